//! The webhook's certificates in the cluster: one Secret, and the CA bundle of the webhook
//! configurations.
//!
//! [`sync`] reads the Secret, asks `material::assess` whether it is still good, renews what is
//! due, publishes the CA bundle into every named MutatingWebhookConfiguration and only then
//! writes the Secret, so the API server already trusts a new CA before any webhook replica
//! serves a certificate signed by it. A run that finds valid material and current bundles
//! writes nothing. The Secret is `kubernetes.io/tls` (`tls.crt`, `tls.key`) plus `ca.crt`,
//! `ca.key` and `ca-bundle.crt`; the webhook mounts it and reloads the files when they change.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use time::OffsetDateTime;
use tracing::info;

use crate::material::{self, Material, Verdict, Wanted};
use crate::{CertError, PemPair};

pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CA_BUNDLE: &str = "ca-bundle.crt";

/// What can go wrong while keeping the certificates in the cluster.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{action} failed: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("MutatingWebhookConfiguration {0:?} not found")]
    MissingWebhookConfiguration(String),
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// Where the certificates live and what they must be.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub namespace: String,
    pub secret_name: String,
    /// MutatingWebhookConfigurations whose webhooks get the CA bundle.
    pub webhook_configurations: Vec<String>,
    /// Skip webhook configurations that do not exist yet (a pre-install hook runs before the
    /// chart creates them) instead of failing.
    pub ignore_missing_webhook_configurations: bool,
    pub wanted: Wanted,
}

/// What a [`sync`] run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReport {
    pub verdict: Verdict,
    /// Whether the Secret was created or replaced.
    pub secret_written: bool,
    /// Webhook configurations whose CA bundle was updated.
    pub patched: Vec<String>,
    /// Webhook configurations that did not exist (only with `ignore_missing_...`).
    pub missing: Vec<String>,
}

/// Makes sure valid certificates are stored and trusted; see the module documentation.
pub async fn sync(client: Client, options: &SyncOptions) -> Result<SyncReport, SyncError> {
    options.wanted.validate()?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let secret_ref = format!("Secret {}/{}", options.namespace, options.secret_name);
    let existing_secret = secrets
        .get_opt(&options.secret_name)
        .await
        .map_err(|source| api_error(format!("reading {secret_ref}"), source))?;
    let existing = existing_secret.as_ref().and_then(material_of);

    let now = OffsetDateTime::now_utc();
    let verdict = material::assess(existing.as_ref(), &options.wanted, now);
    let mut material = material::renew(existing.as_ref(), &verdict, &options.wanted, now)?;
    let pruned = material::prune_bundle(&material.ca_bundle, now);
    if !pruned.is_empty() {
        material.ca_bundle = pruned;
    }
    info!(secret = %secret_ref, verdict = %verdict, "Certificates assessed");

    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client);
    let mut patched = Vec::new();
    let mut missing = Vec::new();
    for name in &options.webhook_configurations {
        match publish_bundle(&webhooks, name, &material.ca_bundle).await? {
            Some(true) => patched.push(name.clone()),
            Some(false) => {}
            None if options.ignore_missing_webhook_configurations => {
                info!(configuration = %name, "Webhook configuration not there yet, skipped");
                missing.push(name.clone());
            }
            None => return Err(SyncError::MissingWebhookConfiguration(name.clone())),
        }
    }

    let secret_written = existing.as_ref() != Some(&material);
    if secret_written {
        let data = secret_data(&material);
        match existing_secret {
            Some(mut secret) => {
                secret.data = Some(data);
                secret.type_ = Some("kubernetes.io/tls".to_owned());
                secrets
                    .replace(&options.secret_name, &PostParams::default(), &secret)
                    .await
                    .map_err(|source| api_error(format!("replacing {secret_ref}"), source))?;
            }
            None => {
                let secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(options.secret_name.clone()),
                        namespace: Some(options.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "tensor-fusion-certs".to_owned(),
                        )])),
                        ..Default::default()
                    },
                    type_: Some("kubernetes.io/tls".to_owned()),
                    data: Some(data),
                    ..Default::default()
                };
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .map_err(|source| api_error(format!("creating {secret_ref}"), source))?;
            }
        }
        info!(secret = %secret_ref, verdict = %verdict, "Certificates stored");
    }
    Ok(SyncReport {
        verdict,
        secret_written,
        patched,
        missing,
    })
}

