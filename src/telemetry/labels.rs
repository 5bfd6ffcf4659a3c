//! The label sets of the metric families, the bound on client-chosen label values, and the
//! trace-id exemplar.

use std::collections::HashSet;

use prometheus_client::encoding::{
    EncodeLabelKey, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder,
};

/// What every per-call family is labelled with: the call's experiment, prompt version, provider
/// and model. Requests, latency, tokens, cost, cache, guardrails and scores all carry these, so
/// any two of them can be divided by the same `by (...)` clause.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CallLabels {
    pub experiment: String,
    pub prompt_version: String,
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub call: CallLabels,
    /// The HTTP status, or `cancelled` when the client left first.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct UpstreamLabels {
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TokenLabels {
    pub call: CallLabels,
    /// `input`, `output` or `cached_input`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct CacheLabels {
    pub call: CallLabels,
    /// `hit`, `miss` or `bypass`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct GuardrailLabels {
    pub call: CallLabels,
    pub guardrail: String,
    /// `pass`, `flagged`, `redacted` or `blocked`.
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ScoreLabels {
    pub call: CallLabels,
    /// The score's name (`exact_match`, ...).
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RejectLabels {
    /// `connections` or `in_flight`.
    pub reason: &'static str,
}

/// One `key="value"` pair.
fn label(encoder: &mut LabelSetEncoder, key: &str, value: &str) -> Result<(), std::fmt::Error> {
    let mut label = encoder.encode_label();
    let mut key_encoder = label.encode_label_key()?;
    EncodeLabelKey::encode(&key, &mut key_encoder)?;
    let mut value_encoder = key_encoder.encode_label_value()?;
    EncodeLabelValue::encode(&value, &mut value_encoder)?;
    value_encoder.finish()
}

/// The call labels, then the family's own. (The derive's `flatten` only works on a last field.)
fn call_and(
    mut encoder: LabelSetEncoder,
    call: &CallLabels,
    own: &[(&str, &str)],
) -> Result<(), std::fmt::Error> {
    label(&mut encoder, "experiment", &call.experiment)?;
    label(&mut encoder, "prompt_version", &call.prompt_version)?;
    label(&mut encoder, "provider", &call.provider)?;
    label(&mut encoder, "model", &call.model)?;
    for (key, value) in own {
        label(&mut encoder, key, value)?;
    }
    Ok(())
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        call_and(encoder, &self.call, &[("status", &self.status)])
    }
}

impl EncodeLabelSet for TokenLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        call_and(encoder, &self.call, &[("kind", self.kind)])
    }
}

impl EncodeLabelSet for CacheLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        call_and(encoder, &self.call, &[("result", self.result)])
    }
}

impl EncodeLabelSet for GuardrailLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let own = [
            ("guardrail", self.guardrail.as_str()),
            ("verdict", self.verdict),
        ];
        call_and(encoder, &self.call, &own)
    }
}

impl EncodeLabelSet for ScoreLabels {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        call_and(encoder, &self.call, &[("name", &self.name)])
    }
}

/// The label value a capped label takes once its maximum of distinct values is reached.
pub const OVERFLOW: &str = "other";

/// Caps the distinct values a label may take; later ones are reported as [`OVERFLOW`].
#[derive(Debug)]
pub struct LabelLimit {
    max: usize,
    seen: HashSet<String>,
}

impl LabelLimit {
    pub fn new(max: usize) -> LabelLimit {
        LabelLimit {
            max,
            seen: HashSet::new(),
        }
    }

    /// The value to report for `value`. Allocates only the first time a value is admitted.
    pub fn admit<'a>(&mut self, value: &'a str) -> &'a str {
        if self.seen.contains(value) {
            return value;
        }
        if self.seen.len() < self.max {
            self.seen.insert(value.to_owned());
            return value;
        }
        OVERFLOW
    }
}

/// The exemplar a latency observation carries: `trace_id`, the flowgate trace id, so a slow
/// bucket in Grafana links to `/api/v1/traces/{id}`. Held inline: setting an exemplar on every
/// observation must not allocate.
#[derive(Clone, Copy, Debug)]
pub struct TraceExemplar {
    bytes: [u8; TraceExemplar::MAX],
    len: u8,
}

impl TraceExemplar {
    /// A UUID is 36 bytes; OpenMetrics allows 128 characters for an exemplar's whole label set.
    const MAX: usize = 64;

    /// `None` for an empty id, or one too long for an exemplar (the gateway's own ids always fit).
    pub fn new(trace_id: &str) -> Option<TraceExemplar> {
        if trace_id.is_empty() || trace_id.len() > Self::MAX {
            return None;
        }
        let mut bytes = [0; Self::MAX];
        bytes[..trace_id.len()].copy_from_slice(trace_id.as_bytes());
        Some(TraceExemplar {
            bytes,
            len: trace_id.len() as u8,
        })
    }

    pub fn as_str(&self) -> &str {
        // Copied whole from a `&str` in `new`, so always valid UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl EncodeLabelSet for TraceExemplar {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        label(&mut encoder, "trace_id", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_bounded() {
        let mut limit = LabelLimit::new(2);
        assert_eq!(limit.admit("a"), "a");
        assert_eq!(limit.admit("b"), "b");
        assert_eq!(limit.admit("c"), OVERFLOW);
        assert_eq!(limit.admit("a"), "a");
    }

    #[test]
    fn exemplars_hold_ids_that_fit() {
        let id = "0190f5c2-7a4e-7cc2-9d3b-2f6e1c1a0b9d";
        assert_eq!(
            TraceExemplar::new(id)
                .map(|e| e.as_str().to_owned())
                .as_deref(),
            Some(id)
        );
        assert!(TraceExemplar::new("").is_none());
        assert!(TraceExemplar::new(&"x".repeat(65)).is_none());
    }
}
