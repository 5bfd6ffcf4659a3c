//! `regex`: the user's own patterns, searched in one pass. Matches count under the guardrail's
//! name and are redacted as `[NAME]` (the name in upper case).

use super::detector::{Detector, Hit, MatchKind, PatternSet, Rule};

pub(crate) struct UserRegex {
    set: PatternSet,
    kinds: Vec<MatchKind>,
}

impl UserRegex {
    pub fn new(name: &str, patterns: &[String]) -> Result<UserRegex, String> {
        if patterns.is_empty() {
            return Err("a regex guardrail needs patterns = [...]".into());
        }
        let rules = patterns
            .iter()
            .map(|pattern| Rule {
                pattern: pattern.clone(),
                kind: 0,
                validate: None,
            })
            .collect();
        let set = PatternSet::new(rules).map_err(|err| format!("patterns: {err}"))?;
        let placeholder = format!("[{}]", name.trim().to_uppercase());
        Ok(UserRegex {
            set,
            kinds: vec![MatchKind::new(name.trim(), &placeholder)],
        })
    }
}

impl Detector for UserRegex {
    fn kinds(&self) -> &[MatchKind] {
        &self.kinds
    }

    fn scan(&self, text: &str, out: &mut Vec<Hit>) {
        let mut found = Vec::new();
        self.set.scan(text, &mut found);
        // A pattern that can match nothing (`x*`) would "find" empty matches everywhere.
        out.extend(found.into_iter().filter(|hit| hit.end > hit.start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_and_empty_matches_do_not_count() {
        let detector = UserRegex::new("order-ids", &[r"ORD-\d{8}".into(), "z*".into()]).unwrap();
        let mut hits = vec![];
        detector.scan("see ORD-12345678 and ORD-1", &mut hits);
        assert_eq!(hits.len(), 1);
        assert_eq!((hits[0].start, hits[0].end), (4, 16));
        assert_eq!(detector.kinds()[0].placeholder, "[ORDER-IDS]");
        let err = UserRegex::new("x", &["(unclosed".into()]).err().unwrap();
        assert!(err.contains("(unclosed"), "{err}");
    }
}
