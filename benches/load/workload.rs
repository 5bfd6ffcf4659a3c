//! The requests: the pooled client, the chat bodies, sending one request and timing its answer.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::stats::{Sample, StreamTiming};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client whose pool keeps up to `pool` idle connections, so a phase with
/// that many requests in flight reuses its connections instead of opening new ones.
pub fn client(pool: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    // Without it, Nagle's algorithm delays small writes and the numbers measure the kernel.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(pool)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

/// `GET url`, the whole body, within 10 s.
pub async fn get(client: &HttpClient, url: &str) -> Result<(StatusCode, Bytes), String> {
    let request = Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|err| err.to_string())?;
    let call = async {
        let response = client
            .request(request)
            .await
            .map_err(|err| err.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| err.to_string())?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| format!("GET {url}: no answer within 10 s"))?
}

/// Something requests are sent to: the mock itself, flowgate, or a peer gateway.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: &'static str,
    /// Its `/v1/chat/completions`.
    pub url: Uri,
    /// The answer must reach the client exactly as the mock sent it (same body length, same number
    /// of chunks): true for the mock and for flowgate, which passes bytes through.
    pub exact: bool,
    /// Headers of its own on every request (a peer gateway's routing).
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
}

/// What a correct answer looks like.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub body_len: usize,
    pub chunks: u32,
}

/// Chat request bodies of about `size` bytes, different for each request index unless `repeat`.
/// Temperature 0 makes every call one the response cache looks up (and, unless `repeat`, misses).
#[derive(Clone, Debug)]
pub struct Bodies {
    pub size: usize,
    pub stream: bool,
    pub repeat: bool,
    /// Makes every scenario's bodies its own: no scenario hits answers another one cached.
    pub salt: String,
}

const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa",
];

impl Bodies {
    pub fn body(&self, index: u64) -> Bytes {
        let index = if self.repeat { 0 } else { index };
        let head = format!(
            concat!(
                r#"{{"model":"gpt-4o-mini","stream":{},"temperature":0,"messages":["#,
                r#"{{"role":"system","content":"You are a concise assistant."}},"#,
                r#"{{"role":"user","content":"request {} of {}:"#
            ),
            self.stream, index, self.salt
        );
        const TAIL: &str = r#""}]}"#;
        let mut body = String::with_capacity(self.size + 16);
        body.push_str(&head);
        // A word sequence that depends on the index, so no two bodies are the same.
        let mut word = index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        while body.len() + TAIL.len() < self.size {
            body.push(' ');
            body.push_str(WORDS[(word % 16) as usize]);
            word = word.rotate_left(5) ^ index;
        }
        body.push_str(TAIL);
        Bytes::from(body)
    }
}

/// Sends requests to one target, tagged for one experiment.
pub struct Caller {
    pub client: HttpClient,
    pub target: Target,
    pub bodies: Bodies,
    pub expect: Expect,
    experiment: HeaderValue,
}

impl Caller {
    pub fn new(
        client: HttpClient,
        target: Target,
        bodies: Bodies,
        expect: Expect,
        experiment: &str,
    ) -> Caller {
        Caller {
            client,
            target,
            bodies,
            expect,
            experiment: HeaderValue::from_str(experiment).expect("experiment names are ASCII"),
        }
    }

    /// Sends request `index`, which was due at `due`, and times its answer from `due`.
    pub async fn call(&self, index: u64, due: Instant) -> Sample {
        let lag = due.elapsed();
        let request = self.request(index);
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(_) => return Sample::failed(due.elapsed(), lag, "transport"),
        };
        let status = response.status();
        if !status.is_success() {
            let _ = response.into_body().collect().await;
            return Sample::failed(due.elapsed(), lag, format!("status {}", status.as_u16()));
        }
        let read = if self.bodies.stream {
            self.read_stream(response.into_body(), due).await
        } else {
            self.read_whole(response.into_body()).await
        };
        match read {
            Ok(stream) => Sample {
                latency: due.elapsed(),
                lag,
                stream,
                error: None,
            },
            Err(error) => Sample::failed(due.elapsed(), lag, error),
        }
    }

    fn request(&self, index: u64) -> Request<Full<Bytes>> {
        let mut request = Request::post(self.target.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, "Bearer sk-load-test")
            .header("x-flowgate-experiment", self.experiment.clone())
            .header("x-flowgate-prompt-version", "v1")
            .body(Full::new(self.bodies.body(index)))
            .expect("a valid request");
        *request.version_mut() = http::Version::HTTP_11;
        request
            .headers_mut()
            .extend(self.target.headers.iter().cloned());
        request
    }

    async fn read_whole(&self, mut body: Incoming) -> Result<Option<StreamTiming>, String> {
        let mut len = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| "body cut".to_string())?;
            len += frame.data_ref().map_or(0, Bytes::len);
        }
        if len == 0 || (self.target.exact && len != self.expect.body_len) {
            return Err("body length".into());
        }
        Ok(None)
    }

    async fn read_stream(
        &self,
        mut body: Incoming,
        due: Instant,
    ) -> Result<Option<StreamTiming>, String> {
        let mut events = SseEvents::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| "stream cut".to_string())?;
            if let Some(data) = frame.data_ref() {
                events.push(data, Instant::now());
            }
        }
        let (Some(first), Some(last)) = (events.first, events.last) else {
            return Err("empty stream".into());
        };
        if !events.done {
            return Err("no [DONE]".into());
        }
        if self.target.exact && events.count != self.expect.chunks {
            return Err("chunk count".into());
        }
        Ok(Some(StreamTiming {
            first_chunk: first - due,
            mean_spacing: (events.count > 1).then(|| (last - first) / (events.count - 1)),
        }))
    }
}

/// Splits an SSE byte stream into events (frames may cut an event anywhere) and notes when the
/// first and the last data event before `[DONE]` were complete.
#[derive(Default)]
struct SseEvents {
    pending: BytesMut,
    count: u32,
    first: Option<Instant>,
    last: Option<Instant>,
    done: bool,
}

impl SseEvents {
    fn push(&mut self, data: &[u8], now: Instant) {
        self.pending.extend_from_slice(data);
        while let Some(end) = find(&self.pending, b"\n\n") {
            let event = self.pending.split_to(end + 2);
            if find(&event, b"[DONE]").is_some() {
                self.done = true;
            } else if find(&event, b"data:").is_some() {
                self.count += 1;
                self.first.get_or_insert(now);
                self.last = Some(now);
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
