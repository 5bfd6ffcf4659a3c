//! The command line: `serve` and `check-config` (run by main.rs) and the read-only clients of the
//! admin API (`runs`, `traces`, `experiments`), which print human tables or the API's JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::{header, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// How long a read command waits for the whole answer; the admin API reads a local database, so
/// anything slower means something is wrong rather than busy.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the gateway listens unless configured otherwise (CONTRACT section 1).
const DEFAULT_URL: &str = "http://127.0.0.1:8080";

#[derive(Debug, Parser)]
#[command(
    name = "flowgate",
    version,
    about = "An LLM gateway that records every call as a trace, aggregated into experiments and runs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the gateway.
    Serve {
        /// Config file; default: $FLOWGATE_CONFIG, else config/flowgate.toml if present, else
        /// built-in defaults.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Validate a config and print the resolved routing table.
    CheckConfig {
        /// Config file; resolved like `serve --config`.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Runs: traces grouped by configuration, with their metrics.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Traces: one per call through the gateway.
    Traces {
        #[command(subcommand)]
        command: TracesCommand,
    },
    /// Experiments: named groups of runs.
    Experiments {
        #[command(subcommand)]
        command: ExperimentsCommand,
    },
    /// The embedded store, offline (stop the gateway first).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Open the store, read every record, and report what it holds and what it cannot read.
    Check {
        /// The store; default: `storage.path` of the config.
        #[arg(long, value_name = "PATH")]
        path: Option<PathBuf>,
        /// Config file, to find the store; resolved like `serve --config`.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List run summaries.
    List {
        /// Only the runs of this experiment.
        #[arg(long)]
        experiment: Option<String>,
        /// Sort key understood by the API, e.g. `cost_usd` or `latency_ms.p95`.
        #[arg(long, value_name = "KEY")]
        order_by: Option<String>,
        /// At most this many runs.
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one run: params, tags and every metric.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Compare runs side by side; the best value of each metric is marked with `*`.
    Compare {
        #[arg(required = true, num_args = 2.., value_name = "ID")]
        ids: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TracesCommand {
    /// List trace summaries, newest first.
    List {
        #[arg(long)]
        experiment: Option<String>,
        /// Only the traces of this run id.
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        session: Option<String>,
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Continue a listing where the previous page ended.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one whole trace, bodies included.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExperimentsCommand {
    /// List experiments with their run and trace counts.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Options shared by every read command.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the gateway.
    #[arg(long, env = "FLOWGATE_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Admin token, sent as `Authorization: Bearer`.
    #[arg(long, env = "FLOWGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON answer (pretty) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("`{0}` is not a client command")]
    NotAClientCommand(&'static str),
    #[error("invalid --url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid --token: {0}")]
    InvalidToken(#[source] header::InvalidHeaderValue),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot connect to {url}: {cause}; is `flowgate serve` running?")]
    Refused { url: String, cause: String },
    #[error("cannot connect to {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("request to {url} failed: {cause}")]
    Request { url: String, cause: String },
    #[error("no answer from {url} within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout { url: String },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
    #[error("{url} answered with invalid JSON: {source}")]
    BadJson {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Performs a read command against the admin API and prints the answer on stdout.
///
/// Prints nothing on failure: the error's message says what happened (for a refused answer, the
/// URL, the status and the API's `error.message`), and the caller reports it and exits 1.
pub async fn run_client(command: &Command) -> Result<(), CliError> {
    match command {
        Command::Serve { .. } => Err(CliError::NotAClientCommand("serve")),
        Command::CheckConfig { .. } => Err(CliError::NotAClientCommand("check-config")),
        Command::Store { .. } => Err(CliError::NotAClientCommand("store")),
        Command::Runs { command } => runs_command(command).await,
        Command::Traces { command } => traces_command(command).await,
        Command::Experiments { command } => experiments_command(command).await,
    }
}

async fn runs_command(command: &RunsCommand) -> Result<(), CliError> {
    match command {
        RunsCommand::List {
            experiment,
            order_by,
            limit,
            client,
        } => {
            let query = query_string(&[
                ("experiment", experiment.clone()),
                ("order_by", order_by.clone()),
                ("limit", limit.map(|n| n.to_string())),
            ]);
            let answer = get_json(client, &format!("/api/v1/runs{query}")).await?;
            print_answer(client, &answer, render_runs_list)
        }
        RunsCommand::Show { id, client } => {
            let path = format!("/api/v1/runs/{}", percent_encode(id));
            let answer = get_json(client, &path).await?;
            print_answer(client, &answer, render_run_show)
        }
        RunsCommand::Compare { ids, client } => {
            // Commas separate the ids, so they stay literal; each id is encoded on its own.
            let ids: Vec<String> = ids.iter().map(|id| percent_encode(id)).collect();
            let path = format!("/api/v1/runs/compare?ids={}", ids.join(","));
            let answer = get_json(client, &path).await?;
            print_answer(client, &answer, render_runs_compare)
        }
    }
}

async fn traces_command(command: &TracesCommand) -> Result<(), CliError> {
    match command {
        TracesCommand::List {
            experiment,
            run,
            session,
            limit,
            cursor,
            client,
        } => {
            let query = query_string(&[
                ("experiment", experiment.clone()),
                ("run", run.clone()),
                ("session", session.clone()),
                ("limit", limit.map(|n| n.to_string())),
                ("cursor", cursor.clone()),
            ]);
            let answer = get_json(client, &format!("/api/v1/traces{query}")).await?;
            print_answer(client, &answer, render_traces_list)
        }
        TracesCommand::Show { id, client } => {
            let path = format!("/api/v1/traces/{}", percent_encode(id));
            let answer = get_json(client, &path).await?;
            print_answer(client, &answer, render_trace_show)
        }
    }
}

async fn experiments_command(command: &ExperimentsCommand) -> Result<(), CliError> {
    match command {
        ExperimentsCommand::List { client } => {
            let answer = get_json(client, "/api/v1/experiments").await?;
            print_answer(client, &answer, render_experiments_list)
        }
    }
}

fn print_answer(
    client: &ClientArgs,
    answer: &Value,
    render: fn(&Value) -> String,
) -> Result<(), CliError> {
    let text = if client.json {
        // Serialising a parsed `Value` cannot fail; fall back to compact form just in case.
        let pretty = serde_json::to_string_pretty(answer).unwrap_or_else(|_| answer.to_string());
        format!("{pretty}\n")
    } else {
        render(answer)
    };
    write_stdout(&text)
}

/// Writes to stdout; a closed pipe (`flowgate traces list | head`) is a normal end, not an error.
fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

async fn get_json(client: &ClientArgs, path_and_query: &str) -> Result<Value, CliError> {
    let uri = endpoint_uri(&client.url, path_and_query)?;
    let url = uri.to_string();
    let request = build_request(uri, client.token.as_deref())?;
    match tokio::time::timeout(REQUEST_TIMEOUT, fetch(request, &client.url, &url)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(CliError::Timeout { url }),
    }
}

async fn fetch(request: Request<Empty<Bytes>>, base: &str, url: &str) -> Result<Value, CliError> {
    let response = http_client()?
        .request(request)
        .await
        .map_err(|err| request_error(&err, base, url))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| CliError::Request {
            url: url.to_string(),
            cause: root_cause(&err),
        })?
        .to_bytes();
    if !status.is_success() {
        return Err(status_error(url, status, &body));
    }
    serde_json::from_slice(&body).map_err(|source| CliError::BadJson {
        url: url.to_string(),
        source,
    })
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

/// A client for both `http://` and `https://` gateways, trusting the Mozilla roots.
fn http_client() -> Result<HttpsClient, CliError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// Joins the user's base URL (which may carry a path prefix behind a proxy) and an API path.
fn endpoint_uri(base: &str, path_and_query: &str) -> Result<Uri, CliError> {
    let invalid = |reason: &str| CliError::InvalidUrl {
        url: base.to_string(),
        reason: reason.to_string(),
    };
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(invalid("expected http://HOST:PORT or https://HOST:PORT"));
    }
    // The API path and query are appended, so the base must end at its path.
    if base.contains(['?', '#']) {
        return Err(invalid("must not contain a query or fragment"));
    }
    let joined = format!("{}{}", base.trim_end_matches('/'), path_and_query);
    let uri: Uri = joined
        .parse()
        .map_err(|err: http::uri::InvalidUri| invalid(&err.to_string()))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("missing host"));
    }
    Ok(uri)
}

fn build_request(uri: Uri, token: Option<&str>) -> Result<Request<Empty<Bytes>>, CliError> {
    let url = uri.to_string();
    let mut builder = Request::get(uri).header(header::ACCEPT, "application/json");
    // An empty token is what `FLOWGATE_ADMIN_TOKEN=` in a shell profile gives: treat it as none.
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(CliError::InvalidToken)?;
        value.set_sensitive(true);
        builder = builder.header(header::AUTHORIZATION, value);
    }
    builder.body(Empty::new()).map_err(|err| CliError::Request {
        url,
        cause: err.to_string(),
    })
}

fn request_error(err: &hyper_util::client::legacy::Error, base: &str, url: &str) -> CliError {
    let cause = root_cause(err);
    if is_connection_refused(err) {
        CliError::Refused {
            url: base.to_string(),
            cause,
        }
    } else if err.is_connect() {
        // DNS, TLS handshake, unreachable network: the gateway may well be running, so no hint.
        CliError::Unreachable {
            url: base.to_string(),
            cause,
        }
    } else {
        CliError::Request {
            url: url.to_string(),
            cause,
        }
    }
}

fn is_connection_refused(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        let refused = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        if refused {
            return true;
        }
        current = e.source();
    }
    false
}

/// The innermost cause says what actually happened ("Connection refused"); the outer layers only
/// say "client error (Connect)".
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

fn status_error(url: &str, status: StatusCode, body: &[u8]) -> CliError {
    let mut message = api_error_message(body);
    if status == StatusCode::UNAUTHORIZED {
        message.push_str(" (pass --token or set FLOWGATE_ADMIN_TOKEN)");
    }
    CliError::Status {
        url: url.to_string(),
        status,
        message,
    }
}

/// `error.message` of an OpenAI-style error body, else the start of whatever the body says.
fn api_error_message(body: &[u8]) -> String {
    const MAX_CHARS: usize = 300;
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(message) = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(Value::as_str)
    {
        return message.to_string();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_string()
    } else {
        text.chars().take(MAX_CHARS).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Query strings

/// Percent-encodes everything but RFC 3986 unreserved characters, so any value is safe both in a
/// query and as a path segment.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `?a=1&b=2` from the pairs that have a value; empty when none has.
fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(key, value)| {
            let value = value.as_ref()?;
            Some(format!("{key}={}", percent_encode(value)))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

// ---------------------------------------------------------------------------------------------
// Tables

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A plain-text table: columns as wide as their widest cell, two spaces apart.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    aligns: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Table {
            headers: columns.iter().map(|(name, _)| name.to_string()).collect(),
            aligns: columns.iter().map(|(_, align)| *align).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print as `-`, extra cells are dropped.
    pub fn push(&mut self, mut row: Vec<String>) {
        row.resize(self.headers.len(), DASH.to_string());
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let widths = self.widths();
        let mut out = self.render_line(&self.headers, &widths);
        for row in &self.rows {
            out.push_str(&self.render_line(row, &widths));
        }
        out
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| display_width(h)).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(display_width(cell));
            }
        }
        widths
    }

    fn render_line(&self, cells: &[String], widths: &[usize]) -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .zip(&self.aligns)
            .map(|((cell, width), align)| pad(cell, *width, *align))
            .collect();
        // Left-aligned last columns leave trailing blanks that only make diffs noisy.
        let mut line = padded.join("  ").trim_end().to_string();
        line.push('\n');
        line
    }
}

fn display_width(text: &str) -> usize {
    text.chars().count()
}

fn pad(cell: &str, width: usize, align: Align) -> String {
    let fill = " ".repeat(width.saturating_sub(display_width(cell)));
    match align {
        Align::Left => format!("{cell}{fill}"),
        Align::Right => format!("{fill}{cell}"),
    }
}

/// `key  value` lines with the keys padded to one width.
fn render_key_values(pairs: &[(String, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| display_width(k))
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{}  {value}\n", pad(key, width, Align::Left)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Value formatting

const DASH: &str = "-";

/// The value at a dotted path; JSON `null` counts as missing.
fn field<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(value, |current, key| current.get(key))
        .filter(|v| !v.is_null())
}

fn text(value: Option<&Value>) -> String {
    match value {
        None => DASH.to_string(),
        Some(Value::String(s)) if s.is_empty() => DASH.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => generic(other),
    }
}

fn count(value: Option<&Value>) -> String {
    match value {
        Some(v) if v.is_u64() || v.is_i64() => v.to_string(),
        Some(v) => v
            .as_f64()
            .map_or_else(|| DASH.to_string(), |x| format!("{x:.0}")),
        None => DASH.to_string(),
    }
}

fn decimals(value: Option<&Value>, places: usize) -> String {
    value
        .and_then(Value::as_f64)
        .map_or_else(|| DASH.to_string(), |x| format!("{x:.places$}"))
}

pub fn format_ms(value: Option<&Value>) -> String {
    decimals(value, 1)
}

pub fn format_usd(value: Option<&Value>) -> String {
    decimals(value, 6)
}

/// A 0..1 rate as a percentage number with one decimal (the `%` is in the column header).
fn percent(value: Option<&Value>) -> String {
    value
        .and_then(Value::as_f64)
        .map_or_else(|| DASH.to_string(), |rate| format!("{:.1}", rate * 100.0))
}

/// Any scalar as a short string; floats with at most 4 decimals, structures as compact JSON.
fn generic(value: &Value) -> String {
    match value {
        Value::Null => DASH.to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => n.as_f64().map_or_else(|| n.to_string(), trim_float),
        other => other.to_string(),
    }
}

fn trim_float(x: f64) -> String {
    let fixed = format!("{x:.4}");
    fixed
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string()
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn format_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (year, month, day) = civil_from_days(secs / 86_400);
    let second_of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`,
/// unsigned because the input is never before the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn time_at(value: &Value, path: &str) -> String {
    field(value, path)
        .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|x| x.max(0.0) as u64)))
        .map_or_else(|| DASH.to_string(), format_utc)
}

/// `id@version`, `id`, `@version` or `-`.
fn prompt_label(run: &Value) -> String {
    let id = field(run, "prompt_id").and_then(Value::as_str);
    let version = field(run, "prompt_version").and_then(Value::as_str);
    match (id, version) {
        (Some(id), Some(version)) => format!("{id}@{version}"),
        (Some(id), None) => id.to_string(),
        (None, Some(version)) => format!("@{version}"),
        (None, None) => DASH.to_string(),
    }
}

/// `k=v, k2=v2` of a flat object, `-` when empty or missing.
fn inline_map(value: Option<&Value>) -> String {
    let Some(Value::Object(map)) = value else {
        return DASH.to_string();
    };
    if map.is_empty() {
        return DASH.to_string();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={}", generic(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn items<'a>(answer: &'a Value, key: &str) -> &'a [Value] {
    answer
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The metrics of a run in reading order; whatever else the API sends is listed after these.
const KNOWN_METRICS: &[&str] = &[
    "requests",
    "errors",
    "error_rate",
    "cache_hits",
    "cache_hit_rate",
    "latency_ms.p50",
    "latency_ms.p95",
    "latency_ms.p99",
    "latency_ms.mean",
    "ttft_ms.p50",
    "ttft_ms.p95",
    "ttft_ms.p99",
    "ttft_ms.mean",
    "overhead_ms.p50",
    "overhead_ms.p95",
    "overhead_ms.p99",
    "overhead_ms.mean",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "provider_cache_hit_rate",
    "cost_usd",
    "cost_per_request_usd",
    "cost_saved_usd",
];

/// Formats a metric by what its path says it measures.
pub fn format_metric(path: &str, value: Option<&Value>) -> String {
    let last = path.rsplit('.').next().unwrap_or(path);
    if path.split('.').any(|segment| segment.ends_with("_ms")) {
        format_ms(value)
    } else if path.contains("usd") {
        format_usd(value)
    } else if last.ends_with("_rate") {
        value
            .and_then(Value::as_f64)
            .map_or_else(|| DASH.to_string(), |rate| format!("{:.1}%", rate * 100.0))
    } else {
        value.map_or_else(|| DASH.to_string(), generic)
    }
}

/// Every leaf path under `value` (dotted). `null` is a leaf (a metric without data yet); an empty
/// object has none (no guardrail configured, no score posted: nothing to show).
fn leaf_paths(prefix: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaf_paths(&path, child, out);
            }
        }
        _ if !prefix.is_empty() => out.push(prefix.to_string()),
        _ => {}
    }
}

/// Metric paths of these runs: the known ones first, then the rest (guardrails, scores, and
/// anything newer than this client) in name order.
fn metric_paths<'a>(runs: impl IntoIterator<Item = &'a Value>) -> Vec<String> {
    let mut extra = BTreeSet::new();
    for run in runs {
        let mut leaves = Vec::new();
        if let Some(metrics) = run.get("metrics") {
            leaf_paths("", metrics, &mut leaves);
        }
        extra.extend(leaves.into_iter().filter(|p| !covered_by_known(p)));
    }
    KNOWN_METRICS
        .iter()
        .map(|p| p.to_string())
        .chain(extra)
        .collect()
}

/// True when a path is a known metric or a parent of one (`ttft_ms` is `null` without streams).
fn covered_by_known(path: &str) -> bool {
    KNOWN_METRICS
        .iter()
        .any(|known| *known == path || known.starts_with(&format!("{path}.")))
}

// ---------------------------------------------------------------------------------------------
// Renderers, one per read command

fn render_runs_list(answer: &Value) -> String {
    let mut table = Table::new(&[
        ("RUN", Align::Left),
        ("EXPERIMENT", Align::Left),
        ("MODEL", Align::Left),
        ("PROMPT", Align::Left),
        ("REQS", Align::Right),
        ("ERR%", Align::Right),
        ("P50 ms", Align::Right),
        ("P95 ms", Align::Right),
        ("P99 ms", Align::Right),
        ("TOKENS IN/OUT", Align::Right),
        ("COST USD", Align::Right),
    ]);
    for run in items(answer, "runs") {
        table.push(vec![
            text(field(run, "id")),
            text(field(run, "experiment")),
            text(field(run, "model")),
            prompt_label(run),
            count(field(run, "metrics.requests")),
            percent(field(run, "metrics.error_rate")),
            format_ms(field(run, "metrics.latency_ms.p50")),
            format_ms(field(run, "metrics.latency_ms.p95")),
            format_ms(field(run, "metrics.latency_ms.p99")),
            format!(
                "{}/{}",
                count(field(run, "metrics.input_tokens")),
                count(field(run, "metrics.output_tokens"))
            ),
            format_usd(field(run, "metrics.cost_usd")),
        ]);
    }
    if table.is_empty() {
        return "no runs\n".to_string();
    }
    table.render()
}

fn render_run_show(run: &Value) -> String {
    let mut pairs: Vec<(String, String)> = [
        ("id", text(field(run, "id"))),
        ("experiment", text(field(run, "experiment"))),
        ("name", text(field(run, "name"))),
        ("provider", text(field(run, "provider"))),
        ("model", text(field(run, "model"))),
        ("prompt", prompt_label(run)),
        ("first seen (UTC)", time_at(run, "first_seen_ms")),
        ("last seen (UTC)", time_at(run, "last_seen_ms")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for section in ["params", "sampling", "tags"] {
        pairs.extend(map_entries(section, run.get(section)));
    }
    for path in metric_paths([run]) {
        let value = format_metric(&path, field(run, &format!("metrics.{path}")));
        pairs.push((path, value));
    }
    render_key_values(&pairs)
}

/// One `section.key  value` pair per entry, or `section  -` when there is none.
fn map_entries(section: &str, value: Option<&Value>) -> Vec<(String, String)> {
    match value {
        Some(Value::Object(map)) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| (format!("{section}.{k}"), generic(v)))
            .collect(),
        _ => vec![(section.to_string(), DASH.to_string())],
    }
}

fn render_runs_compare(answer: &Value) -> String {
    let runs = items(answer, "runs");
    if runs.is_empty() {
        return "no runs\n".to_string();
    }
    let mut out = compare_identity_table(runs).render();
    out.push('\n');
    out.push_str(&compare_metric_table(runs, &best_runs(answer)).render());
    out.push_str("\n* best value of the metric\n");
    out
}

fn compare_identity_table(runs: &[Value]) -> Table {
    let mut table = Table::new(&[
        ("RUN", Align::Left),
        ("EXPERIMENT", Align::Left),
        ("PROVIDER", Align::Left),
        ("MODEL", Align::Left),
        ("PROMPT", Align::Left),
        ("PARAMS", Align::Left),
    ]);
    for run in runs {
        table.push(vec![
            text(field(run, "id")),
            text(field(run, "experiment")),
            text(field(run, "provider")),
            text(field(run, "model")),
            prompt_label(run),
            inline_map(run.get("params")),
        ]);
    }
    table
}

/// Metric path → id of the best run; keys may or may not carry a `metrics.` prefix.
fn best_runs(answer: &Value) -> BTreeMap<String, String> {
    let Some(Value::Object(best)) = answer.get("best") else {
        return BTreeMap::new();
    };
    best.iter()
        .filter_map(|(path, id)| {
            let path = path.strip_prefix("metrics.").unwrap_or(path);
            Some((path.to_string(), id.as_str()?.to_string()))
        })
        .collect()
}

fn compare_metric_table(runs: &[Value], best: &BTreeMap<String, String>) -> Table {
    let ids: Vec<String> = runs.iter().map(|run| text(field(run, "id"))).collect();
    let mut columns = vec![("METRIC", Align::Left)];
    columns.extend(ids.iter().map(|id| (id.as_str(), Align::Right)));
    let mut table = Table::new(&columns);
    for path in metric_paths(runs) {
        let mut row = vec![path.clone()];
        for (run, id) in runs.iter().zip(&ids) {
            let value = format_metric(&path, field(run, &format!("metrics.{path}")));
            // Every cell gets a marker slot so the numbers stay right-aligned on their digits.
            let marker = if best.get(&path) == Some(id) {
                '*'
            } else {
                ' '
            };
            row.push(format!("{value}{marker}"));
        }
        table.push(row);
    }
    table
}

fn render_traces_list(answer: &Value) -> String {
    let mut table = Table::new(&[
        ("ID", Align::Left),
        ("TIME (UTC)", Align::Left),
        ("EXPERIMENT", Align::Left),
        ("RUN", Align::Left),
        ("MODEL", Align::Left),
        ("STATUS", Align::Left),
        ("MS", Align::Right),
        ("IN", Align::Right),
        ("OUT", Align::Right),
        ("COST", Align::Right),
    ]);
    for trace in items(answer, "traces") {
        table.push(vec![
            text(field(trace, "id")),
            time_at(trace, "started_at_ms"),
            text(field(trace, "experiment")),
            text(field(trace, "run_id")),
            text(field(trace, "served_model")),
            status_label(trace),
            format_ms(field(trace, "total_ms")),
            count(field(trace, "input_tokens")),
            count(field(trace, "output_tokens")),
            format_usd(field(trace, "cost_usd")),
        ]);
    }
    let mut out = if table.is_empty() {
        "no traces\n".to_string()
    } else {
        table.render()
    };
    if let Some(cursor) = field(answer, "next_cursor").and_then(Value::as_str) {
        out.push_str(&format!("\nmore traces: add --cursor {cursor}\n"));
    }
    out
}

/// `200`, or `502 upstream_http` when the call failed.
fn status_label(trace: &Value) -> String {
    let status = count(field(trace, "status"));
    match field(trace, "error_class").and_then(Value::as_str) {
        Some(class) => format!("{status} {class}"),
        None => status,
    }
}

fn render_trace_show(trace: &Value) -> String {
    let mut pairs = trace_summary_pairs(trace);
    for section in ["params", "tags", "sampling"] {
        pairs.extend(map_entries(section, trace.get(section)));
    }
    pairs.extend(attempt_pairs(trace));
    pairs.extend(guardrail_pairs(trace));
    pairs.extend(score_pairs(trace));
    let mut out = render_key_values(&pairs);
    for (label, key) in [
        ("request body", "request_body"),
        ("response body", "response_body"),
    ] {
        out.push_str(&render_body(label, trace.get(key)));
    }
    out
}

fn trace_summary_pairs(trace: &Value) -> Vec<(String, String)> {
    let error = field(trace, "error")
        .map(|e| format!("{}: {}", text(field(e, "class")), text(field(e, "message"))));
    let parent = field(trace, "parent").map(|p| {
        format!(
            "trace {} span {}",
            text(field(p, "trace_id")),
            text(field(p, "span_id"))
        )
    });
    let usage_source = field(trace, "usage.source").and_then(Value::as_str);
    [
        ("id", text(field(trace, "id"))),
        ("started (UTC)", time_at(trace, "started_at_ms")),
        ("ended (UTC)", time_at(trace, "ended_at_ms")),
        ("session", text(field(trace, "session"))),
        ("parent", parent.unwrap_or_else(|| DASH.to_string())),
        ("experiment", text(field(trace, "experiment"))),
        ("run", text(field(trace, "run_id"))),
        ("run name", text(field(trace, "run_name"))),
        ("prompt", prompt_label(trace)),
        ("provider", text(field(trace, "provider"))),
        ("requested model", text(field(trace, "requested_model"))),
        ("models entry", text(field(trace, "model_group"))),
        ("served model", text(field(trace, "served_model"))),
        ("endpoint", text(field(trace, "endpoint"))),
        (
            "request",
            format!(
                "{} {}",
                text(field(trace, "method")),
                text(field(trace, "path"))
            ),
        ),
        ("stream", text(field(trace, "stream"))),
        ("status", text(field(trace, "status"))),
        ("error", error.unwrap_or_else(|| DASH.to_string())),
        ("cache", text(field(trace, "cache"))),
        ("total ms", format_ms(field(trace, "latency.total_ms"))),
        (
            "upstream ms",
            format_ms(field(trace, "latency.upstream_ms")),
        ),
        (
            "overhead ms",
            format_ms(field(trace, "latency.overhead_ms")),
        ),
        ("ttft ms", format_ms(field(trace, "latency.ttft_ms"))),
        ("input tokens", count(field(trace, "usage.input_tokens"))),
        ("output tokens", count(field(trace, "usage.output_tokens"))),
        (
            "cached input tokens",
            count(field(trace, "usage.cached_input_tokens")),
        ),
        ("tokens from", usage_source.unwrap_or(DASH).to_string()),
        ("cost usd", format_usd(field(trace, "cost_usd"))),
        (
            "saved by cache usd",
            format_usd(field(trace, "cost_saved_usd")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `attempt.1  a/gpt-4o-mini 500 (12.0 ms)`, `attempt.2  b/gpt-4o-mini 200 (8.1 ms) served`.
fn attempt_pairs(trace: &Value) -> Vec<(String, String)> {
    items(trace, "attempts")
        .iter()
        .enumerate()
        .map(|(index, attempt)| {
            let outcome = match field(attempt, "status") {
                Some(status) if !status.is_null() => text(Some(status)),
                _ => text(field(attempt, "error")),
            };
            let served = if attempt["served"] == true {
                " served"
            } else {
                ""
            };
            let value = format!(
                "{}/{} {outcome} ({} ms){served}",
                text(field(attempt, "provider")),
                text(field(attempt, "model")),
                format_ms(field(attempt, "ms"))
            );
            (format!("attempt.{}", index + 1), value)
        })
        .collect()
}

/// `guardrail.pii  redacted email=2 (35 us)` per verdict.
fn guardrail_pairs(trace: &Value) -> Vec<(String, String)> {
    items(trace, "guardrails")
        .iter()
        .map(|verdict| {
            let matches = match inline_map(verdict.get("matches")) {
                none if none == DASH => String::new(),
                some => format!(" {some}"),
            };
            let value = format!(
                "{}{matches} ({} us)",
                text(field(verdict, "verdict")),
                count(field(verdict, "elapsed_us"))
            );
            (
                format!("guardrail.{}", text(field(verdict, "guardrail"))),
                value,
            )
        })
        .collect()
}

/// `score.exact_match  1 (comment)` per score.
fn score_pairs(trace: &Value) -> Vec<(String, String)> {
    items(trace, "scores")
        .iter()
        .map(|score| {
            let comment = field(score, "comment")
                .and_then(Value::as_str)
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            let value = format!("{}{comment}", text(field(score, "value")));
            (format!("score.{}", text(field(score, "name"))), value)
        })
        .collect()
}

/// A captured body: JSON pretty-printed, text as is.
fn render_body(label: &str, captured: Option<&Value>) -> String {
    let Some(captured) = captured.filter(|c| !c.is_null()) else {
        return format!("\n{label}: not captured\n");
    };
    let truncated = field(captured, "truncated").and_then(Value::as_bool) == Some(true);
    let note = if truncated { " (truncated)" } else { "" };
    let content = match captured.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => serde_json::to_string_pretty(other).unwrap_or_else(|_| other.to_string()),
        None => DASH.to_string(),
    };
    format!("\n{label}{note}:\n{}\n", content.trim_end())
}

fn render_experiments_list(answer: &Value) -> String {
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("RUNS", Align::Right),
        ("TRACES", Align::Right),
        ("LAST ACTIVITY (UTC)", Align::Left),
    ]);
    for experiment in items(answer, "experiments") {
        table.push(vec![
            text(field(experiment, "name")),
            count(field(experiment, "runs")),
            count(field(experiment, "traces")),
            time_at(experiment, "last_activity_ms"),
        ]);
    }
    if table.is_empty() {
        return "no experiments\n".to_string();
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use serde_json::json;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_read_commands_with_defaults() {
        let cli = Cli::try_parse_from(["flowgate", "runs", "compare", "a", "b", "--json"])
            .map_err(|e| e.to_string());
        let Ok(Cli {
            command:
                Command::Runs {
                    command: RunsCommand::Compare { ids, client },
                },
        }) = cli
        else {
            panic!("unexpected parse: {cli:?}");
        };
        assert_eq!(ids, ["a", "b"]);
        assert!(client.json);
    }

    #[test]
    fn compare_needs_two_ids() {
        assert!(Cli::try_parse_from(["flowgate", "runs", "compare", "a"]).is_err());
    }

    #[test]
    fn serve_takes_a_config_path() {
        let cli = Cli::try_parse_from(["flowgate", "serve", "--config", "x.toml"]);
        assert!(matches!(
            cli,
            Ok(Cli { command: Command::Serve { config: Some(p) } }) if p == std::path::Path::new("x.toml")
        ));
    }

    #[test]
    fn percent_encoding_keeps_unreserved_and_escapes_the_rest() {
        assert_eq!(percent_encode("abc-XYZ_0.9~"), "abc-XYZ_0.9~");
        assert_eq!(percent_encode("a b&c=d/e?f#g"), "a%20b%26c%3Dd%2Fe%3Ff%23g");
        assert_eq!(percent_encode("ü"), "%C3%BC");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode(""), "");
    }

    #[test]
    fn query_string_skips_missing_values() {
        assert_eq!(query_string(&[("a", None)]), "");
        assert_eq!(
            query_string(&[
                ("a", Some("x y".into())),
                ("b", None),
                ("c", Some("1".into()))
            ]),
            "?a=x%20y&c=1"
        );
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_utc(1_700_000_000_999), "2023-11-14 22:13:20");
        assert_eq!(format_utc(1_735_689_599_000), "2024-12-31 23:59:59");
        assert_eq!(format_utc(4_107_542_400_000), "2100-03-01 00:00:00");
    }

    #[test]
    fn table_aligns_columns_by_content() {
        let mut table = Table::new(&[("NAME", Align::Left), ("N", Align::Right)]);
        table.push(vec!["alpha".into(), "1".into()]);
        table.push(vec!["b".into(), "1234".into()]);
        assert_eq!(table.render(), "NAME      N\nalpha     1\nb      1234\n");
    }

    #[test]
    fn table_fills_missing_cells_and_trims_line_ends() {
        let mut table = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        table.push(vec!["xyz".into()]);
        table.push(vec!["q".into(), "".into()]);
        assert_eq!(table.render(), "A    B\nxyz  -\nq\n");
    }

    #[test]
    fn number_formats() {
        assert_eq!(format_ms(Some(&json!(12.345))), "12.3");
        assert_eq!(format_ms(None), "-");
        assert_eq!(format_usd(Some(&json!(0.0001234))), "0.000123");
        assert_eq!(format_usd(Some(&Value::Null)), "-");
        assert_eq!(format_metric("error_rate", Some(&json!(0.125))), "12.5%");
        assert_eq!(format_metric("latency_ms.p95", Some(&json!(3))), "3.0");
        assert_eq!(
            format_metric("cost_per_request_usd", Some(&json!(1))),
            "1.000000"
        );
        assert_eq!(format_metric("requests", Some(&json!(7))), "7");
        assert_eq!(format_metric("scores.em.mean", Some(&json!(0.5))), "0.5");
    }

    #[test]
    fn endpoint_uri_joins_and_validates() {
        let uri = endpoint_uri("http://127.0.0.1:8080/", "/api/v1/runs?limit=1");
        assert_eq!(
            uri.map(|u| u.to_string()).ok().as_deref(),
            Some("http://127.0.0.1:8080/api/v1/runs?limit=1")
        );
        assert!(endpoint_uri("127.0.0.1:8080", "/api/v1/runs").is_err());
        assert!(endpoint_uri("ftp://host", "/api/v1/runs").is_err());
        assert!(endpoint_uri("http://host/?x=1", "/api/v1/runs").is_err());
        assert!(endpoint_uri("http://", "/api/v1/runs").is_err());
        let prefixed = endpoint_uri("https://gw.example/flowgate/", "/api/v1/experiments");
        assert_eq!(
            prefixed.map(|u| u.to_string()).ok().as_deref(),
            Some("https://gw.example/flowgate/api/v1/experiments")
        );
    }

    #[test]
    fn api_error_message_prefers_openai_shape() {
        let body = br#"{"error":{"message":"run not found","type":"x"}}"#;
        assert_eq!(api_error_message(body), "run not found");
        assert_eq!(api_error_message(b"  plain text \n"), "plain text");
        assert_eq!(api_error_message(b""), "(empty body)");
    }

    fn sample_run(id: &str, p95: f64) -> Value {
        json!({
            "id": id, "experiment": "exp", "provider": "mock", "model": "mock/gpt-4o-mini",
            "prompt_id": "qa", "prompt_version": "v1", "params": {"k": "5"}, "tags": {},
            "first_seen_ms": 0, "last_seen_ms": 1000,
            "metrics": {
                "requests": 3, "errors": 0, "error_rate": 0.0,
                "latency_ms": {"p50": 1.0, "p95": p95, "p99": p95, "mean": 1.0},
                "ttft_ms": null,
                "input_tokens": 10, "output_tokens": 20, "cost_usd": 0.00012,
                "scores": {"em": {"count": 2, "mean": 0.5}}, "guardrails": {}
            }
        })
    }

    #[test]
    fn runs_list_renders_one_line_per_run() {
        let out = render_runs_list(&json!({"runs": [sample_run("r1", 2.0)]}));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("RUN"));
        assert!(lines[1].contains("qa@v1"));
        assert!(lines[1].contains("10/20"));
        assert!(lines[1].ends_with("0.000120"));
        assert_eq!(render_runs_list(&json!({})), "no runs\n");
    }

    #[test]
    fn run_show_lists_params_and_every_metric() {
        let out = render_run_show(&sample_run("r1", 2.0));
        assert!(out.contains("params.k"));
        assert!(out
            .lines()
            .any(|l| l.starts_with("ttft_ms.p95") && l.ends_with('-')));
        assert!(out
            .lines()
            .any(|l| l.starts_with("scores.em.mean") && l.ends_with("0.5")));
        assert!(out
            .lines()
            .any(|l| l.starts_with("tags") && l.ends_with('-')));
    }

    #[test]
    fn compare_marks_the_best_run() {
        let answer = json!({
            "runs": [sample_run("r1", 2.0), sample_run("r2", 9.0)],
            "best": {"latency_ms.p95": "r1", "metrics.cost_usd": "r2"}
        });
        let out = render_runs_compare(&answer);
        let p95 = out.lines().find(|l| l.starts_with("latency_ms.p95"));
        assert_eq!(
            p95.map(|l| l.split_whitespace().collect::<Vec<_>>()),
            Some(vec!["latency_ms.p95", "2.0*", "9.0"])
        );
        let cost = out.lines().find(|l| l.starts_with("cost_usd"));
        assert!(cost.is_some_and(|l| l.ends_with("0.000120*")));
    }

    #[test]
    fn traces_list_shows_time_and_cursor() {
        let answer = json!({
            "traces": [{"id": "t1", "started_at_ms": 0, "experiment": "e", "run_id": "r",
                        "served_model": "m", "status": 502, "error_class": "upstream_http",
                        "total_ms": 5.25, "input_tokens": null, "cost_usd": null}],
            "next_cursor": "abc"
        });
        let out = render_traces_list(&answer);
        assert!(out.contains("1970-01-01 00:00:00"));
        assert!(out.contains("502 upstream_http"));
        assert!(out.contains("--cursor abc"));
    }

    #[test]
    fn trace_show_prints_bodies() {
        let trace = json!({
            "id": "t1", "started_at_ms": 0, "latency": {"total_ms": 1.0},
            "request_body": {"content": {"model": "m"}, "truncated": true},
            "response_body": {"content": "plain"},
            "guardrails": [{"guardrail": "pii", "verdict": "redacted", "matches": {"email": 2}, "elapsed_us": 35}]
        });
        let out = render_trace_show(&trace);
        assert!(out.contains("request body (truncated):\n{\n  \"model\": \"m\"\n}"));
        assert!(out.contains("response body:\nplain"));
        assert!(out.contains("redacted email=2 (35 us)"));
    }
}
