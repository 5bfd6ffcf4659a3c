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
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::cache::{self, replay, KeyInput, Lookup, ResponseCache};
use crate::config::{Config, ProviderKind};
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::guardrails::{Expectation, Guardrails, Which};
use crate::providers::{mock, Endpoint, Route, Router, UpstreamRequest};
use crate::recorder::RecorderHandle;
use crate::response::{self, ResponseBody};
use crate::routing::Plan;
use crate::runs::RunIdentity;
use crate::trace::Trace;

pub mod body;
pub mod guard;
pub mod headers;
pub mod request;

use body::{Captured, Draft, InFlight, MeteredBody};
use request::RequestFields;

// Built at compile time: inserting by `&str` parses and validates the name on every call.
pub const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-flowgate-trace-id");
pub const RUN_ID_HEADER: HeaderName = HeaderName::from_static("x-flowgate-run-id");
/// The same name as the request's cache directive header.
pub const CACHE_HEADER: HeaderName = crate::context::CACHE;

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
    cache: Option<ResponseCache>,
    guardrails: Guardrails,
}

/// What the proxy learnt from a request: where it may go, and how its body is prepared for each
/// place.
struct Call {
    plan: Plan,
    /// The client's body.
    body: Bytes,
    /// `None`: forwarded untouched (pass-through paths).
    rewrite: Option<Rewrite>,
    stream: bool,
    /// The client asked for the usage chunk of a stream.
    client_usage: bool,
    /// Set when output guardrails that may change the answer must run before it is sent.
    output_check: Option<Expectation>,
}

/// What a model call's body may need changed for a deployment.
struct Rewrite {
    /// The model the client named.
    requested: String,
    /// The endpoint reports stream usage when asked (chat, completions).
    streams_usage: bool,
    has_stream_options: bool,
}

impl Call {
    /// The body for one deployment, and whether the gateway asked it for stream usage (a chunk
    /// the client then must not see).
    fn body_for(&self, route: &Route) -> Result<(Bytes, bool), ApiError> {
        let Some(rewrite) = &self.rewrite else {
            return Ok((self.body.clone(), false));
        };
        let ask_usage = self.stream
            && rewrite.streams_usage
            && !self.client_usage
            && route.provider.supports_stream_usage();
        let renamed = (route.model != rewrite.requested).then_some(route.model.as_str());
        let body = request::rewrite(&self.body, renamed, ask_usage, rewrite.has_stream_options)?;
        Ok((body, ask_usage))
    }

    /// Who the cache and the run see as serving this call: the `[[models]]` name, or the route.
    fn identity(&self) -> Option<(&str, &str)> {
        match &self.plan.group {
            Some(group) => Some((crate::routing::GROUP_PROVIDER, group.as_str())),
            None => self
                .plan
                .first()
                .map(|route| (route.provider.name(), route.model.as_str())),
        }
    }

    /// Whether the client's own key may reach a provider (then it is part of the cache key).
    fn forwards_client_key(&self) -> bool {
        self.plan
            .candidates
            .iter()
            .any(|c| !c.route.provider.has_own_key())
    }
}

/// A failed attempt kept while others are tried: the last one is what the client gets.
enum Failure {
    Answer {
        /// Who answered, and which of the trace's attempts it was.
        route: Route,
        attempt: usize,
        status: StatusCode,
        headers: http::HeaderMap,
        body: Bytes,
    },
    Error(ApiError),
}

/// Bytes of a failed answer kept for the client in case every later attempt fails too.
const MAX_FAILED_ANSWER_BYTES: usize = 64 * 1024;

impl Proxy {
    pub fn new(
        config: &Config,
        router: Router,
        guardrails: Guardrails,
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
            cache: ResponseCache::new(&config.cache),
            guardrails,
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
                let answered = match draft.blocked_answer.take() {
                    // Read for its usage (the provider billed it); never stored.
                    Some(answer) => Captured::whole(
                        self.metering_bytes,
                        false,
                        answer,
                        draft.started().elapsed().as_micros() as u64,
                    ),
                    None => Captured::default(),
                };
                draft.finish(answered);
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
        if endpoint.takes_model() {
            if let Some(hit) = self.consult_cache(parts, &call, &context, draft).await {
                return Ok(hit);
            }
        }
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
        let plan = self.router.plan(model)?;
        if let Some(route) = plan.first() {
            draft.trace.provider = Some(route.provider.name().to_owned());
            draft.trace.served_model = Some(route.model.clone());
        }
        draft.trace.model_group = plan.group.clone();
        let own_stream_shape = matches!(draft.endpoint, Endpoint::Responses | Endpoint::Messages);
        if stream && own_stream_shape && self.guardrails.changes_output() {
            return Err(ApiError::invalid_request(
                "guardrail_stream_unsupported",
                "an output guardrail here redacts or blocks answers, which flowgate does not do on streamed Responses API or /v1/messages answers yet: send stream=false, or use chat completions",
            )
            .with_param("stream"));
        }
        let body = self.check_input(body, draft)?;
        Ok(Call {
            plan,
            output_check: self
                .guardrails
                .changes_output()
                .then(|| self.guardrails.expectation(&body)),
            body,
            rewrite: Some(Rewrite {
                requested: model.to_owned(),
                streams_usage: matches!(
                    draft.endpoint,
                    Endpoint::ChatCompletions | Endpoint::Completions
                ),
                has_stream_options: fields.stream_options.is_some(),
            }),
            stream,
            client_usage: fields.client_asked_for_usage(),
        })
    }

