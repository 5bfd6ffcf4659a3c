//! The admin REST API (CONTRACT section 7, minus `/metrics` and `/healthz`, which the server
//! owns). The server has already checked the admin token and read the body within its limit.
//!
//! Reads first wait for the recorder to store everything queued before them, so a client that
//! just finished a call sees its trace; store calls block on disk, so they run in
//! `spawn_blocking`, never on the runtime's workers.
//!
//! Conventions: empty query values (`?experiment=&run=r1`) mean "no filter"; unknown query
//! parameters are a 400 (a typo must not silently widen a listing); `order_by=KEY` sorts
//! ascending and `order_by=-KEY` descending, with runs lacking the value always last.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::recorder::{RecorderError, RecorderHandle, ScoreOutcome};
use crate::response::{self, ResponseBody};
use crate::runs::{self, RunView};
use crate::store::{Store, StoreError, TraceQuery};
use crate::trace::Score;

const PREFIX: &str = "/api/v1/";
const DEFAULT_TRACE_LIMIT: usize = 50;
const DEFAULT_RUN_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
const MAX_COMPARED_RUNS: usize = 50;
const MAX_SCORE_NAME_BYTES: usize = 200;
/// Scores are grades (0–1, 1–10, 0–100...); the bound keeps run sums finite.
const MAX_SCORE_MAGNITUDE: f64 = 1e9;

/// What the admin handlers need.
pub struct Admin {
    pub store: Arc<dyn Store>,
    pub recorder: RecorderHandle,
}

/// Answers one admin request; every failure is an OpenAI-shaped error.
pub async fn handle(
    admin: &Admin,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: Bytes,
) -> Response<ResponseBody> {
    let endpoint = match Endpoint::parse(path) {
        Ok(endpoint) => endpoint,
        Err(err) => return err.into_response(),
    };
    let allowed = endpoint.method();
    if *method != allowed {
        return method_not_allowed(&allowed);
    }
    respond(admin, endpoint, query, &body)
        .await
        .unwrap_or_else(ApiError::into_response)
}

async fn respond(
    admin: &Admin,
    endpoint: Endpoint,
    query: Option<&str>,
    body: &[u8],
) -> Result<Response<ResponseBody>, ApiError> {
    let params = Params::parse(query, endpoint.query_params())?;
    match endpoint {
        Endpoint::Scores(trace_id) => post_score(&admin.recorder, trace_id, body).await,
        Endpoint::Read(endpoint) => {
            admin.recorder.sync().await.map_err(recorder_error)?;
            read(&admin.store, endpoint, &params).await
        }
    }
}

