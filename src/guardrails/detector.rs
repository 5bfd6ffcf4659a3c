//! What the text checks share: the `Detector` trait, a match (`Hit`, positions only, never the
//! text), a multi-pattern regex pass with per-pattern validation, and applying redactions.

use std::ops::Range;

use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input, Match, PatternID};

use super::starts::Starts;

/// ASCII word boundary. Unicode `\b` makes the lazy DFA give up on non-ASCII text (falling back
/// to a much slower engine), and every pattern here is ASCII anyway.
pub(crate) const B: &str = r"(?-u:\b)";

/// One kind of match a detector reports: its name in verdicts and its redaction placeholder.
#[derive(Debug, Clone)]
pub(crate) struct MatchKind {
    pub name: String,
    pub placeholder: String,
    /// What one match adds to the score (1 for everything but injection phrases).
    pub weight: f64,
    /// How a match that outgrew a stream's window continues.
    pub tail: Tail,
}

/// What the rest of a match looks like, for dropping it from a stream as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Token characters up to the next space or punctuation.
    Token,
    /// Up to the END line of a PEM block.
    PemBlock,
}

impl MatchKind {
    pub fn new(name: &str, placeholder: &str) -> MatchKind {
        MatchKind {
            name: name.to_owned(),
            placeholder: placeholder.to_owned(),
            weight: 1.0,
            tail: Tail::Token,
        }
    }
}

/// A match: where it is and which of the detector's kinds, never what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub start: usize,
    pub end: usize,
    /// Index into the detector's `kinds()`.
    pub kind: u16,
    /// Which rule matched (for scoring a rule once however often it matches).
    pub rule: u16,
}

pub(crate) trait Detector: Send + Sync {
    fn kinds(&self) -> &[MatchKind];
    /// Appends the matches in `text`, in order, not overlapping.
    fn scan(&self, text: &str, out: &mut Vec<Hit>);
    /// The score of a text's hits; by default the summed weight of every hit.
    fn score(&self, hits: &[Hit]) -> f64 {
        let kinds = self.kinds();
        hits.iter()
            .map(|hit| kinds.get(usize::from(hit.kind)).map_or(1.0, |k| k.weight))
            .sum()
    }
}

/// Decides whether a candidate really is a match, and may widen it (a PEM block runs to its END
/// line). Gets the whole text for context (what precedes a dotted quad, say).
pub(crate) type Validate = fn(text: &str, span: Range<usize>) -> Option<Range<usize>>;

/// One rule of a `PatternSet`.
pub(crate) struct Rule {
    pub pattern: String,
    pub kind: u16,
    pub validate: Option<Validate>,
}

/// Many patterns searched in one pass (regex-automata's meta regex reports which pattern
/// matched). Leftmost-first: on a candidate that fails validation, the other patterns are tried
/// at the same start before moving on by one character, so a Luhn-invalid card cannot hide a
/// valid phone number that starts at the same place.
pub(crate) struct PatternSet {
    regex: Regex,
    rules: Vec<Rule>,
    /// Where matches can start, when known: long texts are then searched anchored there.
    starts: Option<Starts>,
}

/// From this length on, a text is searched anchored at its candidate starts when the set knows
/// them. Shorter texts take the unanchored search, cheaper per byte once its states are built
/// (8k against ~30k instructions on the 1 KB bench text), and a short text builds few.
pub(crate) const LONG_TEXT: usize = 4 << 10;

impl PatternSet {
    pub fn new(rules: Vec<Rule>) -> Result<PatternSet, String> {
        let patterns: Vec<&str> = rules.iter().map(|r| r.pattern.as_str()).collect();
        let regex = Regex::builder()
            .configure(
                Regex::config()
                    // Generous: the default set is a few hundred KB of NFA; the check must not
                    // fail to build because a user added a few patterns.
                    .nfa_size_limit(Some(64 << 20))
                    .hybrid_cache_capacity(8 << 20),
            )
            .build_many(&patterns)
            .map_err(|err| describe_build_error(&patterns, &err))?;
        Ok(PatternSet {
            regex,
            rules,
            starts: None,
        })
    }

