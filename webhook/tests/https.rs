//! The webhook over real TLS on loopback: HTTP/1.1 and HTTP/2, 400 for garbage, the ops
//! endpoint, and a certificate rotation while requests flow.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tensor_fusion_certs::CertificateAuthority;
use tensor_fusion_webhook::admission::Admitter;
use tensor_fusion_webhook::server::{self, ServeConfig};
use tensor_fusion_webhook::slots::MemorySlots;
use tensor_fusion_webhook::telemetry;
use tensor_fusion_webhook::tls::CertificateFiles;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const FIXTURE: &str = include_str!("fixtures/canary-pod-review.json");
const DAY: Duration = Duration::from_secs(86_400);
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(300);

struct Webhook {
    admission: SocketAddr,
    ops: SocketAddr,
    ca_pem: String,
    files: Arc<CertificateFiles>,
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
    ready: watch::Sender<bool>,
    stop: watch::Sender<bool>,
}

/// Writes a new serving pair and returns its certificate (DER).
fn write_serving(ca: &CertificateAuthority, dir: &Path) -> Vec<u8> {
    let pair = ca
        .issue_serving(
            &["localhost".to_owned()],
            &["127.0.0.1".parse().unwrap()],
            DAY,
        )
        .unwrap();
    // Key first, then certificate, each replaced atomically, as tensor-fusion-certs does.
    for (name, text) in [("tls.key", &pair.key_pem), ("tls.crt", &pair.cert_pem)] {
        let tmp = dir.join(format!(".{name}"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    rustls_pemfile::certs(&mut pair.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

async fn start() -> Webhook {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = CertificateAuthority::generate("test-ca", DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_serving(&ca, dir.path());
    let files =
        CertificateFiles::load(dir.path().join("tls.crt"), dir.path().join("tls.key")).unwrap();
    let tls = Arc::new(files.server_config().unwrap());
    tokio::spawn(files.clone().watch(Duration::from_millis(50)));

    let admission = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (admission_addr, ops_addr) = (admission.local_addr().unwrap(), ops.local_addr().unwrap());
    let (ready, ready_rx) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };
    let admitter = Arc::new(Admitter::new(MemorySlots::default()));
    tokio::spawn(server::serve_tls(
        admission,
        tls,
        server::admission_router(admitter),
        ServeConfig {
            header_read_timeout: HEADER_READ_TIMEOUT,
            ..ServeConfig::default()
        },
        stopped(),
    ));
    tokio::spawn(server::serve_plain(
        ops,
        server::ops_router(ready_rx, telemetry::metrics_handle()),
        stopped(),
    ));
    Webhook {
        admission: admission_addr,
        ops: ops_addr,
        ca_pem: ca.pem().cert_pem.clone(),
        files,
        dir,
        ca,
        ready,
        stop,
    }
}

fn client_config(ca_pem: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let der: CertificateDer<'static> = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    roots.add(der).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// One TLS connection speaking HTTP/1.1 or HTTP/2; returns a sender for requests.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(addr: SocketAddr, ca_pem: &str, h2: bool) -> Conn {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem, alpn));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    assert_eq!(
        negotiated.as_deref(),
        Some(alpn),
        "ALPN negotiates {alpn:?}"
    );
    let io = TokioIo::new(tls);
    if h2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(connection);
        Conn::H2(sender)
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        Conn::H1(sender)
    }
}

impl Conn {
    async fn post(&mut self, body: &'static str) -> (u16, String) {
        let request = Request::post("https://127.0.0.1/mutate-v1-pod")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let response = match self {
            Conn::H1(sender) => sender.send_request(request).await.unwrap(),
            Conn::H2(sender) => sender.send_request(request).await.unwrap(),
        };
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

async fn get_plain(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn reviews_over_http1_and_http2() {
    let webhook = start().await;
    for h2 in [false, true] {
        let mut conn = connect(webhook.admission, &webhook.ca_pem, h2).await;
        let (status, body) = conn.post(FIXTURE).await;
        assert_eq!(status, 200);
        assert!(body.contains("\"allowed\":true"), "{body}");
        assert!(body.contains("\"patchType\":\"JSONPatch\""), "{body}");
        let (status, body) = conn.post("{\"kind\":").await;
        assert_eq!(status, 400);
        assert!(body.starts_with("malformed AdmissionReview"), "{body}");
    }
    webhook.stop.send_replace(true);
}

#[tokio::test]
async fn ops_endpoint_reports_health_readiness_and_metrics() {
    let webhook = start().await;
    assert_eq!(
        get_plain(webhook.ops, "/healthz").await,
        (200, "ok".to_owned())
    );
    assert_eq!(get_plain(webhook.ops, "/readyz").await.0, 503);
    webhook.ready.send_replace(true);
    assert_eq!(get_plain(webhook.ops, "/readyz").await.0, 200);

    let mut conn = connect(webhook.admission, &webhook.ca_pem, false).await;
    conn.post(FIXTURE).await;
    let (status, metrics) = get_plain(webhook.ops, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tensor_fusion_webhook_admissions_total{decision=\"shared\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tensor_fusion_webhook_admission_duration_seconds_bucket"));
    webhook.stop.send_replace(true);
}

#[tokio::test]
async fn certificate_rotation_fails_no_request() {
    let webhook = start().await;
    let first_serial = served_certificate(&webhook).await;
    let running = Arc::new(AtomicBool::new(true));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for index in 0..4 {
        let (addr, ca_pem) = (webhook.admission, webhook.ca_pem.clone());
        let (running, done) = (running.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            // Half the clients keep one connection, half open a new one per request, so both
            // old connections and new handshakes run across the swap.
            let mut conn = connect(addr, &ca_pem, index % 2 == 0).await;
            while running.load(Ordering::Relaxed) {
                if index % 2 == 1 {
                    conn = connect(addr, &ca_pem, false).await;
                }
                let (status, _) = conn.post(FIXTURE).await;
                assert_eq!(status, 200);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut last = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        last = write_serving(&webhook.ca, webhook.dir.path());
    }
    // Wait until the watcher has picked the last pair up.
    let mut rotated = false;
    for _ in 0..250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if served_certificate(&webhook).await == last {
            rotated = true;
            break;
        }
    }
    assert_ne!(first_serial, last);
    running.store(false, Ordering::Relaxed);
    for client in clients {
        client.await.expect("no client saw a failed request");
    }
    assert!(rotated, "the last certificate written is served");
    assert!(done.load(Ordering::Relaxed) > 0);
    assert!(!webhook.files.reload().unwrap(), "nothing left to reload");
    webhook.stop.send_replace(true);
}

/// The DER of the certificate the server presents now.
async fn served_certificate(webhook: &Webhook) -> Vec<u8> {
    let connector = tokio_rustls::TlsConnector::from(client_config(&webhook.ca_pem, b"h2"));
    let tcp = TcpStream::connect(webhook.admission).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_broken_certificate_file_keeps_the_old_one() {
    let webhook = start().await;
    std::fs::write(webhook.dir.path().join("tls.crt"), "not a certificate").unwrap();
    assert!(webhook.files.reload().is_err());
    let mut conn = connect(webhook.admission, &webhook.ca_pem, true).await;
    assert_eq!(conn.post(FIXTURE).await.0, 200);
    webhook.stop.send_replace(true);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let webhook = start().await;
    let connector = tokio_rustls::TlsConnector::from(client_config(&webhook.ca_pem, b"http/1.1"));
    let tcp = TcpStream::connect(webhook.admission).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"POST /mutate-v1-pod HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // The server answers the stalled request with 408 or just closes; either way the read ends
    // well before this test's own limit, which is far above the configured timeout.
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(HEADER_READ_TIMEOUT * 20, tls.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "the connection was closed by the server");
    let text = String::from_utf8_lossy(&buffer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    webhook.stop.send_replace(true);
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let webhook = start().await;
    let connector = tokio_rustls::TlsConnector::from(client_config(&webhook.ca_pem, b"http/1.1"));
    let tcp = TcpStream::connect(webhook.admission).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    // Headers and half the body, then shutdown starts, then the rest of the body.
    let head = format!(
        "POST /mutate-v1-pod HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        FIXTURE.len()
    );
    let (first, rest) = FIXTURE.split_at(FIXTURE.len() / 2);
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(first.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    webhook.stop.send_replace(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(webhook.admission).await.is_err(),
        "no new connections once shutdown starts"
    );
    tls.write_all(rest.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"allowed\":true"), "{response}");
}
