//! Configuration: the TOML schema, `${VAR}` / `${VAR:-default}` expansion, and validation.
//!
//! Every section denies unknown keys, so a typo names itself (with file, line and the keys that
//! are allowed) instead of being silently ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// Where a config came from, for messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    BuiltIn,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::BuiltIn => f.write_str("built-in defaults"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {source_name}: {message}")]
    Parse {
        source_name: Source,
        message: String,
    },
    #[error("invalid config {source_name}: {message}")]
    Invalid {
        source_name: Source,
        message: String,
    },
}

/// hyper's smallest read buffer.
const MIN_HEADER_BYTES: usize = 8192;

/// Longest accepted `request_timeout_ms`: a day.
const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Model names served by several deployments, with fallbacks (`[[models]]`).
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// USD per 1M tokens, overriding the bundled table entry by entry.
    #[serde(default)]
    pub pricing: BTreeMap<String, Price>,
    #[serde(default)]
    pub guardrails: Vec<crate::guardrails::GuardrailConfig>,
    #[serde(skip)]
    pub source: Option<Source>,
    /// `guardrails` as `validate` compiled them (and the entries they came from), so that a
    /// gateway compiles them once: the compile takes ~130M instructions and its scratch memory
    /// stays partly resident.
    #[serde(skip)]
    compiled_guardrails: Option<(
        Vec<crate::guardrails::GuardrailConfig>,
        crate::guardrails::Guardrails,
    )>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    #[serde(deserialize_with = "expanded")]
    pub listen: String,
    /// Empty: the admin API answers loopback clients only.
    #[serde(deserialize_with = "expanded")]
    pub admin_token: String,
    pub max_body_bytes: u64,
    /// The whole call, upstream included; past it the client gets 504 (or an error event).
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// How long in-flight requests may finish after SIGTERM/SIGINT.
    pub shutdown_grace_ms: u64,
    /// Largest request head (request line and headers); larger ones get 431.
    pub max_header_bytes: usize,
    /// Time a client gets to send a request head once it started it (or, on a new connection,
    /// its first byte); slower ones (slowloris) are disconnected.
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection with no call in flight is closed after this long: longer than
    /// load balancers and client pools keep idle connections (AWS ALB 60 s, Go 90 s, Oracle
    /// Cloud 300 s, Google Cloud 600 s, fixed), so that the gateway never closes one as the
    /// balancer sends a call on it.
    pub idle_timeout_ms: u64,
    /// PEM certificate chain and private key: with both, the listener speaks TLS (h2, http/1.1).
    #[serde(deserialize_with = "expanded_opt_path")]
    pub tls_cert: Option<PathBuf>,
    #[serde(deserialize_with = "expanded_opt_path")]
    pub tls_key: Option<PathBuf>,
    /// Open client connections at most; further ones get 503 with `retry-after`.
    pub max_connections: usize,
    /// Calls in progress (streams until their last byte) at most; further ones get 503.
    pub max_in_flight: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_token: String::new(),
            max_body_bytes: 10 * 1024 * 1024,
            request_timeout_ms: 600_000,
            connect_timeout_ms: 10_000,
            shutdown_grace_ms: 30_000,
            max_header_bytes: 64 * 1024,
            header_read_timeout_ms: 30_000,
            idle_timeout_ms: 620_000,
            tls_cert: None,
            tls_key: None,
            max_connections: 10_000,
            max_in_flight: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// Request and response bodies are stored with the trace.
    Full,
    /// Only metadata: no prompt or response text is stored.
    Metadata,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    #[serde(deserialize_with = "expanded_path")]
    pub path: PathBuf,
    pub capture: Capture,
    /// Bodies larger than this are stored cut, marked `truncated`.
    pub max_capture_bytes: usize,
    /// The recorder writes a batch at least this often.
    pub flush_interval_ms: u64,
    /// Traces waiting for the recorder; when full, requests still succeed and the loss is counted.
    pub queue_capacity: usize,
    /// Bytes (captured bodies) waiting for the recorder, bounded like the count.
    pub queue_max_bytes: usize,
    /// sled's page cache. sled holds where each trace is, its indexes and the run aggregates
    /// (traces are in the trace log), so a few MB hold much: `tests/store_memory.rs` grew RSS by
    /// 27 MB over 600k traces with 4 MB, by 45 MB with 16 MB.
    pub cache_capacity_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/flowgate.sled"),
            capture: Capture::Full,
            max_capture_bytes: 1024 * 1024,
            flush_interval_ms: 200,
            queue_capacity: 65_536,
            queue_max_bytes: 256 * 1024 * 1024,
            cache_capacity_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Distinct experiment / prompt_version label values; further ones are counted as `other`.
    pub max_label_values: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_label_values: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Answers kept at most, in bytes (bodies plus bookkeeping).
    pub max_bytes: u64,
    pub ttl_seconds: u64,
    pub mode: CacheMode,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            // 8 MB: ~5k chat answers of 1 KB (LiteLLM's in-memory cache keeps 200 items by
            // default). CONTRACT said 256 MB, 2.5x the 100 MB a gateway process should need, and
            // a full cache costs memory and CPU by its size: ~1.15 MB of RSS per MB, and CPU on
            // every call that stores an answer (the load harness's closed loop, all misses:
            // 59–60 µs per call at 8 MB, 61–67 at 32 MB, 48–49 with no cache). Who repeats more
            // calls sets more.
            max_bytes: 8 * 1024 * 1024,
            ttl_seconds: 3600,
            mode: CacheMode::Deterministic,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Only calls that ask for a repeatable answer: temperature 0, or a seed (and embeddings).
    Deterministic,
    All,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible API: OpenAI, vLLM, Ollama, Groq, OpenRouter, ...
    Openai,
    /// Azure OpenAI: deployment URLs (`/openai/deployments/{model}/...?api-version=`) and the
    /// `api-key` header.
    Azure,
    /// Anthropic's Messages API: chat completions are translated, `/v1/messages` is forwarded.
    Anthropic,
    /// The built-in deterministic provider; answers without any network.
    Mock,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Mock => "mock",
        }
    }

    /// The base URL used when a provider of this kind names none.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::Anthropic => Some("https://api.anthropic.com"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(deserialize_with = "expanded")]
    pub name: String,
    pub kind: ProviderKind,
    #[serde(default, deserialize_with = "expanded")]
    pub base_url: String,
    /// Empty: the client's own `Authorization` header is forwarded.
    #[serde(default, deserialize_with = "expanded")]
    pub api_key: String,
    /// Glob patterns (`*`, `?`) of model names routed to this provider.
    #[serde(default)]
    pub models: Vec<String>,
    /// A PEM file of extra CA certificates to trust for this upstream.
    #[serde(default, deserialize_with = "expanded_opt_path")]
    pub ca_file: Option<PathBuf>,
    /// Ask for `stream_options.include_usage` on streams whose client did not (and hide that
    /// chunk). Turn off for servers that reject the parameter; their streams are then counted.
    #[serde(default = "yes")]
    pub stream_usage: bool,
    /// Azure OpenAI's `api-version` query parameter (`kind = "azure"` only, and required there).
    #[serde(default, deserialize_with = "expanded_opt")]
    pub api_version: Option<String>,
}

