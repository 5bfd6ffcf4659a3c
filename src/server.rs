//! The listener: accepts connections, sends each request to the proxy (`/v1/*`), the admin API
//! (`/api/v1/*`), `/metrics` or `/healthz`, and shuts down gracefully.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, Admin};
use crate::config::Config;
use crate::error::ApiError;
use crate::metering::Pricing;
use crate::providers::Router;
use crate::proxy::Proxy;
use crate::recorder::{self, RecorderControl, RecorderSettings};
use crate::response::{self, ResponseBody};
use crate::store::{SledStore, Store};
use crate::telemetry::{Exposition, Metrics, RejectLabels};

pub mod after_write;
mod wakeups;
mod watchdog;
use wakeups::AbsorbSelfWakes;
use watchdog::{Activity, Tracked, Verdict, Watched};

/// Admin request bodies are small JSON documents.
const MAX_ADMIN_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Provider(#[from] crate::providers::BuildError),
    #[error(transparent)]
    Pricing(#[from] crate::metering::PricingError),
    #[error(transparent)]
    Guardrails(#[from] crate::guardrails::GuardrailError),
    #[error("cannot set up TLS on the listener: {0}")]
    Tls(String),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
}

/// Everything a request may need; shared by all connections.
struct App {
    proxy: Proxy,
    admin: Admin,
    metrics: Arc<Metrics>,
    admin_token: Option<String>,
}

/// A started gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Opens the store, starts the recorder, binds the listener and starts serving.
    pub async fn start(config: &Config) -> Result<Gateway, StartError> {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(
            &config.storage.path,
            config.storage.cache_capacity_bytes,
        )?);
        let metrics = Arc::new(Metrics::new());
        let pricing = Pricing::new(&config.pricing)?;
        let router = Router::from_config(config)?;
        let guardrails = config.compiled_guardrails()?;
        let settings = RecorderSettings {
            guardrails: guardrails.clone(),
            ..RecorderSettings::from_config(config)
        };
        let (recorder, control) =
            recorder::spawn(store.clone(), metrics.clone(), pricing, settings)?;
        let listener = TcpListener::bind(&config.server.listen)
            .await
            .map_err(|source| StartError::Listen {
                address: config.server.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            address: config.server.listen.clone(),
            source,
        })?;
        let in_flight_rejections = metrics
            .rejected
            .get_or_create(&RejectLabels {
                reason: "in_flight",
            })
            .clone();
        let app = Arc::new(App {
            proxy: Proxy::new(
                config,
                router,
                guardrails,
                recorder.clone(),
                in_flight_rejections,
            ),
            admin: Admin { store, recorder },
            metrics,
            admin_token: Some(config.server.admin_token.clone()).filter(|t| !t.is_empty()),
        });
        let (stop, stopped) = watch::channel(false);
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        let limits = Limits {
            tls,
            grace: Duration::from_millis(config.server.shutdown_grace_ms),
            max_connections: config.server.max_connections,
            max_header_bytes: config.server.max_header_bytes,
            timeouts: Timeouts {
                head: Duration::from_millis(config.server.header_read_timeout_ms.max(1)),
                idle: Duration::from_millis(config.server.idle_timeout_ms.max(1)),
            },
        };
        let accept_loop = tokio::spawn(serve(listener, app, stopped, limits, control));
        Ok(Gateway {
            addr,
            stop,
            accept_loop,
        })
    }

    /// Stops accepting, lets in-flight calls finish (up to the grace period), stores every
    /// trace and closes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.accept_loop.await;
    }
}

async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    mut stopped: watch::Receiver<bool>,
    limits: Limits,
    recorder: RecorderControl,
) {
    let builder = connection_builder(&limits);
    let refused = app
        .metrics
        .rejected
        .get_or_create(&RejectLabels {
            reason: "connections",
        })
        .clone();
    let grace = limits.grace;
    // Connection tasks, so the ones still running after the grace period can be ended (which
    // records their calls as cancelled) before the recorder stops.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                if connections.len() >= limits.max_connections {
                    refused.inc();
                    tokio::spawn(refuse(stream));
                    continue;
                }
                let (app, builder, stopped) = (app.clone(), builder.clone(), stopped.clone());
                let timeouts = limits.timeouts;
                match limits.tls.clone() {
                    None => {
                        let (io, activity) = timeouts.watch(stream);
                        let connection = drive(builder, io, app, peer, stopped, activity);
                        connections.spawn(AbsorbSelfWakes::new(connection));
                    }
                    Some(acceptor) => {
                        // The handshake runs in the connection's task, bounded like a request head.
                        let handshake_limit = limits.timeouts.head;
                        connections.spawn(AbsorbSelfWakes::new(async move {
                            let stream = match tokio::time::timeout(handshake_limit, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(err)) => return tracing::debug!(%err, %peer, "TLS handshake failed"),
                                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                            };
                            let (io, activity) = timeouts.watch(stream);
                            drive(builder, io, app, peer, stopped, activity).await;
                        }));
                    }
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    // Every connection saw the stop too: each finishes its calls, then closes.
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            calls = connections.len(),
            "in-flight calls did not finish within the grace period; ending them"
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    recorder.shutdown().await;
}

