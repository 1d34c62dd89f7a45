//! The arrival trace: seeded, Zipf-popular functions, Poisson arrivals with bursts.

/// Zipf exponent of function popularity.
pub const ZIPF_EXPONENT: f64 = 1.1;
/// Arrival rate during a burst, as a multiple of the base rate.
pub const BURST_FACTOR: f64 = 5.0;
/// Length of one burst.
pub const BURST_S: f64 = 2.0;
/// One burst per this much trace.
pub const BURST_EVERY_S: f64 = 15.0;

/// splitmix64: small, seedable, and the same on every host.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed gap of a Poisson process at `rate` per second.
    fn exp(&mut self, rate: f64) -> f64 {
        -(1.0 - self.unit()).ln() / rate
    }
}

pub struct TraceParams {
    pub functions: usize,
    pub duration_s: f64,
    pub rate: f64,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Arrival {
    /// Seconds from the start of the trace.
    pub at_s: f64,
    /// Index of the function (0 is the most popular).
    pub function: usize,
    /// The request sent to the function.
    pub n: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Burst {
    pub start_s: f64,
    pub end_s: f64,
}

pub struct Trace {
    pub arrivals: Vec<Arrival>,
    pub bursts: Vec<Burst>,
    pub duration_s: f64,
    pub functions: usize,
}

pub fn generate(p: &TraceParams) -> Trace {
    let mut rng = Rng(p.seed);
    let weights: Vec<f64> = (1..=p.functions)
        .map(|r| 1.0 / (r as f64).powf(ZIPF_EXPONENT))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let pick = |u: f64| cdf.partition_point(|&c| c <= u).min(p.functions - 1);

    let count = ((p.duration_s / BURST_EVERY_S).round() as usize).max(1);
    let len = BURST_S.min(p.duration_s);
    let mut bursts: Vec<Burst> = (0..count)
        .map(|_| {
            let start_s = rng.unit() * (p.duration_s - len);
            Burst {
                start_s,
                end_s: start_s + len,
            }
        })
        .collect();
    bursts.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));

    // The rate is constant between these edges; a Poisson process restarted at each edge is exact there
    // (exponential gaps have no memory).
    let mut edges = vec![0.0, p.duration_s];
    for b in &bursts {
        edges.extend([b.start_s, b.end_s]);
    }
    edges.sort_by(f64::total_cmp);
    edges.dedup();
    let mut arrivals = Vec::new();
    for w in edges.windows(2) {
        let (from, to) = (w[0], w[1]);
        let mid = (from + to) / 2.0;
        let bursting = bursts.iter().any(|b| b.start_s <= mid && mid < b.end_s);
        let rate = if bursting {
            p.rate * BURST_FACTOR
        } else {
            p.rate
        };
        let mut t = from;
        loop {
            t += rng.exp(rate);
            if t >= to {
                break;
            }
            let function = pick(rng.unit());
            arrivals.push(Arrival {
                at_s: t,
                function,
                n: rng.next_u64() % 1_000_000_000,
            });
        }
    }
    Trace {
        arrivals,
        bursts,
        duration_s: p.duration_s,
        functions: p.functions,
    }
}

impl Trace {
    /// The most arrivals within any `window_s` seconds (arrivals are sorted by time).
    pub fn peak_in_window(&self, window_s: f64) -> usize {
        let mut best = 0;
        let mut first = 0;
        for (last, a) in self.arrivals.iter().enumerate() {
            while a.at_s - self.arrivals[first].at_s >= window_s {
                first += 1;
            }
            best = best.max(last + 1 - first);
        }
        best
    }

    pub fn per_function(&self) -> Vec<usize> {
        let mut counts = vec![0; self.functions];
        for a in &self.arrivals {
            counts[a.function] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: u64, duration_s: f64) -> TraceParams {
        TraceParams {
            functions: 20,
            duration_s,
            rate: 10.0,
            seed,
        }
    }

    #[test]
    fn same_seed_same_trace() {
        let a = generate(&params(7, 60.0));
        let b = generate(&params(7, 60.0));
        assert_eq!(a.arrivals, b.arrivals);
        assert_eq!(a.bursts, b.bursts);
        let c = generate(&params(8, 60.0));
        assert_ne!(a.arrivals, c.arrivals);
    }

    #[test]
    fn arrivals_are_sorted_inside_the_trace() {
        let t = generate(&params(1, 60.0));
        assert!(t.arrivals.windows(2).all(|w| w[0].at_s <= w[1].at_s));
        assert!(t
            .arrivals
            .iter()
            .all(|a| a.at_s >= 0.0 && a.at_s < 60.0 && a.function < 20));
        // 4 bursts of 2 s at 5x: about 10 * (52 + 8 * 5) = 920 arrivals.
        assert_eq!(t.bursts.len(), 4);
        let n = t.arrivals.len() as f64;
        assert!((700.0..1150.0).contains(&n), "{n} arrivals");
    }

    #[test]
    fn popularity_is_skewed() {
        let t = generate(&params(3, 300.0));
        let counts = t.per_function();
        let total: usize = counts.iter().sum();
        // Zipf 1.1 over 20: the top 3 take about half, the bottom 10 under a fifth.
        let top3: usize = counts[..3].iter().sum();
        let tail: usize = counts[10..].iter().sum();
        assert!(top3 * 100 > total * 40, "{counts:?}");
        assert!(tail * 100 < total * 20, "{counts:?}");
        assert!(counts[0] > counts[19] * 10, "{counts:?}");
        // The tail is rare, not absent.
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    }

    #[test]
    fn bursts_raise_the_rate() {
        for seed in 0..5 {
            let t = generate(&params(seed, 60.0));
            let inside = |a: &Arrival| {
                t.bursts
                    .iter()
                    .any(|b| b.start_s <= a.at_s && a.at_s < b.end_s)
            };
            let burst_s: f64 = {
                // Bursts may overlap: measure their union on a fine grid.
                let steps = 60_000;
                (0..steps)
                    .filter(|&i| {
                        let at_s = i as f64 * 60.0 / steps as f64;
                        inside(&Arrival {
                            at_s,
                            function: 0,
                            n: 0,
                        })
                    })
                    .count() as f64
                    * 60.0
                    / steps as f64
            };
            let n_in = t.arrivals.iter().filter(|a| inside(a)).count() as f64;
            let n_out = t.arrivals.len() as f64 - n_in;
            let rate_in = n_in / burst_s;
            let rate_out = n_out / (60.0 - burst_s);
            assert!(
                rate_in > 2.5 * rate_out,
                "seed {seed}: {rate_in} vs {rate_out}"
            );
            assert!(t.peak_in_window(1.0) >= 30, "seed {seed}");
        }
        // A CI-sized trace still has its burst.
        let short = generate(&params(1, 5.0));
        assert_eq!(short.bursts.len(), 1);
        assert!(short.bursts[0].end_s <= 5.0);
    }

    #[test]
    fn peak_window_counts_arrivals() {
        let t = Trace {
            arrivals: [0.0, 0.1, 0.2, 1.5, 1.6, 1.7, 1.8, 3.0]
                .iter()
                .map(|&at_s| Arrival {
                    at_s,
                    function: 0,
                    n: 0,
                })
                .collect(),
            bursts: Vec::new(),
            duration_s: 4.0,
            functions: 1,
        };
        assert_eq!(t.peak_in_window(1.0), 4);
        assert_eq!(t.peak_in_window(0.05), 1);
    }
}
