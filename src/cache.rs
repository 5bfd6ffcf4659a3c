//! The exact-match response cache: which calls may be answered from it, their key, lookup with
//! request coalescing, and filling it from a finished answer.
//!
//! Entries live in a byte-bounded moka cache with a TTL. A miss that may fill the cache makes
//! its caller the *leader* for that key: identical calls arriving meanwhile wait for the
//! leader's answer instead of calling the provider again. The leader's [`Fill`] is completed by
//! the call's finish hook — with the whole answer when it was a complete 2xx, else with nothing,
//! which releases the waiters to call the provider themselves. A `Fill` dropped unfinished
//! releases them too, so a waiter never waits for a leader that is gone.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName};
use serde_json::Value;
use tokio::sync::watch;

use crate::config::{CacheConfig, CacheMode};
use crate::providers::Endpoint;

mod key;
pub mod replay;

pub const HIT: &str = "hit";
pub const MISS: &str = "miss";
pub const BYPASS: &str = "bypass";

/// The client's `x-flowgate-cache` directive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Directive {
    #[default]
    Auto,
    /// Neither read nor write.
    Bypass,
    /// Skip the read, write the fresh answer.
    Refresh,
}

impl Directive {
    pub fn parse(value: &str) -> Option<Directive> {
        match value.to_ascii_lowercase().as_str() {
            "auto" => Some(Directive::Auto),
            "bypass" => Some(Directive::Bypass),
            "refresh" => Some(Directive::Refresh),
            _ => None,
        }
    }
}

/// 128 bits of SipHash-1-3 (128-bit output) keyed with a secret of this process: collisions are
/// out of reach, and a client cannot craft a request that lands on another's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(u64, u64);

/// A stored answer: the provider's bytes as they came, JSON or SSE.
#[derive(Debug)]
pub struct Entry {
    pub body: Bytes,
    pub sse: bool,
}

/// Bytes an entry costs beyond its body (key, Arc, moka's bookkeeping), for the weigher:
/// ~450 measured (`memory_probe`), so `max_bytes` bounds the memory the cache really holds.
const ENTRY_OVERHEAD: usize = 512;

/// `None` while the leader is working; then its answer, or `None` when it got none to share.
type Outcome = Option<Option<Arc<Entry>>>;

type Pending = Arc<Mutex<HashMap<Key, watch::Receiver<Outcome>>>>;

/// What the cache says about one call.
pub enum Lookup {
    /// Not served from, nor stored in, the cache.
    Bypass,
    Hit(Arc<Entry>),
    /// Call the provider; complete the fill with the answer (a fill may be a no-op).
    Miss(Fill),
}

/// What identifies a call for the cache, beyond its body.
pub struct KeyInput<'a> {
    pub endpoint: Endpoint,
    pub provider: &'a str,
    /// The model as the provider is asked for it (after routing).
    pub model: &'a str,
    pub body: &'a [u8],
    /// The client's own credential headers, when they are what the provider sees: tenants
    /// behind one gateway never share an entry.
    pub credential: Option<&'a HeaderMap>,
}

pub struct ResponseCache {
    entries: moka::future::Cache<Key, Arc<Entry>>,
    pending: Pending,
    mode: CacheMode,
    max_entry_bytes: usize,
    hash_key: key::HashKey,
}

/// Request fields that choose how an answer is delivered, not what it says.
const NOT_IN_KEY: [&str; 3] = ["model", "stream", "stream_options"];

/// Headers that carry a client's own key to the provider.
/// Built at compile time: `HeaderMap::get` with a `&str` parses the name on every call.
const CREDENTIAL_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

