//! `tensor-fusion-certs`: the webhook's CA and serving certificate, in files (`generate`,
//! `renew`) or in the cluster (`sync`, `remove`: a Secret plus the CA bundle of the webhook
//! configurations; this is what the Helm chart's certificate Job runs).

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tensor_fusion_certs::cluster::{self, SyncOptions};
use tensor_fusion_certs::material::{self, Wanted};
use tensor_fusion_certs::{CertificateAuthority, PemPair};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "CA and serving certificates for the TensorFusion webhook"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a new CA (ca.crt, ca.key) and a serving certificate (tls.crt, tls.key).
    Generate {
        #[command(flatten)]
        serving: Serving,
    },
    /// Issue a new serving certificate (tls.crt, tls.key) from the CA already in --out-dir.
    Renew {
        #[command(flatten)]
        serving: Serving,
    },
    /// Make sure the Secret holds a valid CA and serving certificate (renewing what expires
    /// within the renew-before windows) and the webhook configurations trust the CA. A run that
    /// finds valid material changes nothing.
    Sync(Box<SyncArgs>),
    /// Delete the Secret (what `helm uninstall` runs; the webhook configurations are the
    /// chart's).
    Remove {
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(clap::Args)]
struct SecretArgs {
    /// Namespace of the Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tensor-fusion-sys")]
    namespace: String,
    /// Name of the Secret.
    #[arg(long, default_value = "tensor-fusion-webhook-tls")]
    secret: String,
}

#[derive(clap::Args)]
struct SyncArgs {
    #[command(flatten)]
    secret: SecretArgs,
    /// MutatingWebhookConfiguration that gets the CA bundle (repeatable).
    #[arg(long = "webhook-configuration")]
    webhook_configurations: Vec<String>,
    /// Skip webhook configurations that do not exist yet instead of failing (pre-install).
    #[arg(long)]
    ignore_missing_webhook_configurations: bool,
    /// Service the webhook is reached through: adds NAME, NAME.NAMESPACE, NAME.NAMESPACE.svc
    /// and NAME.NAMESPACE.svc.CLUSTER_DOMAIN to the DNS names.
    #[arg(long)]
    service: Option<String>,
    /// Cluster DNS domain for --service.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// More DNS subject alternative names.
    #[arg(long = "dns")]
    dns_names: Vec<String>,
    /// IP subject alternative names (127.0.0.1 for a webhook run outside the cluster).
    #[arg(long = "ip")]
    ip_addresses: Vec<IpAddr>,
    /// Validity of the serving certificate (s, m, h or d).
    #[arg(long, default_value = "8760h", value_parser = duration)]
    validity: Duration,
    /// Renew the serving certificate when it expires within this window.
    #[arg(long, default_value = "720h", value_parser = duration)]
    renew_before: Duration,
    /// Validity of the CA.
    #[arg(long, default_value = "87600h", value_parser = duration)]
    ca_validity: Duration,
    /// Replace the CA (and the serving certificate) when it expires within this window.
    #[arg(long, default_value = "2160h", value_parser = duration)]
    ca_renew_before: Duration,
}

fn duration(text: &str) -> Result<Duration, String> {
    material::parse_duration(text).map_err(|error| error.to_string())
}

#[derive(clap::Args)]
struct Serving {
    /// Directory the PEM files are written to.
    #[arg(long)]
    out_dir: PathBuf,
    /// DNS subject alternative names of the serving certificate.
    #[arg(long = "dns")]
    dns_names: Vec<String>,
    /// IP subject alternative names of the serving certificate.
    #[arg(long = "ip")]
    ip_addresses: Vec<IpAddr>,
    /// Validity of the serving certificate, in seconds.
    #[arg(long, default_value_t = 365 * 86_400)]
    validity_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Generate { serving } => {
            let ca = CertificateAuthority::generate(
                "tensor-fusion-webhook-ca",
                Duration::from_secs(10 * 365 * 86_400),
            )?;
            fs::create_dir_all(&serving.out_dir)
                .with_context(|| format!("creating {}", serving.out_dir.display()))?;
            write_pair(&serving.out_dir, "ca", ca.pem())?;
            issue(&ca, &serving)
        }
        Command::Renew { serving } => {
            let read = |name: &str| {
                let path = serving.out_dir.join(name);
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
            };
            let ca = CertificateAuthority::from_pem(PemPair {
                cert_pem: read("ca.crt")?,
                key_pem: read("ca.key")?,
            })?;
            issue(&ca, &serving)
        }
        Command::Sync(args) => in_cluster(sync(*args)),
        Command::Remove { secret } => in_cluster(async move {
            let client = client().await?;
            let existed = cluster::remove(client, &secret.namespace, &secret.secret).await?;
            info!(namespace = %secret.namespace, secret = %secret.secret, existed, "Secret removed");
            Ok(())
        }),
    }
}

fn in_cluster(work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was already installed"))?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(work)
}

async fn client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API server")
}

async fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let namespace = args.secret.namespace;
    let mut dns_names = Vec::new();
    if let Some(service) = &args.service {
        dns_names.push(service.clone());
        dns_names.push(format!("{service}.{namespace}"));
        dns_names.push(format!("{service}.{namespace}.svc"));
        dns_names.push(format!("{service}.{namespace}.svc.{}", args.cluster_domain));
    }
    dns_names.extend(args.dns_names);
    let options = SyncOptions {
        namespace,
        secret_name: args.secret.secret,
        webhook_configurations: args.webhook_configurations,
        ignore_missing_webhook_configurations: args.ignore_missing_webhook_configurations,
        wanted: Wanted {
            dns_names,
            ip_addresses: args.ip_addresses,
            serving_validity: args.validity,
            ca_validity: args.ca_validity,
            renew_before: args.renew_before,
            ca_renew_before: args.ca_renew_before,
        },
    };
    let report = cluster::sync(client().await?, &options).await?;
    info!(
        verdict = %report.verdict,
        secret_written = report.secret_written,
        patched = ?report.patched,
        missing = ?report.missing,
        "Certificates in sync"
    );
    Ok(())
}

/// Logs to stderr, filtered by `TF_LOG_LEVEL` (default `info`), JSON with `TF_LOG_FORMAT=json`.
fn init_logging() {
    let filter = EnvFilter::try_from_env("TF_LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("TF_LOG_FORMAT").is_ok_and(|format| format == "json") {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn issue(ca: &CertificateAuthority, serving: &Serving) -> anyhow::Result<()> {
    let pair = ca.issue_serving(
        &serving.dns_names,
        &serving.ip_addresses,
        Duration::from_secs(serving.validity_seconds),
    )?;
    write_pair(&serving.out_dir, "tls", &pair)
}

/// Writes `<stem>.crt` and `<stem>.key`, each through a temporary file and a rename, key first,
/// so a reader that polls the certificate never sees a certificate without its key.
fn write_pair(dir: &Path, stem: &str, pair: &PemPair) -> anyhow::Result<()> {
    for (ext, contents) in [("key", &pair.key_pem), ("crt", &pair.cert_pem)] {
        let path = dir.join(format!("{stem}.{ext}"));
        let tmp = dir.join(format!(".{stem}.{ext}.tmp"));
        fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    }
    Ok(())
}
