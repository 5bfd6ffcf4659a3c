//! What a guardrail concluded, as the trace stores it: never the matched text, only its kind and
//! how often; and the refusal a `block` turns into.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::{Action, CheckKind, Stage};
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Nothing found (or below the threshold).
    Pass,
    /// Found, logged (`action = "log"`).
    Flagged,
    /// Found and replaced by placeholders.
    Redacted,
    /// Found, and the call refused.
    Blocked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Flagged => "flagged",
            Outcome::Redacted => "redacted",
            Outcome::Blocked => "blocked",
        }
    }

    pub(crate) fn of(triggered: bool, action: Action) -> Outcome {
        match (triggered, action) {
            (false, _) => Outcome::Pass,
            (true, Action::Log) => Outcome::Flagged,
            (true, Action::Redact) => Outcome::Redacted,
            (true, Action::Block) => Outcome::Blocked,
        }
    }
}

/// How many matches of one kind (`email`, `openai`, `term`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchCount {
    pub kind: String,
    pub count: u64,
}

/// One guardrail's verdict on one stage of one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The guardrail's configured name.
    pub name: String,
    pub kind: CheckKind,
    pub stage: Stage,
    pub verdict: Outcome,
    /// Match kinds and counts, in the check's order of kinds; empty on a clean pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchCount>,
    /// Time the check took, µs (for a stream: summed over its chunks).
    pub elapsed_us: u64,
}

impl Verdict {
    /// The trace's record of this verdict (the stored shape: matches as a `kind -> count` map).
    pub fn to_trace(&self) -> crate::trace::GuardrailVerdict {
        self.clone().into_trace()
    }

    /// `to_trace` for a verdict that is not needed after: its name and match kinds move over.
    pub fn into_trace(self) -> crate::trace::GuardrailVerdict {
        crate::trace::GuardrailVerdict {
            guardrail: self.name,
            kind: self.kind.as_str().into(),
            stage: self.stage.as_str().into(),
            verdict: self.verdict.as_str().into(),
            matches: self
                .matches
                .into_iter()
                .map(|m| (m.kind, m.count))
                .collect(),
            elapsed_us: self.elapsed_us,
        }
    }
}

pub(crate) fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

/// A refusal: which guardrail, where, and why in words that quote nothing of the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub guardrail: String,
    pub stage: Stage,
    /// `email ×2, phone ×1`, or what failed (`the answer is not valid JSON`).
    pub reason: String,
}

impl Blocked {
    pub(crate) fn new(verdict: &Verdict, reason: Option<String>) -> Blocked {
        let reason = reason.unwrap_or_else(|| {
            verdict
                .matches
                .iter()
                .map(|m| format!("{} ×{}", m.kind, m.count))
                .collect::<Vec<_>>()
                .join(", ")
        });
        Blocked {
            guardrail: verdict.name.clone(),
            stage: verdict.stage,
            reason,
        }
    }

    pub fn message(&self) -> String {
        let what = match self.stage {
            Stage::Input => "request",
            Stage::Output => "answer",
        };
        format!(
            "The {what} was blocked by guardrail {:?} ({}).",
            self.guardrail, self.reason
        )
    }

    /// OpenAI's error shape: HTTP 400, `code: "guardrail_blocked"`, the guardrail named in the
    /// message.
    pub fn to_api_error(&self) -> ApiError {
        ApiError::invalid_request("guardrail_blocked", self.message())
    }
}
