//! `tensor-fusion-certs`: writes a CA and a webhook serving certificate to files.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tensor_fusion_certs::{CertificateAuthority, PemPair};

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
