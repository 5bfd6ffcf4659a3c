//! Output guardrails on a streamed answer: a scanner fed the text deltas as they arrive.
//!
//! Matches are found across delta boundaries: each choice's text is kept in a buffer until it is
//! safe to let go. With only `log` guardrails nothing is held back (each delta is returned as it
//! came, and scanning trails `HOLD_BACK_BYTES` behind). With a `redact` or `block` guardrail the
//! scanner holds back the last `HOLD_BACK_BYTES` of each choice's text: `push` returns the text
//! that is final (redacted), and `finish_choice` flushes the rest.
//!
//! Why the window is enough: the built-in patterns' matches are shorter than it (keys,
//! addresses, numbers), so a match starting before the release point ends inside the buffer and
//! is seen whole; a match reaching past the release point moves it back to the match's start.
//! Longer ones match from their first bytes (a PEM header, a JWT's header and payload) and so
//! are held as they grow, up to `MAX_HELD_BYTES`; past that the part seen is redacted and the
//! rest of the secret is dropped as it arrives (up to the next whitespace, or for a key block up
//! to its END line). A user pattern whose matches are longer than the window and that only
//! matches once its end arrives can leak its start: keep `regex` patterns short.

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::body::{self, Leaf};
use super::config::{Action, Check};
use super::detector::{apply_redactions, Hit, Redaction, Tail};
use super::json_output::Expectation;
use super::verdict::{micros, Blocked, Outcome, Verdict};
use super::{count_kinds, Guardrails, Stage};
use crate::providers::Endpoint;

/// Text held back per choice while a `redact` / `block` guardrail watches a stream: the longest
/// match caught whole across deltas.
pub const HOLD_BACK_BYTES: usize = 512;
/// Text scanned at once beyond the window: each scan releases this much.
const STEP_BYTES: usize = 256;
/// A match still growing past this much held text is redacted as far as it has come.
pub const MAX_HELD_BYTES: usize = 16 * 1024;
/// Released text kept before the window, so that checks see what precedes a match.
const CONTEXT_BYTES: usize = 32;
/// Choices tracked apart; further indexes share the last one.
const MAX_CHOICES: usize = 128;
/// Answer text kept for `json_output`; a longer answer fails the check.
const MAX_JSON_BYTES: usize = 16 << 20;

struct Channel {
    choice: usize,
    /// Context (released), then pending text.
    buffer: String,
    pending_from: usize,
    /// Dropping the rest of a secret that outgrew the window.
    absorbing: Option<Absorb>,
    /// The whole answer, for `json_output`.
    json: String,
    json_overflow: bool,
    finished: bool,
}

struct Absorb {
    tail: Tail,
    /// The last bytes seen, so an END line split across deltas is found.
    carry: String,
}

