//! HTTP wiring: the admission endpoint over TLS and the plain ops endpoint.
//!
//! [`admission_router`] serves `POST /mutate-v1-pod`; [`serve_tls`] runs it over rustls with
//! HTTP/1.1 and HTTP/2 (ALPN), a handshake and header-read timeout, and graceful shutdown that
//! lets requests in flight finish. [`ops_router`] serves `/healthz`, `/readyz` and `/metrics` on
//! a separate plain-HTTP port for probes and Prometheus.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admission::Admitter;
use crate::canary::SlotStore;

/// Timeouts of the TLS listener.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's headers (HTTP/1.1).
    pub header_read_timeout: Duration,
    /// Time requests in flight get to finish after shutdown starts.
    pub shutdown_grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// An AdmissionReview may carry a pod of up to the API server's 3 MiB request limit, twice.
const MAX_REVIEW_BYTES: usize = 8 << 20;

pub fn admission_router<S: SlotStore>(admitter: Arc<Admitter<S>>) -> Router {
    Router::new()
        .route("/mutate-v1-pod", post(mutate::<S>))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(admitter)
}

async fn mutate<S: SlotStore>(State(admitter): State<Arc<Admitter<S>>>, body: Bytes) -> Response {
    match admitter.review(&body).await {
        Ok((response, _decision)) => {
            ([(header::CONTENT_TYPE, "application/json")], response).into_response()
        }
        Err(error) => {
            debug!(%error, "Rejected a malformed review");
            metrics::counter!("tensor_fusion_webhook_malformed_reviews_total").increment(1);
            (StatusCode::BAD_REQUEST, error.to_string()).into_response()
        }
    }
}

pub fn ops_router(ready: watch::Receiver<bool>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "pod cache not synced")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then drains.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "Accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let config = config.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(config.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout);
            builder.http2().timer(TokioTimer::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection.into_owned()).await {
                debug!(%peer, %error, "Connection ended with an error");
            }
        });
    }
    drop(listener);
    info!("Draining admission connections");
    if tokio::time::timeout(config.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("Connections still open after the shutdown grace period; closing them");
    }
}

/// Serves `router` over plain HTTP until `shutdown` completes.
pub async fn serve_plain(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