/// Deletes the Secret; a Secret that is already gone is fine. Returns whether it existed.
pub async fn remove(client: Client, namespace: &str, secret_name: &str) -> Result<bool, SyncError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    match secrets.delete(secret_name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(api_error(
            format!("deleting Secret {namespace}/{secret_name}"),
            source,
        )),
    }
}

/// Reads material out of a Secret; `None` when any key is missing or not UTF-8.
pub fn material_of(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
    };
    Some(Material {
        ca: PemPair {
            cert_pem: text(CA_CERT)?,
            key_pem: text(CA_KEY)?,
        },
        serving: PemPair {
            cert_pem: text(TLS_CERT)?,
            key_pem: text(TLS_KEY)?,
        },
        ca_bundle: text(CA_BUNDLE)?,
    })
}

/// The Secret's data for `material`.
pub fn secret_data(material: &Material) -> BTreeMap<String, ByteString> {
    [
        (CA_CERT, &material.ca.cert_pem),
        (CA_KEY, &material.ca.key_pem),
        (TLS_CERT, &material.serving.cert_pem),
        (TLS_KEY, &material.serving.key_pem),
        (CA_BUNDLE, &material.ca_bundle),
    ]
    .into_iter()
    .map(|(key, pem)| (key.to_owned(), ByteString(pem.as_bytes().to_vec())))
    .collect()
}

/// Sets `bundle` on every webhook of the configuration. `None`: it does not exist;
/// `Some(changed)` otherwise.
async fn publish_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    bundle: &str,
) -> Result<Option<bool>, SyncError> {
    let what = format!("MutatingWebhookConfiguration {name}");
    let Some(mut configuration) = api
        .get_opt(name)
        .await
        .map_err(|source| api_error(format!("reading {what}"), source))?
    else {
        return Ok(None);
    };
    if !set_bundle(&mut configuration, bundle) {
        return Ok(Some(false));
    }
    api.replace(name, &PostParams::default(), &configuration)
        .await
        .map_err(|source| api_error(format!("updating {what}"), source))?;
    info!(configuration = %name, "CA bundle published");
    Ok(Some(true))
}

/// Sets the CA bundle on every webhook; returns whether anything changed.
pub fn set_bundle(configuration: &mut MutatingWebhookConfiguration, bundle: &str) -> bool {
    let mut changed = false;
    for webhook in configuration.webhooks.iter_mut().flatten() {
        let wanted = Some(ByteString(bundle.as_bytes().to_vec()));
        if webhook.client_config.ca_bundle != wanted {
            webhook.client_config.ca_bundle = wanted;
            changed = true;
        }
    }
    changed
}

fn api_error(action: String, source: kube::Error) -> SyncError {
    SyncError::Api { action, source }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn material() -> Material {
        let wanted = Wanted {
            dns_names: vec!["webhook.tf.svc".to_owned()],
            ip_addresses: vec![],
            serving_validity: Duration::from_secs(3_600),
            ca_validity: Duration::from_secs(36_000),
            renew_before: Duration::from_secs(60),
            ca_renew_before: Duration::from_secs(60),
        };
        let now = OffsetDateTime::now_utc();
        material::renew(None, &material::assess(None, &wanted, now), &wanted, now).unwrap()
    }

    #[test]
    fn a_secret_round_trips_the_material() {
        let material = material();
        let secret = Secret {
            data: Some(secret_data(&material)),
            ..Default::default()
        };
        assert_eq!(material_of(&secret), Some(material));
    }

    #[test]
    fn a_secret_without_the_ca_key_holds_no_material() {
        let mut data = secret_data(&material());
        data.remove(CA_KEY);
        let secret = Secret {
            data: Some(data),
            ..Default::default()
        };
        assert_eq!(material_of(&secret), None);
    }

    #[test]
    fn the_bundle_goes_to_every_webhook_once() {
        let mut configuration: MutatingWebhookConfiguration =
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": "tf" },
                "webhooks": [
                    { "name": "a.tensor-fusion.ai", "clientConfig": { "url": "https://x" },
                      "admissionReviewVersions": ["v1"], "sideEffects": "None" },
                    { "name": "b.tensor-fusion.ai", "clientConfig": { "url": "https://x" },
                      "admissionReviewVersions": ["v1"], "sideEffects": "None" }
                ]
            }))
            .unwrap();
        assert!(set_bundle(&mut configuration, "PEM"));
        for webhook in configuration.webhooks.as_ref().unwrap() {
            assert_eq!(
                webhook.client_config.ca_bundle,
                Some(ByteString(b"PEM".to_vec()))
            );
        }
        assert!(!set_bundle(&mut configuration, "PEM"));
    }
}
