//! The text parts of request and answer bodies, found without building a JSON tree, and the
//! rewrite that puts redacted text back.
//!
//! Each text is a JSON string token of the body; its byte span is known (the raw value borrows
//! from the body), so a redaction replaces that token and nothing else: every other byte, key
//! order and number included, stays as it was sent.
//!
//! A body the walk cannot read (a repeated key, a wrong type where text should be) is refused
//! rather than passed unchecked: a duplicate `content` key would otherwise smuggle text past the
//! checks to an upstream that reads the last one.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::providers::Endpoint;

/// One text of a body.
pub(crate) struct Leaf<'a> {
    /// The JSON string token, quotes included.
    pub span: Range<usize>,
    pub text: Cow<'a, str>,
    /// The message, prompt or choice it belongs to.
    pub group: usize,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("guardrails cannot read the {what} body: {reason}")]
pub struct BodyError {
    /// `request`, `answer` or `stream event`.
    pub what: &'static str,
    pub reason: String,
}

/// How deep content nests: a part list inside an item inside the input list.
const MAX_DEPTH: usize = 4;

struct Walk<'a> {
    body: &'a [u8],
    leaves: Vec<Leaf<'a>>,
    what: &'static str,
}

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct CompletionRequest<'a> {
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct InputRequest<'a> {
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
}

/// A message, a content part, a responses item: whichever of these it has.
#[derive(Deserialize)]
struct Node<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChoicesBody<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    index: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<Node<'a>>,
    #[serde(borrow, default)]
    delta: Option<Node<'a>>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
}

/// Anthropic's Messages request: `system` and `messages` (blocks with `text` / `content`).
#[derive(Deserialize)]
struct MessagesRequest<'a> {
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponsesAnswer<'a> {
    #[serde(borrow, default)]
    output: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output_text: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<&'a RawValue>,
}

impl<'a> Walk<'a> {
    fn new(body: &'a [u8], what: &'static str) -> Walk<'a> {
        Walk {
            body,
            leaves: Vec::new(),
            what,
        }
    }

    fn error(&self, reason: impl std::fmt::Display) -> BodyError {
        BodyError {
            what: self.what,
            reason: reason.to_string(),
        }
    }

    fn parse<T: Deserialize<'a>>(&self, raw: &'a str) -> Result<T, BodyError> {
        serde_json::from_str(raw).map_err(|err| self.error(err))
    }

    fn top<T: Deserialize<'a>>(&self) -> Result<T, BodyError> {
        let text = std::str::from_utf8(self.body).map_err(|_| self.error("not UTF-8"))?;
        // A derived struct would also read a JSON array, positionally.
        if !text.trim_start().starts_with('{') {
            return Err(self.error("not a JSON object"));
        }
        self.parse(text)
    }

    /// A string, a list, or an object with `text` / `content`: every string of it is a leaf.
    fn content(&mut self, raw: &'a RawValue, group: usize, depth: usize) -> Result<(), BodyError> {
        let json = raw.get();
        match json.as_bytes().first() {
            Some(b'"') => self.string(raw, group),
            Some(b'[') if depth < MAX_DEPTH => {
                let items: Vec<&'a RawValue> = self.parse(json)?;
                items
                    .into_iter()
                    .try_for_each(|item| self.content(item, group, depth + 1))
            }
            Some(b'{') if depth < MAX_DEPTH => {
                let node: Node<'a> = self.parse(json)?;
                for inner in [node.text, node.content].into_iter().flatten() {
                    self.content(inner, group, depth + 1)?;
                }
                Ok(())
            }
            // Numbers (token arrays), null, booleans: no text.
            _ => Ok(()),
        }
    }

    /// Each element of a list as its own group (messages, choices, prompts).
    fn list(&mut self, raw: &'a RawValue) -> Result<(), BodyError> {
        if raw.get().starts_with('[') {
            let items: Vec<&'a RawValue> = self.parse(raw.get())?;
            for (group, item) in items.into_iter().enumerate() {
                self.content(item, group, 1)?;
            }
            Ok(())
        } else {
            self.content(raw, 0, 1)
        }
    }

    fn string(&mut self, raw: &'a RawValue, group: usize) -> Result<(), BodyError> {
        let json = raw.get();
        let start = (json.as_ptr() as usize)
            .checked_sub(self.body.as_ptr() as usize)
            .filter(|start| self.body.get(*start..start + json.len()) == Some(json.as_bytes()))
            .ok_or_else(|| self.error("a text value is not part of the body"))?;
        // The token was validated when it was read as a raw value: without a backslash, its
        // text is the bytes between the quotes, borrowed as they are (no second parse).
        let inner = json.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
        let text = match inner {
            Some(inner) if !inner.as_bytes().contains(&b'\\') => Cow::Borrowed(inner),
            // Escapes: the decoded text differs from the bytes; serde_json decodes it (and
            // refuses a lone surrogate).
            _ => Cow::Owned(self.parse::<String>(json)?),
        };
        self.leaves.push(Leaf {
            span: start..start + json.len(),
            text,
            group,
        });
        Ok(())
    }

    fn choices(&mut self, stream: bool) -> Result<(), BodyError> {
        let body: ChoicesBody<'a> = self.top()?;
        for (position, choice) in body.choices.into_iter().flatten().enumerate() {
            // Streamed chunks carry only some choices: their `index` says which.
            let group = match choice.index {
                Some(index) if stream => index.get().parse::<usize>().unwrap_or(position),
                _ => position,
            };
            let node = if stream { choice.delta } else { choice.message };
            for raw in [node.and_then(|n| n.content), choice.text]
                .into_iter()
                .flatten()
            {
                self.content(raw, group, 1)?;
            }
        }
        Ok(())
    }
}