    /// The input guardrails: a block ends the call here (no upstream call, no cost); a
    /// redaction changes what goes upstream, what the cache keys on and what the trace keeps.
    fn check_input(&self, body: &Bytes, draft: &mut Draft) -> Result<Bytes, ApiError> {
        // Guardrails that only log change nothing: the recorder runs them, off the path.
        if !self.guardrails.changes_input() {
            return Ok(body.clone());
        }
        let checked = self
            .guardrails
            .check_request_of(Which::Changing, draft.endpoint, body)
            .map_err(|err| {
                ApiError::invalid_request(
                    "unreadable_body",
                    format!("the guardrails cannot read this request's texts: {err}"),
                )
            })?;
        draft
            .trace
            .guardrails
            .extend(checked.verdicts.iter().map(|v| v.to_trace()));
        if let Some(blocked) = checked.blocked {
            // What a guardrail refused is not kept.
            draft.request_body = Bytes::new();
            return Err(blocked.to_api_error());
        }
        Ok(match checked.rewritten {
            Some(redacted) => {
                draft.request_body = redacted.clone();
                redacted
            }
            None => body.clone(),
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
            plan: Plan::single(route),
            body: body.clone(),
            rewrite: None,
            stream: false,
            client_usage: false,
            output_check: None,
        })
    }

    /// Answers from the cache, or — on a miss the cache may keep — hands the draft the fill
    /// its finish hook completes. `None`: call the provider.
    async fn consult_cache(
        &self,
        parts: &Parts,
        call: &Call,
        context: &RequestContext,
        draft: &mut Draft,
    ) -> Option<Response<ResponseBody>> {
        let cache = self.cache.as_ref()?;
        if context.cache == cache::Directive::Bypass
            || !cache.admits(draft.endpoint, &draft.trace.sampling)
        {
            return None;
        }
        let (provider, model) = call.identity()?;
        let body = &call.body;
        let key = cache.key(&KeyInput {
            endpoint: draft.endpoint,
            provider,
            model,
            body,
            credential: call.forwards_client_key().then_some(&parts.headers),
        })?;
        let deadline = tokio::time::Instant::from_std(draft.started() + self.request_timeout);
        match cache.lookup(key, context.cache, deadline).await {
            Lookup::Bypass => None,
            Lookup::Miss(fill) => {
                draft.trace.cache = cache::MISS.into();
                draft.cache_fill = Some(fill);
                None
            }
            Lookup::Hit(entry) => {
                match replay::to_client(&entry, draft.endpoint, call.stream, call.client_usage) {
                    Ok(answer) => Some(self.serve_hit(&entry, answer, call, body, draft)),
                    Err(err) => {
                        tracing::warn!(trace_id = %draft.trace.id, error = %err, "cached answer not replayable; calling the provider");
                        draft.trace.cache = cache::MISS.into();
                        None
                    }
                }
            }
        }
    }

    fn serve_hit(
        &self,
        entry: &cache::Entry,
        answer: Bytes,
        call: &Call,
        body: &Bytes,
        draft: &mut Draft,
    ) -> Response<ResponseBody> {
        let content_type = if call.stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let mut response = response::with_content_type(StatusCode::OK, answer, content_type);
        draft.trace.cache = cache::HIT.into();
        draft.trace.status = StatusCode::OK.as_u16();
        let elapsed = draft.started().elapsed();
        if call.stream {
            draft.trace.latency.ttft_ms = Some(elapsed.as_secs_f64() * 1000.0);
        }
        add_trace_headers(&mut response, &draft.trace);
        draft.request_body = Bytes::copy_from_slice(body);
        // The recorder reads usage from the answer as it was stored.
        let stored = Captured::whole(
            self.metering_bytes,
            entry.sse,
            entry.body.clone(),
            elapsed.as_micros() as u64,
        );
        draft.finish(stored);
        response
    }

