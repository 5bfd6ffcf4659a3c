//! Reading the shipped Grafana dashboards: their panels, PromQL targets and template variables.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// The dashboards under `dashboards/`, by file name.
pub const DASHBOARDS: [&str; 2] = ["flowgate-overview.json", "flowgate-experiments.json"];

pub fn path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub fn load(file: &str) -> Value {
    let path = path(&format!("dashboards/{file}"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"))
}

/// Every panel, rows and the panels inside collapsed rows included.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// One PromQL target of one panel.
#[derive(Clone, Debug)]
pub struct Query {
    pub dashboard: &'static str,
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
}

impl Query {
    /// How a failure names the query: `file / panel title / refId`.
    pub fn name(&self) -> String {
        format!("{} / {} / {}", self.dashboard, self.panel, self.ref_id)
    }
}

pub fn queries(file: &'static str, dashboard: &Value) -> Vec<Query> {
    panels(dashboard)
        .into_iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |target| Query {
                    dashboard: file,
                    panel: title.clone(),
                    ref_id: target["refId"].as_str().unwrap_or_default().to_owned(),
                    expr: target["expr"].as_str().unwrap_or_default().to_owned(),
                })
        })
        .collect()
}

pub fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

/// A query variable's `label_values(selector, label)`, split.
pub fn label_values(variable: &Value) -> Option<(String, String)> {
    let definition = variable["definition"].as_str()?;
    let inner = definition
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_owned(), label.trim().to_owned()))
}

/// `text` with each `$name` replaced by its value; longer names first, so `$__range` is not
/// read as a prefix of another name.
pub fn substitute(text: &str, values: &[(&str, &str)]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = text.to_owned();
    for (name, value) in sorted {
        out = out.replace(&format!("${name}"), value);
    }
    out
}