/// The texts a request sends to the model: chat `messages[].content`, completions `prompt`,
/// embeddings `input`, responses `instructions` and `input`.
pub(crate) fn request_leaves(endpoint: Endpoint, body: &[u8]) -> Result<Vec<Leaf<'_>>, BodyError> {
    let mut walk = Walk::new(body, "request");
    match endpoint {
        Endpoint::ChatCompletions => {
            if let Some(messages) = walk.top::<ChatRequest>()?.messages {
                walk.list(messages)?;
            }
        }
        Endpoint::Completions => {
            if let Some(prompt) = walk.top::<CompletionRequest>()?.prompt {
                walk.list(prompt)?;
            }
        }
        Endpoint::Embeddings | Endpoint::Responses => {
            let request: InputRequest = walk.top()?;
            if let Some(instructions) = request.instructions {
                walk.content(instructions, 0, 1)?;
            }
            if let Some(input) = request.input {
                walk.list(input)?;
            }
        }
        Endpoint::Messages | Endpoint::MessagesCountTokens => {
            let request: MessagesRequest = walk.top()?;
            if let Some(system) = request.system {
                walk.content(system, 0, 1)?;
            }
            if let Some(messages) = request.messages {
                walk.list(messages)?;
            }
        }
        Endpoint::Models | Endpoint::Passthrough => {}
    }
    Ok(walk.leaves)
}

/// The texts of a (non-streamed) answer: chat `choices[].message.content`, completions
/// `choices[].text`, responses `output[].content[].text` (and `output_text` when present).
pub(crate) fn answer_leaves(endpoint: Endpoint, body: &[u8]) -> Result<Vec<Leaf<'_>>, BodyError> {
    let mut walk = Walk::new(body, "answer");
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => walk.choices(false)?,
        Endpoint::Responses => {
            let answer: ResponsesAnswer = walk.top()?;
            for raw in [answer.output, answer.output_text].into_iter().flatten() {
                walk.content(raw, 0, 0)?;
            }
        }
        Endpoint::Messages => {
            let answer: Node = walk.top()?;
            if let Some(content) = answer.content {
                walk.content(content, 0, 1)?;
            }
        }
        Endpoint::Embeddings
        | Endpoint::Models
        | Endpoint::Passthrough
        | Endpoint::MessagesCountTokens => {}
    }
    Ok(walk.leaves)
}

