//! The `anthropic` kind: Anthropic's Messages API.
//!
//! Chat completions are translated both ways (`request`, `conversation`, `response`, `stream`,
//! `error`): the client speaks OpenAI's API to a Claude model. `/v1/messages`,
//! `/v1/messages/count_tokens`, `/v1/models` and other pass-through paths go to Anthropic as the
//! client sent them. OpenAI's other model endpoints (completions, embeddings, responses) have no
//! Anthropic counterpart and are refused with a 400.
//!
//! The key goes in `x-api-key`, with `anthropic-version` (the client's own when it sent one).
//! Without a provider key the client's `x-api-key` is forwarded; an OpenAI client's
//! `Authorization: Bearer <key>` becomes `x-api-key` for translated calls.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use super::client::{self, HttpClient, Settings};
use super::{
    BuildError, Endpoint, Provider, SendFuture, UpstreamError, UpstreamRequest, UpstreamResponse,
};
use crate::config::{ProviderConfig, ProviderKind};

pub mod conversation;
pub mod error;
pub mod request;
pub mod response;
pub mod stream;

/// The Messages API version flowgate translates for.
pub const API_VERSION: &str = "2023-06-01";

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");

/// A non-streamed answer larger than this is refused rather than held in memory to translate.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

pub struct Anthropic {
    name: String,
    /// `https://api.anthropic.com`, without a trailing slash or `/v1`.
    base_url: String,
    /// The provider's own key for `x-api-key`; without one the client's is forwarded.
    key: Option<HeaderValue>,
    client: HttpClient,
}

impl Anthropic {
    pub fn new(config: &ProviderConfig, settings: &Settings) -> Result<Anthropic, BuildError> {
        let error = |message: String| BuildError {
            name: config.name.clone(),
            message,
        };
        let key = if config.api_key.is_empty() {
            None
        } else {
            let mut value = HeaderValue::from_str(&config.api_key)
                .map_err(|_| error("api_key contains characters not allowed in a header".into()))?;
            value.set_sensitive(true);
            Some(value)
        };
        let client =
            client::build(settings, config.ca_file.as_deref()).map_err(|e| error(e.to_string()))?;
        let trimmed = config.base_url.trim_end_matches('/');
        Ok(Anthropic {
            name: config.name.clone(),
            base_url: trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_owned(),
            key,
            client,
        })
    }

    /// The headers for Anthropic: credentials and API version (see the module comment).
    fn headers(&self, mut headers: HeaderMap, translated: bool) -> HeaderMap {
        if let Some(key) = &self.key {
            headers.remove(AUTHORIZATION);
            headers.insert(X_API_KEY, key.clone());
        } else if translated && !headers.contains_key(X_API_KEY) {
            let bearer = headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .and_then(|key| HeaderValue::from_str(key.trim()).ok());
            if let Some(mut key) = bearer {
                key.set_sensitive(true);
                headers.remove(AUTHORIZATION);
                headers.insert(X_API_KEY, key);
            }
        }
        if !headers.contains_key(ANTHROPIC_VERSION) {
            headers.insert(ANTHROPIC_VERSION, HeaderValue::from_static(API_VERSION));
        }
        headers
    }

    async fn send_to(
        &self,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let url = format!("{}/v1{path_and_query}", self.base_url);
        let mut outgoing = Request::builder()
            .method(method)
            .uri(&url)
            .body(Full::new(body))
            .map_err(|_| UpstreamError::Url(url.clone()))?;
        *outgoing.headers_mut() = headers;
        super::openai::send(&self.client, &self.base_url, outgoing).await
    }

    /// Anthropic's own API: forwarded as the client sent it.
    async fn native(&self, request: UpstreamRequest) -> Result<UpstreamResponse, UpstreamError> {
        let headers = self.headers(request.headers, false);
        self.send_to(
            request.method,
            &request.path_and_query,
            headers,
            request.body,
        )
        .await
    }

    /// A chat completion: translated to a Messages call, and its answer back.
    async fn translated(
        &self,
        request: UpstreamRequest,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let model = request.model.as_deref().unwrap_or_default();
        let translated = request::translate(&request.body, model).map_err(|rejection| {
            UpstreamError::Rejected {
                code: rejection.code(),
                param: rejection.param(),
                message: rejection.to_string(),
            }
        })?;
        let body = serde_json::to_vec(&translated.body).map_err(|err| UpstreamError::Request {
            upstream: self.base_url.clone(),
            detail: err.to_string(),
        })?;
        let mut headers = self.headers(request.headers, true);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let upstream = self
            .send_to(Method::POST, "/messages", headers, Bytes::from(body))
            .await?;
        let created = unix_seconds();
        let is_sse = upstream
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if upstream.status.is_success() && is_sse {
            let translator = stream::Translator::new(translated.include_usage, created);
            let mut headers = upstream.headers;
            headers.remove(CONTENT_LENGTH);
            return Ok(UpstreamResponse {
                status: upstream.status,
                headers,
                body: stream::TranslatedBody::new(upstream.body, translator).boxed(),
            });
        }
        self.translate_whole(upstream, created).await
    }

    /// A non-streamed answer (or any error): read whole, then translated.
    async fn translate_whole(
        &self,
        upstream: UpstreamResponse,
        created: u64,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let bytes = read_at_most(upstream.body, MAX_ANSWER_BYTES)
            .await
            .map_err(|detail| UpstreamError::Request {
                upstream: self.base_url.clone(),
                detail: format!("reading the answer: {detail}"),
            })?;
        let (status, json) = if upstream.status.is_success() {
            match response::to_chat_completion(&bytes, created) {
                Ok(json) => (upstream.status, json),
                Err(err) => {
                    let detail = error::Detail {
                        kind: Some("upstream_invalid_answer".into()),
                        message: Some(format!("Anthropic's answer is not a message: {err}")),
                    };
                    let status = StatusCode::BAD_GATEWAY;
                    let body = serde_json::json!({"error": error::openai_error(&detail, status)});
                    (status, body)
                }
            }
        } else {
            error::to_openai(upstream.status, &bytes)
        };
        let mut headers = upstream.headers;
        headers.remove(CONTENT_LENGTH);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(UpstreamResponse {
            status,
            headers,
            body: crate::response::full(json.to_string()),
        })
    }
}

/// A whole body, or why not: it broke off, or it is larger than `limit`.
async fn read_at_most(
    mut body: crate::response::ResponseBody,
    limit: usize,
) -> Result<Bytes, String> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| client::root_cause(&*err))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(format!("the answer is larger than {limit} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    /// Translated streams always know their usage (from `message_start` and `message_delta`);
    /// the usage chunk is written when the body asks for it, and the gateway hides the one it
    /// asked for itself.
    fn supports_stream_usage(&self) -> bool {
        true
    }

    fn has_own_key(&self) -> bool {
        self.key.is_some()
    }

    fn send(&self, request: UpstreamRequest) -> SendFuture<'_> {
        Box::pin(async move {
            match request.endpoint {
                Endpoint::ChatCompletions => self.translated(request).await,
                Endpoint::Completions | Endpoint::Embeddings | Endpoint::Responses => {
                    Err(UpstreamError::Rejected {
                        code: "unsupported_endpoint",
                        param: None,
                        message: format!(
                            "POST /v1/{} is OpenAI's API, which Anthropic does not offer; an anthropic provider serves /v1/chat/completions (translated) and /v1/messages",
                            request.endpoint.as_str()
                        ),
                    })
                }
                Endpoint::Messages
                | Endpoint::MessagesCountTokens
                | Endpoint::Models
                | Endpoint::Passthrough => self.native(request).await,
            }
        })
    }
}