    /// Searches long texts anchored at `starts` (which must hold every start of every rule).
    pub fn with_starts(self, starts: Option<Starts>) -> PatternSet {
        PatternSet { starts, ..self }
    }

    /// Whether `text` is searched anchored at candidate starts.
    pub fn anchors(&self, text: &str) -> bool {
        self.starts.is_some() && text.len() >= LONG_TEXT && Starts::cover(text)
    }

    pub fn scan(&self, text: &str, out: &mut Vec<Hit>) {
        self.scan_by(text, out, &mut |input| self.regex.search(input));
    }

    /// `scan` with the lazy DFA's cache in the caller's hands, to see what a scan makes it hold.
    #[cfg(test)]
    pub fn scan_memory(&self, text: &str) -> usize {
        let mut cache = self.regex.create_cache();
        let mut hits = Vec::new();
        self.scan_by(text, &mut hits, &mut |input| {
            self.regex.search_with(&mut cache, input)
        });
        cache.memory_usage()
    }

    fn scan_by(
        &self,
        text: &str,
        out: &mut Vec<Hit>,
        search: &mut dyn FnMut(&Input) -> Option<Match>,
    ) {
        let mut candidates = match &self.starts {
            Some(starts) if self.anchors(text) => Some((starts.candidates(text), 0)),
            _ => None,
        };
        let mut at = 0;
        while at <= text.len() {
            let found = match &mut candidates {
                Some((starts, next)) => Self::find_anchored(text, at, starts, next, search),
                None => search(&Input::new(text).range(at..)),
            };
            let Some(found) = found else {
                return;
            };
            match self
                .accept(text, found.pattern(), found.range())
                .or_else(|| self.alternatives(text, found.start(), found.pattern()))
            {
                Some(hit) => {
                    out.push(hit);
                    // An empty match must still move on.
                    at = if hit.end > hit.start {
                        hit.end
                    } else {
                        next_boundary(text, hit.start + 1)
                    };
                }
                None => at = next_boundary(text, found.start() + 1),
            }
        }
    }

    /// The leftmost match at or after `at`: the first candidate start from `next` on where an
    /// anchored search matches (the same match an unanchored search finds).
    fn find_anchored(
        text: &str,
        at: usize,
        starts: &[usize],
        next: &mut usize,
        search: &mut dyn FnMut(&Input) -> Option<Match>,
    ) -> Option<Match> {
        while let Some(&start) = starts.get(*next) {
            *next += 1;
            if start < at {
                continue;
            }
            let input = Input::new(text).range(start..).anchored(Anchored::Yes);
            if let Some(found) = search(&input) {
                return Some(found);
            }
        }
        None
    }

    fn accept(&self, text: &str, pattern: PatternID, span: Range<usize>) -> Option<Hit> {
        let rule = self.rules.get(pattern.as_usize())?;
        let span = match rule.validate {
            Some(validate) => validate(text, span)?,
            None => span,
        };
        Some(Hit {
            start: span.start,
            end: span.end,
            kind: rule.kind,
            rule: pattern.as_usize() as u16,
        })
    }

    /// The other patterns, anchored where a rejected candidate started.
    fn alternatives(&self, text: &str, start: usize, rejected: PatternID) -> Option<Hit> {
        (0..self.rules.len())
            .filter_map(|index| PatternID::new(index).ok())
            .filter(|pattern| *pattern != rejected)
            .find_map(|pattern| {
                let input = Input::new(text)
                    .range(start..)
                    .anchored(Anchored::Pattern(pattern));
                let found = self.regex.search(&input)?;
                self.accept(text, pattern, found.range())
            })
    }
}

