//! The webhook's TLS material as a whole, and the decision whether it must be renewed.
//!
//! [`Material`] is what the Secret holds: the CA, the serving certificate it signed, and the CA
//! bundle the API server trusts (the current CA, plus a retired one while it is still valid, so
//! a CA rotation never leaves a webhook replica with a certificate the API server rejects).
//! [`assess`] reads existing material against what is [`Wanted`] at a given time and says what
//! to do; [`renew`] does it. Both are plain functions over PEM text: the Kubernetes side lives in
//! `cluster`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::{CertError, CertificateAuthority, PemPair};

/// Common name of every CA this crate makes.
pub const CA_COMMON_NAME: &str = "tensor-fusion-webhook-ca";

/// The certificates the webhook needs, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub ca: PemPair,
    pub serving: PemPair,
    /// PEM certificates the API server trusts: the current CA first.
    pub ca_bundle: String,
}

/// What valid material looks like.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub serving_validity: Duration,
    pub ca_validity: Duration,
    /// A serving certificate that expires within this window is renewed.
    pub renew_before: Duration,
    /// A CA that expires within this window is replaced (and the serving certificate with it).
    pub ca_renew_before: Duration,
}

impl Wanted {
    /// Rejects windows that would renew on every run.
    pub fn validate(&self) -> Result<(), CertError> {
        for (what, window, validity) in [
            ("renew-before", self.renew_before, self.serving_validity),
            ("ca-renew-before", self.ca_renew_before, self.ca_validity),
        ] {
            if window >= validity {
                return Err(CertError::Window {
                    what,
                    window,
                    validity,
                });
            }
        }
        if self.dns_names.is_empty() && self.ip_addresses.is_empty() {
            return Err(CertError::NoNames);
        }
        Ok(())
    }
}

/// What [`assess`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid for the wanted names beyond both renewal windows: nothing to do.
    Valid,
    /// The CA is fine; only the serving certificate must be issued again.
    NewServing(String),
    /// A new CA and a new serving certificate are needed.
    NewCa(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Valid => f.write_str("valid"),
            Verdict::NewServing(why) => write!(f, "new serving certificate: {why}"),
            Verdict::NewCa(why) => write!(f, "new CA: {why}"),
        }
    }
}

/// Decides whether `existing` material is still good for `wanted` at `now`.
pub fn assess(existing: Option<&Material>, wanted: &Wanted, now: OffsetDateTime) -> Verdict {
    let Some(existing) = existing else {
        return Verdict::NewCa("no certificates stored yet".to_owned());
    };

    let ca_pem = match parse_one(&existing.ca.cert_pem) {
        Ok(pem) => pem,
        Err(why) => return Verdict::NewCa(format!("unreadable CA certificate: {why}")),
    };
    let Ok(ca) = ca_pem.parse_x509() else {
        return Verdict::NewCa("unreadable CA certificate".to_owned());
    };
    if !key_matches(&existing.ca.key_pem, &ca) {
        return Verdict::NewCa("CA key does not match the CA certificate".to_owned());
    }
    let ca_expiry = not_after(&ca);
    if ca_expiry - now < as_time(wanted.ca_renew_before) {
        return Verdict::NewCa(format!("CA expires at {ca_expiry}"));
    }
    if !existing.ca_bundle.contains(existing.ca.cert_pem.trim()) {
        return Verdict::NewCa("CA bundle does not contain the CA".to_owned());
    }

    let serving_pem = match parse_one(&existing.serving.cert_pem) {
        Ok(pem) => pem,
        Err(why) => return Verdict::NewServing(format!("unreadable serving certificate: {why}")),
    };
    let Ok(serving) = serving_pem.parse_x509() else {
        return Verdict::NewServing("unreadable serving certificate".to_owned());
    };
    if !key_matches(&existing.serving.key_pem, &serving) {
        return Verdict::NewServing("serving key does not match its certificate".to_owned());
    }
    if serving.verify_signature(Some(ca.public_key())).is_err() {
        return Verdict::NewServing("serving certificate is not signed by the CA".to_owned());
    }
    let serving_expiry = not_after(&serving);
    if serving_expiry - now < as_time(wanted.renew_before) {
        return Verdict::NewServing(format!("serving certificate expires at {serving_expiry}"));
    }
    let names = san_names(&serving);
    let wanted_names: BTreeSet<String> = wanted
        .dns_names
        .iter()
        .cloned()
        .chain(wanted.ip_addresses.iter().map(IpAddr::to_string))
        .collect();
    if names != wanted_names {
        return Verdict::NewServing(format!(
            "names differ: has {names:?}, wants {wanted_names:?}"
        ));
    }
    Verdict::Valid
}