impl Absorb {
    /// How much of `delta` belongs to the secret, and whether it ended there.
    fn consume(&mut self, delta: &str) -> (usize, bool) {
        match self.tail {
            Tail::Token => {
                let end = delta
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "-_./+=".contains(c)))
                    .unwrap_or(delta.len());
                (end, end < delta.len())
            }
            Tail::PemBlock => {
                let seen = format!("{}{delta}", self.carry);
                let close = seen.find("-----END ").and_then(|at| {
                    let after = at + "-----END ".len();
                    seen[after..]
                        .find("-----")
                        .map(|c| after + c + "-----".len())
                });
                match close {
                    Some(end) => (end.saturating_sub(self.carry.len()).min(delta.len()), true),
                    None => {
                        let keep = floor_boundary(&seen, seen.len().saturating_sub(64));
                        self.carry = seen[keep..].to_owned();
                        (delta.len(), false)
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    hits: Vec<Hit>,
    elapsed: Duration,
    /// `json_output`: (match kind, reason) per failed choice.
    failures: Vec<(&'static str, String)>,
}

/// The output guardrails of one streamed answer. See the module docs.
pub struct StreamGuard {
    rails: Guardrails,
    /// Indexes of the output guardrails in `rails`.
    active: Vec<usize>,
    hold: bool,
    expect: Expectation,
    channels: Vec<Channel>,
    tallies: Vec<Tally>,
    blocked: Option<Blocked>,
    scratch: Vec<Hit>,
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the text: only how much is held.
        f.debug_struct("StreamGuard")
            .field("guardrails", &self.active.len())
            .field("holds_back", &self.hold)
            .field(
                "held_bytes",
                &self
                    .channels
                    .iter()
                    .map(|c| c.buffer.len() - c.pending_from)
                    .sum::<usize>(),
            )
            .field("blocked", &self.blocked)
            .finish()
    }
}

/// What a finished stream concluded.
#[derive(Debug, Clone)]
pub struct StreamEnd {
    pub verdicts: Vec<Verdict>,
    pub blocked: Option<Blocked>,
    /// Held text of choices not finished with `finish_choice`, (choice, text): send it before
    /// the stream ends.
    pub flushed: Vec<(usize, String)>,
}

impl StreamGuard {
    pub(crate) fn new(rails: Guardrails, expect: Expectation) -> Option<StreamGuard> {
        let active: Vec<usize> = rails
            .rails
            .iter()
            .enumerate()
            .filter(|(_, g)| g.output)
            .map(|(index, _)| index)
            .collect();
        if active.is_empty() {
            return None;
        }
        let hold = active.iter().any(|&index| {
            let rail = &rails.rails[index];
            matches!(rail.check, Check::Text { .. }) && rail.action != Action::Log
        });
        let tallies = active.iter().map(|_| Tally::default()).collect();
        Some(StreamGuard {
            rails,
            active,
            hold,
            expect,
            channels: Vec::new(),
            tallies,
            blocked: None,
            scratch: Vec::new(),
        })
    }

    /// Whether text is held back: then the caller must send what `push` returns instead of the
    /// delta (otherwise `push` returns the delta unchanged).
    pub fn holds_back(&self) -> bool {
        self.hold
    }

    /// A `block` guardrail fired: stop forwarding, end the stream with its error.
    pub fn blocked(&self) -> Option<&Blocked> {
        self.blocked.as_ref()
    }

    /// Feeds one text delta of a choice; returns the text to send now (empty once blocked).
    pub fn push(&mut self, choice: usize, delta: &str) -> String {
        if self.blocked.is_some() {
            return String::new();
        }
        let index = self.channel(choice);
        let channel = &mut self.channels[index];
        if self.expect.wants_json() && !channel.json_overflow {
            channel.json_overflow = channel.json.len() + delta.len() > MAX_JSON_BYTES;
            if !channel.json_overflow {
                channel.json.push_str(delta);
            }
        }
        let mut fresh = delta;
        if let Some(absorb) = channel.absorbing.as_mut() {
            let (consumed, ended) = absorb.consume(delta);
            fresh = &delta[consumed..];
            if ended {
                channel.absorbing = None;
            }
        }
        channel.buffer.push_str(fresh);
        let pending = channel.buffer.len() - channel.pending_from;
        let released = if pending >= HOLD_BACK_BYTES + STEP_BYTES {
            let release_at =
                floor_boundary(&channel.buffer, channel.buffer.len() - HOLD_BACK_BYTES);
            self.process(index, release_at, false)
        } else {
            String::new()
        };
        if self.hold {
            released
        } else {
            delta.to_owned()
        }
    }

    /// The choice ended (its `finish_reason` arrived): checks and returns all its held text.
    pub fn finish_choice(&mut self, choice: usize) -> String {
        let index = self.channel(choice);
        if self.channels[index].finished {
            return String::new();
        }
        let end = self.channels[index].buffer.len();
        let released = self.process(index, end, true);
        self.channels[index].finished = true;
        self.check_json(index);
        if self.hold && self.blocked.is_none() {
            released
        } else {
            String::new()
        }
    }

    /// Ends the stream: flushes unfinished choices and gives every output guardrail's verdict.
    pub fn finish(mut self) -> StreamEnd {
        let unfinished: Vec<usize> = self
            .channels
            .iter()
            .filter(|c| !c.finished)
            .map(|c| c.choice)
            .collect();
        let flushed = unfinished
            .into_iter()
            .map(|choice| (choice, self.finish_choice(choice)))
            .filter(|(_, text)| !text.is_empty())
            .collect();
        let verdicts = (0..self.active.len())
            .map(|slot| self.verdict(slot))
            .collect();
        StreamEnd {
            verdicts,
            blocked: self.blocked,
            flushed,
        }
    }

    fn channel(&mut self, choice: usize) -> usize {
        if let Some(index) = self.channels.iter().position(|c| c.choice == choice) {
            return index;
        }
        if self.channels.len() >= MAX_CHOICES {
            return self.channels.len() - 1;
        }
        self.channels.push(Channel {
            choice,
            buffer: String::new(),
            pending_from: 0,
            absorbing: None,
            json: String::new(),
            json_overflow: false,
            finished: false,
        });
        self.channels.len() - 1
    }

    /// Scans a channel's buffer, counts the matches that are final before `release_at` (moved
    /// back to the start of any match reaching past it), and returns that text, redacted.
    fn process(&mut self, index: usize, release_at: usize, at_end: bool) -> String {
        let mut found: Vec<Vec<Hit>> = Vec::with_capacity(self.active.len());
        let channel = &self.channels[index];
        let text = channel.buffer.as_str();
        for (slot, &rail) in self.active.iter().enumerate() {
            let mut hits = Vec::new();
            if let Check::Text { detector, .. } = &self.rails.rails[rail].check {
                let started = Instant::now();
                self.scratch.clear();
                detector.scan(text, &mut self.scratch);
                hits.extend(
                    self.scratch
                        .iter()
                        .filter(|h| h.start >= channel.pending_from),
                );
                self.tallies[slot].elapsed += started.elapsed();
            }
            found.push(hits);
        }
        let mut release = release_at;
        if !at_end {
            release = settle(&found, release);
            if release <= channel.pending_from && text.len() - channel.pending_from > MAX_HELD_BYTES
            {
                release = text.len();
            }
        }
        let mut redactions = Vec::new();
        let mut absorb = None;
        for (slot, hits) in found.iter().enumerate() {
            let rail = &self.rails.rails[self.active[slot]];
            let Check::Text {
                detector,
                threshold,
            } = &rail.check
            else {
                continue;
            };
            let kinds = detector.kinds();
            let tally = &mut self.tallies[slot];
            for hit in hits.iter().filter(|h| h.end <= release) {
                tally.hits.push(*hit);
                if rail.action == Action::Redact {
                    let kind = kinds.get(usize::from(hit.kind));
                    redactions.push(Redaction {
                        start: hit.start - channel.pending_from,
                        end: hit.end - channel.pending_from,
                        placeholder: kind.map(|k| k.placeholder.clone()).unwrap_or_default(),
                    });
                    // Forced out while still growing: drop the rest of it as it arrives.
                    if hit.end == text.len() && !at_end {
                        absorb = kind.map(|k| k.tail);
                    }
                }
            }
            let triggered = !tally.hits.is_empty() && detector.score(&tally.hits) >= *threshold;
            if triggered && rail.action == Action::Block && self.blocked.is_none() {
                let verdict = self.verdict(slot);
                self.blocked = Some(Blocked::new(&verdict, None));
            }
        }
        let channel = &mut self.channels[index];
        let pending = &channel.buffer[channel.pending_from..release];
        let released = apply_redactions(pending, &mut redactions);
        let keep_from = floor_boundary(&channel.buffer, release.saturating_sub(CONTEXT_BYTES));
        channel.buffer.drain(..keep_from);
        channel.pending_from = release - keep_from;
        if let Some(tail) = absorb {
            channel.absorbing = Some(Absorb {
                tail,
                carry: String::new(),
            });
        }
        if self.blocked.is_some() {
            String::new()
        } else {
            released
        }
    }

    fn check_json(&mut self, index: usize) {
        if !self.expect.wants_json() {
            return;
        }
        let channel = &mut self.channels[index];
        let failure = if channel.json_overflow {
            Some(("too_large", "the answer is too large to check".to_owned()))
        } else {
            self.expect.check(&channel.json)
        };
        channel.json = String::new();
        let Some(failure) = failure else {
            return;
        };
        for slot in 0..self.active.len() {
            let rail = &self.rails.rails[self.active[slot]];
            if !matches!(rail.check, Check::JsonOutput) {
                continue;
            }
            self.tallies[slot].failures.push(failure.clone());
            if rail.action == Action::Block && self.blocked.is_none() {
                let verdict = self.verdict(slot);
                self.blocked = Some(Blocked::new(&verdict, Some(failure.1.clone())));
            }
        }
    }

    fn verdict(&self, slot: usize) -> Verdict {
        let rail = &self.rails.rails[self.active[slot]];
        let tally = &self.tallies[slot];
        let (triggered, matches) = match &rail.check {
            Check::Text {
                detector,
                threshold,
            } => (
                !tally.hits.is_empty() && detector.score(&tally.hits) >= *threshold,
                count_kinds(detector.kinds(), &tally.hits),
            ),
            Check::JsonOutput => (
                !tally.failures.is_empty(),
                super::count_failures(&tally.failures),
            ),
            Check::MaxInputTokens(_) => (false, Vec::new()),
        };
        Verdict {
            name: rail.name.clone(),
            kind: rail.kind,
            stage: Stage::Output,
            verdict: Outcome::of(triggered, rail.action),
            matches,
            elapsed_us: micros(tally.elapsed),
        }
    }
}

/// Moves the release point back to the start of any match that reaches past it, until none
/// does (moving it can put another match across it).
fn settle(found: &[Vec<Hit>], mut release: usize) -> usize {
    loop {
        let crossing = found
            .iter()
            .flatten()
            .filter(|h| h.start < release && h.end > release)
            .map(|h| h.start)
            .min();
        match crossing {
            Some(start) => release = start,
            None => return release,
        }
    }
}

/// The last char boundary at or before `at`.
fn floor_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A text delta inside one SSE event's JSON data (a chat or completions chunk, a responses
/// `response.output_text.delta` event). Debug shows where it is, never the text.
pub struct StreamDelta {
    pub choice: usize,
    pub text: String,
    span: Range<usize>,
}

impl std::fmt::Debug for StreamDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDelta")
            .field("choice", &self.choice)
            .field("text_bytes", &self.text.len())
            .finish()
    }
}

/// The text deltas of one SSE event's data (the JSON after `data: `).
pub fn stream_deltas(endpoint: Endpoint, data: &[u8]) -> Result<Vec<StreamDelta>, body::BodyError> {
    Ok(body::stream_leaves(endpoint, data)?
        .into_iter()
        .map(|Leaf { span, text, group }| StreamDelta {
            choice: group,
            text: text.into_owned(),
            span,
        })
        .collect())
}

/// The event data with each delta's text replaced (pairs in the order `stream_deltas` gave);
/// every other byte as it was.
pub fn replace_deltas(data: &[u8], replaced: &[(&StreamDelta, &str)]) -> Bytes {
    let mut replacements: Vec<(Range<usize>, String)> = replaced
        .iter()
        .map(|(delta, text)| (delta.span.clone(), (*text).to_owned()))
        .collect();
    replacements.sort_by_key(|(span, _)| span.start);
    body::splice(data, &replacements)
}