/// The text deltas of one SSE event's data: chat `choices[].delta.content`, completions
/// `choices[].text`, responses `response.output_text.delta` events. Group = choice index.
pub(crate) fn stream_leaves(endpoint: Endpoint, data: &[u8]) -> Result<Vec<Leaf<'_>>, BodyError> {
    let mut walk = Walk::new(data, "stream event");
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => walk.choices(true)?,
        Endpoint::Responses => {
            let event: ResponsesEvent = walk.top()?;
            if event.kind.as_deref() == Some("response.output_text.delta") {
                if let Some(delta) = event.delta {
                    walk.content(delta, 0, 1)?;
                }
            }
        }
        Endpoint::Messages => {
            let event: ResponsesEvent = walk.top()?;
            if event.kind.as_deref() == Some("content_block_delta") {
                if let Some(delta) = event.delta {
                    walk.content(delta, 0, 1)?;
                }
            }
        }
        Endpoint::Embeddings
        | Endpoint::Models
        | Endpoint::Passthrough
        | Endpoint::MessagesCountTokens => {}
    }
    Ok(walk.leaves)
}

/// Replaces JSON string tokens (sorted, not overlapping) with new texts, encoded as JSON
/// strings; every other byte is copied.
pub(crate) fn splice(body: &[u8], replacements: &[(Range<usize>, String)]) -> Bytes {
    let mut out = Vec::with_capacity(body.len());
    let mut copied = 0;
    for (span, text) in replacements {
        if span.start < copied || span.end > body.len() {
            continue;
        }
        out.extend_from_slice(&body[copied..span.start]);
        // A String always encodes as JSON.
        out.extend_from_slice(serde_json::to_string(text).unwrap_or_default().as_bytes());
        copied = span.end;
    }
    out.extend_from_slice(&body[copied..]);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(leaves: &[Leaf]) -> Vec<(usize, String)> {
        leaves
            .iter()
            .map(|l| (l.group, l.text.to_string()))
            .collect()
    }

    #[test]
    fn request_texts_of_every_endpoint_shape() {
        type Case = (Endpoint, &'static str, Vec<(usize, &'static str)>);
        let cases: [Case; 7] = [
            (
                Endpoint::ChatCompletions,
                r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi \u00e9"},{"type":"image_url","image_url":{"url":"http://x"}}]}]}"#,
                vec![(0, "be brief"), (1, "hi é")],
            ),
            (
                Endpoint::Completions,
                r#"{"prompt":"once upon"}"#,
                vec![(0, "once upon")],
            ),
            (
                Endpoint::Completions,
                r#"{"prompt":["a","b",[1,2]]}"#,
                vec![(0, "a"), (1, "b")],
            ),
            (
                Endpoint::Embeddings,
                r#"{"input":["x","y"]}"#,
                vec![(0, "x"), (1, "y")],
            ),
            (
                Endpoint::Responses,
                r#"{"instructions":"sys","input":"hello"}"#,
                vec![(0, "sys"), (0, "hello")],
            ),
            (
                Endpoint::Responses,
                r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"q1"}]},{"role":"assistant","content":"a1"}]}"#,
                vec![(0, "q1"), (1, "a1")],
            ),
            (Endpoint::Models, "not json", vec![]),
        ];
        for (endpoint, body, expected) in cases {
            let leaves = request_leaves(endpoint, body.as_bytes()).unwrap();
            let expected: Vec<(usize, String)> = expected
                .into_iter()
                .map(|(g, t)| (g, t.to_owned()))
                .collect();
            assert_eq!(texts(&leaves), expected, "{body}");
            for leaf in &leaves {
                assert!(body[leaf.span.clone()].starts_with('"'), "{body}");
            }
        }
    }

    #[test]
    fn answer_and_stream_texts() {
        let chat = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"one"}},{"index":1,"message":{"content":null}}]}"#;
        assert_eq!(
            texts(&answer_leaves(Endpoint::ChatCompletions, chat.as_bytes()).unwrap()),
            vec![(0, "one".into())]
        );
        let completion = r#"{"choices":[{"text":"t","index":0}]}"#;
        assert_eq!(
            texts(&answer_leaves(Endpoint::Completions, completion.as_bytes()).unwrap()),
            vec![(0, "t".into())]
        );
        let responses = r#"{"output":[{"type":"message","content":[{"type":"output_text","text":"r","annotations":[]}]}]}"#;
        assert_eq!(
            texts(&answer_leaves(Endpoint::Responses, responses.as_bytes()).unwrap()),
            vec![(0, "r".into())]
        );
        let chunk = r#"{"choices":[{"index":2,"delta":{"content":"d"}}]}"#;
        assert_eq!(
            texts(&stream_leaves(Endpoint::ChatCompletions, chunk.as_bytes()).unwrap()),
            vec![(2, "d".into())]
        );
        let event = r#"{"type":"response.output_text.delta","delta":"x"}"#;
        assert_eq!(
            texts(&stream_leaves(Endpoint::Responses, event.as_bytes()).unwrap()),
            vec![(0, "x".into())]
        );
        let error = r#"{"error":{"message":"bad"}}"#;
        assert!(answer_leaves(Endpoint::ChatCompletions, error.as_bytes())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn unreadable_bodies_are_refused_not_skipped() {
        let smuggled = r#"{"messages":[{"role":"user","content":"ok","content":"hidden"}]}"#;
        let err = request_leaves(Endpoint::ChatCompletions, smuggled.as_bytes())
            .err()
            .unwrap();
        assert!(err.reason.contains("duplicate"), "{err}");
        assert!(request_leaves(Endpoint::ChatCompletions, b"[1]").is_err());
        assert!(request_leaves(
            Endpoint::ChatCompletions,
            b"{\"messages\":[{\"content\":\"\xff\"}]}"
        )
        .is_err());
        // Deep nesting is not walked past MAX_DEPTH (and never recurses without bound).
        let deep = format!("{{\"prompt\":{}\"x\"{}}}", "[".repeat(100), "]".repeat(100));
        assert!(request_leaves(Endpoint::Completions, deep.as_bytes()).is_ok());
    }

    #[test]
    fn escaped_texts_decode_as_serde_json_does() {
        let tokens = [
            r#""plain""#,
            r#""line\nbreak \"quoted\" back\\slash \/ \t\r\b\f""#,
            r#""\u00e9t\u00E9 \ud83d\ude00 \u0000 end\\""#,
            r#""\\u0041 is not an escape""#,
        ];
        for token in tokens {
            let body = format!(r#"{{"prompt":{token}}}"#);
            let leaves = request_leaves(Endpoint::Completions, body.as_bytes()).unwrap();
            let expected: String = serde_json::from_str(token).unwrap();
            assert_eq!(texts(&leaves), vec![(0, expected)], "{token}");
        }
        // A lone surrogate is refused, as serde_json refuses it.
        for token in [r#""\ud83d alone""#, r#""\ud83d\u0041""#] {
            let body = format!(r#"{{"prompt":{token}}}"#);
            assert!(
                request_leaves(Endpoint::Completions, body.as_bytes()).is_err(),
                "{token}"
            );
        }
    }

    #[test]
    fn splice_changes_only_the_replaced_tokens() {
        let body = br#"{"a":1.50,"messages":[{"content":"secret"}],"z":"keep"}"#;
        let leaves = request_leaves(Endpoint::ChatCompletions, body).unwrap();
        let replaced = splice(body, &[(leaves[0].span.clone(), "[X] \"q\"".into())]);
        assert_eq!(
            &replaced[..],
            br#"{"a":1.50,"messages":[{"content":"[X] \"q\""}],"z":"keep"}"#
        );
    }
}
