//! The `openai` kind: any OpenAI-compatible API (OpenAI, vLLM, Ollama, Groq, OpenRouter, ...).
//! The request is forwarded as the client sent it; only the URL and the key change. The `azure`
//! kind is the same adapter with Azure's deployment URLs and `api-key` header.

use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};

use super::client::{self, HttpClient, Settings};
use super::{
    azure, BuildError, Provider, SendFuture, UpstreamError, UpstreamRequest, UpstreamResponse,
};
use crate::config::{ProviderConfig, ProviderKind};
use crate::response::BoxError;

/// Azure OpenAI's key header.
const API_KEY: HeaderName = HeaderName::from_static("api-key");

pub struct OpenAi {
    name: String,
    kind: ProviderKind,
    /// `https://api.openai.com/v1`, without a trailing slash (Azure: the resource URL).
    base_url: String,
    /// The provider's own key as a header (`Authorization: Bearer <key>`, Azure: `api-key`);
    /// without one the client's header is forwarded.
    key: Option<(HeaderName, HeaderValue)>,
    /// Azure's `api-version`.
    api_version: Option<String>,
    client: HttpClient,
    stream_usage: bool,
}

impl OpenAi {
    pub fn new(config: &ProviderConfig, settings: &Settings) -> Result<OpenAi, BuildError> {
        let error = |message: String| BuildError {
            name: config.name.clone(),
            message,
        };
        let azure = config.kind == ProviderKind::Azure;
        let key = if config.api_key.is_empty() {
            None
        } else {
            let (name, text) = if azure {
                (API_KEY, config.api_key.clone())
            } else {
                (AUTHORIZATION, format!("Bearer {}", config.api_key))
            };
            let mut value = HeaderValue::from_str(&text)
                .map_err(|_| error("api_key contains characters not allowed in a header".into()))?;
            value.set_sensitive(true);
            Some((name, value))
        };
        let client =
            client::build(settings, config.ca_file.as_deref()).map_err(|e| error(e.to_string()))?;
        let base_url = if azure {
            azure::normalize_base(&config.base_url)
        } else {
            config.base_url.trim_end_matches('/').to_owned()
        };
        Ok(OpenAi {
            name: config.name.clone(),
            kind: config.kind,
            base_url,
            key,
            api_version: config.api_version.clone(),
            client,
            stream_usage: config.stream_usage,
        })
    }

    fn url(&self, request: &UpstreamRequest) -> String {
        match &self.api_version {
            Some(version) => azure::url(
                &self.base_url,
                request.endpoint,
                request.model.as_deref(),
                &request.path_and_query,
                version,
            ),
            None => format!("{}{}", self.base_url, request.path_and_query),
        }
    }

    async fn forward(&self, request: UpstreamRequest) -> Result<UpstreamResponse, UpstreamError> {
        let url = self.url(&request);
        let mut outgoing = Request::builder()
            .method(request.method)
            .uri(&url)
            .body(Full::new(request.body))
            .map_err(|_| UpstreamError::Url(url.clone()))?;
        *outgoing.headers_mut() = request.headers;
        if let Some((name, value)) = &self.key {
            // The client's credentials stay with the client when the provider has its own.
            outgoing.headers_mut().remove(AUTHORIZATION);
            outgoing.headers_mut().remove(&API_KEY);
            outgoing.headers_mut().insert(name.clone(), value.clone());
        }
        send(&self.client, &self.base_url, outgoing).await
    }
}

/// Sends a prepared request on a pooled client; the answer's body is streamed, not read.
pub(crate) async fn send(
    client: &HttpClient,
    upstream: &str,
    outgoing: Request<Full<bytes::Bytes>>,
) -> Result<UpstreamResponse, UpstreamError> {
    let response = client
        .request(outgoing)
        .await
        .map_err(|err| classify(upstream, err))?;
    let (parts, body) = response.into_parts();
    Ok(UpstreamResponse {
        status: parts.status,
        headers: parts.headers,
        body: body.map_err(|err| Box::new(err) as BoxError).boxed(),
    })
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
        self.kind
    }

    fn supports_stream_usage(&self) -> bool {
        self.stream_usage
    }

    fn has_own_key(&self) -> bool {
        self.key.is_some()
    }

    fn send(&self, request: UpstreamRequest) -> SendFuture<'_> {
        Box::pin(self.forward(request))
    }
}