/// Makes the material the verdict asks for. `Valid` returns `existing` unchanged.
pub fn renew(
    existing: Option<&Material>,
    verdict: &Verdict,
    wanted: &Wanted,
    now: OffsetDateTime,
) -> Result<Material, CertError> {
    let ca = match (verdict, existing) {
        (Verdict::Valid, Some(existing)) => return Ok(existing.clone()),
        (Verdict::NewServing(_), Some(existing)) => {
            CertificateAuthority::from_pem(existing.ca.clone())?
        }
        _ => CertificateAuthority::generate(CA_COMMON_NAME, wanted.ca_validity)?,
    };
    let serving = ca.issue_serving(
        &wanted.dns_names,
        &wanted.ip_addresses,
        wanted.serving_validity,
    )?;

    // The bundle keeps every earlier CA that is still valid, so replicas that still serve a
    // certificate from the old CA keep working until they load the new one.
    let mut ca_bundle = ca.pem().cert_pem.trim().to_owned();
    ca_bundle.push('\n');
    let earlier = existing.map_or("", |existing| existing.ca_bundle.as_str());
    for pem in split_pem(earlier) {
        if pem == ca.pem().cert_pem.trim() || !still_valid(&pem, now) {
            continue;
        }
        ca_bundle.push_str(&pem);
        ca_bundle.push('\n');
    }
    Ok(Material {
        ca: ca.pem().clone(),
        serving,
        ca_bundle,
    })
}

/// The bundle without certificates that expired before `now` (unreadable ones are dropped too).
pub fn prune_bundle(bundle: &str, now: OffsetDateTime) -> String {
    split_pem(bundle)
        .into_iter()
        .filter(|pem| still_valid(pem, now))
        .map(|pem| pem + "\n")
        .collect()
}

/// When the first certificate in `pem` expires.
pub fn expiry(pem: &str) -> Result<OffsetDateTime, CertError> {
    let parsed = parse_one(pem).map_err(CertError::Parse)?;
    let cert = parsed
        .parse_x509()
        .map_err(|error| CertError::Parse(error.to_string()))?;
    Ok(not_after(&cert))
}

fn parse_one(pem: &str) -> Result<Pem, String> {
    Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .ok_or_else(|| "no PEM block".to_owned())?
        .map_err(|error| error.to_string())
}

fn split_pem(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .map(str::trim)
        .filter(|block| block.ends_with(END) && block.contains("-----BEGIN CERTIFICATE-----"))
        .map(str::to_owned)
        .collect()
}

fn still_valid(pem: &str, now: OffsetDateTime) -> bool {
    expiry(pem).is_ok_and(|expires| expires > now)
}

fn not_after(cert: &X509Certificate<'_>) -> OffsetDateTime {
    cert.validity().not_after.to_datetime()
}

fn key_matches(key_pem: &str, cert: &X509Certificate<'_>) -> bool {
    use rcgen::PublicKeyData;
    rcgen::KeyPair::from_pem(key_pem)
        .is_ok_and(|key| key.subject_public_key_info() == cert.public_key().raw)
}

fn san_names(cert: &X509Certificate<'_>) -> BTreeSet<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return BTreeSet::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => ip_of(bytes).map(|ip| ip.to_string()),
            _ => None,
        })
        .collect()
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        _ => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
    }
}

fn as_time(duration: Duration) -> time::Duration {
    time::Duration::try_from(duration).unwrap_or(time::Duration::MAX)
}