    /// Calls the plan's deployments in order — with retries, backoff and circuit breakers for
    /// `[[models]]` routes — until one answers with something that is not worth retrying, and
    /// streams that answer. Nothing reaches the client before that choice is made.
    async fn forward(
        &self,
        parts: &Parts,
        call: Call,
        draft: &mut Draft,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let deadline = tokio::time::Instant::from_std(draft.started() + self.request_timeout);
        let groups = self.router.groups();
        let candidates = &call.plan.candidates;
        let mut failure: Option<Failure> = None;
        let mut wait_hint: Option<Duration> = None;
        draft.upstream_started = Some(std::time::Instant::now());
        for (index, candidate) in candidates.iter().enumerate() {
            if !groups.admit(candidate) {
                draft.attempt(&candidate.route, None, Some("circuit_open"), Duration::ZERO);
                continue;
            }
            let (body, drop_usage_chunk) = call.body_for(&candidate.route)?;
            for retry in 0..=call.plan.retries {
                if retry > 0 {
                    let wait = wait_hint
                        .take()
                        .unwrap_or_else(|| groups.policy.backoff(retry));
                    if tokio::time::Instant::now() + wait >= deadline {
                        break;
                    }
                    tokio::time::sleep(wait).await;
                }
                let last =
                    retry == call.plan.retries && !groups.any_available(&candidates[index + 1..]);
                let sent = std::time::Instant::now();
                let request = self.upstream_request(
                    parts,
                    draft.endpoint,
                    &candidate.route,
                    &body,
                    call.stream,
                );
                let provider = &candidate.route.provider;
                let upstream = match tokio::time::timeout_at(deadline, provider.send(request)).await
                {
                    Err(_) => {
                        draft.attempt(&candidate.route, None, Some("timeout"), sent.elapsed());
                        return Err(ApiError::gateway_timeout(format!(
                            "provider {:?} did not answer within server.request_timeout_ms ({} ms)",
                            provider.name(),
                            self.request_timeout.as_millis()
                        )));
                    }
                    Ok(Err(err)) => {
                        groups.record(candidate, false);
                        let error = err.into_api_error(provider.name());
                        draft.attempt(&candidate.route, None, Some(error.code), sent.elapsed());
                        failure = Some(Failure::Error(error));
                        continue;
                    }
                    Ok(Ok(upstream)) => upstream,
                };
                let retryable = crate::routing::is_retryable(upstream.status);
                groups.record(candidate, !retryable);
                draft.attempt(
                    &candidate.route,
                    Some(upstream.status),
                    None,
                    sent.elapsed(),
                );
                if !retryable || last {
                    let upstream = self.check_output(&call, upstream, draft, deadline).await?;
                    draft.serve_from(&candidate.route, None);
                    // Kept for the trace as a copy: the body is a slice of the client
                    // connection's read buffer, which the recorder would otherwise pin.
                    draft.request_body = Bytes::copy_from_slice(&body);
                    return Ok(self.respond(&call, upstream, drop_usage_chunk, draft, deadline));
                }
                wait_hint = crate::routing::retry_after(&upstream.headers);
                let attempt = draft.trace.attempts.len().saturating_sub(1);
                let route = candidate.route.clone();
                failure = Some(keep_failure(route, attempt, upstream, deadline).await);
            }
        }
        match failure {
            Some(Failure::Answer {
                route,
                attempt,
                status,
                headers,
                body: answer,
            }) => {
                draft.serve_from(&route, Some(attempt));
                let kept = rebuilt(status, headers, answer);
                Ok(self.respond_failed(kept, draft, deadline))
            }
            Some(Failure::Error(error)) => Err(error),
            None => {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "deployments_unavailable",
                    "every deployment of this model has its circuit open after repeated failures; retry after the cool-down",
                );
                error.retry_after_secs =
                    Some(groups.soonest_reopening(candidates).as_secs().max(1));
                Err(error)
            }
        }
    }

    fn upstream_request(
        &self,
        parts: &Parts,
        endpoint: Endpoint,
        route: &Route,
        body: &Bytes,
        stream: bool,
    ) -> UpstreamRequest {
        let path = parts.uri.path();
        let suffix = path.strip_prefix("/v1").unwrap_or(path);
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{suffix}?{query}"),
            None => suffix.to_owned(),
        };
        UpstreamRequest {
            endpoint,
            method: parts.method.clone(),
            path_and_query,
            headers: headers::for_upstream(parts.headers.clone()),
            body: body.clone(),
            model: (!route.model.is_empty()).then(|| route.model.clone()),
            stream,
        }
    }

    /// Output guardrails that may redact or block run on a whole (non-streamed) 2xx answer
    /// before any of it is sent. Answers too large to hold are refused rather than sent
    /// unchecked.
    async fn check_output(
        &self,
        call: &Call,
        upstream: crate::providers::UpstreamResponse,
        draft: &mut Draft,
        deadline: tokio::time::Instant,
    ) -> Result<crate::providers::UpstreamResponse, ApiError> {
        let Some(expect) = &call.output_check else {
            return Ok(upstream);
        };
        if is_event_stream(&upstream.headers) || !upstream.status.is_success() {
            return Ok(upstream);
        }
        let read = collect_at_most(upstream.body, self.metering_bytes);
        let answer = match tokio::time::timeout_at(deadline, read).await {
            Ok(Some(answer)) => Bytes::from(answer),
            _ => return Err(ApiError::bad_gateway(
                "guardrail_unchecked",
                "the answer could not be read whole, so the output guardrails could not check it",
            )),
        };
        let mut headers = upstream.headers;
        let Ok(checked) = self
            .guardrails
            .check_response(draft.endpoint, expect, &answer)
        else {
            // Not an answer with texts (an unexpected shape): nothing to check.
            return Ok(rebuilt(upstream.status, headers, answer));
        };
        draft.output_checked = true;
        draft
            .trace
            .guardrails
            .extend(checked.verdicts.iter().map(|v| v.to_trace()));
        if let Some(blocked) = checked.blocked {
            // The provider made (and billed) the answer: the recorder still reads its usage.
            draft.blocked_answer = Some(answer);
            return Err(blocked.to_api_error());
        }
        let answer = match checked.rewritten {
            Some(redacted) => {
                headers.remove(http::header::CONTENT_LENGTH);
                redacted
            }
            None => answer,
        };
        Ok(rebuilt(upstream.status, headers, answer))
    }

    /// The answer of the attempt that serves the call, streamed to the client.
    fn respond(
        &self,
        call: &Call,
        upstream: crate::providers::UpstreamResponse,
        drop_usage_chunk: bool,
        draft: &mut Draft,
        deadline: tokio::time::Instant,
    ) -> Response<ResponseBody> {
        draft.trace.status = upstream.status.as_u16();
        if !upstream.status.is_success() {
            draft.fail(
                "upstream_http",
                format!("the upstream answered {}", upstream.status),
            );
        }
        let check = match (&call.output_check, upstream.status.is_success()) {
            (Some(expect), true) => self
                .guardrails
                .stream(expect.clone())
                .map(|guard| guard::StreamCheck::new(guard, draft.endpoint)),
            _ => None,
        };
        self.stream_back(upstream, drop_usage_chunk, check, draft, deadline)
    }

    /// The response head now, and the body as it arrives, metered (and checked, for a stream
    /// that output guardrails may change).
    fn stream_back(
        &self,
        upstream: crate::providers::UpstreamResponse,
        drop_usage_chunk: bool,
        check: Option<guard::StreamCheck>,
        draft: &mut Draft,
        deadline: tokio::time::Instant,
    ) -> Response<ResponseBody> {
        let sse = is_event_stream(&upstream.headers);
        let drop_usage_chunk = drop_usage_chunk && sse;
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
        )
        .with_check(check);
        response.map(|_| body.boxed())
    }

    /// Every attempt failed: the client gets the last failed answer as the provider sent it.
    fn respond_failed(
        &self,
        upstream: crate::providers::UpstreamResponse,
        draft: &mut Draft,
        deadline: tokio::time::Instant,
    ) -> Response<ResponseBody> {
        draft.trace.status = upstream.status.as_u16();
        draft.fail(
            "upstream_http",
            format!(
                "every attempt failed; the last answered {}",
                upstream.status
            ),
        );
        self.stream_back(upstream, false, None, draft, deadline)
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

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

fn rebuilt(
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
) -> crate::providers::UpstreamResponse {
    crate::providers::UpstreamResponse {
        status,
        headers,
        body: response::full(body),
    }
}

/// Reads a failed answer (bounded, within the deadline) so its connection is released while
/// other attempts run, and the client can still get it if they all fail.
async fn keep_failure(
    route: Route,
    attempt: usize,
    upstream: crate::providers::UpstreamResponse,
    deadline: tokio::time::Instant,
) -> Failure {
    let status = upstream.status;
    let read = collect_at_most(upstream.body, MAX_FAILED_ANSWER_BYTES);
    let body = match tokio::time::timeout_at(deadline, read).await {
        Ok(Some(body)) => Bytes::from(body),
        _ => Bytes::new(),
    };
    let mut headers = upstream.headers;
    headers.remove(http::header::CONTENT_LENGTH);
    Failure::Answer {
        route,
        attempt,
        status,
        headers,
        body,
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
        provider: crate::runs::run_provider(trace),
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
    let cache = match trace.cache.as_str() {
        cache::HIT => cache::HIT,
        cache::MISS => cache::MISS,
        _ => cache::BYPASS,
    };
    headers.insert(CACHE_HEADER, HeaderValue::from_static(cache));
}