impl ResponseCache {
    /// `None` when the cache is switched off.
    pub fn new(config: &CacheConfig) -> Option<ResponseCache> {
        if !config.enabled || config.mode == CacheMode::Off {
            return None;
        }
        let max_bytes = config.max_bytes;
        let entries = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &Key, entry: &Arc<Entry>| {
                u32::try_from(entry.body.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .time_to_live(Duration::from_secs(config.ttl_seconds))
            // LRU, not moka's default TinyLFU: TinyLFU admits a new entry into a full cache only
            // if its key was asked for more often than the victim's, so a cache full of answers
            // asked for once kept no new answer at all until entries expired, and the call a user
            // repeats right away missed (see `a_new_answer_is_kept_even_when_the_cache_is_full`).
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Some(ResponseCache {
            entries,
            pending: Arc::default(),
            mode: config.mode,
            // One answer may not take more than an eighth of the cache (nor what a weight holds).
            max_entry_bytes: usize::try_from(max_bytes / 8)
                .unwrap_or(usize::MAX)
                .min(u32::MAX as usize - ENTRY_OVERHEAD),
            hash_key: Default::default(),
        })
    }

    /// Whether the mode lets this call use the cache at all. Responses are never cached: the
    /// API is stateful (`previous_response_id`, stored responses with unique ids).
    pub fn admits(
        &self,
        endpoint: Endpoint,
        sampling: &std::collections::BTreeMap<String, Value>,
    ) -> bool {
        match endpoint {
            Endpoint::Embeddings => true,
            Endpoint::ChatCompletions | Endpoint::Completions => match self.mode {
                CacheMode::All => true,
                CacheMode::Off => false,
                CacheMode::Deterministic => is_deterministic(sampling),
            },
            _ => false,
        }
    }

    /// The key of a call, or `None` when its body is not a JSON object (never cached, never an
    /// error because of the cache).
    pub fn key(&self, input: &KeyInput<'_>) -> Option<Key> {
        let body = key::object_digest(&self.hash_key, input.body, &NOT_IN_KEY)?;
        let credentials = input.credential.map(|headers| {
            CREDENTIAL_HEADERS.map(|name| {
                let value = headers.get(&name).map(|v| v.as_bytes());
                (name, value)
            })
        });
        let digest = key::digest(&self.hash_key, |hasher| {
            input.endpoint.as_str().hash(hasher);
            input.provider.hash(hasher);
            input.model.hash(hasher);
            hasher.write_u64(body.0);
            hasher.write_u64(body.1);
            if let Some(credentials) = &credentials {
                for (name, value) in credentials {
                    name.as_str().hash(hasher);
                    value.hash(hasher);
                }
            }
        });
        Some(Key(digest.0, digest.1))
    }

    /// Reads the cache for `key` as `directive` says, waiting for an identical call in flight
    /// (until `deadline`) rather than calling the provider twice.
    pub async fn lookup(
        &self,
        key: Key,
        directive: Directive,
        deadline: tokio::time::Instant,
    ) -> Lookup {
        match directive {
            Directive::Bypass => return Lookup::Bypass,
            Directive::Refresh => return Lookup::Miss(self.fill(key, None)),
            Directive::Auto => {}
        }
        if let Some(entry) = self.entries.get(&key).await {
            return Lookup::Hit(entry);
        }
        let waiting = {
            let mut pending = lock(&self.pending);
            match pending.get(&key) {
                Some(receiver) => Err(receiver.clone()),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    pending.insert(key, receiver);
                    Ok(sender)
                }
            }
        };
        match waiting {
            Ok(sender) => {
                // The previous leader may have stored its answer between our read and our claim.
                // Checked without a read first: `get` records a read for moka's eviction policy
                // (~3k instructions), and this is every miss's path.
                let stored = if self.entries.contains_key(&key) {
                    self.entries.get(&key).await
                } else {
                    None
                };
                if let Some(entry) = stored {
                    let fill = self.fill(key, Some(sender));
                    fill.release(Some(entry.clone()));
                    return Lookup::Hit(entry);
                }
                Lookup::Miss(self.fill(key, Some(sender)))
            }
            Err(mut receiver) => {
                let outcome =
                    tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some)).await;
                match outcome {
                    Ok(Ok(answer)) => match answer.clone().flatten() {
                        Some(entry) => Lookup::Hit(entry),
                        // The leader got no answer to share: call the provider, and store what
                        // comes back.
                        None => Lookup::Miss(self.fill(key, None)),
                    },
                    Ok(Err(_)) | Err(_) => Lookup::Miss(self.fill(key, None)),
                }
            }
        }
    }

    fn fill(&self, key: Key, leader: Option<watch::Sender<Outcome>>) -> Fill {
        Fill {
            key,
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            leader,
            max_entry_bytes: self.max_entry_bytes,
        }
    }

    /// Entries and their weight in bytes, after pending maintenance (for tests and `/metrics`).
    pub async fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks().await;
        (self.entries.entry_count(), self.entries.weighted_size())
    }
}

