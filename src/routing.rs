//! `[[models]]` routes: a model name served by several deployments (weighted), with fallback
//! models, retries with exponential backoff and jitter, and a circuit breaker per deployment.
//!
//! The router turns a model name into a [`Plan`]: the deployments to try, in order. The proxy
//! walks the plan before anything reached the client, so a retry never follows a streamed byte.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};

use crate::config::{ModelConfig, RoutingConfig};
use crate::providers::{Provider, Route};

/// The `provider` of a run whose model is a `[[models]]` name: which deployment served a call is
/// the gateway's business, not part of the configuration the client chose.
pub const GROUP_PROVIDER: &str = "models";

/// Retries, backoff and breaker settings, shared by every group.
#[derive(Debug, Clone)]
pub struct Policy {
    pub retries: u32,
    pub backoff: Duration,
    pub breaker_failures: u32,
    pub cooldown: Duration,
}

impl Policy {
    pub fn from_config(config: &RoutingConfig) -> Policy {
        Policy {
            retries: config.retries,
            backoff: Duration::from_millis(config.backoff_ms),
            breaker_failures: config.breaker_failures.max(1),
            cooldown: Duration::from_millis(config.breaker_cooldown_ms),
        }
    }

    /// Wait before retry number `retry` (1-based): `backoff × 2^(retry-1)`, jittered down to
    /// half of it at random so that clients retrying together spread out.
    pub fn backoff(&self, retry: u32) -> Duration {
        let full = self.backoff.saturating_mul(
            1u32.checked_shl(retry.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let half = full / 2;
        half + half.mul_f64((random() % 1000) as f64 / 1000.0)
    }
}

/// A circuit breaker: closed until `failures` calls in a row failed, then open for the
/// cool-down; after it, one trial call is let through (half-open) and decides.
#[derive(Debug, Default)]
pub struct Breaker {
    consecutive_failures: AtomicU32,
    /// Milliseconds since the router started when the circuit may close again; 0: closed.
    open_until_ms: AtomicU64,
}

impl Breaker {
    /// Whether a call may go now; in the half-open state only the first asker gets the trial.
    fn try_pass(&self, now_ms: u64, cooldown: Duration) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if now_ms < until {
            return false;
        }
        let next = now_ms + cooldown.as_millis() as u64;
        self.open_until_ms
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn is_available(&self, now_ms: u64) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        until == 0 || now_ms >= until
    }

    fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
        self.open_until_ms.store(0, Ordering::Release);
    }

    fn failed(&self, now_ms: u64, policy: &Policy) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= policy.breaker_failures {
            let until = now_ms + policy.cooldown.as_millis() as u64;
            self.open_until_ms.store(until.max(1), Ordering::Release);
        }
    }

    fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis(
            self.open_until_ms
                .load(Ordering::Acquire)
                .saturating_sub(now_ms),
        )
    }
}

pub struct Deployment {
    pub route: Route,
    weight: u32,
    breaker: Breaker,
}

pub struct ModelGroup {
    pub name: String,
    deployments: Vec<Arc<Deployment>>,
    fallbacks: Vec<String>,
}

impl ModelGroup {
    pub fn fallbacks(&self) -> &[String] {
        &self.fallbacks
    }

    /// `openai/gpt-4o-mini ×3, azure/gpt-4o-mini ×1; then claude-haiku-4-5`.
    pub fn describe(&self) -> String {
        let deployments: Vec<String> = self
            .deployments
            .iter()
            .map(|d| {
                format!(
                    "{}/{} ×{}",
                    d.route.provider.name(),
                    d.route.model,
                    d.weight
                )
            })
            .collect();
        let mut text = deployments.join(", ");
        if !self.fallbacks.is_empty() {
            text.push_str(&format!("; then {}", self.fallbacks.join(", ")));
        }
        text
    }
}

/// One deployment to try; `deployment` is `None` for plain provider routes.
#[derive(Clone)]
pub struct Candidate {
    pub route: Route,
    deployment: Option<Arc<Deployment>>,
}

/// What to try for one call, in order.
pub struct Plan {
    /// The `[[models]]` name, when the model is one.
    pub group: Option<String>,
    pub candidates: Vec<Candidate>,
    /// Retries per candidate (0 for plain provider routes: their answers pass through as is).
    pub retries: u32,
}

