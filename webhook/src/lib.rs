//! The TensorFusion pod admission webhook.
//!
//! Pods labelled `tensor-fusion.ai/enabled: "true"` arrive as AdmissionReviews. `share` reads
//! their annotations, `canary` decides whether this replica goes on shared GPUs (coordinated
//! through `slots`), `inject` rewrites the containers, and `admission` turns that into the JSON
//! patch. `server` and `tls` carry it over HTTPS; [`run`] wires everything for the binary.

pub mod admission;
pub mod canary;
pub mod fresh;
pub mod inject;
pub mod keys;
pub mod native;
pub mod quantity;
pub mod server;
pub mod share;
pub mod slots;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::admission::Admitter;
use crate::server::ServeConfig;
use crate::slots::{ClaimCache, LeaseSlots};
use crate::tls::CertificateFiles;

/// Command-line options of `tensor-fusion-webhook`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    version,
    about = "TensorFusion mutating admission webhook for GPU-sharing pods"
)]
pub struct Options {
    /// Address of the HTTPS admission endpoint.
    #[arg(long, env = "TF_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP endpoint for /healthz, /readyz and /metrics.
    #[arg(long, env = "TF_WEBHOOK_OPS_LISTEN", default_value = "0.0.0.0:9090")]
    pub ops_listen: SocketAddr,
    /// PEM certificate chain served on the admission endpoint; reloaded when it changes.
    #[arg(
        long,
        env = "TF_WEBHOOK_TLS_CERT",
        default_value = "/etc/tensor-fusion/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(
        long,
        env = "TF_WEBHOOK_TLS_KEY",
        default_value = "/etc/tensor-fusion/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub cert_reload_seconds: f64,
    /// How long a canary claim that no pod carries yet (a pod rejected after admission) holds
    /// its slot, in seconds.
    #[arg(long, default_value_t = slots::DEFAULT_CLAIM_GRACE.as_secs_f64())]
    pub claim_grace_seconds: f64,
    /// `nvidiaOperatorProgressiveMigration`: labelled pods left native (canary quota full,
    /// `enabled-replicas: "0"`) that ask for `nvidia.com/gpu` also get the node anti-affinity
    /// that keeps them off nodes hosting shared workers, as unlabelled native GPU pods do.
    #[arg(long, env = "TF_WEBHOOK_PROGRESSIVE_MIGRATION")]
    pub progressive_migration: bool,
    /// How long requests in flight may take to finish after SIGTERM, in seconds.
    #[arg(long, default_value_t = 20.0)]
    pub shutdown_grace_seconds: f64,
}

/// Runs the webhook until SIGTERM or Ctrl-C.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let metrics = telemetry::metrics_handle();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API server")?;

    let certificates = CertificateFiles::load(options.tls_cert.clone(), options.tls_key.clone())
        .context("loading the serving certificate")?;
    let tls = Arc::new(certificates.server_config()?);
    tokio::spawn(
        certificates
            .clone()
            .watch(Duration::from_secs_f64(options.cert_reload_seconds)),
    );

    let claims = Arc::new(ClaimCache::default());
    let (synced_tx, synced_rx) = watch::channel(false);
    tokio::spawn(claims.clone().run(client.clone(), synced_tx));
    let grace = Duration::from_secs_f64(options.claim_grace_seconds);
    let admitter = Arc::new(
        Admitter::new(LeaseSlots::new(client, claims, grace))
            .keeping_native_gpu_pods_off_shared_nodes(options.progressive_migration),
    );

    let admission = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding {}", options.listen))?;
    let ops = TcpListener::bind(options.ops_listen)
        .await
        .with_context(|| format!("binding {}", options.ops_listen))?;
    info!(admission = %admission.local_addr()?, ops = %ops.local_addr()?, "Webhook listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };
    let ops_task = tokio::spawn(server::serve_plain(
        ops,
        server::ops_router(synced_rx, metrics),
        stopped(),
    ));
    let config = ServeConfig {
        shutdown_grace: Duration::from_secs_f64(options.shutdown_grace_seconds),
        ..ServeConfig::default()
    };
    let admission_task = tokio::spawn(server::serve_tls(
        admission,
        tls,
        server::admission_router(admitter),
        config,
        stopped(),
    ));

    shutdown_signal().await;
    info!("Shutting down");
    stop_tx.send_replace(true);
    admission_task.await?;
    ops_task.await??;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler only fails outside a Tokio runtime");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
