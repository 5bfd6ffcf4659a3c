//! Server-sent events: splitting a byte stream into events as it arrives, and reading an event's
//! name and data. Used to meter streams (off the request path) and to drop the usage chunk the
//! gateway asked for on the client's behalf.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// Splits arriving bytes into whole raw events (terminator included), keeping the rest.
#[derive(Debug, Default)]
pub struct EventSplitter {
    buffer: BytesMut,
    /// Bytes already searched without finding an event's end: each byte is scanned once, however
    /// many pieces a long event arrives in.
    scanned: usize,
}

impl EventSplitter {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event, bytes exactly as received.
    pub fn next_event(&mut self) -> Option<Bytes> {
        // A terminator may straddle the old and new bytes: back up by its length minus one.
        let from = self.scanned.saturating_sub(2);
        match event_end(&self.buffer[from..]) {
            Some(end) => {
                self.scanned = 0;
                Some(self.buffer.split_to(from + end).freeze())
            }
            None => {
                self.scanned = self.buffer.len();
                None
            }
        }
    }

    /// Bytes received that do not yet make a whole event.
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }

    /// Whatever is left after the stream ended (an event without its blank line).
    pub fn take_rest(&mut self) -> Bytes {
        self.scanned = 0;
        self.buffer.split().freeze()
    }
}

/// The whole events of a stream that arrived as `frames`, and the bytes after the last one.
pub fn split_events<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Bytes>, Bytes) {
    let mut splitter = EventSplitter::default();
    let mut events = Vec::new();
    for frame in frames {
        splitter.push(frame);
        events.extend(std::iter::from_fn(|| splitter.next_event()));
    }
    (events, splitter.take_rest())
}

/// The whole events of a stream that arrived as `frames` (with arrival times, µs), parsed, each
/// with the time of the frame that completed it; bytes after the last whole event are left out.
/// The recorder reads a stream's events once, for its usage and for its guardrails alike.
pub fn timed_events(frames: &[(u64, Bytes)]) -> Vec<(u64, Event)> {
    let mut splitter = EventSplitter::default();
    let mut events = Vec::new();
    for (at_us, frame) in frames {
        splitter.push(frame);
        while let Some(raw) = splitter.next_event() {
            events.push((*at_us, parse_event(&raw)));
        }
    }
    events
}

/// Index just past the blank line that ends the first event (`\n\n`, `\r\n\r\n` or `\n\r\n`).
/// Jumps from newline to newline (`memchr`): this runs on every chunk of every stream.
fn event_end(buffer: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buffer).find_map(|i| match &buffer[i + 1..] {
        [b'\n', ..] => Some(i + 2),
        [b'\r', b'\n', ..] => Some(i + 3),
        _ => None,
    })
}

/// Whether `bytes` end an event, so something appended starts a new one.
pub fn ends_event(bytes: &[u8]) -> bool {
    bytes.ends_with(b"\n\n") || bytes.ends_with(b"\n\r\n")
}

/// One parsed event.
#[derive(Debug, Default, PartialEq)]
pub struct Event {
    pub name: Option<String>,
    pub data: String,
}

pub fn parse_event(raw: &[u8]) -> Event {
    let mut event = Event::default();
    let mut data_lines = 0;
    // Split on bytes, not on a decoded copy: `\n` and `:` never occur inside a UTF-8 sequence,
    // so decoding each value alone reads the same as decoding the whole event first.
    for line in lines(raw) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (field, value) = match memchr::memchr(b':', line) {
            Some(at) => {
                let value = &line[at + 1..];
                (&line[..at], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if data_lines > 0 {
                    event.data.push('\n');
                }
                event.data.push_str(&lossy_utf8(value));
                data_lines += 1;
            }
            b"event" => event.name = Some(lossy_utf8(value).into_owned()),
            _ => {}
        }
    }
    event
}

/// `bytes` as text, invalid UTF-8 replaced by U+FFFD, like `String::from_utf8_lossy`, which
/// walks the bytes one at a time even when all are valid (callgrind: 14% of the recorder's work
/// on a stream); `from_utf8` checks valid text (nearly all of it) a word at a time first.
pub fn lossy_utf8(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// The `\n`-separated lines of `raw` (the last one possibly empty), found with `memchr`.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', raw)
        .chain(std::iter::once(raw.len()))
        .map(move |end| {
            let line = &raw[start..end];
            start = end + 1;
            line
        })
}