/// The admin paths, with their decoded path parameters.
#[derive(Debug, Clone, PartialEq)]
enum Endpoint {
    Read(Read),
    Scores(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Read {
    Experiments,
    Runs,
    CompareRuns,
    Run(String),
    Traces,
    Trace(String),
}

impl Endpoint {
    fn parse(path: &str) -> Result<Endpoint, ApiError> {
        let not_found =
            || ApiError::not_found("unknown_admin_path", format!("no admin endpoint at {path}"));
        let rest = path.strip_prefix(PREFIX).ok_or_else(not_found)?;
        let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        let id = |segment: &str| percent_decode(segment, "path");
        let read = match segments.as_slice() {
            ["experiments"] => Read::Experiments,
            ["runs"] => Read::Runs,
            ["runs", "compare"] => Read::CompareRuns,
            ["runs", run] if !run.is_empty() => Read::Run(id(run)?),
            ["traces"] => Read::Traces,
            ["traces", trace] if !trace.is_empty() => Read::Trace(id(trace)?),
            ["traces", trace, "scores"] if !trace.is_empty() => {
                return Ok(Endpoint::Scores(id(trace)?))
            }
            _ => return Err(not_found()),
        };
        Ok(Endpoint::Read(read))
    }

    fn method(&self) -> Method {
        match self {
            Endpoint::Read(_) => Method::GET,
            Endpoint::Scores(_) => Method::POST,
        }
    }

    fn query_params(&self) -> &'static [&'static str] {
        match self {
            Endpoint::Read(Read::Runs) => &["experiment", "order_by", "limit"],
            Endpoint::Read(Read::CompareRuns) => &["ids"],
            Endpoint::Read(Read::Traces) => &["experiment", "run", "session", "limit", "cursor"],
            _ => &[],
        }
    }
}

/// A 405 in the usual error shape, with the `allow` header.
fn method_not_allowed(allowed: &Method) -> Response<ResponseBody> {
    let message = format!("this admin endpoint only answers {allowed}");
    let error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        message,
    );
    let mut response = error.into_response();
    if let Ok(value) = HeaderValue::from_str(allowed.as_str()) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

async fn read(
    store: &Arc<dyn Store>,
    endpoint: Read,
    params: &Params,
) -> Result<Response<ResponseBody>, ApiError> {
    match endpoint {
        Read::Experiments => list_experiments(store).await,
        Read::Runs => list_runs(store, params).await,
        Read::CompareRuns => compare_runs(store, params).await,
        Read::Run(id) => show_run(store, id).await,
        Read::Traces => list_traces(store, params).await,
        Read::Trace(id) => show_trace(store, id).await,
    }
}

async fn list_experiments(store: &Arc<dyn Store>) -> Result<Response<ResponseBody>, ApiError> {
    let mut experiments = blocking(store, |store| store.experiments()).await?;
    experiments.sort_by(|a, b| {
        b.last_activity_ms
            .cmp(&a.last_activity_ms)
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(ok(&json!({ "experiments": experiments })))
}

async fn list_runs(
    store: &Arc<dyn Store>,
    params: &Params,
) -> Result<Response<ResponseBody>, ApiError> {
    let order = RunOrder::parse(params.get("order_by"))?;
    let limit = params.limit(DEFAULT_RUN_LIMIT)?;
    let experiment = params.get("experiment").map(str::to_owned);
    let runs = blocking(store, move |store| store.runs(experiment.as_deref())).await?;
    let mut views: Vec<RunView> = runs.iter().map(|run| run.view()).collect();
    let total = views.len();
    order.sort(&mut views);
    views.truncate(limit);
    Ok(ok(&json!({ "runs": views, "total": total })))
}

async fn show_run(store: &Arc<dyn Store>, id: String) -> Result<Response<ResponseBody>, ApiError> {
    let lookup = id.clone();
    match blocking(store, move |store| store.run(&lookup)).await? {
        Some(run) => Ok(ok(&run.view())),
        None => Err(run_not_found(&id)),
    }
}

async fn compare_runs(
    store: &Arc<dyn Store>,
    params: &Params,
) -> Result<Response<ResponseBody>, ApiError> {
    let ids = compared_ids(params.get("ids"))?;
    let lookup = ids.clone();
    let found = blocking(store, move |store| {
        lookup
            .iter()
            .map(|id| store.run(id))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let mut views = Vec::with_capacity(ids.len());
    for (id, run) in ids.iter().zip(found) {
        views.push(run.ok_or_else(|| run_not_found(id))?.view());
    }
    Ok(ok(&runs::compare(&views)))
}

/// `ids=a,b,c`: at least two distinct run ids, in the order given.
fn compared_ids(raw: Option<&str>) -> Result<Vec<String>, ApiError> {
    let mut ids: Vec<String> = Vec::new();
    for id in raw
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
    {
        if !ids.iter().any(|seen| seen == id) {
            ids.push(id.to_owned());
        }
    }
    if ids.len() < 2 || ids.len() > MAX_COMPARED_RUNS {
        let message = format!("ids needs between 2 and {MAX_COMPARED_RUNS} distinct run ids, comma-separated (got {})", ids.len());
        return Err(ApiError::invalid_request("invalid_ids", message).with_param("ids"));
    }
    Ok(ids)
}

async fn list_traces(
    store: &Arc<dyn Store>,
    params: &Params,
) -> Result<Response<ResponseBody>, ApiError> {
    let query = TraceQuery {
        experiment: params.get("experiment").map(str::to_owned),
        run: params.get("run").map(str::to_owned),
        session: params.get("session").map(str::to_owned),
        limit: params.limit(DEFAULT_TRACE_LIMIT)?,
        cursor: params.get("cursor").map(str::to_owned),
    };
    let page = blocking(store, move |store| store.traces(&query)).await?;
    Ok(ok(&page))
}

async fn show_trace(
    store: &Arc<dyn Store>,
    id: String,
) -> Result<Response<ResponseBody>, ApiError> {
    let lookup = id.clone();
    match blocking(store, move |store| store.trace(&lookup)).await? {
        Some(trace) => Ok(ok(&trace)),
        None => Err(trace_not_found(&id)),
    }
}

/// The body of `POST /api/v1/traces/{id}/scores`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewScore {
    name: String,
    value: f64,
    #[serde(default)]
    comment: Option<String>,
}

fn parse_score(body: &[u8]) -> Result<NewScore, ApiError> {
    let score: NewScore = serde_json::from_slice(body).map_err(|err| {
        ApiError::invalid_request(
            "invalid_score",
            format!(r#"expected {{"name": "...", "value": <number>, "comment": "..."}}: {err}"#),
        )
    })?;
    if score.name.trim().is_empty() || score.name.len() > MAX_SCORE_NAME_BYTES {
        let message = format!("name must be non-empty and at most {MAX_SCORE_NAME_BYTES} bytes");
        return Err(ApiError::invalid_request("invalid_score", message).with_param("name"));
    }
    if !score.value.is_finite() || score.value.abs() > MAX_SCORE_MAGNITUDE {
        let message = format!(
            "value must be a number between -{MAX_SCORE_MAGNITUDE:e} and {MAX_SCORE_MAGNITUDE:e}"
        );
        return Err(ApiError::invalid_request("invalid_score", message).with_param("value"));
    }
    Ok(score)
}

async fn post_score(
    recorder: &RecorderHandle,
    trace_id: String,
    body: &[u8],
) -> Result<Response<ResponseBody>, ApiError> {
    let new = parse_score(body)?;
    // A malformed id cannot name a stored trace; say so without bothering the recorder.
    if uuid::Uuid::try_parse(&trace_id).is_err() {
        return Err(trace_not_found(&trace_id));
    }
    let score = Score {
        name: new.name,
        value: new.value,
        comment: new.comment,
        at_ms: now_ms(),
    };
    // The score travels the recorder's queue behind every trace handed over before it, so it
    // finds a trace that was still queued: no sync needed.
    match recorder
        .add_score(&trace_id, score.clone())
        .await
        .map_err(recorder_error)?
    {
        ScoreOutcome::Recorded { run_id } => Ok(response::json(
            StatusCode::CREATED,
            &json!({ "trace_id": trace_id, "run_id": run_id, "score": score }),
        )),
        ScoreOutcome::NoSuchTrace => Err(trace_not_found(&trace_id)),
    }
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The sort of `GET /api/v1/runs`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RunOrder {
    key: RunSortKey,
    descending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum RunSortKey {
    CostUsd,
    CostPerRequestUsd,
    Requests,
    ErrorRate,
    LatencyP50,
    LatencyP95,
    LatencyP99,
    LastSeen,
    FirstSeen,
}

const RUN_SORT_KEYS: [(&str, RunSortKey); 9] = [
    ("cost_usd", RunSortKey::CostUsd),
    ("cost_per_request_usd", RunSortKey::CostPerRequestUsd),
    ("requests", RunSortKey::Requests),
    ("error_rate", RunSortKey::ErrorRate),
    ("latency_p50", RunSortKey::LatencyP50),
    ("latency_p95", RunSortKey::LatencyP95),
    ("latency_p99", RunSortKey::LatencyP99),
    ("last_seen", RunSortKey::LastSeen),
    ("first_seen", RunSortKey::FirstSeen),
];

impl RunOrder {
    /// `KEY` ascending, `-KEY` descending; absent: newest activity first.
    fn parse(raw: Option<&str>) -> Result<RunOrder, ApiError> {
        let Some(raw) = raw else {
            return Ok(RunOrder {
                key: RunSortKey::LastSeen,
                descending: true,
            });
        };
        let (name, descending) = match raw.strip_prefix('-') {
            Some(name) => (name, true),
            None => (raw, false),
        };
        match RUN_SORT_KEYS.iter().find(|(known, _)| *known == name) {
            Some(&(_, key)) => Ok(RunOrder { key, descending }),
            None => {
                let valid: Vec<&str> = RUN_SORT_KEYS.iter().map(|(known, _)| *known).collect();
                let message = format!(
                    "unknown order_by {raw:?}; valid: {} (prefix with - for descending)",
                    valid.join(", ")
                );
                Err(ApiError::invalid_request("invalid_order_by", message).with_param("order_by"))
            }
        }
    }

    fn sort(self, views: &mut [RunView]) {
        views.sort_by(|a, b| self.compare(a, b).then_with(|| a.id.cmp(&b.id)));
    }

    /// Runs without the value (no priced request, no latency sample) go last either way.
    fn compare(self, a: &RunView, b: &RunView) -> Ordering {
        match (self.key.value(a), self.key.value(b)) {
            (Some(x), Some(y)) if self.descending => y.total_cmp(&x),
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        }
    }
}

impl RunSortKey {
    fn value(self, view: &RunView) -> Option<f64> {
        let metrics = &view.metrics;
        match self {
            RunSortKey::CostUsd => metrics.cost_usd,
            RunSortKey::CostPerRequestUsd => metrics.cost_per_request_usd,
            RunSortKey::Requests => Some(metrics.requests as f64),
            RunSortKey::ErrorRate => Some(metrics.error_rate),
            RunSortKey::LatencyP50 => metrics.latency_ms.map(|d| d.p50),
            RunSortKey::LatencyP95 => metrics.latency_ms.map(|d| d.p95),
            RunSortKey::LatencyP99 => metrics.latency_ms.map(|d| d.p99),
            RunSortKey::LastSeen => Some(view.last_seen_ms as f64),
            RunSortKey::FirstSeen => Some(view.first_seen_ms as f64),
        }
    }
}

/// Decoded query parameters; empty values count as absent, the last repeat wins.
#[derive(Debug, Default)]
struct Params(BTreeMap<String, String>);

impl Params {
    fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut params = BTreeMap::new();
        for pair in raw
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode(name, "query")?;
            if !allowed.contains(&name.as_str()) {
                return Err(unknown_param(&name, allowed));
            }
            let value = percent_decode(value, "query")?;
            if value.is_empty() {
                params.remove(&name);
            } else {
                params.insert(name, value);
            }
        }
        Ok(Params(params))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `limit`, from 1 to [`MAX_LIMIT`].
    fn limit(&self, default: usize) -> Result<usize, ApiError> {
        let Some(raw) = self.get("limit") else {
            return Ok(default);
        };
        match raw.parse::<usize>() {
            Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => Ok(limit),
            _ => Err(ApiError::invalid_request(
                "invalid_limit",
                format!("limit must be a whole number from 1 to {MAX_LIMIT}, not {raw:?}"),
            )
            .with_param("limit")),
        }
    }
}

fn unknown_param(name: &str, allowed: &[&str]) -> ApiError {
    let message = if allowed.is_empty() {
        format!("unknown query parameter {name:?}: this endpoint takes none")
    } else {
        format!(
            "unknown query parameter {name:?}; valid: {}",
            allowed.join(", ")
        )
    };
    ApiError::invalid_request("invalid_query", message)
}

/// `%XX` escapes and `+` for space (form encoding); the result must be UTF-8.
fn percent_decode(raw: &str, part: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid_request(
            "invalid_encoding",
            format!("malformed percent-encoding in the {part}: {raw:?}"),
        )
    };
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let high = bytes
                    .get(i + 1)
                    .and_then(|b| hex_value(*b))
                    .ok_or_else(bad)?;
                let low = bytes
                    .get(i + 2)
                    .and_then(|b| hex_value(*b))
                    .ok_or_else(bad)?;
                decoded.push(high << 4 | low);
                i += 3;
            }
            b'+' => {
                decoded.push(b' ');
                i += 1;
            }
            byte => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).map_err(|_| bad())
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// Runs a blocking store call off the runtime's workers.
async fn blocking<T, F>(store: &Arc<dyn Store>, call: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || call(store.as_ref()))
        .await
        .map_err(|err| ApiError::internal(format!("store task failed: {err}")))?
        .map_err(store_error)
}

fn store_error(err: StoreError) -> ApiError {
    match err {
        StoreError::InvalidTraceId { id } => trace_not_found(&id),
        StoreError::InvalidCursor { .. } => {
            ApiError::invalid_request("invalid_cursor", err.to_string()).with_param("cursor")
        }
        other => {
            tracing::error!(error = %other, "admin API store read failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "storage_error",
                other.to_string(),
            )
        }
    }
}

fn recorder_error(err: RecorderError) -> ApiError {
    match err {
        RecorderError::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "recorder_unavailable",
            "the trace recorder is not running (is the gateway shutting down?)",
        ),
        RecorderError::Store(message) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "storage_error",
            message,
        ),
    }
}

fn run_not_found(id: &str) -> ApiError {
    ApiError::not_found("run_not_found", format!("no run with id {id:?}"))
}

fn trace_not_found(id: &str) -> ApiError {
    ApiError::not_found("trace_not_found", format!("no trace with id {id:?}"))
}

fn ok<T: serde::Serialize + ?Sized>(value: &T) -> Response<ResponseBody> {
    response::json(StatusCode::OK, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::Run;
    use crate::store::{Batch, SledStore};
    use crate::trace::{Latency, Trace};
    use http_body_util::BodyExt;
    use serde_json::Value;

    fn trace(n: u64, run: &str, total_ms: f64, cost: Option<f64>) -> Trace {
        Trace {
            id: format!("0190f5d6-0000-7000-8000-{n:012}"),
            started_at_ms: 1_000 + n,
            ended_at_ms: 1_100 + n,
            experiment: "exp".into(),
            run_id: run.into(),
            endpoint: "chat.completions".into(),
            status: 200,
            latency: Latency {
                total_ms,
                overhead_ms: 1.0,
                ..Latency::default()
            },
            cost_usd: cost,
            cache: "miss".into(),
            ..Trace::default()
        }
    }

    /// Three runs: `fast` (cheap to run, priced), `slow` (priced higher), `free` (no price).
    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("db"), 1 << 22).unwrap();
        let traces = vec![
            trace(1, "fast", 10.0, Some(0.002)),
            trace(2, "slow", 500.0, Some(0.01)),
            trace(3, "free", 50.0, None),
            trace(4, "fast", 12.0, Some(0.002)),
        ];
        let mut runs: BTreeMap<String, Run> = BTreeMap::new();
        for trace in &traces {
            match runs.get_mut(&trace.run_id) {
                Some(run) => run.observe(trace),
                None => {
                    runs.insert(trace.run_id.clone(), Run::from_first(trace));
                }
            }
        }
        let batch = Batch {
            traces,
            runs: runs.into_values().collect(),
            experiments: vec![],
        };
        store.apply(&batch).unwrap();
        (dir, Arc::new(store))
    }

