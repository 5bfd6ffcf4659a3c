//! The shipped Grafana dashboards are valid: unique panel ids, a datasource variable every query
//! goes through, panels that do not overlap, a PromQL expression on every target naming only
//! series flowgate exposes, and every metric family on a dashboard and in docs/metrics.md.
//! (tests/prometheus.rs runs every expression against a real Prometheus.)

mod grafana;

use std::collections::{BTreeSet, HashSet};

use serde_json::Value;

use flowgate::telemetry::{Exposition, Metrics, MetricsWriter, RejectLabels};
use flowgate::trace::{GuardrailVerdict, Latency, Score, Trace, Usage};

/// Grafana's own variables a query may use besides the dashboard's.
const BUILT_IN: [&str; 3] = ["__rate_interval", "__range", "__interval"];

fn each_dashboard() -> Vec<(&'static str, Value)> {
    grafana::DASHBOARDS
        .iter()
        .map(|file| (*file, grafana::load(file)))
        .collect()
}

#[test]
fn dashboards_have_a_title_a_unique_uid_and_a_current_schema() {
    let mut uids = HashSet::new();
    for (file, dashboard) in each_dashboard() {
        let uid = dashboard["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty() && uid.len() <= 40, "{file}: uid {uid:?}");
        assert!(uids.insert(uid.to_owned()), "{file}: uid {uid} used twice");
        assert!(
            dashboard["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}"
        );
        assert!(
            dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{file}"
        );
        assert_eq!(
            dashboard["id"],
            Value::Null,
            "{file}: an id would clash on import"
        );
    }
}

#[test]
fn panel_ids_are_unique() {
    for (file, dashboard) in each_dashboard() {
        let mut ids = HashSet::new();
        for panel in grafana::panels(&dashboard) {
            let id = panel["id"].as_u64();
            assert!(id.is_some(), "{file}: panel {} has no id", panel["title"]);
            assert!(ids.insert(id), "{file}: panel id {id:?} used twice");
        }
    }
}

/// (x, y, w, h) of a panel.
type Grid = (u64, u64, u64, u64);

fn grid(file: &str, panel: &Value) -> Grid {
    let at = |key: &str| {
        panel["gridPos"][key]
            .as_u64()
            .unwrap_or_else(|| panel_error(file, panel, &format!("no gridPos.{key}")))
    };
    (at("x"), at("y"), at("w"), at("h"))
}

fn panel_error(file: &str, panel: &Value, what: &str) -> ! {
    panic!("{file}: panel {:?}: {what}", panel["title"])
}

#[test]
fn panels_fit_the_grid_without_overlapping() {
    for (file, dashboard) in each_dashboard() {
        let placed: Vec<(&Value, Grid)> = grafana::panels(&dashboard)
            .into_iter()
            .map(|panel| (panel, grid(file, panel)))
            .collect();
        for (panel, (x, _, w, h)) in &placed {
            if *w == 0 || *h == 0 || x + w > 24 {
                panel_error(file, panel, "outside the 24-column grid or empty");
            }
        }
        for (i, (a, (ax, ay, aw, ah))) in placed.iter().enumerate() {
            for (b, (bx, by, bw, bh)) in &placed[i + 1..] {
                let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
                assert!(apart, "{file}: {:?} overlaps {:?}", a["title"], b["title"]);
            }
        }
    }
}

#[test]
fn every_query_goes_through_the_datasource_variable() {
    for (file, dashboard) in each_dashboard() {
        let variables = grafana::variables(&dashboard);
        let datasource = variables
            .iter()
            .find(|v| v["type"] == "datasource")
            .unwrap_or_else(|| panic!("{file}: no datasource variable"));
        assert_eq!(datasource["query"], "prometheus", "{file}");
        let via_variable = |value: &Value| {
            value["uid"] == format!("${{{}}}", datasource["name"].as_str().unwrap_or_default())
        };
        for variable in variables.iter().filter(|v| v["type"] == "query") {
            assert!(
                via_variable(&variable["datasource"]),
                "{file}: {}",
                variable["name"]
            );
        }
        for panel in grafana::panels(&dashboard) {
            if panel["type"] == "row" {
                continue;
            }
            assert!(
                via_variable(&panel["datasource"]),
                "{file}: {}",
                panel["title"]
            );
            let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
            if targets.is_empty() {
                panel_error(file, panel, "no targets");
            }
            for target in targets {
                assert!(
                    via_variable(&target["datasource"]),
                    "{file}: {}",
                    panel["title"]
                );
            }
        }
    }
}

#[test]
fn every_target_has_an_expression_using_only_defined_variables() {
    for (file, dashboard) in each_dashboard() {
        let defined: HashSet<String> = grafana::variables(&dashboard)
            .iter()
            .filter_map(|v| v["name"].as_str())
            .map(str::to_owned)
            .chain(BUILT_IN.iter().map(|b| (*b).to_owned()))
            .collect();
        let queries = grafana::queries(file, &dashboard);
        assert!(
            queries.len() >= 10,
            "{file}: only {} queries",
            queries.len()
        );
        let mut ref_ids = HashSet::new();
        for query in &queries {
            assert!(!query.expr.trim().is_empty(), "{}: no expr", query.name());
            assert!(
                ref_ids.insert((query.panel.clone(), query.ref_id.clone())),
                "{}: refId used twice in the panel",
                query.name()
            );
            for used in variables_in(&query.expr) {
                assert!(
                    defined.contains(&used),
                    "{}: ${used} is not defined",
                    query.name()
                );
            }
        }
    }
}

fn variables_in(expr: &str) -> Vec<String> {
    expr.split('$')
        .skip(1)
        .map(|rest| {
            rest.trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn the_dashboards_filter_by_what_users_pick() {
    let names = |file: &str| -> Vec<String> {
        grafana::variables(&grafana::load(file))
            .iter()
            .filter(|v| v["type"] == "query")
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(
        names("flowgate-overview.json"),
        ["experiment", "provider", "model"]
    );
    assert_eq!(
        names("flowgate-experiments.json"),
        ["experiment", "prompt_version", "model"]
    );
    // The experiment dashboard is about one experiment at a time.
    let experiments = grafana::load("flowgate-experiments.json");
    let experiment = grafana::variables(&experiments)
        .into_iter()
        .find(|v| v["name"] == "experiment")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&experiment["multi"], &experiment["includeAll"]),
        (&Value::Bool(false), &Value::Bool(false))
    );
    for (file, dashboard) in each_dashboard() {
        for variable in grafana::variables(&dashboard)
            .iter()
            .filter(|v| v["type"] == "query")
        {
            assert!(
                grafana::label_values(variable).is_some(),
                "{file}: {}",
                variable["name"]
            );
        }
    }
}

/// An exposition with a series in every family.
fn exposition() -> String {
    let metrics = Metrics::new();
    let mut writer = MetricsWriter::new(10);
    let trace = Trace {
        id: "0190f5c2-7a4e-7cc2-9d3b-2f6e1c1a0b9d".into(),
        experiment: "qa".into(),
        provider: Some("openai".into()),
        served_model: Some("gpt-4o-mini".into()),
        status: 200,
        cost_usd: Some(0.1),
        cache: "hit".into(),
        guardrails: vec![GuardrailVerdict {
            guardrail: "pii".into(),
            verdict: "flagged".into(),
            ..Default::default()
        }],
        usage: Usage {
            input_tokens: Some(1),
            output_tokens: Some(1),
            cached_input_tokens: Some(1),
            cache_write_input_tokens: None,
            source: "provider".into(),
        },
        latency: Latency {
            total_ms: 1.0,
            upstream_ms: Some(1.0),
            overhead_ms: 0.1,
            ttft_ms: Some(1.0),
        },
        ..Default::default()
    };
    writer.observe(&metrics, &trace);
    let score = Score {
        name: "exact_match".into(),
        value: 1.0,
        comment: None,
        at_ms: 0,
    };
    writer.observe_score(&metrics, &trace, &score);
    let _ = metrics.rejected.get_or_create(&RejectLabels {
        reason: "in_flight",
    });
    metrics.encode(Exposition::Prometheus)
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("flowgate_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn dashboards_name_only_real_series_and_cover_every_family() {
    let text = exposition();
    let series: HashSet<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let families: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    let mut used = BTreeSet::new();
    for (file, dashboard) in each_dashboard() {
        for query in grafana::queries(file, &dashboard) {
            for name in metric_names(&query.expr) {
                assert!(
                    series.contains(name.as_str()),
                    "{}: no series {name}",
                    query.name()
                );
                used.insert(name);
            }
        }
    }
    let docs = std::fs::read_to_string(grafana::path("docs/metrics.md")).unwrap_or_default();
    for family in families {
        assert!(
            used.iter().any(|name| name.starts_with(family)),
            "no dashboard shows {family}"
        );
        assert!(
            docs.contains(&format!("`{family}")),
            "docs/metrics.md does not describe {family}"
        );
    }
}
