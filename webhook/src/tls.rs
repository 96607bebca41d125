//! TLS for the admission endpoint: certificate files, reloaded when they change.
//!
//! [`CertificateFiles`] reads a PEM certificate chain and key into a rustls `CertifiedKey`
//! held in an [`ArcSwap`]; [`CertificateFiles::watch`] polls the files and swaps in a new key
//! when their contents change. Each handshake reads the current key, so connections in flight
//! keep the old one and new ones get the new one: no restart, no failed requests. A half-written
//! or broken pair is logged and ignored until it is whole.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

/// Why a certificate pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("no private key in {0}")]
    NoKey(PathBuf),
    #[error("unusable private key in {path}: {source}")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("building the TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// A certificate and key on disk, and the key currently served.
pub struct CertificateFiles {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    loaded_from: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for CertificateFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateFiles")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: cert_path.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Read {
            path: key_path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(key_path.to_owned()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|source| {
        TlsError::BadKey {
            path: key_path.to_owned(),
            source,
        }
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|source| TlsError::BadKey {
        path: key_path.to_owned(),
        source,
    })?;
    Ok(certified)
}

impl CertificateFiles {
    /// Loads the pair; fails if it is not usable now.
    pub fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<Self>, TlsError> {
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        let key = certified_key(&cert_path, &cert_pem, &key_path, &key_pem)?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            current: ArcSwap::from_pointee(key),
            loaded_from: std::sync::Mutex::new((cert_pem, key_pem)),
        }))
    }

    /// Reloads the pair if the files changed. Returns whether a new key is now served.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = (read(&self.cert_path)?, read(&self.key_path)?);
        let mut loaded = self
            .loaded_from
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let key = certified_key(&self.cert_path, &cert_pem, &self.key_path, &key_pem)?;
        self.current.store(Arc::new(key));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// Polls the files every `interval` until the task is dropped.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.reload()).await {
                Ok(Ok(true)) => {
                    info!(cert = %self.cert_path.display(), "Serving certificate reloaded")
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    warn!(%error, "Serving certificate not reloaded; keeping the current one")
                }
                Err(error) => warn!(%error, "Certificate reload task failed"),
            }
        }
    }

    /// A rustls server configuration (TLS 1.2 and 1.3, ALPN h2 and http/1.1) that always serves
    /// the current key.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
