//! Guardrails: checks on what a call sends and answers — PII, secrets, prompt injection, banned
//! terms, token budgets, JSON answers, the user's own patterns — each logging, redacting or
//! blocking what it finds.
//!
//! Built once from the `[[guardrails]]` config (every pattern compiled at start), shared behind
//! an `Arc`. Checks read only the text parts of a body (`body`), never its JSON syntax; a
//! redaction rewrites only the string tokens it changed. Verdicts name match kinds and counts,
//! never the matched text.
//!
//! Entry points for the pipeline: [`Guardrails::check_request`] before the call goes upstream,
//! [`Guardrails::check_response`] on a whole answer, [`Guardrails::stream`] for a streamed one.

mod banned_terms;
mod body;
mod config;
mod detector;
mod injection;
mod input_tokens;
mod json_output;
mod pii;
mod schema;
mod secrets;
mod starts;
mod stream;
mod user_regex;
mod verdict;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

pub use body::BodyError;
pub use config::{Action, CheckKind, GuardrailConfig, GuardrailError, Stage, StageConfig};
pub use json_output::Expectation;
pub use stream::{
    replace_deltas, stream_deltas, StreamDelta, StreamEnd, StreamGuard, HOLD_BACK_BYTES,
    MAX_HELD_BYTES,
};
pub use verdict::{Blocked, MatchCount, Outcome, Verdict};

use body::Leaf;
use config::{Check, Guardrail};
use detector::{apply_redactions, Hit, MatchKind, Redaction};
use verdict::micros;

use crate::providers::Endpoint;

/// Which guardrails of a stage to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    All,
    /// Those that may change the call: `redact` and `block`.
    Changing,
    /// Those that only record a verdict: `log`.
    Logging,
}

impl Which {
    fn includes(self, rail: &Guardrail) -> bool {
        match self {
            Which::All => true,
            Which::Changing => rail.action != Action::Log,
            Which::Logging => rail.action == Action::Log,
        }
    }
}

/// The configured guardrails, compiled. Cloning shares them.
#[derive(Clone, Default)]
pub struct Guardrails {
    rails: Arc<[Guardrail]>,
}

impl std::fmt::Debug for Guardrails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.rails.iter()).finish()
    }
}

