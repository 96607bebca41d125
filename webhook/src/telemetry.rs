//! Logging and metrics set-up shared by the binaries.
//!
//! Logs go to stderr through `tracing`, filtered by `TF_LOG_LEVEL` (an `EnvFilter` directive,
//! default `info`), as JSON lines when `TF_LOG_FORMAT=json`. Metrics go to one process-wide
//! Prometheus recorder whose text the ops endpoint renders.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the global log subscriber and returns the guard that flushes its writer; keep it
/// until the process ends. Safe to call more than once (later calls install nothing).
///
/// Lines go to stderr from a background thread: an admission never waits for a slow log pipe
/// (a container runtime that reads stderr late, a full disk). If more than 128,000 lines wait,
/// newer ones are dropped rather than blocking admissions.
pub fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("tf-log-writer")
        .finish(std::io::stderr());
    let filter = EnvFilter::try_from_env("TF_LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("TF_LOG_FORMAT").is_ok_and(|format| format == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    guard
}

/// The process-wide metrics recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    &[
                        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
                        0.05, 0.1, 0.25, 0.5, 1.0,
                    ],
                )
                .expect("the bucket list above is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); then ours renders nothing
            // recorded elsewhere, which only affects that test process.
            let _ = metrics::set_global_recorder(recorder);
            describe_webhook_metrics();
            handle
        })
        .clone()
}

/// Describes the webhook's metrics and starts every series at zero, so dashboards and alerts
/// see 0 rather than no data before the first event.
fn describe_webhook_metrics() {
    metrics::describe_counter!(
        "tensor_fusion_webhook_admissions_total",
        "Pod admission reviews answered, by decision"
    );
    metrics::describe_histogram!(
        "tensor_fusion_webhook_admission_duration_seconds",
        metrics::Unit::Seconds,
        "Time to decide one admission review"
    );
    metrics::describe_counter!(
        "tensor_fusion_webhook_malformed_reviews_total",
        "Request bodies that were not an AdmissionReview (answered with HTTP 400)"
    );
    for decision in ["shared", "native", "native-guarded", "denied", "skipped"] {
        metrics::counter!("tensor_fusion_webhook_admissions_total", "decision" => decision)
            .increment(0);
    }
    metrics::counter!("tensor_fusion_webhook_malformed_reviews_total").increment(0);
}
