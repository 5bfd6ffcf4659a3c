//! Providers: how a routed call reaches a model, and which provider a model name routes to.
//!
//! A provider adapter implements [`Provider`]: it takes the prepared call and returns the
//! upstream's response head and body stream. Each adapter lives in its own file; adding a kind
//! is a new file plus one arm in [`build`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use crate::config::{Config, ProviderConfig, ProviderKind};
use crate::error::ApiError;
use crate::response::ResponseBody;

pub mod anthropic;
pub mod azure;
pub mod client;
pub mod mock;
pub mod openai;

/// The endpoint a client called, known from the path alone: OpenAI's, and Anthropic's Messages
/// API (served by `anthropic` providers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Models,
    /// Anthropic's `POST /v1/messages`, forwarded untranslated.
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens`, forwarded untranslated.
    MessagesCountTokens,
    /// Any other `/v1/...` path: passed through untouched.
    Passthrough,
}

impl Endpoint {
    /// `path` is the request path with the `/v1` prefix.
    pub fn from_path(path: &str) -> Endpoint {
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Endpoint::ChatCompletions,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            "/v1/models" => Endpoint::Models,
            "/v1/messages" => Endpoint::Messages,
            "/v1/messages/count_tokens" => Endpoint::MessagesCountTokens,
            _ => Endpoint::Passthrough,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Models => "models",
            Endpoint::Messages => "messages",
            Endpoint::MessagesCountTokens => "messages.count_tokens",
            Endpoint::Passthrough => "passthrough",
        }
    }

    /// The model-calling endpoints: JSON bodies that name a model.
    pub fn takes_model(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Responses
                | Endpoint::Messages
                | Endpoint::MessagesCountTokens
        )
    }
}

/// A call ready for a provider: headers already cleaned of hop-by-hop and tagging headers.
#[derive(Debug)]
pub struct UpstreamRequest {
    pub endpoint: Endpoint,
    pub method: Method,
    /// Path after `/v1`, with the query: `/chat/completions`, `/files/abc?limit=2`.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The model as the provider knows it (after `provider/` is stripped).
    pub model: Option<String>,
    pub stream: bool,
}

pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: ResponseBody,
}

/// Why an upstream could not be reached; becomes a 502/504 at the edge.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to {upstream}: {detail}")]
    Connect { upstream: String, detail: String },
    #[error("TLS handshake with {upstream} failed: {detail}")]
    Tls { upstream: String, detail: String },
    #[error("request to {upstream} failed: {detail}")]
    Request { upstream: String, detail: String },
    #[error("invalid upstream URL {0}")]
    Url(String),
    /// The provider cannot express the request (a parameter, an endpoint): a 400 naming it.
    #[error("{message}")]
    Rejected {
        code: &'static str,
        param: Option<&'static str>,
        message: String,
    },
}

impl UpstreamError {
    pub fn into_api_error(self, provider: &str) -> ApiError {
        let code = match &self {
            UpstreamError::Connect { .. } => "upstream_unreachable",
            UpstreamError::Tls { .. } => "upstream_tls",
            UpstreamError::Request { .. } => "upstream_request_failed",
            UpstreamError::Url(_) => "upstream_url",
            UpstreamError::Rejected { code, param, .. } => {
                let error =
                    ApiError::invalid_request(code, format!("provider {provider:?}: {self}"));
                return match param {
                    Some(param) => error.with_param(param),
                    None => error,
                };
            }
        };
        ApiError::bad_gateway(code, format!("provider {provider:?}: {self}"))
    }
}

pub type SendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<UpstreamResponse, UpstreamError>> + Send + 'a>>;

pub trait Provider: Send + Sync {
    fn name(&self) -> &str;
    fn kind(&self) -> ProviderKind;
    /// Whether a stream's usage may be requested with `stream_options.include_usage` (the
    /// gateway then drops that extra chunk when the client did not ask for it).
    fn supports_stream_usage(&self) -> bool;
    /// Whether the provider sends its own key (else the client's `Authorization` is forwarded).
    fn has_own_key(&self) -> bool;
    fn send(&self, request: UpstreamRequest) -> SendFuture<'_>;
}

#[derive(Debug, thiserror::Error)]
#[error("provider {name:?}: {message}")]
pub struct BuildError {
    pub name: String,
    pub message: String,
}

/// Builds the adapter for one configured provider.
pub fn build(
    config: &ProviderConfig,
    settings: &client::Settings,
) -> Result<Arc<dyn Provider>, BuildError> {
    Ok(match config.kind {
        ProviderKind::Openai | ProviderKind::Azure => {
            Arc::new(openai::OpenAi::new(config, settings)?)
        }
        ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(config, settings)?),
        ProviderKind::Mock => Arc::new(mock::Mock::new(&config.name)),
    })
}

/// Where a model name goes: the provider and the model name it is given.
#[derive(Clone)]
pub struct Route {
    pub provider: Arc<dyn Provider>,
    pub model: String,
}

/// Model name → provider: `provider/model` names a provider explicitly; otherwise the first
/// provider (in config order) with a matching glob pattern.
pub struct Router {
    entries: Vec<(Arc<dyn Provider>, Vec<String>)>,
    groups: crate::routing::Groups,
}

impl Router {
    pub fn from_config(config: &Config) -> Result<Router, BuildError> {
        let settings = client::Settings::from_config(config);
        let mut entries = Vec::with_capacity(config.providers.len());
        for provider in &config.providers {
            entries.push((build(provider, &settings)?, provider.models.clone()));
        }
        let by_name = |name: &str| {
            entries
                .iter()
                .find(|(p, _)| p.name() == name)
                .map(|(p, _)| p.clone())
        };
        let groups = crate::routing::Groups::new(&config.models, &config.routing, by_name)
            .map_err(|err| BuildError {
                name: err.model.clone(),
                message: err.to_string(),
            })?;
        let router = Router { entries, groups };
        router.check_fallbacks()?;
        Ok(router)
    }

    /// Every fallback must name a `[[models]]` entry or route to a provider.
    fn check_fallbacks(&self) -> Result<(), BuildError> {
        for group in self.groups.names() {
            let unrouted = group
                .fallbacks()
                .iter()
                .find(|f| self.groups.get(f).is_none() && self.resolve(f).is_err());
            if let Some(fallback) = unrouted {
                return Err(BuildError {
                    name: group.name.clone(),
                    message: format!(
                        "fallback {fallback:?} is neither a [[models]] name nor routed to a provider"
                    ),
                });
            }
        }
        Ok(())
    }

    /// What to try for `model`: a `[[models]]` entry's deployments and fallbacks, else the one
    /// provider route.
    pub fn plan(&self, model: &str) -> Result<crate::routing::Plan, ApiError> {
        match self.groups.get(model) {
            Some(group) => Ok(self.groups.plan(group, |name| self.resolve(name).ok())),
            None => self.resolve(model).map(crate::routing::Plan::single),
        }
    }

    pub fn groups(&self) -> &crate::routing::Groups {
        &self.groups
    }

    pub fn resolve(&self, model: &str) -> Result<Route, ApiError> {
        if let Some((prefix, rest)) = model.split_once('/') {
            if let Some((provider, _)) = self.entries.iter().find(|(p, _)| p.name() == prefix) {
                if !rest.is_empty() {
                    return Ok(Route {
                        provider: provider.clone(),
                        model: rest.to_owned(),
                    });
                }
            }
        }
        self.entries
            .iter()
            .find(|(_, patterns)| patterns.iter().any(|p| glob_match(p, model)))
            .map(|(provider, _)| Route {
                provider: provider.clone(),
                model: model.to_owned(),
            })
            .ok_or_else(|| self.unknown_model(model))
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.entries
            .iter()
            .find(|(p, _)| p.name() == name)
            .map(|(p, _)| p.clone())
    }

    /// The provider for pass-through calls that name no model: the first that is not the mock.
    pub fn default_provider(&self) -> Option<Arc<dyn Provider>> {
        let real = self
            .entries
            .iter()
            .find(|(p, _)| p.kind() != ProviderKind::Mock);
        real.or(self.entries.first()).map(|(p, _)| p.clone())
    }

    /// Each provider with its model patterns, in config order.
    pub fn providers(&self) -> &[(Arc<dyn Provider>, Vec<String>)] {
        &self.entries
    }

    fn unknown_model(&self, model: &str) -> ApiError {
        let configured: Vec<String> = self
            .entries
            .iter()
            .map(|(p, patterns)| {
                format!(
                    "{} [{}] (or {}/<model>)",
                    p.name(),
                    patterns.join(", "),
                    p.name()
                )
            })
            .collect();
        ApiError::not_found(
            "model_not_found",
            format!(
                "The model `{model}` does not match any configured provider. Configured: {}",
                configured.join("; ")
            ),
        )
        .with_param("model")
    }

    /// The routing table as `check-config` prints it.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut groups: Vec<_> = self.groups.names().collect();
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        for group in groups {
            out.push_str(&format!(
                "{:<12} models  {}\n",
                group.name,
                group.describe()
            ));
        }
        for (provider, patterns) in &self.entries {
            out.push_str(&format!(
                "{:<12} {:<9} {}  (also {}/<model>)\n",
                provider.name(),
                provider.kind().as_str(),
                if patterns.is_empty() {
                    "-".to_owned()
                } else {
                    patterns.join(", ")
                },
                provider.name()
            ));
        }
        out
    }
}

/// Glob match with `*` (any run of characters) and `?` (one character). Works on bytes without
/// allocating (it runs for every pattern on every routed call); `?` steps over a whole UTF-8
/// character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'?') => {
                pi += 1;
                ti += utf8_len(t[ti]);
            }
            Some(b'*') => {
                backtrack = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    let next = matched + utf8_len(t[matched]);
                    pi = star + 1;
                    ti = next;
                    backtrack = Some((star, next));
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*')
}

/// Bytes of the UTF-8 character that starts with `lead`.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_table() {
        let cases = [
            ("gpt-*", "gpt-4o-mini", true),
            ("gpt-*", "gpt-", true),
            ("gpt-*", "o1", false),
            ("o*", "o3-mini", true),
            ("text-embedding-*", "text-embedding-3-small", true),
            ("claude-?-haiku", "claude-3-haiku", true),
            ("claude-?-haiku", "claude-35-haiku", false),
            ("*mini*", "gpt-4o-mini-2024", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("m?del", "mödel", true),
            ("*ö*", "gpt-ö-1", true),
            ("a?", "aé", true),
            ("a?", "aéb", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(glob_match(pattern, text), expected, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn routing_by_prefix_and_pattern() {
        let text = r#"
            [[providers]]
            name = "openai"
            kind = "openai"
            base_url = "http://127.0.0.1:1/v1"
            models = ["gpt-*"]
            [[providers]]
            name = "local"
            kind = "openai"
            base_url = "http://127.0.0.1:2/v1"
            models = ["gpt-4o*", "llama*"]
            [[providers]]
            name = "mock"
            kind = "mock"
            models = ["mock/*"]
        "#;
        let mut config = Config::from_toml(text, crate::config::Source::BuiltIn).unwrap();
        config.validate().unwrap();
        let router = Router::from_config(&config).unwrap();
        let cases = [
            ("gpt-4o", "openai", "gpt-4o"),
            ("llama3", "local", "llama3"),
            ("local/gpt-4o", "local", "gpt-4o"),
            ("mock/echo", "mock", "echo"),
        ];
        for (model, provider, upstream_model) in cases {
            let route = router
                .resolve(model)
                .unwrap_or_else(|e| panic!("{model}: {e}"));
            assert_eq!(
                (route.provider.name(), route.model.as_str()),
                (provider, upstream_model),
                "{model}"
            );
        }
        let Err(err) = router.resolve("claude-3") else {
            panic!("claude-3 must not route")
        };
        assert_eq!(err.status, StatusCode::NOT_FOUND);
        assert!(
            err.message.contains("gpt-*") && err.message.contains("llama*"),
            "{}",
            err.message
        );
        // A slash that names no provider is part of the model name (OpenRouter style).
        assert!(router.resolve("meta-llama/llama-3").is_err());
    }
}