fn yes() -> bool {
    true
}

/// Retries, backoff and circuit breaking for `[[models]]` routes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Retries per deployment on 429, 5xx and connection errors (never after the first
    /// streamed byte reached the client).
    pub retries: u32,
    /// First backoff; doubled for each further retry, with jitter; `retry-after` wins.
    pub backoff_ms: u64,
    /// Consecutive failures that open a deployment's circuit.
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            retries: 2,
            backoff_ms: 100,
            breaker_failures: 5,
            breaker_cooldown_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// What clients send as `model`.
    pub name: String,
    pub deployments: Vec<DeploymentConfig>,
    /// Other model names tried in order when every deployment failed.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    /// A `[[providers]]` name.
    pub provider: String,
    /// The model as that provider knows it.
    pub model: String,
    /// Share of first attempts, relative to the other deployments' weights.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    #[serde(default)]
    pub output: Option<f64>,
    /// Input tokens read from the provider's prompt cache.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Input tokens written to the provider's prompt cache (Anthropic).
    #[serde(default)]
    pub cache_write: Option<f64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            storage: StorageConfig::default(),
            metrics: MetricsConfig::default(),
            cache: CacheConfig::default(),
            providers: vec![mock_provider()],
            routing: RoutingConfig::default(),
            models: Vec::new(),
            pricing: BTreeMap::new(),
            guardrails: Vec::new(),
            source: Some(Source::BuiltIn),
            compiled_guardrails: None,
        }
    }
}

