//! The `[[guardrails]]` config entries, and their validation into compiled checks.
//!
//! Everything a request could trip over is decided here, once, at load: an unknown kind, an
//! option that does not apply to the kind, a pattern that does not compile, an action the check
//! cannot take. The request path only runs what this module built.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::detector::Detector;
use super::{banned_terms, injection, pii, secrets, user_regex};

/// One `[[guardrails]]` entry, as written in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailConfig {
    /// Names the guardrail in traces, metrics and error messages.
    pub name: String,
    /// Which check; defaults to the name (`name = "pii"` is the pii check).
    #[serde(default)]
    pub kind: Option<CheckKind>,
    /// Defaults to `output` for `json_output`, `input` for the rest.
    #[serde(default)]
    pub stage: Option<StageConfig>,
    #[serde(default)]
    pub action: Action,
    /// `regex`: the patterns; `prompt_injection`: extra patterns (each scores 1).
    #[serde(default)]
    pub patterns: Vec<String>,
    /// `banned_terms`: words and phrases.
    #[serde(default)]
    pub terms: Vec<String>,
    /// `banned_terms`: a file of terms, one a line; `#` starts a comment line.
    #[serde(default)]
    pub terms_file: Option<PathBuf>,
    /// `prompt_injection`: the score at which a text is an injection (default 1.0).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// `prompt_injection`: extra phrases, matched case-insensitively (each scores 1).
    #[serde(default)]
    pub phrases: Vec<String>,
    /// `max_input_tokens`: the budget.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// `pii` / `secrets`: only these match kinds (default: all of the check's kinds).
    #[serde(default)]
    pub kinds: Vec<String>,
}

impl GuardrailConfig {
    /// `pii: pii on input, redact` — for `check-config`.
    pub fn describe(&self) -> String {
        let kind = self
            .kind
            .map(CheckKind::as_str)
            .unwrap_or(self.name.as_str());
        let stage = match self.stage {
            Some(StageConfig::Input) => "input",
            Some(StageConfig::Output) => "output",
            Some(StageConfig::Both) => "input and output",
            None if kind == "json_output" => "output",
            None => "input",
        };
        let action = match self.action {
            Action::Log => "log",
            Action::Redact => "redact",
            Action::Block => "block",
        };
        format!("{}: {kind} on {stage}, {action}", self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Pii,
    Secrets,
    PromptInjection,
    BannedTerms,
    MaxInputTokens,
    JsonOutput,
    Regex,
}

impl CheckKind {
    const ALL: [CheckKind; 7] = [
        CheckKind::Pii,
        CheckKind::Secrets,
        CheckKind::PromptInjection,
        CheckKind::BannedTerms,
        CheckKind::MaxInputTokens,
        CheckKind::JsonOutput,
        CheckKind::Regex,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Pii => "pii",
            CheckKind::Secrets => "secrets",
            CheckKind::PromptInjection => "prompt_injection",
            CheckKind::BannedTerms => "banned_terms",
            CheckKind::MaxInputTokens => "max_input_tokens",
            CheckKind::JsonOutput => "json_output",
            CheckKind::Regex => "regex",
        }
    }

    fn from_name(name: &str) -> Option<CheckKind> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    fn names() -> String {
        Self::ALL.map(CheckKind::as_str).join(", ")
    }
}

/// Where a guardrail runs, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageConfig {
    Input,
    Output,
    Both,
}

/// Where a check ran: on the request (input) or the answer (output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Input,
    Output,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Input => "input",
            Stage::Output => "output",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Record the verdict, change nothing.
    #[default]
    Log,
    /// Replace each match with a typed placeholder.
    Redact,
    /// Refuse: HTTP 400 `guardrail_blocked`.
    Block,
}

/// Config errors, each naming the guardrail (by position and name) and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum GuardrailError {
    #[error("guardrails[{index}] ({name:?}): {message}")]
    Invalid {
        index: usize,
        name: String,
        message: String,
    },
}

/// What a compiled guardrail does with a text.
pub(crate) enum Check {
    /// Scans text for matches: pii, secrets, banned terms, user regexes, injection phrases.
    /// Triggers when the summed weights of its matches reach `threshold`.
    Text {
        detector: Box<dyn Detector>,
        threshold: f64,
    },
    /// Counts the request's tokens.
    MaxInputTokens(u64),
    /// Parses the answer as JSON (and validates it) when the request asked for JSON.
    JsonOutput,
}

/// A guardrail ready to run.
pub(crate) struct Guardrail {
    pub name: String,
    pub kind: CheckKind,
    pub input: bool,
    pub output: bool,
    pub action: Action,
    pub check: Check,
}

impl std::fmt::Debug for Guardrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guardrail")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("input", &self.input)
            .field("output", &self.output)
            .field("action", &self.action)
            .finish_non_exhaustive()
    }
}

/// Validates and compiles every entry.
pub(crate) fn compile(configs: &[GuardrailConfig]) -> Result<Vec<Guardrail>, GuardrailError> {
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(configs.len());
    for (index, config) in configs.iter().enumerate() {
        let fail = |message: String| GuardrailError::Invalid {
            index,
            name: config.name.clone(),
            message,
        };
        if !names.insert(config.name.as_str()) {
            return Err(fail("the name is used twice".into()));
        }
        out.push(compile_one(config).map_err(fail)?);
    }
    Ok(out)
}

