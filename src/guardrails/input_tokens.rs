//! `max_input_tokens`: refuses prompts over a token budget, counted with the o200k tokenizer
//! (loaded at start) over the request's texts. Message framing (a few tokens a message) is not
//! counted, so the budget is on what the user wrote.

use crate::metering::count_tokens_o200k;

/// The token count when the texts exceed `max`, else `None`. Counting is skipped when the texts
/// have no more bytes than the budget has tokens: a token is at least one byte.
pub(crate) fn over_budget<'t>(
    texts: impl Iterator<Item = &'t str> + Clone,
    max: u64,
) -> Option<u64> {
    let bytes: u64 = texts.clone().map(|t| t.len() as u64).sum();
    if bytes <= max {
        return None;
    }
    let tokens: u64 = texts.map(count_tokens_o200k).sum();
    (tokens > max).then_some(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_when_the_bytes_could_exceed_the_budget() {
        let short = ["hello", "world"];
        assert_eq!(over_budget(short.iter().copied(), 10), None);
        // "hello world " * 10 is 20 tokens and 120 bytes.
        let long = "hello world ".repeat(10);
        assert_eq!(over_budget([long.as_str()].into_iter(), 100), None);
        let counted = over_budget([long.as_str()].into_iter(), 5).unwrap();
        assert!((15..=25).contains(&counted), "{counted}");
    }
}