/// The built-in mock provider: `mock/<model>` answers deterministically with no key.
pub fn mock_provider() -> ProviderConfig {
    ProviderConfig {
        name: "mock".into(),
        kind: ProviderKind::Mock,
        base_url: String::new(),
        api_key: String::new(),
        models: vec!["mock/*".into()],
        ca_file: None,
        stream_usage: true,
        api_version: None,
    }
}

impl Config {
    /// Resolves which config to use, as CONTRACT section 1 says: `--config`, else
    /// `$FLOWGATE_CONFIG`, else `config/flowgate.toml` if present, else built-in defaults.
    /// Then applies `FLOWGATE_LISTEN` and `FLOWGATE_DATA_DIR`.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os("FLOWGATE_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let default_path = PathBuf::from("config/flowgate.toml");
        let path = explicit
            .map(Path::to_path_buf)
            .or(env_path)
            .or_else(|| default_path.exists().then_some(default_path));
        let mut config = match path {
            Some(path) => Self::from_file(&path)?,
            None => Config::default(),
        };
        config.apply_env_overrides();
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, Source::File(path.to_path_buf()))
    }

    /// Parses without applying environment overrides or validating; see [`Config::validate`].
    pub fn from_toml(text: &str, source: Source) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            source_name: source.clone(),
            message: err.to_string(),
        })?;
        config.source = Some(source);
        Ok(config)
    }

    fn apply_env_overrides(&mut self) {
        if let Some(listen) = std::env::var("FLOWGATE_LISTEN")
            .ok()
            .filter(|v| !v.is_empty())
        {
            self.server.listen = listen;
        }
        if let Some(dir) = std::env::var_os("FLOWGATE_DATA_DIR").filter(|v| !v.is_empty()) {
            self.storage.path = PathBuf::from(dir).join("flowgate.sled");
        }
    }

    pub fn source(&self) -> Source {
        self.source.clone().unwrap_or(Source::BuiltIn)
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            source_name: self.source(),
            message,
        }
    }

    /// Checks what the schema cannot: addresses, names, URLs, files. A config that names no
    /// provider at all gets the mock, so a new setup answers; one that names providers gets
    /// exactly those (a production gateway does not expose `mock/*` unless asked to).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.server.listen.parse::<SocketAddr>().map_err(|err| {
            self.invalid(format!(
                "server.listen = {:?}: {err} (expected host:port, e.g. 127.0.0.1:8080)",
                self.server.listen
            ))
        })?;
        if self.server.max_body_bytes == 0 {
            return Err(self.invalid("server.max_body_bytes must be greater than 0".into()));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&self.server.request_timeout_ms) {
            return Err(self.invalid(format!(
                "server.request_timeout_ms must be between 1 and {MAX_TIMEOUT_MS} (24 hours)"
            )));
        }
        if self.server.max_header_bytes < MIN_HEADER_BYTES {
            return Err(self.invalid(format!(
                "server.max_header_bytes must be at least {MIN_HEADER_BYTES} (the HTTP library's floor)"
            )));
        }
        match (&self.server.tls_cert, &self.server.tls_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                for (name, path) in [("tls_cert", cert), ("tls_key", key)] {
                    if !path.is_file() {
                        return Err(self
                            .invalid(format!("server.{name}: {} does not exist", path.display())));
                    }
                }
            }
            _ => {
                return Err(self.invalid(
                    "server.tls_cert and server.tls_key go together: set both or neither".into(),
                ))
            }
        }
        if self.cache.enabled && (self.cache.max_bytes == 0 || self.cache.ttl_seconds == 0) {
            return Err(self.invalid(
                "cache.max_bytes and cache.ttl_seconds must be greater than 0 (or set cache.enabled = false)".into(),
            ));
        }
        if self.server.max_connections == 0 || self.server.max_in_flight == 0 {
            return Err(self.invalid(
                "server.max_connections and server.max_in_flight must be greater than 0".into(),
            ));
        }
        if self.storage.queue_max_bytes == 0 {
            return Err(self.invalid("storage.queue_max_bytes must be greater than 0".into()));
        }
        if self.storage.queue_capacity == 0 {
            return Err(self.invalid("storage.queue_capacity must be greater than 0".into()));
        }
        for provider in &mut self.providers {
            if provider.base_url.is_empty() {
                if let Some(url) = provider.kind.default_base_url() {
                    provider.base_url = url.to_owned();
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (index, provider) in self.providers.iter().enumerate() {
            self.validate_provider(index, provider)?;
            if !seen.insert(provider.name.as_str()) {
                return Err(self.invalid(format!(
                    "providers[{index}]: the name {:?} is used twice",
                    provider.name
                )));
            }
        }
        if self.providers.is_empty() {
            self.providers.push(mock_provider());
        }
        self.validate_models()?;
        for (model, price) in &self.pricing {
            let rates = [
                Some(price.input),
                price.output,
                price.cached_input,
                price.cache_write,
            ];
            if rates
                .iter()
                .flatten()
                .any(|rate| !rate.is_finite() || *rate < 0.0)
            {
                return Err(self.invalid(format!(
                    "pricing.{model:?}: prices must be finite and not negative"
                )));
            }
        }
        let compiled = crate::guardrails::Guardrails::from_config(&self.guardrails)
            .map_err(|err| self.invalid(err.to_string()))?;
        self.compiled_guardrails = Some((self.guardrails.clone(), compiled));
        Ok(())
    }

    /// The compiled guardrails: those `validate` built when `guardrails` is still what it
    /// compiled, else built now (a config assembled or changed in code).
    pub fn compiled_guardrails(
        &self,
    ) -> Result<crate::guardrails::Guardrails, crate::guardrails::GuardrailError> {
        match &self.compiled_guardrails {
            Some((from, compiled)) if *from == self.guardrails => Ok(compiled.clone()),
            _ => crate::guardrails::Guardrails::from_config(&self.guardrails),
        }
    }

    fn validate_models(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for (index, model) in self.models.iter().enumerate() {
            let at = format!("models[{index}] ({:?})", model.name);
            if model.name.is_empty() || !names.insert(model.name.as_str()) {
                return Err(self.invalid(format!("{at}: a model needs a name used only once")));
            }
            if model.deployments.is_empty() {
                return Err(self.invalid(format!("{at}: list at least one deployment")));
            }
            for deployment in &model.deployments {
                if !self.providers.iter().any(|p| p.name == deployment.provider) {
                    let known: Vec<&str> = self.providers.iter().map(|p| p.name.as_str()).collect();
                    return Err(self.invalid(format!(
                        "{at}: deployment provider {:?} is not a configured provider (known: {})",
                        deployment.provider,
                        known.join(", ")
                    )));
                }
                if deployment.weight == 0 || deployment.model.is_empty() {
                    return Err(self.invalid(format!(
                        "{at}: every deployment needs a model and a weight of at least 1"
                    )));
                }
            }
            if let Some(own) = model.fallbacks.iter().find(|f| **f == model.name) {
                return Err(self.invalid(format!("{at}: {own:?} cannot be its own fallback")));
            }
        }
        Ok(())
    }

    fn validate_provider(
        &self,
        index: usize,
        provider: &ProviderConfig,
    ) -> Result<(), ConfigError> {
        let at = format!("providers[{index}] ({:?})", provider.name);
        if provider.name.is_empty() || provider.name.contains('/') {
            return Err(self.invalid(format!("{at}: name must be non-empty and contain no '/'")));
        }
        match (provider.kind, &provider.api_version) {
            (ProviderKind::Azure, None) => {
                return Err(self.invalid(format!(
                    "{at}: kind = \"azure\" needs api_version (e.g. api_version = \"2024-10-21\")"
                )))
            }
            (ProviderKind::Azure, Some(_)) | (_, None) => {}
            (kind, Some(_)) => {
                return Err(self.invalid(format!(
                    "{at}: api_version is for kind = \"azure\" only, not {:?}",
                    kind.as_str()
                )))
            }
        }
        if provider.kind != ProviderKind::Mock {
            let uri: http::Uri = provider.base_url.parse().map_err(|err| {
                self.invalid(format!(
                    "{at}: base_url {:?} is not a URL: {err}",
                    provider.base_url
                ))
            })?;
            if !matches!(uri.scheme_str(), Some("http") | Some("https"))
                || uri.authority().is_none()
            {
                return Err(self.invalid(format!(
                    "{at}: base_url {:?} must be an absolute http:// or https:// URL",
                    provider.base_url
                )));
            }
        }
        if let Some(ca_file) = &provider.ca_file {
            if !ca_file.is_file() {
                return Err(self.invalid(format!(
                    "{at}: ca_file {} does not exist",
                    ca_file.display()
                )));
            }
        }
        if let Some(pattern) = provider.models.iter().find(|p| p.is_empty()) {
            return Err(self.invalid(format!("{at}: empty model pattern {pattern:?}")));
        }
        Ok(())
    }
}

fn expanded<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let raw = String::deserialize(deserializer)?;
    expand_env(&raw, |name| std::env::var(name).ok()).map_err(serde::de::Error::custom)
}