/// What the checks of one stage concluded.
#[derive(Default)]
pub struct Checked {
    /// One per guardrail of the stage, in config order.
    pub verdicts: Vec<Verdict>,
    /// The body with its matches redacted; `None` when nothing was redacted (send the original).
    pub rewritten: Option<Bytes>,
    /// The first `block` guardrail that fired: answer with `blocked.to_api_error()`.
    pub blocked: Option<Blocked>,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("verdicts", &self.verdicts)
            .field("rewritten_bytes", &self.rewritten.as_ref().map(Bytes::len))
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl Guardrails {
    /// Validates and compiles the config entries; errors name the guardrail and the key.
    pub fn from_config(configs: &[GuardrailConfig]) -> Result<Guardrails, GuardrailError> {
        Ok(Guardrails {
            rails: config::compile(configs)?.into(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rails.is_empty()
    }

    /// Some guardrail checks requests.
    pub fn checks_input(&self) -> bool {
        self.rails.iter().any(|g| g.input)
    }

    /// Some guardrail checks answers.
    pub fn checks_output(&self) -> bool {
        self.rails.iter().any(|g| g.output)
    }

    /// Some output guardrail may change an answer (redact or block): it must run before the
    /// answer reaches the client. Output checks that only log run in the recorder.
    pub fn changes_output(&self) -> bool {
        self.rails
            .iter()
            .any(|g| g.output && g.action != Action::Log)
    }

    /// What the answer to this request must be, for `json_output` (read only when such a
    /// guardrail is configured).
    pub fn expectation(&self, body: &[u8]) -> Expectation {
        let wanted = self
            .rails
            .iter()
            .any(|g| g.output && matches!(g.check, Check::JsonOutput));
        if wanted {
            Expectation::from_request(body)
        } else {
            Expectation::default()
        }
    }

    /// Runs the input guardrails on a request body. An error means the body's texts cannot be
    /// read (a repeated key, say): refuse it (400) rather than send it unchecked.
    pub fn check_request(&self, endpoint: Endpoint, body: &[u8]) -> Result<Checked, BodyError> {
        self.check_request_of(Which::All, endpoint, body)
    }

    /// As [`check_request`](Self::check_request), with only the guardrails `which` names: the
    /// request path runs those that may change the call, the recorder those that only log.
    pub fn check_request_of(
        &self,
        which: Which,
        endpoint: Endpoint,
        body: &[u8],
    ) -> Result<Checked, BodyError> {
        if !self.rails.iter().any(|g| g.input && which.includes(g)) {
            return Ok(Checked::default());
        }
        let leaves = body::request_leaves(endpoint, body)?;
        Ok(self.run(which, Stage::Input, body, &leaves, &Expectation::default()))
    }

    /// Some input guardrail may change the call (redact or block): it runs on the request path.
    pub fn changes_input(&self) -> bool {
        self.rails
            .iter()
            .any(|g| g.input && Which::Changing.includes(g))
    }

    /// Runs the output guardrails on a whole (non-streamed) answer body. An error means the
    /// answer's texts cannot be read.
    pub fn check_response(
        &self,
        endpoint: Endpoint,
        expect: &Expectation,
        body: &[u8],
    ) -> Result<Checked, BodyError> {
        if !self.checks_output() {
            return Ok(Checked::default());
        }
        let leaves = body::answer_leaves(endpoint, body)?;
        Ok(self.run(Which::All, Stage::Output, body, &leaves, expect))
    }

    /// A scanner for a streamed answer; `None` when no guardrail checks answers.
    pub fn stream(&self, expect: Expectation) -> Option<StreamGuard> {
        StreamGuard::new(self.clone(), expect)
    }

    fn run(
        &self,
        which: Which,
        stage: Stage,
        body: &[u8],
        leaves: &[Leaf],
        expect: &Expectation,
    ) -> Checked {
        let mut checked = Checked::default();
        let mut redactions: Vec<(usize, Redaction)> = Vec::new();
        for rail in self.rails.iter() {
            let runs = match stage {
                Stage::Input => rail.input,
                Stage::Output => rail.output,
            };
            if !runs || !which.includes(rail) {
                continue;
            }
            let started = Instant::now();
            let (triggered, matches, reason) = match &rail.check {
                Check::Text {
                    detector,
                    threshold,
                } => {
                    let (hits, at) = scan_leaves(detector.as_ref(), leaves);
                    let triggered = !hits.is_empty() && detector.score(&hits) >= *threshold;
                    if triggered && rail.action == Action::Redact {
                        redactions.extend(
                            hits.iter()
                                .zip(at)
                                .map(|(hit, leaf)| (leaf, redaction(detector.kinds(), hit))),
                        );
                    }
                    (triggered, count_kinds(detector.kinds(), &hits), None)
                }
                Check::MaxInputTokens(max) => {
                    match input_tokens::over_budget(leaves.iter().map(|l| l.text.as_ref()), *max) {
                        Some(tokens) => (
                            true,
                            vec![MatchCount {
                                kind: "tokens".into(),
                                count: tokens,
                            }],
                            Some(format!("{tokens} tokens, over the budget of {max}")),
                        ),
                        None => (false, Vec::new(), None),
                    }
                }
                Check::JsonOutput => {
                    let failures = json_failures(expect, leaves);
                    let reason = failures.first().map(|(_, reason)| reason.clone());
                    (!failures.is_empty(), count_failures(&failures), reason)
                }
            };
            let verdict = Verdict {
                name: rail.name.clone(),
                kind: rail.kind,
                stage,
                verdict: Outcome::of(triggered, rail.action),
                matches,
                elapsed_us: micros(started.elapsed()),
            };
            if verdict.verdict == Outcome::Blocked && checked.blocked.is_none() {
                checked.blocked = Some(Blocked::new(&verdict, reason));
            }
            checked.verdicts.push(verdict);
        }
        if !redactions.is_empty() && checked.blocked.is_none() {
            checked.rewritten = Some(rewrite(body, leaves, redactions));
        }
        checked
    }
}

/// Every leaf scanned; the hits, and for each the leaf it is in.
fn scan_leaves(detector: &dyn detector::Detector, leaves: &[Leaf]) -> (Vec<Hit>, Vec<usize>) {
    let mut hits = Vec::new();
    let mut at = Vec::new();
    for (index, leaf) in leaves.iter().enumerate() {
        let before = hits.len();
        detector.scan(&leaf.text, &mut hits);
        at.resize(hits.len(), index);
        debug_assert!(hits.len() >= before);
    }
    (hits, at)
}

fn redaction(kinds: &[MatchKind], hit: &Hit) -> Redaction {
    Redaction {
        start: hit.start,
        end: hit.end,
        placeholder: kinds
            .get(usize::from(hit.kind))
            .map(|k| k.placeholder.clone())
            .unwrap_or_default(),
    }
}

/// The body with each redacted leaf's text replaced.
fn rewrite(body: &[u8], leaves: &[Leaf], mut redactions: Vec<(usize, Redaction)>) -> Bytes {
    redactions.sort_by_key(|(leaf, _)| *leaf);
    let mut replacements = Vec::new();
    for chunk in redactions.chunk_by(|a, b| a.0 == b.0) {
        let Some(leaf) = leaves.get(chunk[0].0) else {
            continue;
        };
        let mut spans: Vec<Redaction> = chunk.iter().map(|(_, r)| r.clone()).collect();
        replacements.push((leaf.span.clone(), apply_redactions(&leaf.text, &mut spans)));
    }
    replacements.sort_by_key(|(span, _)| span.start);
    body::splice(body, &replacements)
}

/// Match counts per kind, in the detector's order of kinds, zero counts left out.
pub(crate) fn count_kinds(kinds: &[MatchKind], hits: &[Hit]) -> Vec<MatchCount> {
    if hits.is_empty() {
        // The usual case, and an allocation saved on every check of every call.
        return Vec::new();
    }
    let mut counts = vec![0u64; kinds.len()];
    for hit in hits {
        if let Some(count) = counts.get_mut(usize::from(hit.kind)) {
            *count += 1;
        }
    }
    kinds
        .iter()
        .zip(counts)
        .filter(|(_, count)| *count > 0)
        .map(|(kind, count)| MatchCount {
            kind: kind.name.clone(),
            count,
        })
        .collect()
}

pub(crate) fn count_failures(failures: &[(&'static str, String)]) -> Vec<MatchCount> {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for (kind, _) in failures {
        *counts.entry(kind).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(kind, count)| MatchCount {
            kind: kind.to_owned(),
            count,
        })
        .collect()
}

/// `json_output` on a whole answer: each choice's text (its leaves joined) checked.
fn json_failures(expect: &Expectation, leaves: &[Leaf]) -> Vec<(&'static str, String)> {
    if !expect.wants_json() {
        return Vec::new();
    }
    let mut answers: BTreeMap<usize, String> = BTreeMap::new();
    for leaf in leaves {
        answers.entry(leaf.group).or_default().push_str(&leaf.text);
    }
    answers
        .values()
        .filter_map(|answer| expect.check(answer))
        .collect()
}

#[cfg(test)]
mod tests;
