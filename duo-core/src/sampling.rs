//! Logits processing and sampling.
//!
//! [`SamplingParams::distribution`] turns raw logits into the *processed*
//! next-token distribution `p` (temperature, top-k, top-p; greedy = point
//! mass on the argmax). Verification needs those probabilities, so the
//! distribution is a value of its own ([`Distribution`]), sampled with an
//! explicit per-generation RNG ([`Rng`]); there is no global random state.

use rand::{Rng as _, SeedableRng};

/// The per-generation random number generator. ChaCha8 is stable across
/// platforms and crate versions, so a seed always gives the same tokens.
pub type Rng = rand_chacha::ChaCha8Rng;

/// A generator seeded from `seed` (same seed, same stream).
pub fn rng_from_seed(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

/// How logits become the distribution tokens are drawn from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (point mass on the argmax). Must be finite and >= 0.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches
    /// `top_p`; 1.0 disables. Must lie in (0, 1].
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

/// A sampling setting that cannot be used; the message says what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0 (0 = greedy), got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1] (1 disables it), got {0}")]
    TopP(f32),
}

impl SamplingParams {
    /// Greedy decoding: temperature 0.
    pub const fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    /// Sampling at `temperature` with no truncation.
    pub const fn with_temperature(temperature: f32) -> Self {
        Self {
            temperature,
            top_k: 0,
            top_p: 1.0,
        }
    }

    /// True when the processed distribution is a point mass on the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks the settings; call before using them on a request path.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }

    /// The processed distribution for one position's logits.
    ///
    /// Invariants of the result: non-empty (for non-empty `logits`), sorted
    /// by probability descending (ties by token id ascending), probabilities
    /// positive and summing to 1. Non-finite logits are treated as -inf; if
    /// every logit is non-finite the result is a point mass on token 0.
    pub fn distribution(&self, logits: &[f32]) -> Distribution {
        if logits.is_empty() {
            return Distribution::point(0);
        }
        if self.is_greedy() {
            return Distribution::point(argmax(logits));
        }
        let inv_t = 1.0 / f64::from(self.temperature);
        let max = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return Distribution::point(0);
        }
        let mut entries: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, ((f64::from(l) - f64::from(max)) * inv_t).exp()))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        entries.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.top_k > 0 && entries.len() > self.top_k {
            entries.truncate(self.top_k);
        }
        if self.top_p < 1.0 {
            let total: f64 = entries.iter().map(|e| e.1).sum();
            let want = f64::from(self.top_p) * total;
            let mut acc = 0.0;
            let mut keep = entries.len();
            for (i, e) in entries.iter().enumerate() {
                acc += e.1;
                if acc >= want {
                    keep = i + 1;
                    break;
                }
            }
            entries.truncate(keep);
        }
        Distribution::from_weights(entries)
    }
}

/// Index of the largest finite logit (lowest index on ties; 0 if none is finite).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// The `n` most likely tokens under softmax(`logits`) (temperature 1) with
/// their exact probabilities, most likely first (ties by token id). Costs
/// one pass over the logits plus a selection, no full sort: the drafting
/// policy only needs the top candidates.
pub fn top_softmax(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || n == 0 {
        return Vec::new();
    }
    let mut z = 0f64;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_finite() {
            continue;
        }
        z += f64::from(l - max).exp();
        if top.len() < n || l > top[top.len() - 1].1 {
            let pos = top.partition_point(|e| e.1 >= l);
            top.insert(pos, (i as u32, l));
            top.truncate(n);
        }
    }
    top.into_iter()
        .map(|(t, l)| (t, (f64::from(l - max).exp() / z) as f32))
        .collect()
}

/// A processed next-token distribution over its support.
///
/// Invariants: `entries` is non-empty, sorted by probability descending
/// (ties by token id), every probability is > 0 and they sum to 1 (up to
/// rounding). Tokens outside the support have probability 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    entries: Vec<(u32, f32)>,
}

impl Distribution {
    /// Point mass on `token`.
    pub fn point(token: u32) -> Self {
        Self {
            entries: vec![(token, 1.0)],
        }
    }

    /// Normalises non-negative weights; zero weights are dropped, the rest is
    /// sorted. An empty or all-zero input gives a point mass on token 0.
    pub fn from_weights(mut weights: Vec<(u32, f64)>) -> Self {
        weights.retain(|w| w.1 > 0.0 && w.1.is_finite());
        let total: f64 = weights.iter().map(|w| w.1).sum();
        if weights.is_empty() || total <= 0.0 {
            return Self::point(0);
        }
        weights.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Self {
            entries: weights
                .into_iter()
                .map(|(t, w)| (t, (w / total) as f32))
                .collect(),
        }
    }

    /// (token, probability) pairs, most likely first.
    pub fn entries(&self) -> &[(u32, f32)] {
        &self.entries
    }

    /// The most likely token.
    pub fn argmax(&self) -> u32 {
        self.entries[0].0
    }

