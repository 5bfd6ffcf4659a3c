//! A fast mock OpenAI upstream: `POST /v1/chat/completions` answers a prebuilt chat.completion
//! (or, for `"stream": true`, prebuilt SSE chunks at a fixed interval, plus the usage chunk when
//! `stream_options.include_usage` asks for it). It runs on its own tokio runtime so its work is not
//! queued behind the load generator's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::time::{Instant, Sleep};

/// What the mock answers.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Size of the non-streamed chat.completion JSON, in bytes.
    pub answer_bytes: usize,
    /// Added before the answer's head (and so before the first chunk).
    pub latency: Duration,
    /// Content chunks of a streamed answer.
    pub chunks: u32,
    /// Gap between two chunks.
    pub interval: Duration,
    pub threads: usize,
}

/// The running mock. Dropping it stops it.
pub struct Mock {
    pub port: u16,
    /// Length of the non-streamed answer, for checking that a proxy passed it through untouched.
    pub answer_len: usize,
    runtime: Option<Runtime>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Mock {
    pub fn start(config: &MockConfig) -> Result<Mock, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads.max(1))
            .thread_name("mock-upstream")
            .enable_all()
            .build()
            .map_err(|err| format!("mock runtime: {err}"))?;
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .map_err(|err| format!("mock bind: {err}"))?;
        let port = listener.local_addr().map_err(|err| err.to_string())?.port();
        let answers = Arc::new(Answers::build(config));
        let answer_len = answers.json.len();
        runtime.spawn(accept_loop(listener, answers));
        Ok(Mock {
            port,
            answer_len,
            runtime: Some(runtime),
        })
    }
}

/// Every byte the mock sends, built once so answering costs no serialisation.
struct Answers {
    json: Bytes,
    chunks: Vec<Bytes>,
    usage_chunk: Bytes,
    done: Bytes,
    latency: Duration,
    interval: Duration,
}

const MODEL: &str = "gpt-4o-mini";
const ID: &str = "chatcmpl-load";
const CREATED: u64 = 1_700_000_000;

impl Answers {
    fn build(config: &MockConfig) -> Answers {
        let shell = completion("");
        let text = filler(config.answer_bytes.saturating_sub(shell.len()));
        let json = completion(&text);
        let parts = split_evenly(&text, config.chunks.max(1) as usize);
        let last = parts.len() - 1;
        let chunks = parts
            .iter()
            .enumerate()
            .map(|(i, part)| sse(&chunk(i == 0, part, i == last)))
            .collect();
        Answers {
            json: Bytes::from(json),
            chunks,
            usage_chunk: sse(&usage_chunk(&text)),
            done: Bytes::from_static(b"data: [DONE]\n\n"),
            latency: config.latency,
            interval: config.interval,
        }
    }
}

fn usage(text: &str) -> serde_json::Value {
    let completion_tokens = (text.len() / 4).max(1);
    json!({"prompt_tokens": 256, "completion_tokens": completion_tokens,
           "total_tokens": 256 + completion_tokens})
}

fn completion(text: &str) -> String {
    json!({
        "id": ID, "object": "chat.completion", "created": CREATED, "model": MODEL,
        "system_fingerprint": "fp_load",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": usage(text),
    })
    .to_string()
}

fn chunk(first: bool, text: &str, last: bool) -> String {
    let delta = if first {
        json!({"role": "assistant", "content": text})
    } else {
        json!({"content": text})
    };
    json!({
        "id": ID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
        "system_fingerprint": "fp_load",
        "choices": [{"index": 0, "delta": delta, "logprobs": null,
                     "finish_reason": if last { Some("stop") } else { None }}],
    })
    .to_string()
}

fn usage_chunk(text: &str) -> String {
    json!({
        "id": ID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
        "system_fingerprint": "fp_load", "choices": [], "usage": usage(text),
    })
    .to_string()
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// Plain words (nothing to escape in JSON) of exactly `len` bytes.
fn filler(len: usize) -> String {
    const WORDS: &str = "the quick brown fox jumps over the lazy dog while a gateway records \
                         every call as a trace grouped into experiments and runs ";
    WORDS.chars().cycle().take(len).collect()
}

/// `parts` consecutive pieces of `text` (ASCII), the last one taking the remainder.
fn split_evenly(text: &str, parts: usize) -> Vec<&str> {
    let size = text.len() / parts;
    (0..parts)
        .map(|i| {
            let end = if i + 1 == parts {
                text.len()
            } else {
                (i + 1) * size
            };
            &text[i * size..end]
        })
        .collect()
}

async fn accept_loop(listener: TcpListener, answers: Arc<Answers>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answers = answers.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, answers.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The part of a request the mock looks at.
#[derive(Default, Deserialize)]
struct Ask {
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

type MockBody = Either<Full<Bytes>, SseBody>;

async fn answer(
    request: Request<Incoming>,
    answers: Arc<Answers>,
) -> Result<Response<MockBody>, Infallible> {
    if request.uri().path() != "/v1/chat/completions" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::new(),
        ));
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                "application/json",
                Bytes::new(),
            ))
        }
    };
    let ask: Ask = serde_json::from_slice(&body).unwrap_or_default();
    if !answers.latency.is_zero() {
        tokio::time::sleep(answers.latency).await;
    }
    if !ask.stream {
        return Ok(reply(
            StatusCode::OK,
            "application/json",
            answers.json.clone(),
        ));
    }
    let include_usage = ask.stream_options.is_some_and(|o| o.include_usage);
    let mut response = Response::new(Either::Right(SseBody::new(answers, include_usage)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    Ok(response)
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<MockBody> {
    let mut response = Response::new(Either::Left(Full::new(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// A streamed answer: chunk `i` is due at `start + i * interval`; the usage chunk (when asked for)
/// and `[DONE]` follow the last chunk at once, as OpenAI sends them.
struct SseBody {
    answers: Arc<Answers>,
    include_usage: bool,
    next: usize,
    start: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl SseBody {
    fn new(answers: Arc<Answers>, include_usage: bool) -> SseBody {
        SseBody {
            answers,
            include_usage,
            next: 0,
            start: Instant::now(),
            sleep: None,
        }
    }

    fn frame_at(&self, i: usize) -> Option<Bytes> {
        let chunks = &self.answers.chunks;
        let after = i.checked_sub(chunks.len());
        match after {
            None => Some(chunks[i].clone()),
            Some(0) if self.include_usage => Some(self.answers.usage_chunk.clone()),
            Some(n) if n == usize::from(self.include_usage) => Some(self.answers.done.clone()),
            Some(_) => None,
        }
    }

    /// When frame `i` may go: content chunks wait for their slot, the rest go at once.
    fn due(&self, i: usize) -> Option<Instant> {
        (i > 0 && i < self.answers.chunks.len())
            .then(|| self.start + self.answers.interval * i as u32)
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(frame) = this.frame_at(this.next) else {
            return Poll::Ready(None);
        };
        if let Some(due) = this.due(this.next) {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            ready!(Future::poll(sleep.as_mut(), cx));
            this.sleep = None;
        }
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}
