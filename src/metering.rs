//! Metering: the price table and cost, and token counting with tiktoken when the provider
//! reported no usage. Runs in the recorder, never on the request path.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::Price;
use crate::providers::Endpoint;

/// The bundled table (see its header for sources and date), overridable in config.
const BUNDLED: &str = include_str!("../config/pricing.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    models: BTreeMap<String, Price>,
}

#[derive(Debug, thiserror::Error)]
#[error("bundled config/pricing.toml is invalid: {0}")]
pub struct PricingError(String);

/// Model → price, USD per 1M tokens.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    prices: BTreeMap<String, Price>,
}

impl Pricing {
    /// The bundled table with the config's `[pricing]` entries laid over it.
    pub fn new(overrides: &BTreeMap<String, Price>) -> Result<Pricing, PricingError> {
        let file: PriceFile = toml::from_str(BUNDLED).map_err(|e| PricingError(e.to_string()))?;
        let mut prices = file.models;
        prices.extend(overrides.iter().map(|(k, v)| (k.clone(), *v)));
        Ok(Pricing { prices })
    }

    /// `provider/model` first (a config may price one deployment apart), then the model, then the
    /// model without a dated snapshot suffix (`gpt-4o-2024-08-06` → `gpt-4o`).
    pub fn price(&self, provider: &str, model: &str) -> Option<&Price> {
        self.prices
            .get(&format!("{provider}/{model}"))
            .or_else(|| self.prices.get(model))
            .or_else(|| strip_snapshot(model).and_then(|base| self.prices.get(base)))
    }

    /// USD for one call; `None` when the model has no price. Cache reads and writes are parts of
    /// `input`, each at its own rate (the input rate when the table has none).
    pub fn cost(&self, provider: &str, model: &str, tokens: Tokens) -> Option<f64> {
        let price = self.price(provider, model)?;
        let cached = tokens.cached_input.min(tokens.input);
        let written = tokens.cache_write.min(tokens.input - cached);
        let uncached = tokens.input - cached - written;
        let per_million = uncached as f64 * price.input
            + cached as f64 * price.cached_input.unwrap_or(price.input)
            + written as f64 * price.cache_write.unwrap_or(price.input)
            + tokens.output as f64 * price.output.unwrap_or(0.0);
        Some(per_million / 1_000_000.0)
    }

    pub fn len(&self) -> usize {
        self.prices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    /// Part of `input` written to the prompt cache.
    pub cache_write: u64,
}

/// `-2024-08-06`, `-20250929`, `-0613` or `-latest` at the end of a model name.
fn strip_snapshot(model: &str) -> Option<&str> {
    if let Some(base) = model.strip_suffix("-latest") {
        return Some(base);
    }
    let digits_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (head, last) = model.rsplit_once('-')?;
    if digits_only(last) && (last.len() == 8 || last.len() == 4) {
        return Some(head);
    }
    // ISO date: three dash-separated numeric parts.
    let (head2, month) = head.rsplit_once('-')?;
    let (base, year) = head2.rsplit_once('-')?;
    let iso = year.len() == 4 && month.len() == 2 && last.len() == 2;
    (iso && digits_only(year) && digits_only(month) && digits_only(last)).then_some(base)
}

/// Loads the tokenizer of current OpenAI models now, so the first counted call does not pay for
/// it. cl100k (older and non-OpenAI models) loads on first use, on the recorder thread: it costs
/// about 22 MB of memory that most deployments never need.
pub fn warm_tokenizers() {
    let _ = tiktoken_rs::o200k_base_singleton();
}

/// Text counted with the tokenizer at most; the rest is estimated at four bytes a token.
const MAX_COUNTED_BYTES: usize = 256 * 1024;
/// tiktoken's merge is quadratic in the length of one unbroken piece (160 KB of one letter
/// takes seconds): longer pieces are cut, which changes a count by a token or so at each cut.
const MAX_PIECE_BYTES: usize = 512;
/// Text handed to the tokenizer in one call.
const SEGMENT_BYTES: usize = 8 * 1024;

/// Counts tokens the way the model's tokenizer would: o200k for the GPT-4o/4.1/5 and o-series
/// families, cl100k otherwise (an approximation for non-OpenAI models, marked as counted).
/// Bounded in time whatever the text: see the limits above.
pub fn count_tokens(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let o200k = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "gpt-6",
        "o1",
        "o3",
        "o4",
        "chatgpt-4o",
    ];
    let bpe = if o200k.iter().any(|prefix| model.starts_with(prefix)) {
        tiktoken_rs::o200k_base_singleton()
    } else {
        tiktoken_rs::cl100k_base_singleton()
    };
    let counted = floor_char_boundary(text, MAX_COUNTED_BYTES);
    let estimated_rest = (text.len() - counted.len()).div_ceil(4) as u64;
    let mut total = estimated_rest;
    for segment in segments(counted) {
        total += bpe.encode_ordinary(segment).len() as u64;
    }
    total
}

