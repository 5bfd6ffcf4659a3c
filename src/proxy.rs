//! The request pipeline: tagging context → body → route → upstream → metered response.
//!
//! The hot path parses only what routing and run identity need, forwards the body byte for byte
//! where nothing must change, and hands everything else to the recorder when the call ends.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::config::{Config, ProviderKind};
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::providers::{mock, Endpoint, Route, Router, UpstreamRequest};
use crate::recorder::RecorderHandle;
use crate::response::{self, ResponseBody};
use crate::runs::RunIdentity;
use crate::trace::Trace;

pub mod body;
pub mod headers;
pub mod request;

use body::{Captured, Draft, InFlight, MeteredBody};
use request::RequestFields;

pub const TRACE_ID_HEADER: &str = "x-flowgate-trace-id";
pub const RUN_ID_HEADER: &str = "x-flowgate-run-id";

/// Response bytes kept for the recorder at most, whatever the capture setting: enough for any
/// usage block, which providers send last.
const MIN_METERING_BYTES: usize = 4 * 1024 * 1024;

pub struct Proxy {
    router: Router,
    recorder: RecorderHandle,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    /// `flowgate_rejected_total{reason="in_flight"}`.
    rejected: Counter,
    max_body_bytes: u64,
    request_timeout: Duration,
    metering_bytes: usize,
}

/// What the proxy learnt from a model-calling request body.
struct Call {
    route: Route,
    upstream_body: Bytes,
    stream: bool,
    /// The gateway asked for stream usage; the extra chunk must not reach the client.
    drop_usage_chunk: bool,
}