/// Parses `90s`, `30m`, `720h`, `365d` (or plain seconds) into a duration.
pub fn parse_duration(text: &str) -> Result<Duration, CertError> {
    let invalid = || CertError::Duration(text.to_owned());
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(split) => text.split_at(split),
        None => (text, "s"),
    };
    let count: u64 = digits.parse().map_err(|_| invalid())?;
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(invalid()),
    };
    count
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3_600);

    fn wanted() -> Wanted {
        Wanted {
            dns_names: vec![
                "tf-webhook.tensor-fusion.svc".to_owned(),
                "tf-webhook.tensor-fusion.svc.cluster.local".to_owned(),
            ],
            ip_addresses: vec!["127.0.0.1".parse().unwrap()],
            serving_validity: 24 * HOUR,
            ca_validity: 240 * HOUR,
            renew_before: 2 * HOUR,
            ca_renew_before: 48 * HOUR,
        }
    }

    fn fresh(wanted: &Wanted, now: OffsetDateTime) -> Material {
        let verdict = assess(None, wanted, now);
        renew(None, &verdict, wanted, now).unwrap()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn nothing_stored_asks_for_a_new_ca() {
        assert_eq!(
            assess(None, &wanted(), now()),
            Verdict::NewCa("no certificates stored yet".to_owned())
        );
    }

    #[test]
    fn fresh_material_is_valid_and_stays_untouched() {
        let wanted = wanted();
        let material = fresh(&wanted, now());
        assert_eq!(assess(Some(&material), &wanted, now()), Verdict::Valid);
        let again = renew(Some(&material), &Verdict::Valid, &wanted, now()).unwrap();
        assert_eq!(again, material);
        assert_eq!(material.ca_bundle.trim(), material.ca.cert_pem.trim());
    }

    #[test]
    fn a_serving_certificate_inside_the_window_is_renewed_with_the_same_ca() {
        let wanted = wanted();
        let material = fresh(&wanted, now());
        let later = now() + time::Duration::hours(23);
        let verdict = assess(Some(&material), &wanted, later);
        assert!(
            matches!(&verdict, Verdict::NewServing(why) if why.starts_with("serving certificate expires at")),
            "{verdict}"
        );
        let renewed = renew(Some(&material), &verdict, &wanted, later).unwrap();
        assert_eq!(renewed.ca, material.ca);
        assert_eq!(renewed.ca_bundle, material.ca_bundle);
        assert_ne!(renewed.serving, material.serving);
        assert_eq!(assess(Some(&renewed), &wanted, now()), Verdict::Valid);
    }

    #[test]
    fn a_ca_inside_its_window_is_replaced_and_the_old_one_stays_in_the_bundle() {
        let wanted = wanted();
        let material = fresh(&wanted, now());
        let later = now() + time::Duration::hours(200);
        let verdict = assess(Some(&material), &wanted, later);
        assert!(matches!(&verdict, Verdict::NewCa(why) if why.starts_with("CA expires at")));
        let renewed = renew(Some(&material), &verdict, &wanted, now()).unwrap();
        assert_ne!(renewed.ca, material.ca);
        let bundle = split_pem(&renewed.ca_bundle);
        assert_eq!(
            bundle,
            vec![
                renewed.ca.cert_pem.trim().to_owned(),
                material.ca.cert_pem.trim().to_owned()
            ]
        );
        // Once the old CA has expired, the next rotation drops it.
        let much_later = now() + time::Duration::hours(300);
        assert_eq!(prune_bundle(&renewed.ca_bundle, much_later), "");
    }

    #[test]
    fn changed_names_ask_for_a_new_serving_certificate() {
        let mut wanted = wanted();
        let material = fresh(&wanted, now());
        wanted.dns_names.push("extra.example".to_owned());
        assert!(matches!(
            assess(Some(&material), &wanted, now()),
            Verdict::NewServing(why) if why.starts_with("names differ")
        ));
    }

    #[test]
    fn a_serving_certificate_from_another_ca_is_replaced() {
        let wanted = wanted();
        let material = fresh(&wanted, now());
        let other = fresh(&wanted, now());
        let mixed = Material {
            serving: other.serving,
            ..material
        };
        assert_eq!(
            assess(Some(&mixed), &wanted, now()),
            Verdict::NewServing("serving certificate is not signed by the CA".to_owned())
        );
    }

    #[test]
    fn garbage_is_replaced_by_a_new_ca() {
        let wanted = wanted();
        let mut material = fresh(&wanted, now());
        material.ca.cert_pem = "not a certificate".to_owned();
        assert!(matches!(
            assess(Some(&material), &wanted, now()),
            Verdict::NewCa(why) if why.starts_with("unreadable CA certificate")
        ));
    }

    #[test]
    fn windows_as_long_as_the_validity_are_rejected() {
        let mut wanted = wanted();
        wanted.renew_before = wanted.serving_validity;
        assert_eq!(
            wanted.validate().unwrap_err().to_string(),
            "invalid renew-before window 86400s: must be shorter than the validity 86400s"
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1_800));
        assert_eq!(parse_duration("720h").unwrap(), 720 * HOUR);
        assert_eq!(parse_duration("365d").unwrap(), 8_760 * HOUR);
        assert_eq!(
            parse_duration("3w").unwrap_err().to_string(),
            "invalid duration \"3w\": use a number with s, m, h or d"
        );
    }
}
