//! The `openai` kind: any OpenAI-compatible API (OpenAI, vLLM, Ollama, Groq, OpenRouter, ...).
//! The request is forwarded as the client sent it; only the URL and the key change.

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};

use super::client::{self, HttpClient, Settings};
use super::{BuildError, Provider, SendFuture, UpstreamError, UpstreamRequest, UpstreamResponse};
use crate::config::{ProviderConfig, ProviderKind};
use crate::response::BoxError;

pub struct OpenAi {
    name: String,
    /// `https://api.openai.com/v1`, without a trailing slash.
    base_url: String,
    /// `Bearer <key>` when the provider has its own key; else the client's header is forwarded.
    authorization: Option<HeaderValue>,
    client: HttpClient,
    stream_usage: bool,
}

impl OpenAi {
    pub fn new(config: &ProviderConfig, settings: &Settings) -> Result<OpenAi, BuildError> {
        let error = |message: String| BuildError {
            name: config.name.clone(),
            message,
        };
        let authorization = if config.api_key.is_empty() {
            None
        } else {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", config.api_key))
                .map_err(|_| error("api_key contains characters not allowed in a header".into()))?;
            value.set_sensitive(true);
            Some(value)
        };
        let client =
            client::build(settings, config.ca_file.as_deref()).map_err(|e| error(e.to_string()))?;
        Ok(OpenAi {
            name: config.name.clone(),
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            authorization,
            client,
            stream_usage: config.stream_usage,
        })
    }

    async fn forward(&self, request: UpstreamRequest) -> Result<UpstreamResponse, UpstreamError> {
        let url = format!("{}{}", self.base_url, request.path_and_query);
        let mut outgoing = Request::builder()
            .method(request.method)
            .uri(&url)
            .body(Full::new(request.body))
            .map_err(|_| UpstreamError::Url(url.clone()))?;
        *outgoing.headers_mut() = request.headers;
        if let Some(key) = &self.authorization {
            outgoing.headers_mut().insert(AUTHORIZATION, key.clone());
        }
        let response = self
            .client
            .request(outgoing)
            .await
            .map_err(|err| classify(&self.base_url, err))?;
        let (parts, body) = response.into_parts();
        Ok(UpstreamResponse {
            status: parts.status,
            headers: parts.headers,
            body: body.map_err(|err| Box::new(err) as BoxError).boxed(),
        })
    }
}

fn classify(upstream: &str, err: hyper_util::client::legacy::Error) -> UpstreamError {
    let upstream = upstream.to_owned();
    let detail = client::root_cause(&err);
    if client::is_tls_error(&err) {
        UpstreamError::Tls { upstream, detail }
    } else if err.is_connect() {
        UpstreamError::Connect { upstream, detail }
    } else {
        UpstreamError::Request { upstream, detail }
    }
}

impl Provider for OpenAi {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Openai
    }

    fn supports_stream_usage(&self) -> bool {
        self.stream_usage
    }

    fn has_own_key(&self) -> bool {
        self.authorization.is_some()
    }

    fn send(&self, request: UpstreamRequest) -> SendFuture<'_> {
        Box::pin(self.forward(request))
    }
}
