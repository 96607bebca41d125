//! Certificates for the webhook: a self-signed CA and serving certificates it signs.
//!
//! `CertificateAuthority::generate` makes a CA; `CertificateAuthority::issue_serving` signs a
//! serving certificate for the DNS names and IP addresses the API server uses to reach the
//! webhook. Everything is PEM in and out, so the material can go to files or a Secret.
//! `material` decides when stored material must be renewed; `cluster` keeps it in a Secret and
//! publishes the CA bundle into the MutatingWebhookConfigurations.

pub mod cluster;
pub mod material;

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// What can go wrong while making or loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating key pair failed: {0}")]
    KeyGeneration(#[source] rcgen::Error),
    #[error("invalid subject alternative name {name:?}: {source}")]
    InvalidName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("signing certificate failed: {0}")]
    Signing(#[source] rcgen::Error),
    #[error("loading CA from PEM failed: {0}")]
    LoadCa(#[source] rcgen::Error),
    #[error("parsing certificate failed: {0}")]
    Parse(String),
    #[error("invalid duration {0:?}: use a number with s, m, h or d")]
    Duration(String),
    #[error("invalid {what} window {window:?}: must be shorter than the validity {validity:?}")]
    Window {
        what: &'static str,
        window: Duration,
        validity: Duration,
    },
    #[error("no names for the serving certificate: give DNS names or IP addresses")]
    NoNames,
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA that signs serving certificates.
pub struct CertificateAuthority {
    pem: PemPair,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Makes a new self-signed CA, valid from now (minus a minute of clock skew) for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(CertError::KeyGeneration)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity);
        let cert = params.self_signed(&key).map_err(CertError::Signing)?;
        let pem = PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA (certificate and PKCS#8 key, PEM) to sign more certificates with it.
    pub fn from_pem(pem: PemPair) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(&pem.key_pem).map_err(CertError::LoadCa)?;
        let issuer = Issuer::from_ca_cert_pem(&pem.cert_pem, key).map_err(CertError::LoadCa)?;
        Ok(Self { pem, issuer })
    }

    /// The CA certificate and key.
    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    /// Signs a TLS serving certificate for `dns_names` and `ip_addresses`, valid for `validity`.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
        validity: Duration,
    ) -> Result<PemPair, CertError> {
        let key = KeyPair::generate().map_err(CertError::KeyGeneration)?;
        let mut params = CertificateParams::default();
        let common_name = dns_names
            .first()
            .cloned()
            .or_else(|| ip_addresses.first().map(IpAddr::to_string))
            .unwrap_or_else(|| "tensor-fusion-webhook".to_owned());
        params.distinguished_name = distinguished_name(&common_name);
        for name in dns_names {
            let dns = name
                .as_str()
                .try_into()
                .map_err(|source| CertError::InvalidName {
                    name: name.clone(),
                    source,
                })?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params
            .subject_alt_names
            .extend(ip_addresses.iter().copied().map(SanType::IpAddress));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, validity);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CertError::Signing)?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "tensor-fusion");
    name
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + validity;
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn serving_certificate_carries_the_requested_names() {
        let ca = CertificateAuthority::generate("test-ca", DAY).unwrap();
        let pair = ca
            .issue_serving(
                &["webhook.tensor-fusion.svc".to_owned()],
                &["127.0.0.1".parse().unwrap()],
                DAY,
            )
            .unwrap();
        assert!(pair.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        for name in ["webhook.tensor-fusion.svc", "127.0.0.1"] {
            verify(ca.pem(), &pair, name).unwrap();
        }
        assert!(verify(ca.pem(), &pair, "other.example").is_err());
    }

    /// Verifies `pair` as a TLS server certificate for `name`, trusting only `ca`.
    fn verify(ca: &PemPair, pair: &PemPair, name: &str) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let der = |pem: &str| -> CertificateDer<'static> {
            rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .unwrap()
                .unwrap()
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&ca.cert_pem)).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(
                &der(&pair.cert_pem),
                &[],
                &server_name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn a_reloaded_ca_signs_again() {
        let ca = CertificateAuthority::generate("test-ca", DAY).unwrap();
        let again = CertificateAuthority::from_pem(ca.pem().clone()).unwrap();
        again
            .issue_serving(&["a.example".to_owned()], &[], DAY)
            .unwrap();
    }

    #[test]
    fn an_invalid_dns_name_is_named_in_the_error() {
        let ca = CertificateAuthority::generate("test-ca", DAY).unwrap();
        let err = ca
            .issue_serving(&["b\u{e4}d.example".to_owned()], &[], DAY)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid subject alternative name \"b\u{e4}d.example\"")
        );
    }
}