fn compile_one(config: &GuardrailConfig) -> Result<Guardrail, String> {
    let name = config.name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
        return Err("name must be 1 to 64 characters, none of them control characters".into());
    }
    let kind = match config.kind {
        Some(kind) => kind,
        None => CheckKind::from_name(name).ok_or_else(|| {
            format!(
                "no check is called {name:?}: set kind to one of {}",
                CheckKind::names()
            )
        })?,
    };
    check_options(config, kind)?;
    let default_stage = match kind {
        CheckKind::JsonOutput => StageConfig::Output,
        _ => StageConfig::Input,
    };
    let stage = config.stage.unwrap_or(default_stage);
    check_stage_and_action(kind, stage, config.action)?;
    let check = build_check(config, kind)?;
    Ok(Guardrail {
        name: name.to_owned(),
        kind,
        input: stage != StageConfig::Output,
        output: stage != StageConfig::Input,
        action: config.action,
        check,
    })
}

/// Rejects options that belong to another kind: a `patterns` on `pii` would silently do nothing.
fn check_options(config: &GuardrailConfig, kind: CheckKind) -> Result<(), String> {
    let given = [
        ("patterns", !config.patterns.is_empty()),
        ("terms", !config.terms.is_empty()),
        ("terms_file", config.terms_file.is_some()),
        ("threshold", config.threshold.is_some()),
        ("phrases", !config.phrases.is_empty()),
        ("max_tokens", config.max_tokens.is_some()),
        ("kinds", !config.kinds.is_empty()),
    ];
    let allowed: &[&str] = match kind {
        CheckKind::Pii | CheckKind::Secrets => &["kinds"],
        CheckKind::PromptInjection => &["threshold", "phrases", "patterns"],
        CheckKind::BannedTerms => &["terms", "terms_file"],
        CheckKind::MaxInputTokens => &["max_tokens"],
        CheckKind::JsonOutput => &[],
        CheckKind::Regex => &["patterns"],
    };
    for (option, present) in given {
        if present && !allowed.contains(&option) {
            return Err(format!(
                "{option} does not apply to kind {}{}",
                kind.as_str(),
                match allowed {
                    [] => " (it takes no options)".to_owned(),
                    some => format!(" (it takes: {})", some.join(", ")),
                }
            ));
        }
    }
    Ok(())
}

fn check_stage_and_action(
    kind: CheckKind,
    stage: StageConfig,
    action: Action,
) -> Result<(), String> {
    match (kind, stage, action) {
        (CheckKind::MaxInputTokens, StageConfig::Output | StageConfig::Both, _) => {
            Err("max_input_tokens checks requests: stage must be \"input\"".into())
        }
        (CheckKind::JsonOutput, StageConfig::Input | StageConfig::Both, _) => {
            Err("json_output checks answers: stage must be \"output\"".into())
        }
        (CheckKind::MaxInputTokens | CheckKind::JsonOutput, _, Action::Redact) => Err(format!(
            "{} has nothing to redact: action must be \"log\" or \"block\"",
            kind.as_str()
        )),
        (CheckKind::PromptInjection, _, Action::Redact) => Err(
            "redacting injection phrases leaves the rest of the attack in place: action must be \"log\" or \"block\""
                .into(),
        ),
        _ => Ok(()),
    }
}

fn build_check(config: &GuardrailConfig, kind: CheckKind) -> Result<Check, String> {
    let text = |detector: Box<dyn Detector>| Check::Text {
        detector,
        threshold: 1.0,
    };
    Ok(match kind {
        CheckKind::Pii => text(Box::new(pii::Pii::new(&config.kinds)?)),
        CheckKind::Secrets => text(Box::new(secrets::Secrets::new(&config.kinds)?)),
        CheckKind::BannedTerms => {
            let terms = banned_terms::load_terms(&config.terms, config.terms_file.as_deref())?;
            text(Box::new(banned_terms::BannedTerms::new(&terms)?))
        }
        CheckKind::Regex => text(Box::new(user_regex::UserRegex::new(
            &config.name,
            &config.patterns,
        )?)),
        CheckKind::PromptInjection => {
            let threshold = config.threshold.unwrap_or(1.0);
            if !threshold.is_finite() || threshold <= 0.0 {
                return Err(format!(
                    "threshold = {threshold}: must be a number greater than 0"
                ));
            }
            Check::Text {
                detector: Box::new(injection::Injection::new(
                    &config.phrases,
                    &config.patterns,
                )?),
                threshold,
            }
        }
        CheckKind::MaxInputTokens => match config.max_tokens {
            Some(0) | None => return Err("max_tokens must be set, and greater than 0".into()),
            Some(max) => Check::MaxInputTokens(max),
        },
        CheckKind::JsonOutput => Check::JsonOutput,
    })
}

/// Checks a `kinds` list against the kinds a check knows, for the error message.
pub(crate) fn select_kinds<'a>(
    wanted: &[String],
    known: &[&'a str],
) -> Result<Vec<&'a str>, String> {
    if wanted.is_empty() {
        return Ok(known.to_vec());
    }
    wanted
        .iter()
        .map(|kind| {
            known
                .iter()
                .find(|k| **k == kind.as_str())
                .copied()
                .ok_or_else(|| {
                    format!("kinds: unknown kind {kind:?} (known: {})", known.join(", "))
                })
        })
        .collect()
}