    /// Probability of `token` (0 outside the support).
    pub fn prob(&self, token: u32) -> f32 {
        self.entries
            .iter()
            .find(|e| e.0 == token)
            .map_or(0.0, |e| e.1)
    }

    /// True for a point mass (sampling it consumes no randomness).
    pub fn is_point(&self) -> bool {
        self.entries.len() == 1
    }

    /// Draws a token. A point mass returns its token without touching `rng`,
    /// so greedy decoding is independent of the RNG.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        if self.is_point() {
            return self.entries[0].0;
        }
        let u: f64 = rng.random::<f64>();
        let mut acc = 0.0f64;
        for &(t, p) in &self.entries {
            acc += f64::from(p);
            if u < acc {
                return t;
            }
        }
        // Rounding left u above the accumulated mass: the last supported token.
        self.entries[self.entries.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, -1.0, 2.5]
    }

    #[test]
    fn greedy_is_point_mass_on_argmax() {
        let d = SamplingParams::greedy().distribution(&logits());
        assert_eq!(d.entries(), &[(1, 1.0)]);
        let top1 = SamplingParams {
            temperature: 0.8,
            top_k: 1,
            top_p: 1.0,
        };
        assert_eq!(top1.distribution(&logits()).argmax(), 1);
    }

    #[test]
    fn temperature_matches_softmax() {
        let l = logits();
        let d = SamplingParams::with_temperature(0.5).distribution(&l);
        let z: f64 = l.iter().map(|&x| (f64::from(x) / 0.5).exp()).sum();
        for (i, &x) in l.iter().enumerate() {
            let want = (f64::from(x) / 0.5).exp() / z;
            assert!((f64::from(d.prob(i as u32)) - want).abs() < 1e-6);
        }
        let total: f32 = d.entries().iter().map(|e| e.1).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
        };
        let d = p.distribution(&logits());
        let ids: Vec<u32> = d.entries().iter().map(|e| e.0).collect();
        assert_eq!(ids, vec![1, 5, 2]);
        // Softmax of [3, 2.5, 2] is [0.506, 0.307, 0.186]: top_p 0.6 keeps 2.
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 0.6,
        };
        let ids: Vec<u32> = p
            .distribution(&logits())
            .entries()
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(ids, vec![1, 5]);
    }

    #[test]
    fn non_finite_logits_are_ignored() {
        let d = SamplingParams::with_temperature(1.0).distribution(&[f32::NAN, 1.0, f32::INFINITY]);
        assert_eq!(d.entries(), &[(1, 1.0)]);
        let d = SamplingParams::with_temperature(1.0).distribution(&[f32::NAN]);
        assert_eq!(d.argmax(), 0);
    }

    #[test]
    fn validate_rejects_bad_settings() {
        assert!(SamplingParams::with_temperature(-1.0).validate().is_err());
        assert!(
            SamplingParams::with_temperature(f32::NAN)
                .validate()
                .is_err()
        );
        let mut p = SamplingParams::greedy();
        p.top_p = 0.0;
        assert!(p.validate().is_err());
        p.top_p = 1.5;
        assert!(p.validate().is_err());
    }

    /// Empirical frequencies match the processed distribution (chi-square).
    #[test]
    fn sampling_matches_distribution_chi_square() {
        let settings = [
            SamplingParams::with_temperature(1.0),
            SamplingParams::with_temperature(0.7),
            SamplingParams {
                temperature: 1.0,
                top_k: 4,
                top_p: 1.0,
            },
            SamplingParams {
                temperature: 0.9,
                top_k: 0,
                top_p: 0.8,
            },
        ];
        for (si, s) in settings.iter().enumerate() {
            let d = s.distribution(&logits());
            let mut rng = rng_from_seed(42 + si as u64);
            let n = 20_000;
            let mut counts = vec![0u32; 6];
            for _ in 0..n {
                counts[d.sample(&mut rng) as usize] += 1;
            }
            let stat =
                crate::stats::chi_square(&counts, &(0..6).map(|t| d.prob(t)).collect::<Vec<_>>());
            assert!(stat.p_value > 0.01, "setting {s:?}: {stat:?}");
        }
    }

    #[test]
    fn top_softmax_matches_full_distribution() {
        let l = logits();
        let full = SamplingParams::with_temperature(1.0).distribution(&l);
        let top = top_softmax(&l, 3);
        assert_eq!(top.len(), 3);
        for (e, f) in top.iter().zip(full.entries()) {
            assert_eq!(e.0, f.0);
            assert!((e.1 - f.1).abs() < 1e-6);
        }
        assert!(top_softmax(&[f32::NAN], 3).is_empty());
        assert_eq!(top_softmax(&l, 10).len(), 6);
    }

    #[test]
    fn same_seed_same_tokens() {
        let d = SamplingParams::with_temperature(1.0).distribution(&logits());
        let draw = |seed| {
            let mut r = rng_from_seed(seed);
            (0..50).map(|_| d.sample(&mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
