//! A TLS-terminating round-robin balancer: each HTTP request goes to the next backend, so two
//! webhook processes behind one URL both serve a burst (a connection-level balancer would send
//! the API server's single HTTP/2 connection to one of them).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Serves on `port` with the certificate in `cert_dir` and forwards to `backends` (ports of
/// webhook processes on 127.0.0.1 that trust-chain to `ca_pem`). Runs until the task is dropped.
pub async fn run(
    port: u16,
    cert_dir: &std::path::Path,
    ca_pem: &str,
    backends: Vec<u16>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let cert_pem = std::fs::read(cert_dir.join("tls.crt"))?;
    let key_pem = std::fs::read(cert_dir.join("tls.key"))?;
    let chain = rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])?.context("no key")?;
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(server));

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let client_tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls)
        .https_only()
        .enable_http1()
        .build();
    let client: HttpsClient = Client::builder(TokioExecutor::new()).build(connector);

    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let backends = Arc::new(backends);
    Ok(tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, client, next, backends) = (
                acceptor.clone(),
                client.clone(),
                next.clone(),
                backends.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
                    forward(client.clone(), backend, request)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }))
}

async fn forward(
    client: HttpsClient,
    backend: u16,
    request: Request<Incoming>,
) -> anyhow::Result<Response<Full<Bytes>>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = Request::builder()
        .method(parts.method)
        .uri(format!("https://127.0.0.1:{backend}{path}"));
    for (name, value) in &parts.headers {
        upstream = upstream.header(name, value);
    }
    let response = client.request(upstream.body(Full::new(body))?).await?;
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(
        parts,
        Full::new(body.collect().await?.to_bytes()),
    ))
}

/// A plain-HTTP GET on 127.0.0.1: (status, body).
pub async fn plain_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
