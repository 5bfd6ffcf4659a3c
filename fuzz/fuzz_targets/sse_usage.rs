//! Provider responses (SSE streams and JSON bodies) are untrusted: reading usage and text from
//! them must never panic, and splitting a stream into events must not depend on where the network
//! cut it.
//!
//! Input format: byte 0 = number of cuts `n` (mod 16), the next `n` bytes = frame lengths, the
//! rest = the stream (what is left after the cut frames is the last frame). Zero-length frames
//! are allowed, as hyper can deliver them.
#![no_main]

use bytes::Bytes;
use flowgate::providers::Endpoint;
use flowgate::sse::{ends_event, is_usage_only_chunk, parse_event, EventSplitter};
use flowgate::usage::{from_json, from_sse, usage_from_tail, Answer};
use libfuzzer_sys::fuzz_target;

const ENDPOINTS: [Endpoint; 8] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Responses,
    Endpoint::Embeddings,
    Endpoint::Models,
    Endpoint::Messages,
    Endpoint::MessagesCountTokens,
    Endpoint::Passthrough,
];

/// Cuts `stream` into frames, each with an arrival time in µs.
fn frames(cuts: &[u8], stream: &[u8]) -> Vec<(u64, Bytes)> {
    let mut frames = Vec::new();
    let mut rest = stream;
    for (i, cut) in cuts.iter().enumerate() {
        let len = (*cut as usize).min(rest.len());
        let (head, tail) = rest.split_at(len);
        frames.push((100 * (i as u64 + 1), Bytes::copy_from_slice(head)));
        rest = tail;
    }
    frames.push((100 * (cuts.len() as u64 + 1), Bytes::copy_from_slice(rest)));
    frames
}

/// Events (as `EventSplitter` returns them) and the rest, for a stream arriving as `frames`.
fn split(frames: &[(u64, Bytes)]) -> (Vec<Bytes>, Bytes) {
    let mut splitter = EventSplitter::default();
    let mut events = Vec::new();
    let mut pushed = 0;
    for (_, frame) in frames {
        splitter.push(frame);
        pushed += frame.len();
        while let Some(event) = splitter.next_event() {
            events.push(event);
        }
        let taken: usize = events.iter().map(Bytes::len).sum();
        assert_eq!(splitter.pending(), pushed - taken, "pending() miscounts");
    }
    let rest = splitter.take_rest();
    assert_eq!(splitter.pending(), 0, "take_rest left bytes behind");
    assert!(splitter.next_event().is_none(), "event after take_rest");
    (events, rest)
}

/// The parts of an answer that cannot depend on how the stream was cut.
fn cut_independent(answer: &Answer) -> impl PartialEq + std::fmt::Debug + '_ {
    (
        answer.usage,
        &answer.text,
        answer.is_json,
        &answer.error_message,
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 16).min(rest.len());
    let (cuts, stream) = rest.split_at(n);
    let cut = frames(cuts, stream);
    let whole = vec![(100, Bytes::copy_from_slice(stream))];

    // EventSplitter: events + rest == input, each event is the shortest prefix ending in a blank
    // line, and the split does not depend on the cuts.
    let (events, rest) = split(&cut);
    let mut joined = Vec::with_capacity(stream.len());
    for event in &events {
        assert!(ends_event(event), "event without a terminator: {event:?}");
        for end in 1..event.len() {
            assert!(
                !ends_event(&event[..end]),
                "event {event:?} contains an earlier terminator (at {end})"
            );
        }
        joined.extend_from_slice(event);
        // Must not panic, whatever the event.
        let _ = is_usage_only_chunk(event);
        let _ = parse_event(event);
    }
    joined.extend_from_slice(&rest);
    assert_eq!(joined, stream, "events + rest != input");
    assert!(
        (1..=rest.len()).all(|end| !ends_event(&rest[..end])),
        "rest {rest:?} holds a whole event"
    );
    assert_eq!(split(&whole), (events, rest), "split depends on the cuts");

    let _ = is_usage_only_chunk(stream);
    let _ = usage_from_tail(stream);

    for endpoint in ENDPOINTS {
        let cut_answer = from_sse(endpoint, &cut);
        let whole_answer = from_sse(endpoint, &whole);
        assert_eq!(
            cut_independent(&cut_answer),
            cut_independent(&whole_answer),
            "from_sse({endpoint:?}) depends on the cuts"
        );
        if !cut_answer.text.is_empty() {
            assert!(
                cut_answer.first_content_us.is_some(),
                "text without first_content_us"
            );
        }
        let _ = from_json(endpoint, stream);
    }
});
