//! Which text format `/metrics` answers in.
//!
//! The registry encodes OpenMetrics, the only format that carries exemplars. Prometheus asks for
//! it (`Accept: application/openmetrics-text`); everything else — curl, older scrapers, agents
//! that only speak the classic format — gets the Prometheus text format 0.0.4, derived from the
//! OpenMetrics text: exemplars, `# UNIT` and `# EOF` removed, counters' `# HELP` / `# TYPE` named
//! after their `_total` samples. A classic parser would reject an exemplar.

use std::collections::HashSet;

/// A text exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    OpenMetrics,
    Prometheus,
}

impl Exposition {
    /// The format a scraper asked for in its `Accept` header.
    pub fn negotiate(accept: Option<&str>) -> Exposition {
        let asks_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|range| {
                let mut params = range.split(';').map(str::trim);
                let media = params.next().unwrap_or_default();
                let refused = params.any(|p| matches!(p.split_once('='), Some(("q", q)) if q.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)));
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if asks_openmetrics {
            Exposition::OpenMetrics
        } else {
            Exposition::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The classic Prometheus text for an OpenMetrics text.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some((keyword, rest)) = descriptor(line) {
            let name = rest.split(' ').next().unwrap_or_default();
            if counters.contains(name) {
                // The classic format names a counter family after its samples.
                out.push_str(keyword);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        }
        if line.starts_with('#') {
            out.push_str(line);
        } else {
            out.push_str(without_exemplar(line));
        }
        out.push('\n');
    }
    out
}

/// `# HELP name ...` or `# TYPE name ...`, split after the keyword.
fn descriptor(line: &str) -> Option<(&'static str, &str)> {
    ["# HELP ", "# TYPE "]
        .into_iter()
        .find_map(|keyword| Some((keyword, line.strip_prefix(keyword)?)))
}

/// A sample line without its ` # {...} value` exemplar. The label set is skipped with its quoted
/// values, which may themselves hold ` # `.
fn without_exemplar(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut at = line.find(['{', ' ']).unwrap_or(line.len());
    if bytes.get(at) == Some(&b'{') {
        let mut quoted = false;
        let mut escaped = false;
        while at < bytes.len() {
            let byte = bytes[at];
            at += 1;
            match (quoted, escaped, byte) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (_, false, b'"') => quoted = !quoted,
                (false, _, b'}') => break,
                _ => {}
            }
        }
    }
    match line[at..].find(" # ") {
        Some(exemplar) => &line[..at + exemplar],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        let prometheus_2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, expected) in [
            (Some(prometheus_2), Exposition::OpenMetrics),
            (
                Some("application/openmetrics-text"),
                Exposition::OpenMetrics,
            ),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                Exposition::OpenMetrics,
            ),
            (
                Some("application/openmetrics-text;q=0, text/plain"),
                Exposition::Prometheus,
            ),
            (Some("text/plain;version=0.0.4"), Exposition::Prometheus),
            (Some("*/*"), Exposition::Prometheus),
            (None, Exposition::Prometheus),
        ] {
            assert_eq!(Exposition::negotiate(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn classic_text_drops_what_only_openmetrics_knows() {
        let openmetrics = concat!(
            "# HELP flowgate_requests Calls.\n",
            "# TYPE flowgate_requests counter\n",
            "flowgate_requests_total{experiment=\"a # {b}\\\" # c\",status=\"200\"} 3\n",
            "# HELP flowgate_request_duration_seconds Latency.\n",
            "# TYPE flowgate_request_duration_seconds histogram\n",
            "# UNIT flowgate_request_duration_seconds seconds\n",
            "flowgate_request_duration_seconds_bucket{le=\"0.01\"} 1 # {trace_id=\"t1\"} 0.005\n",
            "flowgate_overhead_seconds_bucket{le=\"+Inf\"} 1 # {trace_id=\"t2\"} 0.5\n",
            "flowgate_overhead_seconds_sum 0.5\n",
            "# EOF\n",
        );
        let classic = concat!(
            "# HELP flowgate_requests_total Calls.\n",
            "# TYPE flowgate_requests_total counter\n",
            "flowgate_requests_total{experiment=\"a # {b}\\\" # c\",status=\"200\"} 3\n",
            "# HELP flowgate_request_duration_seconds Latency.\n",
            "# TYPE flowgate_request_duration_seconds histogram\n",
            "flowgate_request_duration_seconds_bucket{le=\"0.01\"} 1\n",
            "flowgate_overhead_seconds_bucket{le=\"+Inf\"} 1\n",
            "flowgate_overhead_seconds_sum 0.5\n",
        );
        assert_eq!(to_prometheus_text(openmetrics), classic);
    }
}
