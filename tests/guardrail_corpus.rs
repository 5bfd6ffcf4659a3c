//! Precision and recall of the detection checks on a labelled corpus (tests/guardrail_corpus/):
//! positives of every kind, and look-alikes that must not match (Luhn-invalid numbers, dates,
//! versions, ISBNs, UUIDs, hashes, code, public keys, placeholders, benign uses of attack words).
//!
//! Each line goes through the public API as a user message of a chat request. A positive line
//! counts as found when its kind is among the verdict's matches; a match on a negative line, or
//! of another kind on a positive line, is a false positive. Fails under 0.95 precision or recall
//! for any check (see `INJECTION_RECALL_FLOOR` on what prompt_injection's recall means). `cargo test --test guardrail_corpus -- --nocapture` prints the table and the
//! misses.

use std::collections::BTreeMap;

use flowgate::config::{Config, Source};
use flowgate::guardrails::{Guardrails, Outcome};
use flowgate::providers::Endpoint;

const FLOOR: f64 = 0.95;

/// prompt_injection is held to the same floor, but read its recall with this in mind: its rules
/// are phrasings, and two held-out batches written after the rules (the last 80 lines of
/// prompt_injection.txt) were found at 10/25 and 6/15 before each was folded into the rules. On
/// phrasings nobody has seen, expect about half; precision held on both batches.
const INJECTION_RECALL_FLOOR: f64 = FLOOR;

struct Line {
    number: usize,
    label: String,
    text: String,
}

fn corpus(check: &str) -> Vec<Line> {
    let path = format!(
        "{}/tests/guardrail_corpus/{check}.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with('#') && !line.trim().is_empty())
        .map(|(index, line)| {
            let (label, text) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("{path}:{}: no tab", index + 1));
            Line {
                number: index + 1,
                label: label.to_owned(),
                text: text.replace("\\n", "\n"),
            }
        })
        .collect()
}

#[derive(Default)]
struct Score {
    true_positives: u32,
    false_positives: u32,
    false_negatives: u32,
    /// Per expected kind: (found, total).
    kinds: BTreeMap<String, (u32, u32)>,
    misses: Vec<String>,
}

impl Score {
    fn precision(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        )
    }

    fn recall(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        )
    }
}

fn ratio(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        1.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

/// The kinds the check reported for a text (none when it passed).
fn detect(rails: &Guardrails, text: &str) -> Vec<String> {
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap();
    let checked = rails
        .check_request(Endpoint::ChatCompletions, &body)
        .unwrap();
    let verdict = &checked.verdicts[0];
    if verdict.verdict == Outcome::Pass {
        return Vec::new();
    }
    verdict.matches.iter().map(|m| m.kind.clone()).collect()
}

fn evaluate(check: &str) -> Score {
    let config = Config::from_toml(
        &format!("[[guardrails]]\nname = \"{check}\""),
        Source::BuiltIn,
    )
    .unwrap();
    let rails = Guardrails::from_config(&config.guardrails).unwrap();
    let mut score = Score::default();
    for line in corpus(check) {
        let found = detect(&rails, &line.text);
        let short: String = line
            .text
            .chars()
            .take(90)
            .collect::<String>()
            .replace('\n', "⏎");
        if line.label == "-" {
            if !found.is_empty() {
                score.false_positives += 1;
                score
                    .misses
                    .push(format!("  FP line {}: {found:?} in {short:?}", line.number));
            }
            continue;
        }
        // For prompt_injection any flag is the kind asked for (the label names the check).
        let hit = found.contains(&line.label) || (line.label == "injection" && !found.is_empty());
        let entry = score.kinds.entry(line.label.clone()).or_default();
        entry.1 += 1;
        if hit {
            entry.0 += 1;
            score.true_positives += 1;
        } else {
            score.false_negatives += 1;
            score.misses.push(format!(
                "  FN line {} ({}): {short:?}",
                line.number, line.label
            ));
        }
        if line.label != "injection" {
            let others: Vec<&String> = found.iter().filter(|kind| **kind != line.label).collect();
            if !others.is_empty() {
                score.false_positives += 1;
                score.misses.push(format!(
                    "  FP line {}: {others:?} in {short:?}",
                    line.number
                ));
            }
        }
    }
    score
}

#[test]
fn precision_and_recall_per_check() {
    let mut failed = Vec::new();
    println!(
        "{:<18} {:>5} {:>5} {:>5} {:>10} {:>8}",
        "check", "TP", "FP", "FN", "precision", "recall"
    );
    for check in ["pii", "secrets", "prompt_injection"] {
        let score = evaluate(check);
        println!(
            "{check:<18} {:>5} {:>5} {:>5} {:>10.3} {:>8.3}",
            score.true_positives,
            score.false_positives,
            score.false_negatives,
            score.precision(),
            score.recall()
        );
        for (kind, (found, total)) in &score.kinds {
            println!("  {kind:<16} recall {found}/{total}");
        }
        for miss in &score.misses {
            println!("{miss}");
        }
        let recall_floor = if check == "prompt_injection" {
            INJECTION_RECALL_FLOOR
        } else {
            FLOOR
        };
        if score.precision() < FLOOR || score.recall() < recall_floor {
            failed.push(format!(
                "{check}: precision {:.3}, recall {:.3}",
                score.precision(),
                score.recall()
            ));
        }
        // Enough lines that the figures mean something.
        assert!(
            score.true_positives + score.false_negatives >= 50,
            "{check}: too few positives"
        );
    }
    assert!(failed.is_empty(), "under {FLOOR}: {failed:?}");
}
