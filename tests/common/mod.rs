//! Test harness: a scriptable mock OpenAI upstream (plain or TLS), an in-process gateway on an
//! ephemeral port with its own store, and a small HTTP client. Everything talks over loopback.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use flowgate::config::{Config, Source};
use flowgate::server::Gateway;

// ---------------------------------------------------------------------------------------------
// Mock upstream

/// A request the mock upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What the mock upstream answers.
pub enum Reply {
    Json(u16, Value),
    /// JSON with extra response headers.
    JsonWithHeaders(u16, Vec<(&'static str, &'static str)>, Value),
    Raw {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// SSE events, each after its delay.
    Sse(Vec<(Duration, String)>),
    /// SSE events, then the connection is cut without finishing the response.
    SseThenCut(Vec<String>),
    /// Events sent as the test releases them, one per message on the channel.
    SseControlled(tokio::sync::mpsc::UnboundedReceiver<String>),
    /// Never answers.
    Hang,
    /// The reply, after a pause.
    Late(Duration, Box<Reply>),
}

pub type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.requests().pop().expect("the upstream saw no request")
    }

    pub async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Upstream {
        Self::start_with_tls(handler, None).await
    }

    pub async fn start_with_tls(
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let task = tokio::spawn(accept_loop(listener, handler, seen.clone(), tls));
        Upstream { addr, seen, task }
    }
}

async fn accept_loop(
    listener: TcpListener,
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (handler, seen, tls) = (handler.clone(), seen.clone(), tls.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, handler.clone(), seen.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn answer(
    request: Request<Incoming>,
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<UpstreamBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // HTTP/2 requests carry the whole URL; tests compare the path and query.
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |p| p.to_string());
    let request = Seen {
        method: parts.method,
        path,
        headers: parts.headers,
        body,
        version: parts.version,
    };
    seen.lock().unwrap().push(request.clone());
    let reply = match handler(&request) {
        Reply::Late(pause, reply) => {
            tokio::time::sleep(pause).await;
            *reply
        }
        reply => reply,
    };
    Ok(match reply {
        Reply::Json(status, value) => {
            full(status, "application/json", value.to_string().into_bytes())
        }
        Reply::JsonWithHeaders(status, headers, value) => {
            let mut response = full(status, "application/json", value.to_string().into_bytes());
            for (name, value) in headers {
                response
                    .headers_mut()
                    .insert(name, http::HeaderValue::from_static(value));
            }
            response
        }
        Reply::Raw {
            status,
            content_type,
            body,
        } => full(status, content_type, body),
        Reply::Sse(events) => {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                for (delay, event) in events {
                    tokio::time::sleep(delay).await;
                    if tx.send(Ok(Bytes::from(event))).await.is_err() {
                        return;
                    }
                }
            });
            sse(rx)
        }
        Reply::SseThenCut(events) => {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                for event in events {
                    let _ = tx.send(Ok(Bytes::from(event))).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(std::io::Error::other("upstream cut"))).await;
            });
            sse(rx)
        }
        Reply::SseControlled(mut events) => {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if tx.send(Ok(Bytes::from(event))).await.is_err() {
                        return;
                    }
                }
            });
            sse(rx)
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            full(500, "text/plain", b"too late".to_vec())
        }
        Reply::Late(..) => full(500, "text/plain", b"one pause per reply".to_vec()),
    })
}

fn full(status: u16, content_type: &'static str, body: Vec<u8>) -> Response<UpstreamBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

fn sse(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response<UpstreamBody> {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(ChannelBody(rx).boxed())
        .unwrap()
}

struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAI-shaped fixtures

pub fn chat_completion(content: &str, prompt_tokens: u64, completion_tokens: u64) -> Value {
    serde_json::json!({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": 0}}
    })
}

pub fn chunk(content: &str) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
    )
}

pub fn usage_chunk(prompt_tokens: u64, completion_tokens: u64) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-4o-mini", "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})
    )
}

pub const DONE: &str = "data: [DONE]\n\n";

/// A streamed answer: words, then (when asked for) the usage chunk, then `[DONE]`.
pub fn streamed_answer(words: &[&str], with_usage: bool) -> Vec<String> {
    let mut events: Vec<String> = words.iter().map(|w| chunk(w)).collect();
    if with_usage {
        events.push(usage_chunk(11, words.len() as u64));
    }
    events.push(DONE.to_owned());
    events
}

pub fn asked_for_usage(seen: &Seen) -> bool {
    seen.json().pointer("/stream_options/include_usage") == Some(&Value::Bool(true))
}

// ---------------------------------------------------------------------------------------------
// Gateway

/// The tests' store flush interval: short, so that a trace is on disk soon after its call.
const FLUSH_INTERVAL_MS: u64 = 20;

