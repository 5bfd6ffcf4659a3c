//! `secrets`: provider API keys (OpenAI, Anthropic, AWS, GitHub, Slack, Stripe), PEM private key
//! blocks and JWTs.
//!
//! Each key format has a fixed prefix, which the regex engine turns into a fast literal scan.
//! Validation weeds out look-alikes the prefix alone lets through: a `sk-` identifier in kebab
//! case has none of the mixed case and digits of a random key; a JWT's header must decode to
//! JSON naming an algorithm.

use std::ops::Range;

use super::config::select_kinds;
use super::detector::{char_at, Detector, Hit, MatchKind, PatternSet, Rule, Tail, B};

const KINDS: [&str; 9] = [
    "openai",
    "anthropic",
    "aws_access_key",
    "aws_secret_key",
    "github",
    "slack",
    "stripe",
    "private_key",
    "jwt",
];

pub(crate) struct Secrets {
    set: PatternSet,
    kinds: Vec<MatchKind>,
}

impl Secrets {
    pub fn new(wanted: &[String]) -> Result<Secrets, String> {
        let enabled = select_kinds(wanted, &KINDS)?;
        let kinds: Vec<MatchKind> = enabled
            .iter()
            .map(|name| MatchKind {
                tail: if *name == "private_key" {
                    Tail::PemBlock
                } else {
                    Tail::Token
                },
                ..MatchKind::new(name, "[SECRET]")
            })
            .collect();
        let mut rules = Vec::new();
        for (index, kind) in enabled.iter().enumerate() {
            for (pattern, validate) in rules_of(kind) {
                rules.push(Rule {
                    pattern,
                    kind: index as u16,
                    validate,
                });
            }
        }
        Ok(Secrets {
            set: PatternSet::new(rules)?,
            kinds,
        })
    }
}

impl Detector for Secrets {
    fn kinds(&self) -> &[MatchKind] {
        &self.kinds
    }

    fn scan(&self, text: &str, out: &mut Vec<Hit>) {
        self.set.scan(text, out);
    }
}

type Validate = fn(&str, Range<usize>) -> Option<Range<usize>>;

fn rules_of(kind: &str) -> Vec<(String, Option<Validate>)> {
    match kind {
        // Anthropic before OpenAI: both start with `sk-`.
        "anthropic" => vec![(
            format!("{B}sk-ant-(?:api|admin|oat)[0-9]{{2}}-[A-Za-z0-9_-]{{32,}}"),
            Some(random_tail as Validate),
        )],
        "openai" => vec![(
            format!("{B}sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_-]{{32,}}"),
            Some(openai),
        )],
        "aws_access_key" => vec![(
            format!("{B}(?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{{16}}{B}"),
            None,
        )],
        // The secret half of an AWS key is 40 base64 characters with nothing to recognise it
        // by but its label; the label is kept, the value redacted.
        "aws_secret_key" => vec![(
            r#"(?i:aws_?secret(?:_?access)?_?key|secret_?access_?key)["']?\s{0,4}[:=]\s{0,4}["']?[A-Za-z0-9/+]{40}"#
                .into(),
            Some(aws_secret),
        )],
        "github" => vec![
            (format!("{B}gh[pousr]_[A-Za-z0-9]{{36,}}{B}"), Some(random_tail)),
            (format!("{B}github_pat_[A-Za-z0-9_]{{60,}}{B}"), None),
        ],
        "slack" => vec![
            (format!("{B}xox[abposr]-[0-9]{{6,}}-[A-Za-z0-9-]{{8,}}"), None),
            (format!("{B}xapp-[0-9]-[A-Z0-9]{{6,}}-[0-9]{{6,}}-[A-Za-z0-9]{{16,}}"), None),
            (
                r"https://hooks\.slack\.com/services/T[A-Z0-9]{6,}/B[A-Z0-9]{6,}/[A-Za-z0-9]{16,}"
                    .into(),
                None,
            ),
        ],
        "stripe" => vec![
            (format!("{B}(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{{16,}}{B}"), Some(random_tail)),
            (format!("{B}whsec_[A-Za-z0-9]{{24,}}{B}"), None),
        ],
        "private_key" => vec![(
            "-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----".into(),
            Some(pem_block),
        )],
        "jwt" => vec![(
            // The signature is optional: a token matches as soon as its payload starts, so a stream
            // holds a long one back from its first bytes.
            format!(r"{B}eyJ[A-Za-z0-9_-]{{8,}}\.eyJ[A-Za-z0-9_-]{{8,}}(?:\.[A-Za-z0-9_-]*)?"),
            Some(jwt),
        )],
        _ => vec![],
    }
}