/// Temperature 0, or a seed: the provider is asked for a repeatable answer.
fn is_deterministic(sampling: &std::collections::BTreeMap<String, Value>) -> bool {
    let zero_temperature = sampling
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let seeded = sampling.get("seed").is_some_and(|s| !s.is_null());
    zero_temperature || seeded
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map stays consistent through a panic elsewhere: every change is one insert or remove.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The right to store one call's answer, and — for a leader — the duty to release the calls
/// waiting for it.
pub struct Fill {
    key: Key,
    entries: moka::future::Cache<Key, Arc<Entry>>,
    pending: Pending,
    leader: Option<watch::Sender<Outcome>>,
    max_entry_bytes: usize,
}

impl Fill {
    /// Called once the answer is known: `Some` for a complete 2xx answer worth storing.
    pub fn complete(self, answer: Option<Entry>) {
        let entry = answer
            .filter(|entry| entry.body.len() <= self.max_entry_bytes && is_complete(entry))
            .map(|entry| {
                // A copy of its own: the answer's bytes may be a slice of the connection's read
                // buffer, which a cached slice would keep alive whole, unweighed, for the TTL.
                Arc::new(Entry {
                    body: Bytes::copy_from_slice(&entry.body),
                    sse: entry.sse,
                })
            });
        match entry {
            None => self.release(None),
            Some(entry) => self.store(entry),
        }
    }

    /// Waiters get the answer at once; the pending claim goes only after the entry is in the
    /// cache, so that no call in between misses both and calls the provider again.
    fn store(mut self, entry: Arc<Entry>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.release(None);
        };
        if let Some(sender) = &self.leader {
            sender.send_replace(Some(Some(entry.clone())));
        }
        let entries = self.entries.clone();
        let key = self.key;
        let mut insert = Box::pin(async move {
            entries.insert(key, entry).await;
            self.release_claim();
        });
        // moka's insert nearly always completes on its first poll: doing it here spares a task
        // spawn, whose wake-up of an idle worker thread cost ~40 µs of CPU per miss in the load
        // harness. Only when it must wait does it become a task of its own.
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        if insert.as_mut().poll(&mut context).is_pending() {
            runtime.spawn(insert);
        }
    }

    fn release(mut self, answer: Option<Arc<Entry>>) {
        if let Some(sender) = self.release_claim() {
            sender.send_replace(Some(answer));
        }
    }

    /// Gives up the leader's claim on the key (only its own: a later leader's stays).
    fn release_claim(&mut self) -> Option<watch::Sender<Outcome>> {
        let sender = self.leader.take()?;
        let mut pending = lock(&self.pending);
        if pending
            .get(&self.key)
            .is_some_and(|receiver| receiver.same_channel(&sender.subscribe()))
        {
            pending.remove(&self.key);
        }
        Some(sender)
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if let Some(sender) = self.release_claim() {
            if sender.borrow().is_none() {
                sender.send_replace(Some(None));
            }
        }
    }
}