impl Proxy {
    pub fn new(
        config: &Config,
        router: Router,
        recorder: RecorderHandle,
        rejected: Counter,
    ) -> Proxy {
        Proxy {
            router,
            recorder,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: config.server.max_in_flight,
            rejected,
            max_body_bytes: config.server.max_body_bytes,
            request_timeout: Duration::from_millis(config.server.request_timeout_ms),
            metering_bytes: config.storage.max_capture_bytes.max(MIN_METERING_BYTES),
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub async fn handle(&self, request: http::Request<Incoming>) -> Response<ResponseBody> {
        let Some(in_flight) = InFlight::try_acquire(&self.in_flight, self.max_in_flight) else {
            // Overload: answered without a trace, so that recording adds no work; counted.
            self.rejected.inc();
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "overloaded",
                format!(
                    "flowgate is handling server.max_in_flight ({}) calls; retry shortly",
                    self.max_in_flight
                ),
            );
            error.retry_after_secs = Some(1);
            return error.into_response();
        };
        let (parts, body) = request.into_parts();
        let mut draft = Draft::new(
            self.recorder.clone(),
            parts.method.as_str(),
            parts.uri.path(),
            fallback_run_id,
        );
        draft.in_flight = Some(in_flight);
        match self.pipeline(&parts, body, &mut draft).await {
            Ok(response) => response,
            Err(error) => {
                // Client mistakes are routine (debug); the gateway's or upstream's failures are not.
                if error.status.is_server_error() {
                    tracing::warn!(trace_id = %draft.trace.id, status = error.status.as_u16(), code = error.code, message = %error.message, "call failed");
                } else {
                    tracing::debug!(trace_id = %draft.trace.id, status = error.status.as_u16(), code = error.code, "call rejected");
                }
                draft.trace.status = error.status.as_u16();
                draft.fail(error.class(), error.message.clone());
                let mut response = error.into_response();
                add_trace_headers(&mut response, &draft.trace);
                draft.finish(Captured::default());
                response
            }
        }
    }

    async fn pipeline(
        &self,
        parts: &Parts,
        body: Incoming,
        draft: &mut Draft,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let context = RequestContext::from_headers(&parts.headers)?;
        apply_context(&mut draft.trace, &context);
        let body = self.read_body(parts, body, draft).await?;
        let endpoint = draft.endpoint;
        if endpoint == Endpoint::Models {
            let response = self.list_models(parts).await;
            draft.trace.status = response.status().as_u16();
            draft.finish(Captured::default());
            return Ok(response);
        }
        let call = if endpoint.takes_model() {
            self.model_call(parts, &body, draft)?
        } else {
            self.passthrough_call(parts, &body, &context, draft)?
        };
        draft.trace.run_id = run_identity(&draft.trace).id();
        self.forward(parts, call, draft).await
    }

    async fn read_body(
        &self,
        parts: &Parts,
        body: Incoming,
        draft: &mut Draft,
    ) -> Result<Bytes, ApiError> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!(
                    "The request body is larger than server.max_body_bytes ({} bytes).",
                    self.max_body_bytes
                ),
            )
        };
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes) {
            return Err(too_large());
        }
        let reading = std::time::Instant::now();
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let deadline = draft.started() + self.request_timeout;
        let collected =
            match tokio::time::timeout_at(deadline.into(), Limited::new(body, limit).collect())
                .await
            {
                Ok(collected) => collected,
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "invalid_request_error",
                        "request_body_timeout",
                        "the request body did not arrive within server.request_timeout_ms",
                    ))
                }
            };
        draft.body_read = reading.elapsed();
        let bytes = collected
            .map_err(|err| {
                if err
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    too_large()
                } else {
                    ApiError::invalid_request(
                        "body_read_failed",
                        format!("could not read the request body: {err}"),
                    )
                }
            })?
            .to_bytes();
        draft.request_body = bytes.clone();
        Ok(bytes)
    }

    /// Chat, completions, embeddings, responses: a JSON body naming a model.
    fn model_call(&self, parts: &Parts, body: &Bytes, draft: &mut Draft) -> Result<Call, ApiError> {
        if parts.method != Method::POST {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                format!(
                    "{} {} is not supported; use POST",
                    parts.method,
                    parts.uri.path()
                ),
            ));
        }
        if !request::is_json_content_type(parts.headers.get(CONTENT_TYPE)) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_content_type",
                "The request body must be JSON: send Content-Type: application/json.",
            ));
        }
        let fields = RequestFields::parse(body)?;
        let model = fields
            .model
            .as_deref()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                ApiError::invalid_request("missing_model", "you must provide a model parameter")
                    .with_param("model")
            })?;
        draft.trace.requested_model = Some(model.to_owned());
        draft.trace.sampling = fields.sampling();
        let stream = fields.stream();
        draft.trace.stream = stream;
        let route = self.router.resolve(model)?;
        draft.trace.provider = Some(route.provider.name().to_owned());
        draft.trace.served_model = Some(route.model.clone());
        let streams_usage = matches!(
            draft.endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions
        );
        let ask_usage = stream
            && streams_usage
            && !fields.client_asked_for_usage()
            && route.provider.supports_stream_usage();
        let renamed = (route.model != model).then_some(route.model.as_str());
        let upstream_body =
            request::rewrite(body, renamed, ask_usage, fields.stream_options.is_some())?;
        Ok(Call {
            route,
            upstream_body,
            stream,
            drop_usage_chunk: ask_usage,
        })
    }

    /// Any other `/v1/...` path: routed by the body's model if it names one, else by
    /// `x-flowgate-provider`, else to the first real provider; forwarded untouched.
    fn passthrough_call(
        &self,
        parts: &Parts,
        body: &Bytes,
        context: &RequestContext,
        draft: &mut Draft,
    ) -> Result<Call, ApiError> {
        let json_model = request::is_json_content_type(parts.headers.get(CONTENT_TYPE))
            .then(|| RequestFields::parse(body).ok())
            .flatten()
            .and_then(|f| f.model.map(|m| m.into_owned()));
        let route = match (&context.provider, json_model) {
            (Some(name), model) => {
                let provider = self.router.by_name(name).ok_or_else(|| {
                    ApiError::not_found(
                        "provider_not_found",
                        format!("no provider named {name:?} is configured"),
                    )
                })?;
                Route {
                    provider,
                    model: model.unwrap_or_default(),
                }
            }
            (None, Some(model)) => self.router.resolve(&model)?,
            (None, None) => {
                let provider = self.router.default_provider().ok_or_else(|| {
                    ApiError::not_found("provider_not_found", "no provider is configured")
                })?;
                Route {
                    provider,
                    model: String::new(),
                }
            }
        };
        draft.trace.provider = Some(route.provider.name().to_owned());
        if !route.model.is_empty() {
            draft.trace.requested_model = Some(route.model.clone());
            draft.trace.served_model = Some(route.model.clone());
        }
        Ok(Call {
            route,
            upstream_body: body.clone(),
            stream: false,
            drop_usage_chunk: false,
        })
    }

    async fn forward(
        &self,
        parts: &Parts,
        call: Call,
        draft: &mut Draft,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let provider = call.route.provider.clone();
        let path = parts.uri.path();
        let suffix = path.strip_prefix("/v1").unwrap_or(path);
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{suffix}?{query}"),
            None => suffix.to_owned(),
        };
        let upstream_request = UpstreamRequest {
            endpoint: draft.endpoint,
            method: parts.method.clone(),
            path_and_query,
            headers: headers::for_upstream(parts.headers.clone()),
            body: call.upstream_body.clone(),
            model: (!call.route.model.is_empty()).then(|| call.route.model.clone()),
            stream: call.stream,
        };
        // Kept for the trace as a copy: the body is a slice of the client connection's read
        // buffer, which the recorder would otherwise pin until it runs.
        draft.request_body = Bytes::copy_from_slice(&call.upstream_body);
        let deadline = tokio::time::Instant::from_std(draft.started() + self.request_timeout);
        draft.upstream_started = Some(std::time::Instant::now());
        let upstream =
            match tokio::time::timeout_at(deadline, provider.send(upstream_request)).await {
                Err(_) => {
                    return Err(ApiError::gateway_timeout(format!(
                        "provider {:?} did not answer within server.request_timeout_ms ({} ms)",
                        provider.name(),
                        self.request_timeout.as_millis()
                    )))
                }
                Ok(Err(err)) => return Err(err.into_api_error(provider.name())),
                Ok(Ok(upstream)) => upstream,
            };
        draft.trace.status = upstream.status.as_u16();
        if !upstream.status.is_success() {
            draft.fail(
                "upstream_http",
                format!("the upstream answered {}", upstream.status),
            );
        }
        let sse = upstream
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let drop_usage_chunk = call.drop_usage_chunk && sse;
        let mut response = Response::new(response::empty());
        *response.status_mut() = upstream.status;
        // An SSE body is re-cut at event boundaries (and may lose a chunk): no fixed length.
        *response.headers_mut() = headers::for_client(upstream.headers, sse);
        add_trace_headers(&mut response, &draft.trace);
        let body = MeteredBody::new(
            upstream.body,
            draft.take(),
            Captured::new(self.metering_bytes, sse),
            drop_usage_chunk,
            tokio::time::sleep_until(deadline),
        );
        Ok(response.map(|_| body.boxed()))
    }

    /// `GET /v1/models`: the mock's models and each OpenAI-compatible upstream's own list,
    /// filtered to what routes to it.
    async fn list_models(&self, parts: &Parts) -> Response<ResponseBody> {
        let mut data = Vec::new();
        let named = parts
            .headers
            .get(crate::context::PROVIDER)
            .and_then(|v| v.to_str().ok());
        let keyless = self
            .router
            .providers()
            .iter()
            .filter(|(p, _)| !p.has_own_key())
            .count();
        for (provider, patterns) in self.router.providers() {
            if named.is_some_and(|name| name != provider.name()) {
                continue;
            }
            // The client's key goes where its calls would go: to the provider it named, or to
            // the only provider that uses client keys. Never fanned out to several.
            let with_client_key = named.is_some() || keyless == 1;
            let ids = match provider.kind() {
                ProviderKind::Mock => mock::listed_models(provider.name()),
                ProviderKind::Openai | ProviderKind::Azure | ProviderKind::Anthropic => {
                    self.upstream_models(provider.as_ref(), parts, with_client_key)
                        .await
                }
            };
            let routed = |id: &String| {
                provider.kind() == ProviderKind::Mock
                    || patterns.iter().any(|p| crate::providers::glob_match(p, id))
            };
            data.extend(ids.iter().filter(|id| routed(id)).map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": provider.name()})));
        }
        response::json(StatusCode::OK, &json!({"object": "list", "data": data}))
    }

    async fn upstream_models(
        &self,
        provider: &dyn crate::providers::Provider,
        parts: &Parts,
        with_client_key: bool,
    ) -> Vec<String> {
        let mut upstream_headers = headers::for_upstream(parts.headers.clone());
        if !with_client_key {
            upstream_headers.remove(http::header::AUTHORIZATION);
        }
        let request = UpstreamRequest {
            endpoint: Endpoint::Models,
            method: Method::GET,
            path_and_query: "/models".into(),
            headers: upstream_headers,
            body: Bytes::new(),
            model: None,
            stream: false,
        };
        let fetch = async {
            let response = provider.send(request).await.ok()?;
            if !response.status.is_success() {
                return None;
            }
            let body = collect_at_most(response.body, MAX_MODEL_LIST_BYTES).await?;
            let list: Value = serde_json::from_slice(&body).ok()?;
            Some(
                list.get("data")?
                    .as_array()?
                    .iter()
                    .filter_map(|m| m.get("id")?.as_str().map(str::to_owned))
                    .collect(),
            )
        };
        match tokio::time::timeout(Duration::from_secs(5), fetch).await {
            Ok(Some(ids)) => ids,
            _ => {
                tracing::warn!(
                    provider = provider.name(),
                    "could not list the upstream's models"
                );
                Vec::new()
            }
        }
    }
}