/// Random keys mix upper case, lower case and digits; identifiers and prose rarely do all three
/// over the last 20 characters.
fn random_tail(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text.get(span.clone())?;
    let tail = &candidate[candidate.len().saturating_sub(20)..];
    let has = |f: fn(&u8) -> bool| tail.as_bytes().iter().any(f);
    (has(u8::is_ascii_uppercase) && has(u8::is_ascii_lowercase) && has(u8::is_ascii_digit))
        .then_some(span)
}

fn openai(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    if text.get(span.clone())?.starts_with("sk-ant-") {
        return None;
    }
    random_tail(text, span)
}

fn aws_secret(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let continues =
        char_at(text, span.end).is_some_and(|c| c.is_ascii_alphanumeric() || c == '/' || c == '+');
    (!continues && span.len() >= 40).then(|| span.end - 40..span.end)
}

/// A key block runs from its BEGIN line to its END line; with no END line, to the end of the
/// text (what follows a private key header is key material).
fn pem_block(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let rest = text.get(span.end..)?;
    let end = rest
        .find("-----END ")
        .and_then(|at| {
            let after = at + "-----END ".len();
            let close = rest[after..].find("-----")?;
            Some(span.end + after + close + "-----".len())
        })
        .unwrap_or(text.len());
    Some(span.start..end)
}

/// The header must decode to a JSON object naming its algorithm (`"alg"`).
fn jwt(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text.get(span.clone())?;
    let header = candidate.split('.').next()?;
    let decoded = base64url_decode(header.get(..header.len().min(512))?)?;
    let json = String::from_utf8_lossy(&decoded);
    (json.starts_with('{') && json.contains("\"alg\"")).then_some(span)
}

fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0;
    for c in input.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(String, &str)> {
        crate::guardrails::detector::found(&Secrets::new(&[]).unwrap(), text)
    }

    #[test]
    fn each_kind_is_found_with_its_exact_span() {
        let pem =
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----";
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        let cases = [
            (
                "key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f end",
                "openai",
                "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f",
            ),
            (
                "sk-ant-api03-Xy9zAb3cDe6fGh9iJk2lMn5oPq8rSt1uVw4xYz7aBc0dEf",
                "anthropic",
                "sk-ant-api03-Xy9zAb3cDe6fGh9iJk2lMn5oPq8rSt1uVw4xYz7aBc0dEf",
            ),
            (
                "id AKIAZ3MHQT6WQX4YB7PL,",
                "aws_access_key",
                "AKIAZ3MHQT6WQX4YB7PL",
            ),
            (
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
                "aws_secret_key",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            ),
            (
                "token ghp_R2d2C3po4Bb8Yoda9Luke7Leia1Han5Solo2Chew",
                "github",
                "ghp_R2d2C3po4Bb8Yoda9Luke7Leia1Han5Solo2Chew",
            ),
            (
                "xoxb-2048193747-4096283746-Zq8Wn3Lk5Jh7Gf2Ds9Ap",
                "slack",
                "xoxb-2048193747-4096283746-Zq8Wn3Lk5Jh7Gf2Ds9Ap",
            ),
            (
                "sk_live_51Hb7Kq2Xw9Lm3Np8Rt4Vy6Za0",
                "stripe",
                "sk_live_51Hb7Kq2Xw9Lm3Np8Rt4Vy6Za0",
            ),
            (pem, "private_key", pem),
            (jwt, "jwt", jwt),
        ];
        for (text, kind, span) in cases {
            assert_eq!(found(text), vec![(kind.to_owned(), span)], "{text}");
        }
    }

    #[test]
    fn look_alikes_are_not_matched() {
        let cases = [
            "pip install sk-learn-extra-tools-for-your-ml-pipeline-v2",
            "sk-ant-api03-short",
            "AKIA is the prefix of AWS access keys",
            "the -----BEGIN PUBLIC KEY----- block is public",
            "eyJ is how base64 JSON starts: eyJmb28iOiJiYXIifQ.eyJzdWIiOiIxIn0.x (no alg)",
            "ghp_ prefix alone, ghp_short",
            "pk_live_51Hb7Kq2Xw9Lm3Np8Rt4Vy6Za0 is a publishable key",
        ];
        for text in cases {
            assert_eq!(found(text), vec![], "{text}");
        }
    }

    #[test]
    fn an_unterminated_key_block_runs_to_the_end() {
        let text = "here: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC";
        assert_eq!(found(text), vec![("private_key".to_owned(), &text[6..])]);
    }
}
