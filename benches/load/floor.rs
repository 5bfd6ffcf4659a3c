//! The floor: a bare reverse proxy built from the same parts as flowgate (hyper 1's HTTP/1 server,
//! hyper-util's pooled client, tokio's multi-thread runtime, mimalloc) that forwards each request
//! to the mock and streams the answer back, and does nothing else: no parsing, no tagging, no
//! metrics, no cache, no store. What it costs is what any proxy of this design costs on this
//! machine (a second hop: two more sockets, two more wake-ups per call), so the report can tell
//! flowgate's own work from the price of being a proxy at all.
//!
//! It runs as a child process (this binary again, with `--floor-proxy`), so its CPU and memory are
//! read from `/proc` exactly as flowgate's are.
//!
//! `FLOWGATE_BENCH_FLOOR=per-core` lays the same parts out differently: one single-threaded runtime
//! per core, each with its own upstream pool, and connections dealt to them in turn, so that no
//! call ever wakes another thread. That is the other layout a proxy could take; on our machine it
//! did not lower the floor (docs/benchmarks.md, item 36).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::child::{scratch_dir, ChildGuard};
use crate::gateway::free_port;
use crate::workload::HttpClient;

/// The hidden first argument that makes this binary the floor proxy.
const SERVE_FLAG: &str = "--floor-proxy";

pub struct FloorProxy {
    guard: ChildGuard,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl FloorProxy {
    pub async fn start(client: &HttpClient, mock_port: u16) -> Result<FloorProxy, String> {
        let dir = scratch_dir("floor-proxy-")?;
        let port = free_port()?;
        let exe = std::env::current_exe().map_err(|err| format!("this binary: {err}"))?;
        let mut command = Command::new(exe);
        command
            .arg(SERVE_FLAG)
            .arg(port.to_string())
            .arg(mock_port.to_string());
        let name = if per_core_asked() {
            "floor proxy (a runtime per core)"
        } else {
            "floor proxy"
        };
        let mut guard = ChildGuard::spawn(name, command, &dir.path().join("floor.log"))?;
        let base = format!("http://127.0.0.1:{port}");
        guard
            .wait_healthy(client, &format!("{base}/healthz"), Duration::from_secs(30))
            .await?;
        Ok(FloorProxy {
            guard,
            base,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

/// When this process was started as the floor proxy (`--floor-proxy LISTEN_PORT UPSTREAM_PORT`),
/// serves until killed and returns how it ended; otherwise `None`.
pub fn serve_if_asked() -> Option<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some(SERVE_FLAG) {
        return None;
    }
    let ports: Vec<u16> = args[1..].iter().filter_map(|a| a.parse().ok()).collect();
    let [listen, upstream] = ports[..] else {
        eprintln!("usage: {SERVE_FLAG} LISTEN_PORT UPSTREAM_PORT");
        return Some(ExitCode::from(2));
    };
    let result = if per_core_asked() {
        serve_per_core(listen, upstream)
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|err| err.to_string())
            .and_then(|runtime| runtime.block_on(serve(listen, upstream)))
    };
    match result {
        Ok(()) => Some(ExitCode::SUCCESS),
        Err(err) => {
            eprintln!("floor proxy: {err}");
            Some(ExitCode::FAILURE)
        }
    }
}

/// `FLOWGATE_BENCH_FLOOR=per-core`: the floor runs a runtime per core (see the module's docs).
fn per_core_asked() -> bool {
    std::env::var("FLOWGATE_BENCH_FLOOR").as_deref() == Ok("per-core")
}

type Upstream = Client<HttpConnector, Incoming>;
type ProxyBody = BoxBody<Bytes, hyper::Error>;

async fn serve(listen: u16, upstream_port: u16) -> Result<(), String> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], listen)))
        .await
        .map_err(|err| format!("bind {listen}: {err}"))?;
    let upstream = upstream_pool();
    let authority = format!("127.0.0.1:{upstream_port}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            upstream.clone(),
            authority.clone(),
        ));
    }
}

/// One current-thread runtime per core; the accepting thread deals connections out in turn.
fn serve_per_core(listen: u16, upstream_port: u16) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], listen)))
        .map_err(|err| format!("bind {listen}: {err}"))?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut cores_in_turn = Vec::with_capacity(cores);
    for core in 0..cores {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("runtime {core}: {err}"))?;
        let (deal, mut dealt) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        cores_in_turn.push(deal);
        let authority = format!("127.0.0.1:{upstream_port}");
        std::thread::Builder::new()
            .name(format!("floor-core-{core}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let upstream = upstream_pool();
                    while let Some(stream) = dealt.recv().await {
                        let stream = stream
                            .set_nonblocking(true)
                            .and_then(|()| tokio::net::TcpStream::from_std(stream));
                        if let Ok(stream) = stream {
                            tokio::spawn(serve_connection(
                                stream,
                                upstream.clone(),
                                authority.clone(),
                            ));
                        }
                    }
                })
            })
            .map_err(|err| format!("thread {core}: {err}"))?;
    }
    for (turn, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        if cores_in_turn[turn % cores].send(stream).is_err() {
            return Err("a core's runtime stopped".into());
        }
    }
    Ok(())
}

fn upstream_pool() -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector)
}

async fn serve_connection(stream: tokio::net::TcpStream, upstream: Upstream, authority: String) {
    let service = service_fn(move |request| forward(request, upstream.clone(), authority.clone()));
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The request as it came, sent to the upstream; the upstream's answer as it comes, streamed back.
async fn forward(
    mut request: Request<Incoming>,
    upstream: Upstream,
    authority: String,
) -> Result<Response<ProxyBody>, Infallible> {
    if request.uri().path() == "/healthz" {
        return Ok(plain(StatusCode::OK));
    }
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
    else {
        return Ok(plain(StatusCode::BAD_REQUEST));
    };
    *request.uri_mut() = uri;
    match upstream.request(request).await {
        Ok(response) => Ok(response.map(BodyExt::boxed)),
        Err(_) => Ok(plain(StatusCode::BAD_GATEWAY)),
    }
}

fn plain(status: StatusCode) -> Response<ProxyBody> {
    let body = Empty::new().map_err(|never| match never {}).boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}