/// Whether a raw chat/completions event is the usage-only chunk (`"choices": []` with a usage
/// object) that `stream_options.include_usage` adds at the end. Cheap byte checks first: every
/// chunk carries `"usage": null` then, and only the last one needs parsing.
pub fn is_usage_only_chunk(raw: &[u8]) -> bool {
    if !has_usage_object(raw) {
        return false;
    }
    let event = parse_event(raw);
    // Only the two members, kept raw: no value tree is built for the rest of the chunk.
    #[derive(serde::Deserialize)]
    struct Chunk<'a> {
        #[serde(default, borrow)]
        choices: Option<&'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        usage: Option<&'a serde_json::value::RawValue>,
    }
    let Ok(chunk) = serde_json::from_str::<Chunk>(&event.data) else {
        return false;
    };
    // A raw value starts at its first byte. Choices absent, null, anything but an array, or an
    // empty one, as before.
    let no_choices = match chunk.choices.map(|choices| choices.get()) {
        Some(choices) if choices.starts_with('[') => choices[1..].trim_start() == "]",
        _ => true,
    };
    no_choices
        && chunk
            .usage
            .is_some_and(|usage| usage.get().starts_with('{'))
}

/// Whether `raw` (an event, or several) has a `"usage"` member whose value is an object: when
/// not, none of its events is the usage-only chunk.
pub fn has_usage_object(raw: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&raw[from..], KEY) {
        let rest = &raw[from + at + KEY.len()..];
        let mut value = rest
            .iter()
            .skip_while(|b| b.is_ascii_whitespace() || **b == b':');
        if value.next() == Some(&b'{') {
            return true;
        }
        from += at + KEY.len();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_arbitrary_chunk_boundaries() {
        let stream = b"data: {\"a\":1}\n\nevent: done\ndata: x\r\n\r\ndata: [DONE]\n\n";
        for cut in 1..stream.len() {
            let mut splitter = EventSplitter::default();
            let mut events = Vec::new();
            for piece in [&stream[..cut], &stream[cut..]] {
                splitter.push(piece);
                while let Some(e) = splitter.next_event() {
                    events.push(parse_event(&e));
                }
            }
            assert_eq!(events.len(), 3, "cut at {cut}");
            assert_eq!(events[0].data, "{\"a\":1}");
            assert_eq!(events[1].name.as_deref(), Some("done"));
            assert_eq!(events[1].data, "x");
            assert_eq!(events[2].data, "[DONE]");
            assert!(splitter.take_rest().is_empty());
        }
    }

    /// What `parse_event` did before it split bytes: decode the whole event, then split it.
    fn parse_decoded_first(raw: &[u8]) -> Event {
        let text = String::from_utf8_lossy(raw);
        let mut event = Event::default();
        let mut data_lines: Vec<&str> = Vec::new();
        for line in text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "data" => data_lines.push(value),
                "event" => event.name = Some(value.to_owned()),
                _ => {}
            }
        }
        event.data = data_lines.join("\n");
        event
    }

    #[test]
    fn parsing_bytes_reads_like_decoding_first() {
        let cases: [&[u8]; 10] = [
            b"data: {\"a\":1}\n\n",
            b"event: done\r\ndata: x\r\n\r\n",
            b"data: a\ndata:b\ndata\n\n",
            b": comment\nid: 7\ndata:  two spaces\n\n",
            b"data: caf\xc3\xa9 \xe2\x82\n\n",
            b"data: \xff\xfe:\xc3\n\xc3\xa9vent: x\n\n",
            b"event:\nevent: second\ndata: [DONE]",
            b"data",
            b"",
            b"\r\n\r\n",
        ];
        for raw in cases {
            assert_eq!(
                parse_event(raw),
                parse_decoded_first(raw),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn multi_line_data_joins_with_newline() {
        assert_eq!(parse_event(b"data: a\ndata: b\n\n").data, "a\nb");
        assert_eq!(parse_event(b": comment\ndata:x\n\n").data, "x");
    }

    #[test]
    fn usage_only_chunk_detection() {
        let cases: [(&[u8], bool); 10] = [
            (br#"data: {"choices":[],"usage":{"prompt_tokens":1}}"#, true),
            (br#"data: {"usage":{"prompt_tokens":1}}"#, true),
            (
                br#"data: {"choices":null,"usage":{"prompt_tokens":1}}"#,
                true,
            ),
            (
                br#"data: {"choices":[ ],"usage":{"prompt_tokens":1}}"#,
                true,
            ),
            (br#"data: {"choices":[],"usage":{"prompt_tokens":1}"#, false),
            (
                br#"data: {"choices": [], "usage" : {"prompt_tokens":1}}"#,
                true,
            ),
            (
                br#"data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}"#,
                false,
            ),
            (
                br#"data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#,
                false,
            ),
            (b"data: [DONE]", false),
            (
                br#"data: {"choices":[{}],"usage":{"a":{"usage":{}}}}"#,
                false,
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                is_usage_only_chunk(raw),
                expected,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
