//! `banned_terms`: words and phrases from the config or a file, found in one Aho-Corasick pass,
//! case-insensitively (ASCII folding, plus the lower- and upper-case forms of non-ASCII terms),
//! on word boundaries: `class` does not match inside `classic`.

use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind as AcMatchKind};

use super::detector::{char_at, char_before, Detector, Hit, MatchKind};

/// Terms from `terms` and `terms_file` (one a line; blank lines and `#` lines skipped), trimmed.
pub(crate) fn load_terms(terms: &[String], file: Option<&Path>) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = terms.iter().map(|t| t.trim().to_owned()).collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("terms_file {}: {err}", path.display()))?;
        out.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_owned),
        );
    }
    if let Some(at) = out.iter().position(String::is_empty) {
        return Err(format!("terms[{at}] is empty: it would match everything"));
    }
    if out.is_empty() {
        return Err("give the terms to look for in terms or terms_file".into());
    }
    Ok(out)
}

pub(crate) struct BannedTerms {
    automaton: AhoCorasick,
    kinds: Vec<MatchKind>,
}

impl BannedTerms {
    pub fn new(terms: &[String]) -> Result<BannedTerms, String> {
        let mut patterns: Vec<String> = Vec::with_capacity(terms.len());
        for term in terms {
            patterns.push(term.clone());
            if !term.is_ascii() {
                patterns.push(term.to_lowercase());
                patterns.push(term.to_uppercase());
            }
        }
        patterns.sort();
        patterns.dedup();
        let automaton = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .match_kind(AcMatchKind::Standard)
            .build(&patterns)
            .map_err(|err| format!("terms: {err}"))?;
        Ok(BannedTerms {
            automaton,
            kinds: vec![MatchKind::new("term", "[TERM]")],
        })
    }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// A term that starts (ends) with a word character must not continue a word there.
fn on_boundaries(text: &str, start: usize, end: usize) -> bool {
    let first = char_at(text, start);
    let last = char_before(text, end);
    let open = !first.is_some_and(is_word) || !char_before(text, start).is_some_and(is_word);
    let close = !last.is_some_and(is_word) || !char_at(text, end).is_some_and(is_word);
    open && close
}

impl Detector for BannedTerms {
    fn kinds(&self) -> &[MatchKind] {
        &self.kinds
    }

    /// Every occurrence of every term is considered (overlapping), those on word boundaries
    /// kept, and then the leftmost, longest ones chosen, so that a term failing its boundary
    /// cannot hide a shorter one at the same place.
    fn scan(&self, text: &str, out: &mut Vec<Hit>) {
        let mut found: Vec<(usize, usize)> = self
            .automaton
            .find_overlapping_iter(text)
            .map(|m| (m.start(), m.end()))
            .filter(|&(start, end)| {
                text.is_char_boundary(start)
                    && text.is_char_boundary(end)
                    && on_boundaries(text, start, end)
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut last_end = 0;
        for (start, end) in found {
            if start >= last_end {
                out.push(Hit {
                    start,
                    end,
                    kind: 0,
                    rule: 0,
                });
                last_end = end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(terms: &[&str], text: &str) -> Vec<String> {
        let terms: Vec<String> = terms.iter().map(|t| t.to_string()).collect();
        let detector = BannedTerms::new(&terms).unwrap();
        let mut hits = vec![];
        detector.scan(text, &mut hits);
        hits.iter()
            .map(|h| text[h.start..h.end].to_owned())
            .collect()
    }

    #[test]
    fn whole_words_any_case() {
        assert_eq!(
            spans(
                &["class", "project x"],
                "Classic CLASS, class-based; PROJECT   X and Project X."
            ),
            vec!["CLASS", "class", "Project X"]
        );
        assert_eq!(
            spans(&["Ärger"], "kein ärger, ÄRGER"),
            vec!["ärger", "ÄRGER"]
        );
        // A longer term failing its boundary does not hide a shorter one.
        assert_eq!(spans(&["foo", "foobar"], "foobarx foo"), vec!["foo"]);
        // Terms that start or end with punctuation need no boundary there.
        assert_eq!(spans(&["c++"], "I like c++."), vec!["c++"]);
    }

    #[test]
    fn terms_load_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("terms.txt");
        std::fs::write(&path, "# comment\n\n  alpha \nbeta gamma\n").unwrap();
        let terms = load_terms(&["delta".into()], Some(&path)).unwrap();
        assert_eq!(terms, vec!["delta", "alpha", "beta gamma"]);
        let missing = load_terms(&[], Some(Path::new("/nonexistent/terms.txt"))).unwrap_err();
        assert!(missing.contains("/nonexistent/terms.txt"), "{missing}");
        assert!(load_terms(&[" ".into()], None)
            .unwrap_err()
            .contains("empty"));
        assert!(load_terms(&[], None).is_err());
    }
}