/// Counts with the tokenizer of current OpenAI models (o200k, loaded at start), whatever the
/// model: for budgets checked on the request path, where loading another tokenizer would stall
/// the call. Bounded like [`count_tokens`].
pub fn count_tokens_o200k(text: &str) -> u64 {
    count_tokens("gpt-4o", text)
}

/// Splits text into tokenizer-sized segments at whitespace, cutting pieces longer than
/// `MAX_PIECE_BYTES` at character boundaries.
fn segments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut piece_start = 0;
    for (at, ch) in text.char_indices() {
        if ch.is_whitespace() {
            piece_start = at + ch.len_utf8();
        } else if at - piece_start >= MAX_PIECE_BYTES {
            out.push(&text[start..at]);
            start = at;
            piece_start = at;
            continue;
        }
        if at - start >= SEGMENT_BYTES && ch.is_whitespace() {
            out.push(&text[start..at]);
            start = at;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

fn floor_char_boundary(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Counts the input tokens of a request body, following OpenAI's chat accounting (a few tokens
/// of framing a message) for chat, and the plain text elsewhere.
pub fn count_input_tokens(endpoint: Endpoint, model: &str, body: &[u8]) -> Option<u64> {
    let json: Value = serde_json::from_slice(body).ok()?;
    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = json.get("messages")?.as_array()?;
            let content: u64 = messages
                .iter()
                .map(|m| {
                    3 + count_tokens(
                        model,
                        &flatten_text(m.get("content").unwrap_or(&Value::Null)),
                    )
                })
                .sum();
            Some(content + 3)
        }
        Endpoint::Completions => Some(count_tokens(model, &flatten_text(json.get("prompt")?))),
        Endpoint::Embeddings => Some(count_tokens(model, &flatten_text(json.get("input")?))),
        Endpoint::Responses => {
            let instructions = json
                .get("instructions")
                .map(flatten_text)
                .unwrap_or_default();
            Some(
                count_tokens(model, &flatten_text(json.get("input")?))
                    + count_tokens(model, &instructions),
            )
        }
        Endpoint::Messages => {
            let system = json.get("system").map(flatten_text).unwrap_or_default();
            let messages = json.get("messages")?.as_array()?;
            let content: u64 = messages
                .iter()
                .map(|m| {
                    count_tokens(
                        model,
                        &flatten_text(m.get("content").unwrap_or(&Value::Null)),
                    )
                })
                .sum();
            Some(content + count_tokens(model, &system))
        }
        Endpoint::Models | Endpoint::MessagesCountTokens | Endpoint::Passthrough => None,
    }
}

/// The text parts of a content value: strings, arrays of parts, `{text}` / `{content}` objects.
pub fn flatten_text(value: &Value) -> String {
    let mut out = String::new();
    push_text(value, &mut out);
    out
}

fn push_text(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(s);
        }
        Value::Array(items) => items.iter().for_each(|item| push_text(item, out)),
        Value::Object(map) => {
            for key in ["text", "content"] {
                if let Some(inner) = map.get(key) {
                    push_text(inner, out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_table_loads_and_covers_common_models() {
        let pricing = Pricing::new(&BTreeMap::new()).unwrap();
        for model in [
            "gpt-4o",
            "gpt-4o-mini",
            "text-embedding-3-small",
            "claude-sonnet-4-5",
            "claude-haiku-4-5",
        ] {
            assert!(pricing.price("p", model).is_some(), "{model}");
        }
    }

    #[test]
    fn lookup_order_and_snapshots() {
        let mut overrides = BTreeMap::new();
        overrides.insert(
            "gpt-4o-mini".into(),
            Price {
                input: 1.0,
                output: Some(2.0),
                cached_input: Some(0.5),
                cache_write: None,
            },
        );
        overrides.insert(
            "azure/gpt-4o-mini".into(),
            Price {
                input: 10.0,
                output: Some(20.0),
                cached_input: None,
                cache_write: None,
            },
        );
        let pricing = Pricing::new(&overrides).unwrap();
        assert_eq!(pricing.price("openai", "gpt-4o-mini").unwrap().input, 1.0);
        assert_eq!(pricing.price("azure", "gpt-4o-mini").unwrap().input, 10.0);
        assert_eq!(
            pricing
                .price("openai", "gpt-4o-mini-2024-07-18")
                .unwrap()
                .input,
            1.0
        );
        assert!(pricing.price("openai", "no-such-model").is_none());
        for (model, base) in [
            ("gpt-4o-2024-08-06", Some("gpt-4o")),
            ("claude-sonnet-4-5-20250929", Some("claude-sonnet-4-5")),
            ("gpt-4-0613", Some("gpt-4")),
            ("claude-3-5-haiku-latest", Some("claude-3-5-haiku")),
            ("gpt-4o-mini", None),
            ("o3", None),
        ] {
            assert_eq!(strip_snapshot(model), base, "{model}");
        }
    }

    #[test]
    fn cost_prices_cached_input_apart_and_unknown_is_none() {
        let mut overrides = BTreeMap::new();
        overrides.insert(
            "m".into(),
            Price {
                input: 2.0,
                output: Some(8.0),
                cached_input: Some(0.5),
                cache_write: None,
            },
        );
        let pricing = Pricing::new(&overrides).unwrap();
        let cost = pricing
            .cost(
                "p",
                "m",
                Tokens {
                    input: 1_000_000,
                    output: 500_000,
                    cached_input: 400_000,
                    cache_write: 0,
                },
            )
            .unwrap();
        // 600k uncached × $2 + 400k cached × $0.5 + 500k out × $8, per million.
        assert!((cost - (1.2 + 0.2 + 4.0)).abs() < 1e-9, "{cost}");
        // Claude Sonnet 4.5 from the bundled table: $3 in, $15 out, $0.30 cache read, $3.75
        // cache write. 1M prompt tokens: 500k read, 200k written, 300k plain; 100k out.
        let claude = pricing
            .cost(
                "anthropic",
                "claude-sonnet-4-5-20250929",
                Tokens {
                    input: 1_000_000,
                    output: 100_000,
                    cached_input: 500_000,
                    cache_write: 200_000,
                },
            )
            .unwrap();
        let expected = 0.3 * 3.0 + 0.5 * 0.30 + 0.2 * 3.75 + 0.1 * 15.0;
        assert!((claude - expected).abs() < 1e-9, "{claude} vs {expected}");
        assert_eq!(pricing.cost("p", "unpriced", Tokens::default()), None);
    }

    #[test]
    fn counting_is_bounded_for_hostile_text() {
        let started = std::time::Instant::now();
        let one_word = "a".repeat(2 * 1024 * 1024);
        let count = count_tokens("gpt-4o", &one_word);
        assert!(count > 100_000, "{count}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        let prose = "The quick brown fox jumps over the lazy dog. ".repeat(1000);
        let whole = tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(&prose)
            .len() as u64;
        let segmented = count_tokens("gpt-4o", &prose);
        assert!(
            whole.abs_diff(segmented) <= whole / 100,
            "{whole} vs {segmented}"
        );
        let cut: Vec<&str> = segments("ééé");
        assert_eq!(cut.concat(), "ééé");
    }

    #[test]
    fn counts_tokens_of_request_bodies() {
        let chat = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello world"}]}"#;
        let counted = count_input_tokens(Endpoint::ChatCompletions, "gpt-4o", chat).unwrap();
        assert_eq!(counted, 3 + 2 + 3);
        let parts = br#"{"input":[{"role":"user","content":[{"type":"input_text","text":"Hello world"}]}]}"#;
        assert_eq!(
            count_input_tokens(Endpoint::Responses, "gpt-4o", parts),
            Some(2)
        );
        assert_eq!(
            count_input_tokens(
                Endpoint::Embeddings,
                "text-embedding-3-small",
                br#"{"input":"Hello world"}"#
            ),
            Some(2)
        );
    }
}
