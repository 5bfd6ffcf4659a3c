//! A mergeable quantile sketch in the manner of DDSketch (Masson et al., VLDB 2019).
//!
//! Values fall into logarithmic buckets whose bounds grow by `gamma = (1 + a) / (1 - a)` with
//! `a = 1%`, so any quantile is answered within 1% relative error, whatever the distribution.
//! Two sketches merge by adding bucket counts, which is what lets a run's latency percentiles be
//! kept incrementally and combined across runs without keeping the samples.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The relative accuracy every quantile is guaranteed to have.
pub const RELATIVE_ACCURACY: f64 = 0.01;

/// Magnitudes below this count as zero. Keeps bucket indexes small (about -1030 at the bottom)
/// and no latency in milliseconds is meaningfully smaller.
const MIN_INDEXABLE: f64 = 1e-9;

fn gamma() -> f64 {
    (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
}

/// A mergeable summary of a stream of values: count, sum, min, max and quantiles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "SketchRepr", try_from = "SketchRepr")]
pub struct Sketch {
    positive: BTreeMap<i32, u64>,
    /// Keyed by the bucket of the value's magnitude.
    negative: BTreeMap<i32, u64>,
    zeros: u64,
    count: u64,
    sum: f64,
    /// Only meaningful while `count > 0`.
    min: f64,
    max: f64,
}

impl Sketch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one value. NaN and infinities are ignored: they have no bucket and would poison
    /// the sum.
    pub fn add(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        if value.abs() < MIN_INDEXABLE {
            self.zeros += 1;
        } else if value > 0.0 {
            *self.positive.entry(bucket_index(value)).or_default() += 1;
        } else {
            *self.negative.entry(bucket_index(-value)).or_default() += 1;
        }
        self.note_extremes(value, value);
        self.count += 1;
        self.sum += value;
    }

    /// Folds `other` into `self`; afterwards `self` answers as if it had seen both streams.
    pub fn merge(&mut self, other: &Sketch) {
        if other.count == 0 {
            return;
        }
        for (&index, &count) in &other.positive {
            *self.positive.entry(index).or_default() += count;
        }
        for (&index, &count) in &other.negative {
            *self.negative.entry(index).or_default() += count;
        }
        self.zeros += other.zeros;
        self.note_extremes(other.min, other.max);
        self.count += other.count;
        self.sum += other.sum;
    }

    /// The value at quantile `q` (0 ≤ q ≤ 1), within 1% relative error; `None` when empty or
    /// `q` is out of range.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        // Nearest rank: the smallest value with at least a fraction q of the values at or
        // below it, so a p99 over three requests is the slowest one, not the middle one.
        let target = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        let mut found = |count: u64| {
            seen += count;
            seen >= target
        };
        for (&index, &count) in self.negative.iter().rev() {
            if found(count) {
                return Some(self.clamp(-bucket_value(index)));
            }
        }
        if found(self.zeros) {
            return Some(self.clamp(0.0));
        }
        for (&index, &count) in &self.positive {
            if found(count) {
                return Some(self.clamp(bucket_value(index)));
            }
        }
        Some(self.max)
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn note_extremes(&mut self, low: f64, high: f64) {
        if self.count == 0 {
            self.min = low;
            self.max = high;
        } else {
            self.min = self.min.min(low);
            self.max = self.max.max(high);
        }
    }

    /// Bucket midpoints can lie outside what was actually seen; the true extremes are known.
    fn clamp(&self, value: f64) -> f64 {
        value.clamp(self.min, self.max)
    }
}

/// Bucket `i` holds magnitudes in `(gamma^(i-1), gamma^i]`.
fn bucket_index(magnitude: f64) -> i32 {
    // Finite magnitudes ≥ MIN_INDEXABLE give indexes in about [-1030, 35200]: the cast is exact.
    (magnitude.ln() / gamma().ln()).ceil() as i32
}

/// The representative of bucket `i`: within `RELATIVE_ACCURACY` of every value in it.
fn bucket_value(index: i32) -> f64 {
    let gamma = gamma();
    2.0 * (f64::from(index) * gamma.ln()).exp() / (gamma + 1.0)
}