fn expanded_opt<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let value = expanded(deserializer)?;
    Ok((!value.is_empty()).then_some(value))
}

fn expanded_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    expanded(deserializer).map(PathBuf::from)
}

fn expanded_opt_path<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PathBuf>, D::Error> {
    let path = expanded(deserializer)?;
    Ok((!path.is_empty()).then(|| PathBuf::from(path)))
}

/// Expands `${VAR}` and `${VAR:-default}`. An unset `${VAR}` without a default is an error, so a
/// missing secret is noticed at start rather than sent upstream as an empty string. `$$` is a
/// literal `$`.
pub fn expand_env(input: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {input:?}"))?;
            out.push_str(&expand_one(&body[..end], &lookup)?);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_one(expr: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default) = match expr.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (expr, None),
    };
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("${{{expr}}}: {name:?} is not a variable name"));
    }
    match (lookup(name).filter(|v| !v.is_empty()), default) {
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_owned()),
        (None, None) => Err(format!(
            "environment variable {name} is not set (write ${{{name}:-}} to make it optional)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_table() {
        let cases = [
            ("plain", Ok("plain")),
            ("${SET}", Ok("value")),
            ("a-${SET}-b", Ok("a-value-b")),
            ("${UNSET:-fallback}", Ok("fallback")),
            ("${EMPTY:-fallback}", Ok("fallback")),
            ("${UNSET:-}", Ok("")),
            ("${SET:-fallback}", Ok("value")),
            ("cost $5", Ok("cost $5")),
            ("$${SET}", Ok("${SET}")),
        ];
        for (input, expected) in cases {
            assert_eq!(
                expand_env(input, env).as_deref(),
                expected.map(str::to_owned).as_deref(),
                "{input}"
            );
        }
        assert!(expand_env("${UNSET}", env)
            .unwrap_err()
            .contains("UNSET is not set"));
        assert!(expand_env("${SET", env).unwrap_err().contains("unclosed"));
        assert!(expand_env("${bad name}", env).is_err());
    }

    #[test]
    fn unknown_key_names_itself_and_the_file() {
        let err = Config::from_toml(
            "[server]\nlisten_on = \"x\"\n",
            Source::File("my.toml".into()),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("my.toml"), "{message}");
        assert!(message.contains("listen_on"), "{message}");
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn shipped_config_parses_and_validates() {
        let text = include_str!("../config/flowgate.toml");
        let mut config = Config::from_toml(text, Source::BuiltIn).unwrap();
        config.validate().unwrap();
        assert!(config
            .providers
            .iter()
            .any(|p| p.kind == ProviderKind::Mock));
    }

    #[test]
    fn compiled_guardrails_follow_changes_made_after_validating() {
        let text = include_str!("../config/flowgate.toml");
        let mut config = Config::from_toml(text, Source::BuiltIn).unwrap();
        config.validate().unwrap();
        assert!(config.compiled_guardrails().unwrap().checks_output());
        config.guardrails.clear();
        assert!(config.compiled_guardrails().unwrap().is_empty());
    }

    #[test]
    fn anthropic_base_url_has_a_default() {
        let text =
            "[[providers]]\nname = \"claude\"\nkind = \"anthropic\"\nmodels = [\"claude-*\"]";
        let mut config = Config::from_toml(text, Source::BuiltIn).unwrap();
        config.validate().unwrap();
        assert_eq!(config.providers[0].base_url, "https://api.anthropic.com");
    }

    #[test]
    fn the_mock_is_added_only_when_no_provider_is_named() {
        let mut bare = Config::from_toml("", Source::BuiltIn).unwrap();
        bare.validate().unwrap();
        assert_eq!(bare.providers.len(), 1);
        assert_eq!(bare.providers[0].kind, ProviderKind::Mock);
        let text = "[[providers]]\nname = \"openai\"\nkind = \"openai\"\nbase_url = \"https://api.openai.com/v1\"";
        let mut production = Config::from_toml(text, Source::BuiltIn).unwrap();
        production.validate().unwrap();
        assert!(production
            .providers
            .iter()
            .all(|p| p.kind != ProviderKind::Mock));
    }

    #[test]
    fn validation_rejects_bad_values() {
        let cases = [
            ("[server]\nlisten = \"nonsense\"", "server.listen"),
            ("[[providers]]\nname = \"x\"\nkind = \"openai\"\nbase_url = \"ftp://h\"", "base_url"),
            ("[[providers]]\nname = \"a/b\"\nkind = \"mock\"", "no '/'"),
            ("[[providers]]\nname = \"x\"\nkind = \"openai\"\nbase_url = \"http://h\"\nca_file = \"/nonexistent.pem\"", "ca_file"),
            ("[pricing]\n\"m\" = { input = -1.0 }", "not negative"),
            ("[server]\nrequest_timeout_ms = 9223372036854775807", "request_timeout_ms"),
            ("[[models]]\nname = \"m\"\ndeployments = [{ provider = \"nope\", model = \"x\" }]", "not a configured provider"),
            ("[[models]]\nname = \"m\"\ndeployments = []", "at least one deployment"),
            ("[[models]]\nname = \"m\"\ndeployments = [{ provider = \"mock\", model = \"x\", weight = 0 }]", "weight of at least 1"),
            ("[[models]]\nname = \"m\"\ndeployments = [{ provider = \"mock\", model = \"x\" }]\nfallbacks = [\"m\"]", "its own fallback"),
            ("[cache]\nttl_seconds = 0", "cache.max_bytes and cache.ttl_seconds"),
            ("[[providers]]\nname = \"az\"\nkind = \"azure\"\nbase_url = \"https://r.openai.azure.com\"", "needs api_version"),
            ("[[providers]]\nname = \"x\"\nkind = \"openai\"\nbase_url = \"http://h\"\napi_version = \"2024-10-21\"", "api_version is for kind = \"azure\" only"),
            ("[[providers]]\nname = \"az\"\nkind = \"azure\"\napi_version = \"2024-10-21\"", "base_url"),
        ];
        for (text, needle) in cases {
            let mut config = Config::from_toml(text, Source::BuiltIn).unwrap();
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(needle), "{text}: {message}");
        }
        let err = Config::from_toml(
            "[[providers]]\nname = \"x\"\nkind = \"bogus\"",
            Source::BuiltIn,
        )
        .unwrap_err();
        assert!(err.to_string().contains("openai"), "{err}");
    }
}
