//! Where the matches of a set of phrase rules can start, for searching long texts anchored.
//!
//! One unanchored lazy DFA over many phrase rules is fast once built, but every one of its
//! states carries the start of every rule, and varied long text keeps making new states: the
//! first scan of 30 KB of varied text spent ~450M instructions building them, and the cache
//! outgrows its budget. Anchored searches from where a rule's first word occurs build few small
//! states. Every rule must then begin with a known literal (or at a line start): these are read
//! off the pattern text, conservatively — a pattern this reader does not understand has none,
//! and the set is searched unanchored as before.

use aho_corasick::{AhoCorasick, MatchKind as AcMatchKind};

/// The candidate starts of a set's matches: where one of the rules' first literals occurs
/// (ASCII case-insensitively), and line starts when a rule begins with `(?m:^)`.
pub(crate) struct Starts {
    literals: AhoCorasick,
    line_starts: bool,
}

/// How a rule's matches begin.
#[derive(Debug, PartialEq, Eq)]
enum Prefix {
    Literal(String),
    LineStart,
}

impl Starts {
    /// From the rules' patterns as compiled inside `(?i:…)`, without that wrapper. `None` when
    /// some rule has no known start (the set is then searched unanchored).
    pub fn new(patterns: &[&str]) -> Option<Starts> {
        let mut literals = Vec::new();
        let mut line_starts = false;
        for pattern in patterns {
            for prefix in prefixes(pattern)? {
                match prefix {
                    Prefix::Literal(literal) => literals.push(literal),
                    Prefix::LineStart => line_starts = true,
                }
            }
        }
        literals.sort();
        literals.dedup();
        let literals = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .match_kind(AcMatchKind::Standard)
            .build(&literals)
            .ok()?;
        Some(Starts {
            literals,
            line_starts,
        })
    }

    /// The candidate starts in `text`, ascending, each once.
    pub fn candidates(&self, text: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .literals
            .find_overlapping_iter(text)
            .map(|found| found.start())
            .collect();
        if self.line_starts {
            out.push(0);
            out.extend(text.match_indices('\n').map(|(at, _)| at + 1));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether the literals find every start in `text`: ASCII case-insensitivity misses the two
    /// non-ASCII letters that Unicode case folding equates with ASCII ones (`ſ` ~ s, `K` ~ k).
    pub fn cover(text: &str) -> bool {
        !text.contains(['\u{17F}', '\u{212A}'])
    }
}

/// The literals a match of `pattern` may begin with; `None` when not known.
fn prefixes(pattern: &str) -> Option<Vec<Prefix>> {
    if let Some(rest) = pattern.strip_prefix("(?m:^)") {
        // Only a rule whose every match begins at a line start.
        return (!has_top_level_alternation(rest)).then(|| vec![Prefix::LineStart]);
    }
    let mut out = Vec::new();
    for alternative in split_top_level(pattern)? {
        out.extend(sequence_prefixes(alternative)?);
    }
    Some(out)
}

/// The top-level alternatives of a pattern (`None` on unbalanced parentheses).
fn split_top_level(pattern: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let mut from = 0;
    let mut balance = 0;
    for (at, c, depth) in operators(pattern) {
        match c {
            _ if depth < 0 => return None,
            '(' => balance += 1,
            ')' => balance -= 1,
            '|' if depth == 0 => {
                out.push(&pattern[from..at]);
                from = at + 1;
            }
            _ => {}
        }
    }
    out.push(&pattern[from..]);
    (balance == 0).then_some(out)
}

/// The characters of a pattern that are operators — not escaped, not in a class — with their
/// index and nesting depth (a parenthesis counts at the depth outside it).
fn operators(pattern: &str) -> Vec<(usize, char, isize)> {
    let mut out = Vec::new();
    let (mut depth, mut escaped, mut in_class) = (0isize, false, false);
    for (at, c) in pattern.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            _ if in_class => {}
            '(' => {
                out.push((at, c, depth));
                depth += 1;
            }
            ')' => {
                depth -= 1;
                out.push((at, c, depth));
            }
            _ => out.push((at, c, depth)),
        }
    }
    out
}