/// The stored form: buckets as `[index, count]` pairs, extremes `null` while empty (JSON has no
/// infinities, and a made-up 0 would be a lie).
#[derive(Serialize, Deserialize)]
struct SketchRepr {
    count: u64,
    sum: f64,
    #[serde(default)]
    min: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    zeros: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    positive: Vec<(i32, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    negative: Vec<(i32, u64)>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl From<Sketch> for SketchRepr {
    fn from(sketch: Sketch) -> Self {
        SketchRepr {
            count: sketch.count,
            sum: sketch.sum,
            min: sketch.min(),
            max: sketch.max(),
            zeros: sketch.zeros,
            positive: sketch.positive.into_iter().collect(),
            negative: sketch.negative.into_iter().collect(),
        }
    }
}

/// Why a stored sketch was refused.
#[derive(Debug, thiserror::Error)]
pub enum SketchError {
    #[error("sketch count {count} does not match its buckets ({buckets})")]
    CountMismatch { count: u64, buckets: u64 },
    #[error("a non-empty sketch needs finite min and max")]
    MissingExtremes,
}

impl TryFrom<SketchRepr> for Sketch {
    type Error = SketchError;

    fn try_from(repr: SketchRepr) -> Result<Self, SketchError> {
        let positive: BTreeMap<i32, u64> = repr.positive.into_iter().collect();
        let negative: BTreeMap<i32, u64> = repr.negative.into_iter().collect();
        let buckets = positive
            .values()
            .chain(negative.values())
            .fold(repr.zeros, |total, count| total.saturating_add(*count));
        if buckets != repr.count {
            return Err(SketchError::CountMismatch {
                count: repr.count,
                buckets,
            });
        }
        let (min, max) = match (repr.min, repr.max) {
            (Some(min), Some(max)) if min.is_finite() && max.is_finite() => (min, max),
            _ if repr.count == 0 => (0.0, 0.0),
            _ => return Err(SketchError::MissingExtremes),
        };
        Ok(Sketch {
            positive,
            negative,
            zeros: repr.zeros,
            count: repr.count,
            sum: repr.sum,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic xorshift generator: tests need no outside randomness.
    struct Rng(u64);

    impl Rng {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1]
    }

    fn assert_within_accuracy(values: &[f64]) {
        let mut sketch = Sketch::new();
        values.iter().for_each(|v| sketch.add(*v));
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let expected = exact_quantile(&sorted, q);
            let got = sketch.quantile(q).unwrap();
            let error = (got - expected).abs() / expected.abs().max(f64::MIN_POSITIVE);
            assert!(
                error <= RELATIVE_ACCURACY + 1e-12,
                "q={q}: expected {expected}, got {got} ({error})"
            );
        }
    }

    #[test]
    fn uniform_quantiles_within_one_percent() {
        let values: Vec<f64> = (1..=10_000).map(f64::from).collect();
        assert_within_accuracy(&values);
    }

    #[test]
    fn exponential_quantiles_within_one_percent() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let values: Vec<f64> = (0..20_000)
            .map(|_| -(1.0 - rng.unit()).ln() * 120.0)
            .collect();
        assert_within_accuracy(&values);
    }

    #[test]
    fn heavy_tailed_quantiles_within_one_percent() {
        let mut rng = Rng(42);
        // Pareto-like: spans several orders of magnitude, as real latencies do.
        let values: Vec<f64> = (0..20_000)
            .map(|_| 0.5 / (1.0 - rng.unit()).powf(0.8))
            .collect();
        assert_within_accuracy(&values);
    }

    #[test]
    fn negative_and_zero_values_are_ordered() {
        let mut sketch = Sketch::new();
        for v in [-100.0, -1.0, 0.0, 0.0, 1.0, 100.0] {
            sketch.add(v);
        }
        assert_eq!(sketch.quantile(0.0), Some(-100.0));
        assert!((sketch.quantile(0.2).unwrap() + 1.0).abs() <= 0.0101);
        assert_eq!(sketch.quantile(0.5), Some(0.0));
        assert_eq!(sketch.quantile(1.0), Some(100.0));
    }

    #[test]
    fn merge_of_two_halves_equals_the_whole() {
        let mut rng = Rng(7);
        // Integral values keep the sum exact whatever the order of addition.
        let values: Vec<f64> = (0..5_000).map(|_| (rng.unit() * 1e6).round()).collect();
        let (mut whole, mut left, mut right) = (Sketch::new(), Sketch::new(), Sketch::new());
        values.iter().for_each(|v| whole.add(*v));
        values[..2_000].iter().for_each(|v| left.add(*v));
        values[2_000..].iter().for_each(|v| right.add(*v));
        left.merge(&right);
        assert_eq!(left, whole);
    }

    #[test]
    fn empty_sketch_answers_nothing() {
        let mut sketch = Sketch::new();
        assert_eq!(sketch.quantile(0.5), None);
        assert_eq!(sketch.mean(), None);
        sketch.merge(&Sketch::new());
        assert!(sketch.is_empty());
        sketch.add(f64::NAN);
        sketch.add(f64::INFINITY);
        assert!(sketch.is_empty());
    }

    #[test]
    fn out_of_range_quantile_is_none() {
        let mut sketch = Sketch::new();
        sketch.add(3.0);
        assert_eq!(sketch.quantile(1.5), None);
        assert_eq!(sketch.quantile(f64::NAN), None);
        assert_eq!(sketch.quantile(0.5), Some(3.0));
        assert_eq!(sketch.mean(), Some(3.0));
    }

    #[test]
    fn serde_round_trip_is_compact_and_exact() {
        let mut sketch = Sketch::new();
        for v in [0.0, 1.5, 1.5, 250.0, -2.0] {
            sketch.add(v);
        }
        let json = serde_json::to_string(&sketch).unwrap();
        assert!(json.contains("\"positive\":[["), "{json}");
        let back: Sketch = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sketch);

        let empty = serde_json::to_string(&Sketch::new()).unwrap();
        assert_eq!(empty, r#"{"count":0,"sum":0.0,"min":null,"max":null}"#);
        assert_eq!(
            serde_json::from_str::<Sketch>(&empty).unwrap(),
            Sketch::new()
        );
    }

    #[test]
    fn inconsistent_stored_sketch_is_refused() {
        let bad = r#"{"count":3,"sum":1.0,"min":1.0,"max":1.0,"positive":[[0,1]]}"#;
        assert!(serde_json::from_str::<Sketch>(bad).is_err());
        let no_extremes = r#"{"count":1,"sum":1.0,"positive":[[0,1]]}"#;
        assert!(serde_json::from_str::<Sketch>(no_extremes).is_err());
    }
}
