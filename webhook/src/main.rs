use clap::Parser;
use tensor_fusion_webhook::{Options, run, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    // Flushes buffered log lines when `main` returns.
    let _log_flush = telemetry::init_logging();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was already installed"))?;
    run(options).await
}
