//! A light HTTPS load generator for the webhook benchmarks (docs/benchmarks.md): keep-alive
//! HTTP/1.1 connections over TLS (what the API server opens towards admission webhooks), each
//! sending the same AdmissionReview, either as fast as the server answers (`--rate 0`) or on a
//! fixed open-loop schedule (`--rate R` reviews/s in all).
//!
//! cargo run --release -p tensor-fusion-webhook --example load -- \
//!     --url https://127.0.0.1:18443/mutate-v1-pod --ca DIR/ca.crt --body review.json \
//!     --connections 64 --rate 2000 --seconds 10
//!
//! It prints one JSON object: requests, non-200 answers, achieved rate, latency percentiles in
//! milliseconds and the CPU time the generator itself used, so a run shows how much of the
//! machine the client took from the server.
//!
//! Latency at a fixed rate: connection `k` of `C` owns the requests due at
//! `start + (k + j*C) / rate`. A request whose connection is still busy with the previous one
//! when it falls due waits, and that wait counts (the server's backlog is its latency: no
//! coordinated omission). A request whose connection was idle is sent when the client's timer
//! fires, and its latency counts from the send: the timer's own lateness (tokio's timer has
//! millisecond ticks) is the client's, not the server's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
struct Args {
    /// `https://HOST:PORT/PATH` of the admission endpoint.
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// The AdmissionReview JSON to send.
    #[arg(long)]
    body: PathBuf,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Reviews per second over all connections; 0 sends as fast as answers come.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Runtime worker threads (1: a current-thread runtime, the lightest client).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Target {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("https://")
        .with_context(|| format!("--url {url:?} does not start with https://"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = authority
        .rsplit_once(':')
        .with_context(|| format!("--url {url:?} has no port"))?;
    Ok(Target {
        host: host.to_owned(),
        port: port
            .parse()
            .with_context(|| format!("--url {url:?}: port {port:?} is not a number"))?,
        path: if path.is_empty() { "/" } else { path }.to_owned(),
    })
}

/// What one connection saw.
struct Outcome {
    latencies: Histogram<u64>,
    ok: u64,
    failed: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(
    target: &Target,
    connector: &TlsConnector,
    name: &ServerName<'static>,
) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("connecting to {}:{}", target.host, target.port))?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(name.clone(), tcp)
        .await
        .context("TLS handshake")?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends one review and reads the whole answer; whether it was a 200.
async fn review(sender: &mut Sender, request: Request<Full<Bytes>>) -> bool {
    if sender.ready().await.is_err() {
        return false;
    }
    match sender.send_request(request).await {
        Ok(response) => {
            let ok = response.status() == hyper::StatusCode::OK;
            ok && response.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

struct Plan {
    target: Target,
    body: Bytes,
    connections: usize,
    /// Time between two requests of one connection; `None`: closed loop.
    interval: Option<Duration>,
    run: Duration,
}

impl Plan {
    fn request(&self) -> Request<Full<Bytes>> {
        Request::post(self.target.path.as_str())
            .header(hyper::header::HOST, self.target.host.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(self.body.clone()))
            .expect("method, path and headers are valid (checked when the URL was parsed)")
    }
}

async fn drive(
    plan: Arc<Plan>,
    connection: usize,
    mut sender: Sender,
    start: Instant,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        latencies: Histogram::new_with_bounds(1_000, 60_000_000_000, 3)?,
        ok: 0,
        failed: 0,
    };
    let end = start + plan.run;
    let first = match plan.interval {
        Some(interval) => interval.mul_f64(connection as f64 / plan.connections as f64),
        None => Duration::ZERO,
    };
    let mut due = start + first;
    while due < end {
        let began = if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
            Instant::now()
        } else {
            // Closed loop, or the previous answer came after this one fell due: the wait counts.
            due.min(Instant::now())
        };
        let ok = review(&mut sender, plan.request()).await;
        let done = Instant::now();
        if ok {
            outcome.ok += 1;
            outcome
                .latencies
                .saturating_record(done.duration_since(began).as_nanos() as u64);
        } else {
            outcome.failed += 1;
        }
        due = match plan.interval {
            Some(interval) => due + interval,
            None => done,
        };
    }
    Ok(outcome)
}

fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    let target = parse_url(&args.url)?;
    if args.connections == 0 {
        bail!("--connections 0: at least one connection is needed");
    }
    let body = Bytes::from(
        std::fs::read(&args.body).with_context(|| format!("reading {}", args.body.display()))?,
    );
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&args.ca).with_context(|| format!("reading {}", args.ca.display()))?;
    for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(certificate?)?;
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(tls));
    let name = ServerName::try_from(target.host.clone())?;

    let mut senders = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        senders.push(connect(&target, &connector, &name).await?);
    }
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.connections as f64 / args.rate));
    let plan = Arc::new(Plan {
        target,
        body,
        connections: args.connections,
        interval,
        run: Duration::from_secs_f64(args.seconds),
    });

    let cpu_before = cpu_seconds();
    let start = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(connection, sender)| {
            tokio::spawn(drive(Arc::clone(&plan), connection, sender, start))
        })
        .collect();
    let mut latencies = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let (mut ok, mut failed) = (0, 0);
    for task in tasks {
        let outcome = task.await??;
        latencies.add(&outcome.latencies)?;
        ok += outcome.ok;
        failed += outcome.failed;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let client_cpu = cpu_seconds() - cpu_before;
    let ms = |quantile: f64| latencies.value_at_quantile(quantile) as f64 / 1e6;
    Ok(serde_json::json!({
        "connections": args.connections,
        "rate_asked": args.rate,
        "seconds": elapsed,
        "ok": ok,
        "failed": failed,
        "rate": (ok + failed) as f64 / elapsed,
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": latencies.max() as f64 / 1e6,
        "client_cpu_seconds": client_cpu,
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let summary = runtime.block_on(run(args))?;
    println!("{summary}");
    Ok(())
}
