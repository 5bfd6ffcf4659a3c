//! The two things the harness reads from flowgate's `GET /metrics`: the overhead histogram and
//! the dropped-traces counter.

/// One scrape.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// `flowgate_overhead_seconds` cumulative buckets: (upper bound in seconds, count).
    pub overhead: Vec<(f64, f64)>,
    pub traces_dropped: f64,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if let Some(labels) = name.strip_prefix("flowgate_overhead_seconds_bucket{") {
                if let Some(le) = label(labels, "le").and_then(bound) {
                    scrape.overhead.push((le, value));
                }
            } else if name == "flowgate_traces_dropped_total" {
                scrape.traces_dropped = value;
            }
        }
        scrape.overhead.sort_by(|a, b| a.0.total_cmp(&b.0));
        scrape
    }

    /// What happened between `earlier` and `self`: bucket counts and counters subtracted.
    pub fn since(&self, earlier: &Scrape) -> Scrape {
        let overhead = self
            .overhead
            .iter()
            .map(|&(le, count)| {
                let before = earlier.overhead.iter().find(|(l, _)| *l == le);
                (le, count - before.map_or(0.0, |(_, c)| *c))
            })
            .collect();
        Scrape {
            overhead,
            traces_dropped: self.traces_dropped - earlier.traces_dropped,
        }
    }

    /// The q-quantile of the overhead in milliseconds, interpolated linearly inside its bucket as
    /// Prometheus' `histogram_quantile` does. Neighbouring bounds are at most 5/3 apart, so this
    /// is an estimate within that factor; `None` when nothing was observed.
    pub fn overhead_quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.overhead.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, count) in &self.overhead {
            if count >= rank {
                if le.is_infinite() {
                    return Some(lower * 1e3);
                }
                let inside = count - below;
                let fraction = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some((lower + (le - lower) * fraction) * 1e3);
            }
            (lower, below) = (le, count);
        }
        None
    }
}

/// The value of `key="..."` in a label set.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

fn bound(le: &str) -> Option<f64> {
    match le {
        "+Inf" => Some(f64::INFINITY),
        _ => le.parse().ok(),
    }
}