/// A model list larger than this is not one.
const MAX_MODEL_LIST_BYTES: usize = 4 * 1024 * 1024;

async fn collect_at_most(mut body: ResponseBody, limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if out.len() + data.len() > limit {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(out)
}

fn apply_context(trace: &mut Trace, context: &RequestContext) {
    trace.experiment = context.experiment.clone();
    trace.run_name = context.run_name.clone();
    trace.prompt_id = context.prompt_id.clone();
    trace.prompt_version = context.prompt_version.clone();
    trace.params = context.params.clone();
    trace.tags = context.tags.clone();
    trace.session = context.session.clone();
    trace.parent = context.parent.clone();
}

fn run_identity(trace: &Trace) -> RunIdentity<'_> {
    RunIdentity {
        experiment: &trace.experiment,
        run_name: trace.run_name.as_deref(),
        provider: trace.provider.as_deref().unwrap_or(""),
        model: crate::runs::run_model(trace),
        prompt_id: trace.prompt_id.as_deref(),
        prompt_version: trace.prompt_version.as_deref(),
        params: &trace.params,
        sampling: &trace.sampling,
    }
}

/// The run of a call that ended before routing (a bad request): whatever was known.
fn fallback_run_id(trace: &Trace) -> String {
    run_identity(trace).id()
}

fn add_trace_headers(response: &mut Response<ResponseBody>, trace: &Trace) {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&trace.id) {
        headers.insert(TRACE_ID_HEADER, value);
    }
    let run_id = if trace.run_id.is_empty() {
        fallback_run_id(trace)
    } else {
        trace.run_id.clone()
    };
    if let Ok(value) = HeaderValue::from_str(&run_id) {
        headers.insert(RUN_ID_HEADER, value);
    }
}