    async fn get(store: &Arc<dyn Store>, path: &str, query: Option<&str>) -> (StatusCode, Value) {
        let outcome = match Endpoint::parse(path).unwrap() {
            Endpoint::Read(endpoint) => {
                let params = Params::parse(query, Endpoint::Read(endpoint.clone()).query_params());
                match params {
                    Ok(params) => read(store, endpoint, &params).await,
                    Err(err) => Err(err),
                }
            }
            Endpoint::Scores(_) => panic!("not a read"),
        };
        let response = outcome.unwrap_or_else(ApiError::into_response);
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn run_ids(body: &Value) -> Vec<&str> {
        body["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|run| run["id"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c%2Fd", "query").unwrap(), "a b c/d");
        assert_eq!(percent_decode("caf%C3%A9", "query").unwrap(), "café");
        for bad in ["%", "%2", "%zz", "%FF"] {
            let err = percent_decode(bad, "query").unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn query_params_are_checked() {
        let allowed = &["experiment", "limit"];
        let params = Params::parse(Some("experiment=my%20exp&limit="), allowed).unwrap();
        assert_eq!(params.get("experiment"), Some("my exp"));
        assert_eq!(params.get("limit"), None);
        assert_eq!(params.limit(50).unwrap(), 50);
        let err = Params::parse(Some("experment=x"), allowed).unwrap_err();
        assert!(err.message.contains("experiment, limit"), "{}", err.message);
        for bad in ["0", "1001", "-1", "ten"] {
            let params = Params::parse(Some(&format!("limit={bad}")), allowed).unwrap();
            assert_eq!(
                params.limit(50).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
        assert_eq!(
            Params::parse(Some("limit=1000"), allowed)
                .unwrap()
                .limit(50)
                .unwrap(),
            1000
        );
    }

    #[test]
    fn routes() {
        let read = |path| match Endpoint::parse(path).unwrap() {
            Endpoint::Read(read) => read,
            Endpoint::Scores(_) => panic!("{path} is not a read"),
        };
        assert_eq!(read("/api/v1/experiments"), Read::Experiments);
        assert_eq!(read("/api/v1/runs/"), Read::Runs);
        assert_eq!(read("/api/v1/runs/compare"), Read::CompareRuns);
        assert_eq!(read("/api/v1/runs/ab%2Fc"), Read::Run("ab/c".into()));
        assert_eq!(read("/api/v1/traces/t1"), Read::Trace("t1".into()));
        let scores = Endpoint::parse("/api/v1/traces/t1/scores").unwrap();
        assert_eq!(scores, Endpoint::Scores("t1".into()));
        assert_eq!(scores.method(), Method::POST);
        for unknown in [
            "/api/v1/",
            "/api/v2/runs",
            "/api/v1/runs/a/b",
            "/api/v1/traces//scores",
        ] {
            let err = Endpoint::parse(unknown).unwrap_err();
            assert_eq!(err.status, StatusCode::NOT_FOUND, "{unknown}");
        }
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let response = method_not_allowed(&Method::GET);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET");
    }

    #[test]
    fn order_by_convention() {
        assert_eq!(
            RunOrder::parse(None).unwrap(),
            RunOrder {
                key: RunSortKey::LastSeen,
                descending: true
            }
        );
        let order = RunOrder::parse(Some("-cost_usd")).unwrap();
        assert_eq!(
            order,
            RunOrder {
                key: RunSortKey::CostUsd,
                descending: true
            }
        );
        let err = RunOrder::parse(Some("price")).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("latency_p95"), "{}", err.message);
    }

    #[test]
    fn compared_ids_need_two_distinct() {
        assert_eq!(compared_ids(Some("a, b,a,")).unwrap(), vec!["a", "b"]);
        assert!(compared_ids(Some("a,a")).is_err());
        assert!(compared_ids(None).is_err());
    }

    #[test]
    fn score_bodies_are_validated() {
        let score =
            parse_score(br#"{"name": "exact_match", "value": 1, "comment": "ok"}"#).unwrap();
        assert_eq!((score.name.as_str(), score.value), ("exact_match", 1.0));
        for bad in [
            &br#"{"value": 1.0}"#[..],
            br#"{"name": "", "value": 1.0}"#,
            br#"{"name": "x", "value": "high"}"#,
            br#"{"name": "x", "value": 1e999}"#,
            br#"{"name": "x", "value": 1.0, "extra": true}"#,
            b"not json",
        ] {
            let err = parse_score(bad).unwrap_err();
            assert_eq!(
                err.status,
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn runs_are_listed_in_the_asked_order() {
        let (_dir, store) = store();
        let (status, body) = get(&store, "/api/v1/runs", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["total"], 3);
        assert_eq!(run_ids(&body), ["fast", "free", "slow"]); // last_seen, newest first
        let (_, body) = get(&store, "/api/v1/runs", Some("order_by=-cost_usd")).await;
        assert_eq!(run_ids(&body), ["slow", "fast", "free"]); // unpriced last
        let (_, body) = get(
            &store,
            "/api/v1/runs",
            Some("order_by=cost_per_request_usd&limit=1"),
        )
        .await;
        assert_eq!(run_ids(&body), ["fast"]);
        let (_, body) = get(&store, "/api/v1/runs", Some("order_by=latency_p50")).await;
        assert_eq!(run_ids(&body), ["fast", "free", "slow"]);
        let (_, body) = get(&store, "/api/v1/runs", Some("experiment=other")).await;
        assert_eq!(body["runs"], json!([]));
        let (status, body) = get(&store, "/api/v1/runs", Some("order_by=cost")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "order_by");
    }

    #[tokio::test]
    async fn run_show_and_compare() {
        let (_dir, store) = store();
        let (status, body) = get(&store, "/api/v1/runs/fast", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["metrics"]["requests"], 2);
        let (status, body) = get(&store, "/api/v1/runs/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "run_not_found");

        let (status, body) = get(&store, "/api/v1/runs/compare", Some("ids=fast,slow")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["best"]["latency_ms.p95"], "fast");
        let (status, body) = get(&store, "/api/v1/runs/compare", Some("ids=fast,ghost")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"]["message"].as_str().unwrap().contains("ghost"));
        let (status, _) = get(&store, "/api/v1/runs/compare", Some("ids=fast")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn traces_page_and_show() {
        let (_dir, store) = store();
        let (status, body) = get(&store, "/api/v1/traces", Some("run=fast&limit=1")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body["traces"][0]["id"],
            "0190f5d6-0000-7000-8000-000000000004"
        );
        let cursor = body["next_cursor"].as_str().unwrap().to_owned();
        let (_, body) = get(
            &store,
            "/api/v1/traces",
            Some(&format!("run=fast&limit=1&cursor={cursor}")),
        )
        .await;
        assert_eq!(
            body["traces"][0]["id"],
            "0190f5d6-0000-7000-8000-000000000001"
        );
        assert_eq!(body["next_cursor"], Value::Null);

        let (status, body) = get(&store, "/api/v1/traces", Some("cursor=garbage")).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::BAD_REQUEST, &json!("invalid_cursor"))
        );

        let (status, body) = get(
            &store,
            "/api/v1/traces/0190f5d6-0000-7000-8000-000000000002",
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["run_id"], "slow");
        for missing in ["0190f5d6-0000-7000-8000-000000000099", "not-a-uuid"] {
            let (status, body) = get(&store, &format!("/api/v1/traces/{missing}"), None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
            assert_eq!(body["error"]["code"], "trace_not_found");
        }
    }
}