/// A stream is worth replaying only when it ended properly, with `[DONE]`.
fn is_complete(entry: &Entry) -> bool {
    if !entry.sse {
        return !entry.body.is_empty();
    }
    let trimmed = entry.body.trim_ascii_end();
    trimmed.ends_with(b"data: [DONE]") || trimmed.ends_with(b"data:[DONE]")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(mode: CacheMode) -> ResponseCache {
        ResponseCache::new(&CacheConfig {
            mode,
            ..CacheConfig::default()
        })
        .expect("enabled")
    }

    fn key_of(cache: &ResponseCache, body: &str, credential: Option<&HeaderMap>) -> Option<Key> {
        cache.key(&KeyInput {
            endpoint: Endpoint::ChatCompletions,
            provider: "openai",
            model: "gpt-4o-mini",
            body: body.as_bytes(),
            credential,
        })
    }

    #[test]
    fn key_ignores_key_order_and_delivery_fields_but_not_content() {
        let cache = cache(CacheMode::All);
        let base = key_of(
            &cache,
            r#"{"model":"a","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            None,
        );
        let cases = [
            (
                r#"{"temperature":0,"messages":[{"content":"hi","role":"user"}],"model":"b"}"#,
                true,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true,"stream_options":{"include_usage":true}}"#,
                true,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"hi"}],"temperature":0.0}"#,
                true,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"hi!"}],"temperature":0}"#,
                false,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"hi"}],"temperature":0,"max_tokens":5}"#,
                false,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"hi"}],"temperature":0.0001}"#,
                false,
            ),
            (
                " {\"model\" : \"a\",\n \"messages\":[ {\"role\":\"user\", \"content\":\"hi\"} ], \"temperature\":0 } ",
                true,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"h\u0069"}],"temperature":0}"#,
                true,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"hi"}],"temperature":"0"}"#,
                false,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"hi"},{"role":"user","content":"hi"}],"temperature":0}"#,
                false,
            ),
            (
                r#"{"model":"a","messages":[{"role":"user","content":"hi"}],"temperature":0,"metadata":{"stream":true}}"#,
                false,
            ),
        ];
        assert!(base.is_some());
        for (body, same) in cases {
            assert_eq!(key_of(&cache, body, None) == base, same, "{body}");
        }
    }

    #[test]
    fn key_keeps_array_order_but_not_member_order_at_any_depth() {
        let cache = cache(CacheMode::All);
        let key = |body: &str| key_of(&cache, body, None).expect("an object has a key");
        let ab = r#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]}"#;
        let ba = r#"{"messages":[{"role":"user","content":"b"},{"role":"user","content":"a"}]}"#;
        assert_ne!(key(ab), key(ba));
        let deep = r#"{"tools":[{"function":{"name":"f","parameters":{"x":1,"y":[1,2]}}}]}"#;
        let shuffled = r#"{"tools":[{"function":{"parameters":{"y":[1,2],"x":1},"name":"f"}}]}"#;
        assert_eq!(key(deep), key(shuffled));
        let swapped = r#"{"tools":[{"function":{"name":"f","parameters":{"x":1,"y":[2,1]}}}]}"#;
        assert_ne!(key(deep), key(swapped));
        // Member names and values do not trade places.
        assert_ne!(key(r#"{"a":{"b":"c"}}"#), key(r#"{"a":{"c":"b"}}"#));
        assert_ne!(key(r#"{"a":1,"b":2}"#), key(r#"{"a":2,"b":1}"#));
    }

    #[test]
    fn key_tells_numbers_apart_that_share_their_bits() {
        let cache = cache(CacheMode::All);
        let key = |body: &str| key_of(&cache, body, None).expect("an object has a key");
        // -1 and u64::MAX are the same 64 bits; so are 1.5 and 4609434218613702656.
        assert_ne!(
            key(r#"{"seed":-1}"#),
            key(r#"{"seed":18446744073709551615}"#)
        );
        assert_ne!(
            key(r#"{"top_p":1.5}"#),
            key(r#"{"top_p":4609434218613702656}"#)
        );
        assert_eq!(key(r#"{"seed":1.0}"#), key(r#"{"seed":1}"#));
    }

    #[test]
    fn key_separates_credentials_and_refuses_non_objects() {
        let cache = cache(CacheMode::All);
        let body = r#"{"model":"a","messages":[]}"#;
        let mut alice = HeaderMap::new();
        alice.insert("authorization", "Bearer sk-alice".parse().expect("header"));
        let mut bob = HeaderMap::new();
        bob.insert("authorization", "Bearer sk-bob".parse().expect("header"));
        assert_ne!(
            key_of(&cache, body, Some(&alice)),
            key_of(&cache, body, Some(&bob))
        );
        assert_eq!(
            key_of(&cache, body, Some(&alice)),
            key_of(&cache, body, Some(&alice))
        );
        for bad in [
            "not json",
            "[1,2]",
            "\"text\"",
            "",
            r#"{"model":"a"} x"#,
            r#"{"model":"a""#,
        ] {
            assert_eq!(key_of(&cache, bad, None), None, "{bad}");
        }
    }

    #[test]
    fn deterministic_mode_admits_temperature_zero_seed_and_embeddings() {
        let cache = cache(CacheMode::Deterministic);
        let sampling = |json: &str| -> std::collections::BTreeMap<String, Value> {
            serde_json::from_str(json).expect("json")
        };
        let cases = [
            (Endpoint::ChatCompletions, r#"{"temperature":0}"#, true),
            (Endpoint::ChatCompletions, r#"{"temperature":0.0}"#, true),
            (
                Endpoint::ChatCompletions,
                r#"{"temperature":0.7,"seed":4}"#,
                true,
            ),
            (Endpoint::ChatCompletions, r#"{"temperature":0.7}"#, false),
            (Endpoint::ChatCompletions, r#"{}"#, false),
            (Endpoint::ChatCompletions, r#"{"seed":null}"#, false),
            (Endpoint::Completions, r#"{"temperature":0}"#, true),
            (Endpoint::Embeddings, r#"{}"#, true),
            (Endpoint::Responses, r#"{"temperature":0}"#, false),
            (Endpoint::Passthrough, r#"{"temperature":0}"#, false),
        ];
        for (endpoint, json, admitted) in cases {
            assert_eq!(
                cache.admits(endpoint, &sampling(json)),
                admitted,
                "{endpoint:?} {json}"
            );
        }
        let all = super::tests::cache(CacheMode::All);
        assert!(all.admits(
            Endpoint::ChatCompletions,
            &sampling(r#"{"temperature":1.2}"#)
        ));
    }

    #[test]
    fn only_finished_streams_are_complete() {
        let sse = |body: &'static str| Entry {
            body: Bytes::from_static(body.as_bytes()),
            sse: true,
        };
        assert!(is_complete(&sse("data: {}\n\ndata: [DONE]\n\n")));
        assert!(!is_complete(&sse("data: {}\n\n")));
        assert!(!is_complete(&Entry {
            body: Bytes::new(),
            sse: false
        }));
    }

    #[test]
    fn directive_parses_case_insensitively() {
        assert_eq!(Directive::parse("BYPASS"), Some(Directive::Bypass));
        assert_eq!(Directive::parse("refresh"), Some(Directive::Refresh));
        assert_eq!(Directive::parse("auto"), Some(Directive::Auto));
        assert_eq!(Directive::parse("sometimes"), None);
    }

    /// A cache with one call in flight that leads for its key.
    async fn led() -> (ResponseCache, Key, tokio::time::Instant, Fill) {
        let cache = cache(CacheMode::All);
        let key = key_of(&cache, r#"{"messages":[]}"#, None).expect("key");
        // Far away: a waiter that returns did so because the leader released it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
        let Lookup::Miss(leader) = cache.lookup(key, Directive::Auto, deadline).await else {
            panic!("first call must lead");
        };
        (cache, key, deadline, leader)
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_releases_its_waiters() {
        let (cache, key, deadline, leader) = led().await;
        let waiter = tokio::time::timeout(
            Duration::from_secs(5),
            cache.lookup(key, Directive::Auto, deadline),
        );
        let drop_leader = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(leader);
        };
        let (outcome, ()) = tokio::join!(waiter, drop_leader);
        let outcome = outcome.expect("the waiter was released, not left to its deadline");
        assert!(
            matches!(outcome, Lookup::Miss(_)),
            "the waiter calls the provider itself"
        );
    }

    #[tokio::test]
    async fn a_stored_answer_answers_waiters_and_later_calls() {
        let (cache, key, deadline, leader) = led().await;
        let waiter = tokio::time::timeout(
            Duration::from_secs(5),
            cache.lookup(key, Directive::Auto, deadline),
        );
        let finish = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            leader.complete(Some(Entry {
                body: Bytes::from_static(b"{\"ok\":true}"),
                sse: false,
            }));
        };
        let (outcome, ()) = tokio::join!(waiter, finish);
        let outcome = outcome.expect("the waiter got the leader's answer");
        assert!(matches!(outcome, Lookup::Hit(ref e) if &e.body[..] == b"{\"ok\":true}"));
        // The insert may have become a task of its own; a later call finds the entry.
        let mut later = cache.lookup(key, Directive::Auto, deadline).await;
        for _ in 0..100 {
            if matches!(later, Lookup::Hit(_)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            later = cache.lookup(key, Directive::Auto, deadline).await;
        }
        assert!(matches!(later, Lookup::Hit(_)));
        assert!(matches!(
            cache.lookup(key, Directive::Bypass, deadline).await,
            Lookup::Bypass
        ));
        assert!(matches!(
            cache.lookup(key, Directive::Refresh, deadline).await,
            Lookup::Miss(_)
        ));
    }

    /// An enabled cache of `max_bytes` that caches every call.
    fn sized(max_bytes: u64) -> ResponseCache {
        ResponseCache::new(&CacheConfig {
            max_bytes,
            mode: CacheMode::All,
            ..CacheConfig::default()
        })
        .expect("enabled")
    }

    /// Answers call number `n` (a miss) with `body`; its key.
    async fn answer_call(cache: &ResponseCache, n: &str, body: &Bytes) -> Key {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let key = key_of(cache, &format!(r#"{{"n":"{n}"}}"#), None).expect("key");
        let Lookup::Miss(fill) = cache.lookup(key, Directive::Auto, deadline).await else {
            panic!("a new key misses");
        };
        fill.complete(Some(Entry {
            body: body.clone(),
            sse: false,
        }));
        key
    }

    #[tokio::test]
    async fn a_new_answer_is_kept_even_when_the_cache_is_full() {
        let cache = sized(1024 * 1024);
        let answer = Bytes::from(vec![b'x'; 16 * 1024]);
        // Four times what fits: the cache is full of answers nobody asked for again.
        for n in 0..256 {
            answer_call(&cache, &n.to_string(), &answer).await;
            cache.entries.run_pending_tasks().await;
        }
        // The call a user repeats right away must be answered from the cache.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut kept = 0;
        for n in 256..266 {
            let key = answer_call(&cache, &n.to_string(), &answer).await;
            cache.entries.run_pending_tasks().await;
            kept += usize::from(matches!(
                cache.lookup(key, Directive::Auto, deadline).await,
                Lookup::Hit(_)
            ));
        }
        assert_eq!(kept, 10, "only {kept} of 10 new answers were kept");
    }

    #[tokio::test]
    async fn a_cache_full_of_large_answers_stays_inside_max_bytes() {
        let max_bytes = 1024 * 1024;
        let cache = sized(max_bytes);
        let answer = Bytes::from(vec![b'x'; 100 * 1024]);
        for n in 0..50 {
            answer_call(&cache, &n.to_string(), &answer).await;
        }
        // An answer over an eighth of the cache is not stored at all.
        let huge = answer_call(&cache, "huge", &Bytes::from(vec![b'y'; 200 * 1024])).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (entries, bytes) = cache.usage().await;
        assert!(bytes <= max_bytes, "{bytes} bytes in {entries} entries");
        assert!(entries >= 5, "the cache still holds answers: {entries}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            cache.lookup(huge, Directive::Auto, deadline).await,
            Lookup::Miss(_)
        ));
    }
}

#[cfg(test)]
mod memory_probe {
    use super::*;

    fn rss_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap()
    }

    /// Run alone (RSS is per process): `cargo test --release --lib memory_probe -- --ignored`.
    #[tokio::test]
    #[ignore]
    async fn entry_overhead_is_weighed_honestly() {
        let cache = ResponseCache::new(&CacheConfig::default()).unwrap();
        let before = rss_kb();
        let n = 40_000u64;
        for i in 0..n {
            let entry = Arc::new(Entry {
                body: Bytes::from(vec![b'x'; 1024]),
                sse: false,
            });
            cache.entries.insert(Key(i, i), entry).await;
        }
        cache.entries.run_pending_tasks().await;
        let after = rss_kb();
        // Per entry kept, not per entry inserted: a full cache has evicted the rest.
        let kept = cache.entries.entry_count();
        let overhead = ((after - before) * 1024 / kept).saturating_sub(1024);
        println!("{kept} of {n} entries kept: {overhead} bytes each beyond the 1 KB body");
        assert!(
            overhead <= ENTRY_OVERHEAD as u64,
            "{overhead} > {ENTRY_OVERHEAD}"
        );
    }
}
