//! The Anthropic translation sees untrusted input both ways: a client's chat completions body,
//! and Anthropic's answers (JSON, errors, SSE streams). None of it may panic, a refused request
//! names what it refuses, and a stream translates the same wherever the network cut it.
//!
//! Input format: byte 0 picks the mode. Even: the rest is a chat completions body. Odd: byte 1 =
//! number of cuts `n` (mod 16), the next `n` bytes = frame lengths, the rest = an Anthropic
//! answer, read as an SSE stream, a message body and an error body.
#![no_main]

use bytes::BytesMut;
use flowgate::providers::anthropic::{error, request, response, stream};
use flowgate::sse::{ends_event, EventSplitter};
use libfuzzer_sys::fuzz_target;

fn translate_request(body: &[u8]) {
    match request::translate(body, "claude-fuzz") {
        Ok(translated) => {
            let out = &translated.body;
            assert_eq!(out["model"], "claude-fuzz");
            assert!(out["max_tokens"].as_u64().is_some_and(|n| n > 0), "{out}");
            assert!(out["messages"].is_array(), "{out}");
        }
        Err(rejection) => assert!(!rejection.to_string().is_empty()),
    }
}

/// The translated output of `stream` arriving in `frames`, and whether it ended (or failed).
fn translate_stream(frames: &[&[u8]]) -> (Vec<u8>, Result<bool, String>) {
    let mut translator = stream::Translator::new(true, 0);
    let mut splitter = EventSplitter::default();
    let mut out = BytesMut::new();
    for frame in frames {
        splitter.push(frame);
        while let Some(event) = splitter.next_event() {
            let before = out.len();
            let step = translator.event(&event, &mut out);
            assert!(
                out.len() == before || ends_event(&out),
                "an event was translated into a partial event"
            );
            match step {
                Ok(stream::Step::End) => return (out.to_vec(), Ok(true)),
                Ok(stream::Step::Continue) => {}
                Err(err) => return (out.to_vec(), Err(err.to_string())),
            }
        }
    }
    (out.to_vec(), Ok(translator.ended()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        translate_request(rest);
        return;
    }
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    let n = (n as usize % 16).min(rest.len());
    let (cuts, answer) = rest.split_at(n);
    let mut frames = Vec::new();
    let mut tail = answer;
    for cut in cuts {
        let (head, next) = tail.split_at((*cut as usize).min(tail.len()));
        frames.push(head);
        tail = next;
    }
    frames.push(tail);
    assert_eq!(
        translate_stream(&frames),
        translate_stream(&[answer]),
        "the translation depends on the cuts"
    );
    let _ = response::to_chat_completion(answer, 0);
    for status in [400u16, 429, 500, 529] {
        let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        let (_, body) = error::to_openai(status, answer);
        assert!(body["error"]["message"].is_string());
    }
});
