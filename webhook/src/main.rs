use clap::Parser;
use tensor_fusion_webhook::{Options, run, telemetry};

/// mimalloc instead of glibc malloc: the admission path allocates many small JSON values per
/// review, and glibc's free-list upkeep was a quarter of the server's CPU time under load
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