fn describe_build_error(patterns: &[&str], err: &regex_automata::meta::BuildError) -> String {
    match err.pattern() {
        Some(id) => format!(
            "pattern {:?} does not compile: {}",
            patterns.get(id.as_usize()).copied().unwrap_or_default(),
            err.syntax_error()
                .map_or_else(|| err.to_string(), ToString::to_string)
        ),
        None => format!("the patterns do not compile together: {err}"),
    }
}

/// The first char boundary at or after `at` (`at` itself when past the end).
pub(crate) fn next_boundary(text: &str, mut at: usize) -> usize {
    while at < text.len() && !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// `text` as a pattern that matches it literally.
pub(crate) fn escape_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The char before `at`, if any.
pub(crate) fn char_before(text: &str, at: usize) -> Option<char> {
    text.get(..at)?.chars().next_back()
}

/// The char at `at`, if any.
pub(crate) fn char_at(text: &str, at: usize) -> Option<char> {
    text.get(at..)?.chars().next()
}

/// A span to replace, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redaction {
    pub start: usize,
    pub end: usize,
    pub placeholder: String,
}

/// Replaces each span with its placeholder. Spans may come from several guardrails, so they are
/// sorted and overlaps merged (the earlier, then the longer, wins the placeholder).
pub(crate) fn apply_redactions(text: &str, redactions: &mut [Redaction]) -> String {
    redactions.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for redaction in redactions.iter() {
        if redaction.end <= copied {
            continue;
        }
        let start = redaction.start.max(copied);
        if let Some(before) = text.get(copied..start) {
            out.push_str(before);
        }
        if start == redaction.start {
            out.push_str(&redaction.placeholder);
        }
        copied = redaction.end.min(text.len());
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    out
}

/// Test helper: each match as (kind name, matched text).
#[cfg(test)]
pub(crate) fn found<'t>(detector: &dyn Detector, text: &'t str) -> Vec<(String, &'t str)> {
    let mut hits = vec![];
    detector.scan(text, &mut hits);
    hits.iter()
        .map(|h| {
            let kind = &detector.kinds()[usize::from(h.kind)];
            (kind.name.clone(), &text[h.start..h.end])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn red(start: usize, end: usize, placeholder: &str) -> Redaction {
        Redaction {
            start,
            end,
            placeholder: placeholder.into(),
        }
    }

    #[test]
    fn redactions_merge_overlaps_and_keep_the_rest() {
        let text = "mail a@b.co and key sk-123 now";
        let mut spans = vec![red(20, 26, "[SECRET]"), red(5, 11, "[EMAIL]")];
        assert_eq!(
            apply_redactions(text, &mut spans),
            "mail [EMAIL] and key [SECRET] now"
        );
        // Overlapping spans from two guardrails: one placeholder, nothing of either left.
        let mut spans = vec![red(5, 11, "[EMAIL]"), red(7, 15, "[TERM]")];
        assert_eq!(
            apply_redactions(text, &mut spans),
            "mail [EMAIL] key sk-123 now"
        );
        let mut none = vec![];
        assert_eq!(apply_redactions(text, &mut none), text);
    }

    #[test]
    fn failed_candidates_let_other_patterns_match_at_the_same_start() {
        fn never(_: &str, _: Range<usize>) -> Option<Range<usize>> {
            None
        }
        let set = PatternSet::new(vec![
            Rule {
                pattern: r"[0-9]{3}-[0-9]{3}".into(),
                kind: 0,
                validate: Some(never),
            },
            Rule {
                pattern: r"[0-9]{3}".into(),
                kind: 1,
                validate: None,
            },
        ])
        .unwrap();
        let mut hits = vec![];
        set.scan("x 123-456 é", &mut hits);
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert_eq!((hits[0].start, hits[0].end, hits[0].kind), (2, 5, 1));
        assert_eq!((hits[1].start, hits[1].end), (6, 9));
    }

    #[test]
    fn bad_pattern_is_named() {
        let err = PatternSet::new(vec![Rule {
            pattern: "a(".into(),
            kind: 0,
            validate: None,
        }])
        .err()
        .unwrap();
        assert!(err.contains("\"a(\""), "{err}");
    }
}