fn has_top_level_alternation(pattern: &str) -> bool {
    split_top_level(pattern).is_none_or(|parts| parts.len() > 1)
}

/// The prefixes of one alternative: the literal text it opens with, or, when it opens with a
/// non-optional `(?:…)` group, the prefixes of the group's alternatives.
fn sequence_prefixes(sequence: &str) -> Option<Vec<Prefix>> {
    if let Some(group) = sequence.strip_prefix("(?:") {
        let close = closing_paren(group)?;
        if matches!(group[close + 1..].chars().next(), Some('?' | '*' | '{')) {
            return None;
        }
        let mut out = Vec::new();
        for alternative in split_top_level(&group[..close])? {
            out.extend(sequence_prefixes(alternative)?);
        }
        return Some(out);
    }
    let literal = leading_literal(sequence);
    (!literal.is_empty() && literal.is_ascii()).then(|| vec![Prefix::Literal(literal)])
}

/// The index of the `)` closing a group whose body starts `text`.
fn closing_paren(text: &str) -> Option<usize> {
    operators(text)
        .into_iter()
        .find(|(_, c, depth)| *c == ')' && *depth < 0)
        .map(|(at, _, _)| at)
}

/// The characters `sequence` matches literally before its first operator; a character made
/// optional or repeated by a quantifier is left out.
fn leading_literal(sequence: &str) -> String {
    let mut out = String::new();
    let mut chars = sequence.chars().peekable();
    while let Some(c) = chars.next() {
        let literal = match c {
            '\\' => match chars.next() {
                Some(escaped) if escaped.is_ascii_punctuation() => escaped,
                _ => break,
            },
            '(' | ')' | '[' | ']' | '.' | '^' | '$' | '|' | '?' | '*' | '+' | '{' | '}' | ' ' => {
                break
            }
            c => c,
        };
        match chars.peek() {
            Some('?' | '*' | '{') => break,
            Some('+') => {
                out.push(literal);
                break;
            }
            _ => out.push(literal),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literals(pattern: &str) -> Option<Vec<String>> {
        prefixes(pattern).map(|prefixes| {
            prefixes
                .into_iter()
                .map(|prefix| match prefix {
                    Prefix::Literal(literal) => literal,
                    Prefix::LineStart => "^".into(),
                })
                .collect()
        })
    }

    #[test]
    fn prefixes_are_read_conservatively() {
        let cases: &[(&str, Option<&[&str]>)] = &[
            (r"ignor(?:e|ing)\s+all", Some(&["ignor"])),
            (r"(?:no\s+longer|not)\s+bound", Some(&["no", "not"])),
            (r"(?:your|the)\s+(?:new|real)", Some(&["your", "the"])),
            (r"(?:a(?:b|c)d|e)f", Some(&["a", "e"])),
            (
                r"<\|im_start\|>\s*system|\[/?INST\]",
                Some(&["<|im_start|>", "["]),
            ),
            (r"from\s+now\s+on,?\s+you", Some(&["from"])),
            (r"(?m:^)\s*(?:system|assistant)\s*:", Some(&["^"])),
            (r"colou?r", Some(&["colo"])),
            (r"###\s*(?:system|instructions?)", Some(&["###"])),
            // Unknown or optional starts: no literal, so no anchored search.
            (r"(?:a|b)?c", None),
            (r"[a-z]+ mode", None),
            (r"\w+ mode", None),
            (r"x|(?:y|)", None),
            (r"a*b", None),
            (r"(?m:^)a|b", None),
            ("é", None),
            ("(?i:x)", None),
        ];
        for (pattern, expected) in cases {
            let expected = expected.map(|e| e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            assert_eq!(literals(pattern), expected, "{pattern}");
        }
    }

    #[test]
    fn candidates_are_literal_and_line_starts_in_order() {
        let starts = Starts::new(&["(?:your|the)\\s+x", "you\\s+are", "(?m:^)\\s*system"]).unwrap();
        // "your" and "you" at 4, "the" at 10 (inside "other"), line starts at 0 and 15.
        assert_eq!(starts.candidates("See YOUR other\nz"), vec![0, 4, 10, 15]);
        assert!(Starts::cover("plain text"));
        assert!(!Starts::cover("ignore previou\u{17F}"));
    }
}
