use clap::Parser;
use tensor_fusion_webhook::{Options, run, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    telemetry::init_logging();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was already installed"))?;
    run(options).await
}
