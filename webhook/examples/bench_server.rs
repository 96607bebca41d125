//! The admission endpoint over HTTPS with in-process canary slots and no API server, for load
//! benchmarks of the HTTP and decision path (see docs/benchmarks.md).
//!
//! cargo run --release -p tensor-fusion-webhook --example bench_server -- 127.0.0.1:18443 DIR
//! serves DIR/tls.crt and DIR/tls.key (e.g. from `tensor-fusion-certs generate`).

use std::path::PathBuf;
use std::sync::Arc;

use tensor_fusion_webhook::admission::Admitter;
use tensor_fusion_webhook::server::{self, ServeConfig};
use tensor_fusion_webhook::slots::MemorySlots;
use tensor_fusion_webhook::tls::CertificateFiles;

/// mimalloc instead of glibc malloc: the admission path allocates many small JSON values per
/// review, and glibc's free-list upkeep was a quarter of the server's CPU time under load
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18443".to_owned());
    let dir = PathBuf::from(args.next().unwrap_or_else(|| ".".to_owned()));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let files = CertificateFiles::load(dir.join("tls.crt"), dir.join("tls.key"))?;
    let tls = Arc::new(files.server_config()?);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("bench server on https://{listen}");
    let router = server::admission_router(Arc::new(Admitter::new(MemorySlots::default())));
    server::serve_tls(listener, tls, router, ServeConfig::default(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}
