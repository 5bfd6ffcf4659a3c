//! Output guardrails on a streamed answer, event by event: deltas are checked with a bounded
//! hold-back window (so a match split across chunks is still redacted or blocked), held text is
//! released in chunks of its own before a choice's finish chunk, and a block ends the stream
//! with an error event.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Value};

use crate::guardrails::{replace_deltas, stream_deltas, Blocked, StreamGuard, Verdict};
use crate::providers::Endpoint;
use crate::sse::parse_event;

pub struct StreamCheck {
    guard: Option<StreamGuard>,
    endpoint: Endpoint,
    /// `id`, `created`, `model` of the stream's chunks: what a chunk of held text carries.
    head: Option<Value>,
    verdicts: Vec<Verdict>,
}

impl StreamCheck {
    pub fn new(guard: StreamGuard, endpoint: Endpoint) -> StreamCheck {
        StreamCheck {
            guard: Some(guard),
            endpoint,
            head: None,
            verdicts: Vec::new(),
        }
    }

    /// One whole SSE event in; what to send for it appended to `out`. `Err`: a guardrail
    /// blocked the answer (nothing more of it may be sent).
    pub fn event(&mut self, raw: &Bytes, out: &mut BytesMut) -> Result<(), Blocked> {
        let Some(guard) = self.guard.as_mut() else {
            out.extend_from_slice(raw);
            return Ok(());
        };
        let data = parse_event(raw).data;
        if data.trim() == "[DONE]" {
            self.finish_into(out)?;
            out.extend_from_slice(raw);
            return Ok(());
        }
        let Ok(deltas) = stream_deltas(self.endpoint, data.as_bytes()) else {
            out.extend_from_slice(raw);
            return Ok(());
        };
        let chunk: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        if self.head.is_none() && chunk.get("id").is_some() {
            self.head = Some(json!({
                "id": chunk["id"], "created": chunk["created"], "model": chunk["model"],
            }));
        }
        let mut texts: Vec<String> = deltas
            .iter()
            .map(|delta| guard.push(delta.choice, &delta.text))
            .collect();
        if let Some(blocked) = guard.blocked() {
            return Err(blocked.clone());
        }
        // A choice that ends in this chunk releases what is held: after its last delta here,
        // or — when the chunk has no text for it — in a chunk of its own just before.
        let mut separate = Vec::new();
        for choice in finished_choices(&chunk) {
            let held = guard.finish_choice(choice);
            if let Some(blocked) = guard.blocked() {
                return Err(blocked.clone());
            }
            if held.is_empty() {
                continue;
            }
            match deltas.iter().rposition(|d| d.choice == choice) {
                Some(last) => texts[last].push_str(&held),
                None => separate.push((choice, held)),
            }
        }
        let holds_back = guard.holds_back();
        for (choice, held) in &separate {
            self.text_chunk(*choice, held, out);
        }
        if !holds_back || deltas.is_empty() {
            out.extend_from_slice(raw);
            return Ok(());
        }
        let pairs: Vec<_> = deltas
            .iter()
            .zip(&texts)
            .map(|(delta, text)| (delta, text.as_str()))
            .collect();
        let rewritten = replace_deltas(data.as_bytes(), &pairs);
        out.put_slice(b"data: ");
        out.put_slice(&rewritten);
        out.put_slice(b"\n\n");
        Ok(())
    }

    /// The stream ended (or broke off): every output guardrail's verdict.
    pub fn verdicts(mut self) -> Vec<Verdict> {
        if let Some(guard) = self.guard.take() {
            self.verdicts = guard.finish().verdicts;
        }
        self.verdicts
    }

    /// `[DONE]`, or the end of the stream without it: held text of choices that never finished
    /// goes out, and the verdicts are in.
    pub fn finish_into(&mut self, out: &mut BytesMut) -> Result<(), Blocked> {
        let Some(guard) = self.guard.take() else {
            return Ok(());
        };
        let end = guard.finish();
        self.verdicts = end.verdicts;
        if let Some(blocked) = end.blocked {
            return Err(blocked);
        }
        for (choice, text) in &end.flushed {
            self.text_chunk(*choice, text, out);
        }
        Ok(())
    }

    fn text_chunk(&self, choice: usize, text: &str, out: &mut BytesMut) {
        let head = self.head.clone().unwrap_or_else(|| json!({}));
        let mut chunk = head;
        let choice = match self.endpoint {
            Endpoint::Completions => {
                chunk["object"] = json!("text_completion");
                json!({"index": choice, "text": text, "logprobs": null, "finish_reason": null})
            }
            _ => {
                chunk["object"] = json!("chat.completion.chunk");
                json!({"index": choice, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
            }
        };
        chunk["choices"] = json!([choice]);
        out.put_slice(b"data: ");
        out.put_slice(chunk.to_string().as_bytes());
        out.put_slice(b"\n\n");
    }
}

/// The choices whose `finish_reason` this chunk carries.
fn finished_choices(chunk: &Value) -> Vec<usize> {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c.get("finish_reason").is_some_and(|r| !r.is_null()))
        .filter_map(|c| c.get("index").and_then(Value::as_u64))
        .map(|i| i as usize)
        .collect()
}