/// Serves one connection until it ends; after a server stop, or idle past
/// `server.idle_timeout_ms`, it finishes what is in flight and closes (hyper's graceful
/// shutdown); a head slower than `server.header_read_timeout_ms` drops it (see `watchdog`). An
/// answer that breaks off needs nothing here: a broken SSE answer still ends well-formed, so its
/// connection stays usable, and a body error makes hyper drop the connection itself.
async fn drive<I>(
    builder: auto::Builder<TokioExecutor>,
    io: I,
    app: Arc<App>,
    peer: SocketAddr,
    mut stopped: watch::Receiver<bool>,
    activity: Arc<Activity>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let watchdog = tokio::time::sleep_until(activity.first_check());
    let calls = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let app = app.clone();
        let call = calls.call();
        async move {
            let response = app.route(request, peer).await;
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, call).boxed()))
        }
    });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection, watchdog);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%err, %peer, "connection ended with an error");
                }
                return;
            }
            _ = stopped.wait_for(|stop| *stop), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = watchdog.as_mut(), if !closing => match activity.verdict(tokio::time::Instant::now()) {
                Verdict::CheckAt(at) => watchdog.as_mut().reset(at),
                Verdict::Idle => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                Verdict::TooSlow => {
                    tracing::debug!(%peer, "request head too slow; connection dropped");
                    return;
                }
            },
        }
    }
}

/// HTTP/1.1 and HTTP/2 (prior knowledge or h2c) on one port, with the head size and head read
/// time (no slowloris) bounded.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Timed by the connection's watchdog instead: hyper's timer also closed idle
        // keep-alive connections.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// What the accept loop enforces.
struct Limits {
    /// TLS on the listener, when configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
    grace: Duration,
    max_connections: usize,
    max_header_bytes: usize,
    timeouts: Timeouts,
}

/// How long a connection may take over a request head, and stay idle between calls.
#[derive(Clone, Copy)]
struct Timeouts {
    head: Duration,
    idle: Duration,
}

impl Timeouts {
    /// `stream` for hyper, its reads and calls watched by the returned activity.
    fn watch<S>(self, stream: S) -> (TokioIo<Watched<S>>, Arc<Activity>) {
        let activity = Activity::new(self.head, self.idle);
        (
            TokioIo::new(Watched::new(stream, activity.clone())),
            activity,
        )
    }
}

/// A rustls acceptor for the listener: the certificate chain and key from PEM files, ALPN offering
/// HTTP/2 then HTTP/1.1.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| StartError::Tls(format!("server.tls_cert {}: {err}", cert.display())))?;
    if chain.is_empty() {
        return Err(StartError::Tls(format!(
            "server.tls_cert {}: no PEM certificate in it",
            cert.display()
        )));
    }
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|err| StartError::Tls(format!("server.tls_key {}: {err}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| StartError::Tls(err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|err| {
            StartError::Tls(format!(
                "{} and {} do not make a usable pair: {err}",
                cert.display(),
                key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Answers a connection over `server.max_connections` with a 503 and closes it, without reading
/// its request: cheap enough to keep doing under overload.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "too_many_connections",
        "flowgate has server.max_connections open connections; retry shortly",
    )
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}

impl App {
    async fn route(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ResponseBody> {
        let path = request.uri().path();
        if path.starts_with("/v1/") || path == "/v1" {
            return self.proxy.handle(request).await;
        }
        if path == "/healthz" {
            return response::text(StatusCode::OK, "ok\n");
        }
        if path == "/metrics" || path.starts_with("/api/") {
            if let Err(err) = self.authorize(&request, peer) {
                return err.into_response();
            }
            if path == "/metrics" {
                return self.metrics_page(&request);
            }
            return self.admin(request).await;
        }
        ApiError::not_found(
            "unknown_path",
            format!("{} {} is not a flowgate endpoint", request.method(), path),
        )
        .into_response()
    }

    /// With a token: the bearer token must match. Without one: loopback clients only.
    fn authorize(&self, request: &Request<Incoming>, peer: SocketAddr) -> Result<(), ApiError> {
        let Some(token) = &self.admin_token else {
            // An IPv4 client of a dual-stack listener shows up as ::ffff:127.0.0.1.
            if peer.ip().to_canonical().is_loopback() {
                return Ok(());
            }
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "admin_loopback_only",
                "the admin API answers loopback clients only unless server.admin_token is set",
            ));
        };
        let offered = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(offered.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "a valid admin token is required: Authorization: Bearer <admin_token>",
            ))
        }
    }

    fn metrics_page(&self, request: &Request<Incoming>) -> Response<ResponseBody> {
        self.metrics
            .queue_depth
            .set(self.admin.recorder.queue_depth() as i64);
        let accept = request.headers().get(http::header::ACCEPT);
        let format = Exposition::negotiate(accept.and_then(|v| v.to_str().ok()));
        response::with_content_type(
            StatusCode::OK,
            self.metrics.encode(format),
            format.content_type(),
        )
    }

    async fn admin(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let (parts, body) = request.into_parts();
        let body = match read_limited(body, MAX_ADMIN_BODY).await {
            Ok(body) => body,
            Err(err) => return err.into_response(),
        };
        api::handle(
            &self.admin,
            &parts.method,
            parts.uri.path(),
            parts.uri.query(),
            body,
        )
        .await
    }
}

async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err)
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!("admin request bodies are limited to {limit} bytes"),
            ))
        }
        Err(err) => Err(ApiError::invalid_request(
            "body_read_failed",
            format!("could not read the request body: {err}"),
        )),
    }
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, byte) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ byte);
    }
    diff == 0
}