impl Plan {
    pub fn single(route: Route) -> Plan {
        Plan {
            group: None,
            candidates: vec![Candidate {
                route,
                deployment: None,
            }],
            retries: 0,
        }
    }

    /// The route a plan serves from when nothing failed: for run identity, cache keys, traces.
    pub fn first(&self) -> Option<&Route> {
        self.candidates.first().map(|c| &c.route)
    }
}

/// The `[[models]]` table, and the clock its breakers count in.
pub struct Groups {
    groups: HashMap<String, Arc<ModelGroup>>,
    pub policy: Policy,
    epoch: Instant,
}

#[derive(Debug, thiserror::Error)]
#[error("models entry {model:?}: {message}")]
pub struct GroupError {
    pub model: String,
    pub message: String,
}

impl Groups {
    pub fn new(
        models: &[ModelConfig],
        config: &RoutingConfig,
        provider: impl Fn(&str) -> Option<Arc<dyn Provider>>,
    ) -> Result<Groups, GroupError> {
        let mut groups = HashMap::new();
        for model in models {
            let mut deployments = Vec::with_capacity(model.deployments.len());
            for deployment in &model.deployments {
                let found = provider(&deployment.provider).ok_or_else(|| GroupError {
                    model: model.name.clone(),
                    message: format!("no provider named {:?}", deployment.provider),
                })?;
                deployments.push(Arc::new(Deployment {
                    route: Route {
                        provider: found,
                        model: deployment.model.clone(),
                    },
                    weight: deployment.weight.max(1),
                    breaker: Breaker::default(),
                }));
            }
            let group = ModelGroup {
                name: model.name.clone(),
                deployments,
                fallbacks: model.fallbacks.clone(),
            };
            groups.insert(model.name.clone(), Arc::new(group));
        }
        Ok(Groups {
            groups,
            policy: Policy::from_config(config),
            epoch: Instant::now(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ModelGroup>> {
        self.groups.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &Arc<ModelGroup>> {
        self.groups.values()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The deployments of `group` in weighted random order, then each fallback's: a fallback
    /// that is a group contributes its deployments, any other name the route `resolve` gives.
    /// Fallbacks of fallbacks are not followed (no cycles, bounded plans).
    pub fn plan(&self, group: &ModelGroup, resolve: impl Fn(&str) -> Option<Route>) -> Plan {
        let mut candidates = weighted_order(&group.deployments);
        for fallback in &group.fallbacks {
            match self.groups.get(fallback) {
                Some(other) => candidates.extend(weighted_order(&other.deployments)),
                None => candidates.extend(resolve(fallback).map(|route| Candidate {
                    route,
                    deployment: None,
                })),
            }
        }
        Plan {
            group: Some(group.name.clone()),
            candidates,
            retries: self.policy.retries,
        }
    }

    /// Whether the candidate may be called now (takes the half-open trial when it is due).
    pub fn admit(&self, candidate: &Candidate) -> bool {
        candidate
            .deployment
            .as_ref()
            .is_none_or(|d| d.breaker.try_pass(self.now_ms(), self.policy.cooldown))
    }

    /// Whether any of `candidates` would be admitted now (without taking a trial).
    pub fn any_available(&self, candidates: &[Candidate]) -> bool {
        let now = self.now_ms();
        candidates.iter().any(|c| {
            c.deployment
                .as_ref()
                .is_none_or(|d| d.breaker.is_available(now))
        })
    }

    pub fn record(&self, candidate: &Candidate, success: bool) {
        if let Some(deployment) = &candidate.deployment {
            if success {
                deployment.breaker.succeeded();
            } else {
                deployment.breaker.failed(self.now_ms(), &self.policy);
            }
        }
    }

    /// How long until the first of `candidates` closes its circuit again.
    pub fn soonest_reopening(&self, candidates: &[Candidate]) -> Duration {
        let now = self.now_ms();
        candidates
            .iter()
            .filter_map(|c| c.deployment.as_ref())
            .map(|d| d.breaker.remaining(now))
            .min()
            .unwrap_or_default()
    }
}

/// Deployments ordered by weighted sampling without replacement.
fn weighted_order(deployments: &[Arc<Deployment>]) -> Vec<Candidate> {
    let mut left: Vec<&Arc<Deployment>> = deployments.iter().collect();
    let mut order = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let total: u64 = left.iter().map(|d| u64::from(d.weight)).sum();
        let mut pick = random() % total.max(1);
        let index = left
            .iter()
            .position(|d| {
                let weight = u64::from(d.weight);
                if pick < weight {
                    return true;
                }
                pick -= weight;
                false
            })
            .unwrap_or(0);
        let chosen = left.remove(index);
        order.push(Candidate {
            route: chosen.route.clone(),
            deployment: Some(chosen.clone()),
        });
    }
    order
}

/// A random number good enough for load spreading and jitter: std's per-process random SipHash
/// keys over a counter (no crate needed for this).
fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEYS.get_or_init(Default::default)
        .hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Answers worth another try: rate limits, server errors, overload (Anthropic's 529).
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// The wait an answer asks for: `retry-after-ms` (OpenAI), else `retry-after` in seconds.
/// HTTP-date forms are ignored (the backoff applies).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (value.is_finite() && value >= 0.0).then_some(value)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    number("retry-after").map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(failures: u32, cooldown_ms: u64) -> Policy {
        Policy {
            retries: 2,
            backoff: Duration::from_millis(100),
            breaker_failures: failures,
            cooldown: Duration::from_millis(cooldown_ms),
        }
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_lets_one_trial_through() {
        let policy = policy(3, 1000);
        let breaker = Breaker::default();
        for now in [0, 1] {
            breaker.failed(now, &policy);
            assert!(
                breaker.try_pass(now, policy.cooldown),
                "still closed at {now}"
            );
        }
        breaker.failed(2, &policy);
        assert!(
            !breaker.try_pass(500, policy.cooldown),
            "open during the cool-down"
        );
        assert!(
            breaker.try_pass(1002, policy.cooldown),
            "the trial after the cool-down"
        );
        assert!(
            !breaker.try_pass(1003, policy.cooldown),
            "only one trial at a time"
        );
        breaker.succeeded();
        assert!(
            breaker.try_pass(1004, policy.cooldown),
            "closed by a success"
        );
        // A success in between resets the count.
        breaker.failed(2000, &policy);
        breaker.succeeded();
        breaker.failed(2001, &policy);
        breaker.failed(2002, &policy);
        assert!(breaker.try_pass(2003, policy.cooldown));
    }

    #[test]
    fn backoff_doubles_with_jitter_within_half() {
        let policy = policy(5, 1000);
        for (retry, full_ms) in [(1, 100), (2, 200), (3, 400)] {
            for _ in 0..50 {
                let wait = policy.backoff(retry).as_millis() as u64;
                assert!(
                    (full_ms / 2..=full_ms).contains(&wait),
                    "retry {retry}: {wait} ms"
                );
            }
        }
        assert!(
            policy.backoff(64) >= Duration::from_millis(100),
            "no overflow panic"
        );
    }

    #[test]
    fn retry_after_reads_milliseconds_then_seconds() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(*k, v.parse().expect("header"));
            }
            map
        };
        let cases = [
            (headers(&[("retry-after", "2")]), Some(2000)),
            (headers(&[("retry-after", "0.25")]), Some(250)),
            (
                headers(&[("retry-after-ms", "40"), ("retry-after", "9")]),
                Some(40),
            ),
            (
                headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]),
                None,
            ),
            (headers(&[("retry-after", "-1")]), None),
            (headers(&[]), None),
        ];
        for (map, expected) in cases {
            assert_eq!(
                retry_after(&map).map(|d| d.as_millis() as u64),
                expected,
                "{map:?}"
            );
        }
    }

    #[test]
    fn retryable_statuses() {
        for (status, retry) in [
            (429, true),
            (500, true),
            (503, true),
            (529, true),
            (400, false),
            (401, false),
            (404, false),
            (200, false),
        ] {
            assert_eq!(
                is_retryable(StatusCode::from_u16(status).expect("status")),
                retry,
                "{status}"
            );
        }
    }
}