pub struct TestGateway {
    pub gateway: Option<Gateway>,
    pub url: String,
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TestGateway {
    /// A gateway whose `openai` provider points at `upstream_url`, with a fresh store.
    /// `server` and `extra` are TOML added to the `[server]` section and after it.
    pub async fn start(upstream_url: &str, server: &str, extra: &str) -> TestGateway {
        Self::start_fresh(upstream_url, server, extra, FLUSH_INTERVAL_MS).await
    }

    /// As [`start`], with the store in `data_dir` (kept across restarts).
    pub async fn start_in(
        data_dir: &Path,
        upstream_url: &str,
        server: &str,
        extra: &str,
    ) -> TestGateway {
        Self::start_on("127.0.0.1:0", data_dir, upstream_url, server, extra).await
    }

    /// As [`start`], flushing the store every `flush_interval_ms` rather than the tests' 20 ms.
    pub async fn start_flushing_every(upstream_url: &str, flush_interval_ms: u64) -> TestGateway {
        Self::start_fresh(upstream_url, "", "", flush_interval_ms).await
    }

    /// A gateway on a store of its own, removed when it is dropped.
    async fn start_fresh(
        upstream_url: &str,
        server: &str,
        extra: &str,
        flush_interval_ms: u64,
    ) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let mut gateway = Self::start_with(
            "127.0.0.1:0",
            dir.path(),
            upstream_url,
            server,
            extra,
            flush_interval_ms,
        )
        .await;
        gateway._dir = Some(dir);
        gateway
    }

    /// As [`start_in`], listening on `listen` (the URL still names the port on loopback).
    pub async fn start_on(
        listen: &str,
        data_dir: &Path,
        upstream_url: &str,
        server: &str,
        extra: &str,
    ) -> TestGateway {
        Self::start_with(
            listen,
            data_dir,
            upstream_url,
            server,
            extra,
            FLUSH_INTERVAL_MS,
        )
        .await
    }

    async fn start_with(
        listen: &str,
        data_dir: &Path,
        upstream_url: &str,
        server: &str,
        extra: &str,
        flush_interval_ms: u64,
    ) -> TestGateway {
        let text = format!(
            r#"
[server]
listen = "{listen}"
{server}

[storage]
path = "{store}"
flush_interval_ms = {flush_interval_ms}

[[providers]]
name = "openai"
kind = "openai"
base_url = "{upstream_url}"
models = ["gpt-*", "text-embedding-*"]

[[providers]]
name = "mock"
kind = "mock"
models = ["mock/*"]

{extra}
"#,
            store = data_dir.join("flowgate.sled").display()
        );
        let mut config =
            Config::from_toml(&text, Source::BuiltIn).unwrap_or_else(|e| panic!("{e}\n{text}"));
        config.validate().unwrap();
        let gateway = Gateway::start(&config).await.unwrap();
        let url = format!("http://127.0.0.1:{}", gateway.addr.port());
        TestGateway {
            gateway: Some(gateway),
            url,
            data_dir: data_dir.to_path_buf(),
            _dir: None,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }

    pub async fn admin(&self, path: &str) -> Value {
        let reply = send(Method::GET, &format!("{}{path}", self.url), &[], "").await;
        assert_eq!(reply.status, StatusCode::OK, "GET {path}: {}", reply.text());
        reply.json()
    }

    /// The run a stored trace belongs to.
    pub async fn run_of(&self, trace: &Value) -> Value {
        let id = trace["run_id"].as_str().expect("the trace names its run");
        self.admin(&format!("/api/v1/runs/{id}")).await
    }

    pub async fn trace(&self, id: &str) -> Value {
        self.admin(&format!("/api/v1/traces/{id}")).await
    }

    pub async fn chat(&self, headers: &[(&str, &str)], body: Value) -> HttpReply {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        send(
            Method::POST,
            &format!("{}/v1/chat/completions", self.url),
            &all,
            &body.to_string(),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Client

#[derive(Debug)]
pub struct HttpReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The content of a streamed chat answer, put together from its chunks.
    pub fn streamed_text(&self) -> String {
        sse_data(&self.body)
            .iter()
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    /// Asserts an OpenAI-shaped error with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        let json = self.json();
        assert_eq!(json["error"]["code"], code, "{json}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{json}"
        );
        assert!(json["error"]["type"].is_string(), "{json}");
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(body.into())).unwrap()
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> HttpReply {
    let response = client()
        .request(request(method, url, headers, body.to_owned()))
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    HttpReply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends a request and returns the response with its body unread, to read frame by frame.
pub async fn open(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response<Incoming> {
    client()
        .request(request(method, url, headers, body.to_owned()))
        .await
        .unwrap()
}

/// The trace id a response carries.
pub fn trace_id_of<B>(response: &Response<B>) -> String {
    response.headers()["x-flowgate-trace-id"]
        .to_str()
        .expect("an ASCII trace id")
        .to_owned()
}

/// A trace as the admin API serves it, once the recorder has stored it.
pub async fn stored_trace(base_url: &str, id: &str) -> Value {
    eventually(Duration::from_secs(5), async || {
        let reply = send(
            Method::GET,
            &format!("{base_url}/api/v1/traces/{id}"),
            &[],
            "",
        )
        .await;
        (reply.status == StatusCode::OK).then(|| reply.json())
    })
    .await
}

/// Reads the next data frame within `limit`, or `None` at the end.
pub async fn next_data(body: &mut Incoming, limit: Duration) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(limit, body.frame())
            .await
            .expect("no frame in time")?;
        if let Ok(data) = frame.expect("body error").into_data() {
            return Some(data);
        }
    }
}

/// Polls `check` until it returns Some, for at most `limit`.
pub async fn eventually<T>(limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The data payloads of an SSE body.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

/// This process's resident memory (`VmRSS`), in KB.
pub fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}
