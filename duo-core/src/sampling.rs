//! Logits processing and sampling.
//!
//! [`SamplingParams::distribution`] turns raw logits into the *processed*
//! next-token distribution `p` (temperature, top-k, top-p; greedy = point
//! mass on the argmax). Verification needs those probabilities, so the
//! distribution is a value of its own ([`Distribution`]), sampled with an
//! explicit per-generation RNG ([`Rng`]); there is no global random state.
//!
//! # Cost and precision
//!
//! One call costs three passes over the vocabulary (the largest finite
//! logit; the weights `e^((l - max) / T)`, summed; the candidates, tokens
//! that can be kept) plus a partial selection: the full vocabulary is
//! sorted only when nothing truncates it (top-k off and top-p 1). Top-k
//! selects its `k` tokens without sorting the rest, among the tokens whose
//! logit reaches the `k`-th largest of the maxima of blocks of 32 (one more
//! pass); top-p sorts a head of the most likely tokens and grows it (x4)
//! only while the head's mass falls short, among the tokens heavy enough to
//! be needed (those lighter than `(1 - top_p) / 2` of the mean weight
//! together hold less than half the mass top-p leaves out).
//!
//! Weights are f32, from an exp made of f32 arithmetic alone (relative
//! error below 1e-7, the same bits on every platform, vectorised by the
//! compiler); sums and normalisation are f64. An earlier version did all of
//! it in f64 with a full sort: the probabilities now agree with that within
//! 1e-5 (and 1e-4 relative), so a fixed seed draws the same tokens except
//! where the RNG's uniform lands within that much of a boundary between two
//! tokens' intervals, or the top-p cut lands within rounding of `top_p`
//! (tested against the f64 implementation, kept in the unit tests, on many
//! random rows). Two deliberate differences: a token whose probability is
//! below `f32::MIN_POSITIVE` (~1.2e-38) is outside the support (it used to
//! stay in with probability 0 or a subnormal, against the invariants below),
//! and equal f32 probabilities are always ordered by token id.

use rand::{Rng as _, SeedableRng};

/// The per-generation random number generator. ChaCha8 is stable across
/// platforms and crate versions, so a seed always gives the same tokens.
pub type Rng = rand_chacha::ChaCha8Rng;

/// A generator seeded from `seed` (same seed, same stream).
pub fn rng_from_seed(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

/// The draft's generator for a generation seeded with `seed`: another
/// ChaCha stream of the same key, so the draft's samples are independent of
/// the target's draws (which sampled verification's exactness needs) and
/// still reproducible.
pub fn draft_rng(seed: u64) -> Rng {
    let mut rng = Rng::seed_from_u64(seed);
    rng.set_stream(DRAFT_STREAM);
    rng
}

/// The ChaCha stream [`draft_rng`] uses (the target's is stream 0).
const DRAFT_STREAM: u64 = 1;

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
    /// Invariants of the result: non-empty, sorted by probability descending
    /// (ties by token id ascending), probabilities positive (at least
    /// `f32::MIN_POSITIVE`) and summing to 1 up to rounding; every token is
    /// an index into `logits`, except the point mass on token 0 given for
    /// empty `logits`. Non-finite logits (NaN, ±inf) are treated as -inf; if
    /// every logit is non-finite the result is a point mass on token 0.
    /// Greedy settings ([`Self::is_greedy`]) give a point mass on
    /// [`argmax`]; so do NaN and negative temperatures, which
    /// [`Self::validate`] rejects: no input panics. Top-k keeps the `top_k` largest logits
    /// (ties by token id); top-p then keeps the shortest most-likely-first
    /// prefix whose mass reaches `top_p` of what top-k kept.
    pub fn distribution(&self, logits: &[f32]) -> Distribution {
        if logits.is_empty() {
            return Distribution::point(0);
        }
        if self.is_greedy() || self.temperature.is_nan() || self.temperature < 0.0 {
            return Distribution::point(argmax(logits));
        }
        let Some(max) = finite_max(logits) else {
            return Distribution::point(0);
        };
        let inv_t = inverse_temperature(self.temperature);
        let mut weights = Vec::new();
        let total = weights_into(logits, max, inv_t, &mut weights);
        // NaN (rejected by validate) disables top-p, as 1 does.
        let top_p = if self.top_p < 1.0 {
            f64::from(self.top_p.max(0.0))
        } else {
            1.0
        };
        let keys = if self.top_k > 0 && self.top_k < logits.len() {
            let mut keys = candidates(logits, &weights, 0.0, top_k_floor(logits, self.top_k));
            if keys.len() > self.top_k {
                keys.select_nth_unstable(self.top_k - 1);
                keys.truncate(self.top_k);
            }
            let want = (top_p < 1.0).then(|| top_p * mass(&keys, &weights));
            sort_until(&mut keys, &weights, want);
            keys
        } else if top_p < 1.0 {
            let want = top_p * total;
            // Tokens under `floor` hold less than half the mass top-p leaves
            // out, so its cut falls among the others; should rounding make
            // them fall short anyway, every token is a candidate.
            let floor = (0.5 * (1.0 - top_p) * total / logits.len() as f64) as f32;
            let mut keys = candidates(logits, &weights, floor, f32::NEG_INFINITY);
            if !sort_until(&mut keys, &weights, Some(want)) {
                keys = candidates(logits, &weights, 0.0, f32::NEG_INFINITY);
                sort_until(&mut keys, &weights, Some(want));
            }
            keys
        } else {
            let mut keys = candidates(logits, &weights, 0.0, f32::NEG_INFINITY);
            keys.sort_unstable();
            keys
        };
        let kept = mass(&keys, &weights);
        let entries = keys
            .iter()
            .map(|&k| {
                let t = key_token(k);
                (t, (f64::from(weights[t as usize]) / kept) as f32)
            })
            .collect();
        // The maxima weigh 1, so the first entry has probability at least
        // 1 / len and is never dropped; the fallback is unreachable.
        Distribution::finish(entries).unwrap_or_else(|| Distribution::point(argmax(logits)))
    }
}

/// Keys in [`sort_until`]'s first sorted head; each further round sorts 3x
/// as many again (the sorted prefix grows x4).
const TOP_P_HEAD: usize = 32;

/// Lanes of the passes over the vocabulary (independent accumulators the
/// compiler turns into SIMD).
const LANES: usize = 8;

/// ln(`f32::MIN_POSITIVE`) to f32 precision: weights e^x for x below it
/// are taken as 0 (their probabilities would be under `f32::MIN_POSITIVE`,
/// the smallest a distribution keeps).
const MIN_EXP_ARG: f32 = -87.336_54;

/// The largest finite logit, if any.
fn finite_max(logits: &[f32]) -> Option<f32> {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            // `abs() < inf` is `is_finite` as one comparison (false for NaN).
            *m = if l.abs() < f32::INFINITY && l > *m {
                l
            } else {
                *m
            };
        }
    }
    for &l in chunks.remainder() {
        lanes[0] = if l.is_finite() && l > lanes[0] {
            l
        } else {
            lanes[0]
        };
    }
    let max = lanes
        .into_iter()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    max.is_finite().then_some(max)
}

/// The unnormalised weight `e^((l - max) * inv_t)` of logit `l`, in
/// [0, 1]: exactly 1 for `l == max`, 0 for a non-finite `l` and wherever it
/// would be below `e^MIN_EXP_ARG`. `max` must be the largest finite logit
/// and `inv_t` finite and >= 0 (see [`inverse_temperature`]).
#[inline(always)]
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    // <= 0 for finite l (-0 or 0 for l == max); NaN for NaN, +inf or NaN
    // for +inf, -inf or NaN for -inf.
    let x = (l - max) * inv_t;
    let e = exp_core(x);
    if (MIN_EXP_ARG..=0.0).contains(&x) {
        e
    } else {
        0.0
    }
}

/// 1 / `temperature` for `temperature` > 0, at most `f32::MAX` (a subnormal
/// temperature would give +inf, and 0 x inf is NaN).
fn inverse_temperature(temperature: f32) -> f32 {
    (1.0 / temperature).min(f32::MAX)
}

/// Writes every logit's [`weight`] into `out` (resized to `logits.len()`)
/// and returns their sum, accumulated in f64.
fn weights_into(logits: &[f32], max: f32, inv_t: f32, out: &mut Vec<f32>) -> f64 {
    out.clear();
    out.resize(logits.len(), 0.0);
    fill_weights(logits, max, inv_t, out);
    let mut sums = [0f64; LANES];
    add_lanes(&mut sums, out);
    sums.into_iter().sum()
}

/// The sum of every logit's [`weight`], the same bits as [`weights_into`]
/// returns (the same lanes see the same weights), without storing them.
fn weight_sum(logits: &[f32], max: f32, inv_t: f32) -> f64 {
    // A multiple of LANES: each token lands in the lane it has in `weights_into`.
    let mut buf = [0f32; 32 * LANES];
    let mut sums = [0f64; LANES];
    for chunk in logits.chunks(buf.len()) {
        let ws = &mut buf[..chunk.len()];
        fill_weights(chunk, max, inv_t, ws);
        add_lanes(&mut sums, ws);
    }
    sums.into_iter().sum()
}

/// `out[i] = weight(logits[i])`: one flat loop, which the compiler
/// vectorises.
fn fill_weights(logits: &[f32], max: f32, inv_t: f32, out: &mut [f32]) {
    for (w, &l) in out.iter_mut().zip(logits) {
        *w = weight(l, max, inv_t);
    }
}

/// Adds `ws[i]` to lane `i % LANES` in f64 (lanes the compiler vectorises).
fn add_lanes(sums: &mut [f64; LANES], ws: &[f32]) {
    let mut chunks = ws.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &w) in sums.iter_mut().zip(chunk) {
            *s += f64::from(w);
        }
    }
    for (s, &w) in sums.iter_mut().zip(chunks.remainder()) {
        *s += f64::from(w);
    }
}

/// e^x for x in [[`MIN_EXP_ARG`], 0] in f32 arithmetic alone: Cody-Waite
/// reduction x = n ln 2 + r, Cephes' degree-7 polynomial for e^r, 2^n built
/// from its bits. Relative error below 1e-7 (at most 8.3e-8, about 1.4
/// ulp), and non-decreasing, so weights keep the logits' order (both
/// checked once over every float in the range; the unit tests check a
/// sample). Outside that range (and for
/// NaN) the result is meaningless, but computing it is harmless: callers
/// mask it ([`weight`]); no branch, so loops over it vectorise. No libm
/// call, so the same bits on every platform.
#[inline(always)]
fn exp_core(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND; // round(x / ln 2), in [-126, 0] in range
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n + 127, in [1, 127] in range (a normal float's biased exponent).
    let exponent = (t.to_bits() as i32)
        .wrapping_sub(ROUND.to_bits() as i32)
        .wrapping_add(127);
    er * f32::from_bits((exponent as u32) << 23)
}

/// Tokens per block in the passes that skip whole blocks.
const BLOCK: usize = 4 * LANES;

/// A logit no lower than the `k`-th largest (so every top-`k` token's is at
/// least this): the `k`-th largest of the blocks' maxima, which are `k`
/// tokens at least that large. -inf when there are no more blocks than `k`.
fn top_k_floor(logits: &[f32], k: usize) -> f32 {
    let mut maxima: Vec<f32> = logits
        .chunks(BLOCK)
        .map(|block| finite_max(block).unwrap_or(f32::NEG_INFINITY))
        .collect();
    if k == 0 || maxima.len() <= k {
        return f32::NEG_INFINITY;
    }
    let (_, kth, _) = maxima.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

/// The sort keys of the tokens whose weight is positive and at least
/// `floor` and whose logit is at least `logit_floor`, in token order.
fn candidates(logits: &[f32], weights: &[f32], floor: f32, logit_floor: f32) -> Vec<u64> {
    // Positive and >= floor, as one comparison (false for a NaN floor).
    let min = floor.max(f32::from_bits(1));
    let mut keys = Vec::new();
    // Blocks without a candidate (most, under a top-p or top-k floor) are
    // skipped after one vectorised scan.
    for (b, (ls, ws)) in logits.chunks(BLOCK).zip(weights.chunks(BLOCK)).enumerate() {
        let hit = ls
            .iter()
            .zip(ws)
            .fold(false, |hit, (&l, &w)| hit | (w >= min && l >= logit_floor));
        if !hit {
            continue;
        }
        for (i, (&l, &w)) in ls.iter().zip(ws).enumerate() {
            if w >= min && l >= logit_floor {
                keys.push(sort_key(l, b * BLOCK + i));
            }
        }
    }
    keys
}

/// A token's key: ascending keys are logits descending, ties by token id
/// ascending (-0 and +0 are one logit). `logit` must be finite.
fn sort_key(logit: f32, token: usize) -> u64 {
    let bits = (logit + 0.0).to_bits();
    // Unsigned order of `ascending` is the float order.
    let ascending = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    };
    (u64::from(!ascending) << 32) | u64::from(token as u32)
}

fn key_token(key: u64) -> u32 {
    key as u32
}

/// Total weight of the tokens in `keys`.
fn mass(keys: &[u64], weights: &[f32]) -> f64 {
    keys.iter()
        .map(|&k| f64::from(weights[key_token(k) as usize]))
        .sum()
}

/// Sorts `keys` (most likely token first) as far as needed to find the
/// shortest prefix whose weight reaches `want`, and truncates `keys` to it;
/// false (and `keys` sorted, untruncated) when the whole falls short. The
/// sorted head starts at [`TOP_P_HEAD`] keys and grows x4 by selecting the
/// next keys among the rest, so a short prefix never sorts the rest.
/// `None` sorts everything.
fn sort_until(keys: &mut Vec<u64>, weights: &[f32], want: Option<f64>) -> bool {
    let Some(want) = want else {
        keys.sort_unstable();
        return true;
    };
    let mut acc = 0.0f64;
    let mut done = 0;
    while done < keys.len() {
        let end = if done == 0 { TOP_P_HEAD } else { done * 4 }.min(keys.len());
        let rest = &mut keys[done..];
        let take = end - done;
        if take < rest.len() {
            rest.select_nth_unstable(take - 1);
        }
        let head = &mut rest[..take];
        head.sort_unstable();
        for (i, &k) in head.iter().enumerate() {
            acc += f64::from(weights[key_token(k) as usize]);
            if acc >= want {
                keys.truncate(done + i + 1);
                return true;
            }
        }
        done = end;
    }
    false
}

/// Index of the largest finite logit (lowest index on ties; 0 if none is
/// finite): NaN and ±inf are skipped, as [`SamplingParams::distribution`]
/// treats them as -inf.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v && v < f32::INFINITY {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// The `n` most likely tokens under softmax(`logits`) (temperature 1) with
/// their probabilities, most likely first (ties by token id); non-finite
/// logits are treated as -inf, so an all-non-finite row gives none. Costs
/// one pass over the logits for the normaliser (the weights of
/// [`SamplingParams::distribution`], so the probabilities agree with it
/// at temperature 1) and one for the selection, no sort: the drafting
/// policy only needs the top candidates.
pub fn top_softmax(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let Some(max) = finite_max(logits) else {
        return Vec::new();
    };
    if n == 0 {
        return Vec::new();
    }
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_finite() {
            continue;
        }
        if top.len() < n || l > top[top.len() - 1].1 {
            let pos = top.partition_point(|e| e.1 >= l);
            top.insert(pos, (i as u32, l));
            top.truncate(n);
        }
    }
    let z = weight_sum(logits, max, 1.0);
    top.into_iter()
        .map(|(t, l)| (t, (f64::from(weight(l, max, 1.0)) / z) as f32))
        .collect()
}

/// log softmax(`logits`)`[token]` at temperature 1 (the model's own
/// log-probability), with non-finite logits treated as -inf: at most 0;
/// -inf for a token outside the row or with a non-finite logit (or below
/// f32's range). Shares [`top_softmax`]'s normaliser.
pub fn log_softmax_at(logits: &[f32], token: u32) -> f32 {
    let (Some(max), Some(&l)) = (finite_max(logits), logits.get(token as usize)) else {
        return f32::NEG_INFINITY;
    };
    if !l.is_finite() {
        return f32::NEG_INFINITY;
    }
    // z >= 1 (the maxima weigh 1), so the result is <= 0.
    let z = weight_sum(logits, max, 1.0);
    (f64::from(l) - f64::from(max) - z.ln()) as f32
}

/// A processed next-token distribution over its support.
///
/// Invariants: `entries` is non-empty, sorted by probability descending
/// (ties by token id ascending), every probability is at least
/// `f32::MIN_POSITIVE` and they sum to 1 (up to rounding). Tokens outside
/// the support have probability 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    entries: Vec<(u32, f32)>,
}

/// The order of [`Distribution::entries`]: probability descending, then
/// token id ascending.
fn by_probability(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

impl Distribution {
    /// Point mass on `token`.
    pub fn point(token: u32) -> Self {
        Self {
            entries: vec![(token, 1.0)],
        }
    }

    /// A distribution given as (token, probability) entries, e.g. a proposal
    /// that came over the network, kept exactly as given (only sorted), so
    /// a verifier uses the very `q` the sender sampled from. Refused, with a
    /// message saying why: no entries or more than `max_entries`, an id at or
    /// above `vocab`, a repeated id, a probability that is not finite and
    /// positive, or a total further than 1e-3 from 1.
    pub fn from_entries(
        mut entries: Vec<(u32, f32)>,
        vocab: usize,
        max_entries: usize,
    ) -> Result<Self, String> {
        if entries.is_empty() || entries.len() > max_entries {
            return Err(format!(
                "a proposal has {} entries (1..={max_entries} allowed)",
                entries.len()
            ));
        }
        if let Some(&(t, _)) = entries.iter().find(|e| e.0 as usize >= vocab) {
            return Err(format!(
                "a proposal names token {t}, outside the vocabulary (size {vocab})"
            ));
        }
        if let Some(&(t, p)) = entries.iter().find(|e| !(e.1.is_finite() && e.1 > 0.0)) {
            return Err(format!(
                "a proposal gives token {t} probability {p} (must be finite and > 0)"
            ));
        }
        let total: f64 = entries.iter().map(|e| f64::from(e.1)).sum();
        if (total - 1.0).abs() > 1e-3 {
            return Err(format!(
                "a proposal's probabilities sum to {total} (must be 1 within 1e-3)"
            ));
        }
        entries.sort_unstable_by(by_probability);
        let mut ids: Vec<u32> = entries.iter().map(|e| e.0).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("a proposal names token {} twice", w[0]));
        }
        Ok(Self { entries })
    }

    /// Normalises non-negative weights; zero, negative and non-finite
    /// weights are dropped, and so are tokens whose probability comes out
    /// below `f32::MIN_POSITIVE`; the rest is sorted. An empty or all-zero
    /// input gives a point mass on token 0. Duplicate tokens are kept as
    /// given.
    pub fn from_weights(mut weights: Vec<(u32, f64)>) -> Self {
        weights.retain(|w| w.1 > 0.0 && w.1.is_finite());
        let Some(heaviest) = weights.iter().map(|w| w.1).reduce(f64::max) else {
            return Self::point(0);
        };
        let mut total: f64 = weights.iter().map(|w| w.1).sum();
        if !total.is_finite() {
            // Weights near f64::MAX overflowed the sum: rescale first.
            weights.iter_mut().for_each(|w| w.1 /= heaviest);
            total = weights.iter().map(|w| w.1).sum();
        }
        weights.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let first = weights[0].0;
        let entries = weights
            .into_iter()
            .map(|(t, w)| (t, (w / total) as f32))
            .collect();
        // The heaviest weight has probability at least 1 / len, so it stays.
        Self::finish(entries).unwrap_or_else(|| Self::point(first))
    }

    /// Enforces the invariants on probabilities normalised from weights
    /// sorted before rounding: drops those below `f32::MIN_POSITIVE` (and
    /// NaN), then restores the exact order where rounding to f32 tied or
    /// swapped neighbours (a check; a sort only then). `None` if nothing is
    /// left.
    fn finish(mut entries: Vec<(u32, f32)>) -> Option<Self> {
        entries.retain(|e| e.1 >= f32::MIN_POSITIVE);
        if !entries.is_sorted_by(|a, b| by_probability(a, b).is_le()) {
            entries.sort_by(by_probability);
        }
        (!entries.is_empty()).then_some(Self { entries })
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
    use std::collections::HashMap;

    use proptest::prelude::*;
    use rand::Rng as _;

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

    #[test]
    fn positive_infinity_is_minus_infinity_for_greedy_too() {
        let row = [f32::NAN, 1.0, f32::INFINITY, 0.5];
        assert_eq!(argmax(&row), 1);
        assert_eq!(SamplingParams::greedy().distribution(&row).argmax(), 1);
        assert_eq!(
            SamplingParams::with_temperature(1e-3)
                .distribution(&row)
                .entries(),
            &[(1, 1.0)]
        );
        assert_eq!(argmax(&[f32::INFINITY, f32::NAN]), 0);
        assert_eq!(log_softmax_at(&row, 2), f32::NEG_INFINITY);
        assert!(log_softmax_at(&row, 1) < 0.0);
        assert_eq!(log_softmax_at(&row, 9), f32::NEG_INFINITY);
        assert_eq!(log_softmax_at(&[], 0), f32::NEG_INFINITY);
        assert_eq!(top_softmax(&row, 2)[0].0, 1);
    }

    #[test]
    fn log_softmax_matches_f64() {
        let l = logits();
        let max = 3.0f64;
        let z: f64 = l.iter().map(|&x| (f64::from(x) - max).exp()).sum();
        for (i, &x) in l.iter().enumerate() {
            let want = f64::from(x) - max - z.ln();
            let got = log_softmax_at(&l, i as u32);
            assert!((f64::from(got) - want).abs() < 1e-6, "{i}: {got} vs {want}");
            assert!(got <= 0.0);
        }
        assert_eq!(log_softmax_at(&[7.0], 0), 0.0);
    }

    /// Extreme temperatures and settings `validate` rejects still give
    /// valid distributions.
    #[test]
    fn extreme_settings_keep_the_invariants() {
        let row = [0.0, -0.0, 1e-30, -3.4e38, 3.4e38, 5.0, f32::NAN];
        for temperature in [
            f32::from_bits(1),
            1e-30,
            1e30,
            f32::INFINITY,
            f32::NAN,
            -1.0,
        ] {
            for top_p in [f32::NAN, -1.0, 0.0, 1e-9, 0.5, 2.0] {
                for top_k in [0, 2, usize::MAX] {
                    let p = SamplingParams {
                        temperature,
                        top_k,
                        top_p,
                    };
                    assert_invariants(&p.distribution(&row), row.len());
                }
            }
        }
        // A subnormal temperature is (almost) greedy, ties kept.
        let tied = [1.0, 3.0, 3.0, 2.0];
        let d = SamplingParams::with_temperature(f32::from_bits(1)).distribution(&tied);
        assert_eq!(d.entries(), &[(1, 0.5), (2, 0.5)]);
        // An infinite temperature is uniform over the finite logits.
        let d = SamplingParams::with_temperature(f32::INFINITY).distribution(&logits());
        assert_eq!(d.entries().len(), 6);
        assert!(d.entries().iter().all(|e| (e.1 - 1.0 / 6.0).abs() < 1e-7));
    }

    #[test]
    fn from_weights_keeps_the_invariants_at_the_extremes() {
        let d = Distribution::from_weights(vec![(3, f64::MAX), (1, f64::MAX), (2, 1.0)]);
        assert_eq!(d.entries(), &[(1, 0.5), (3, 0.5)]);
        let d = Distribution::from_weights(vec![(4, 1.0), (5, 1e-300), (6, f64::NAN)]);
        assert_eq!(d.entries(), &[(4, 1.0)]);
        assert_eq!(
            Distribution::from_weights(vec![(4, 0.0), (5, -1.0)]).entries(),
            &[(0, 1.0)]
        );
        // Weights that differ in f64 but round to one f32 probability are
        // ordered by token id.
        let d = Distribution::from_weights(vec![(9, 1.0 + 1e-12), (2, 1.0)]);
        assert_eq!(d.entries(), &[(2, 0.5), (9, 0.5)]);
    }

    /// `exp_core` against f64 on a sample of its range (the whole range,
    /// every float, was checked once: at most 8.3e-8, never decreasing).
    #[test]
    fn exp_core_is_accurate_and_monotone() {
        assert_eq!(exp_core(0.0), 1.0);
        assert_eq!(exp_core(-0.0), 1.0);
        let mut prev = 0.0f32;
        let n = 200_000;
        for i in (0..=n).rev() {
            let x = MIN_EXP_ARG * (i as f32 / n as f32);
            let got = exp_core(x);
            let want = f64::from(x).exp();
            assert!(
                ((f64::from(got) - want) / want).abs() < 1e-7,
                "e^{x}: {got} vs {want}"
            );
            assert!(got >= prev, "not monotone at {x}");
            prev = got;
        }
        // Float by float (rising) across each switch of the reduction's n.
        for k in 1..=125 {
            // Negative floats: a larger bit pattern is further from 0.
            let mut x = f32::from_bits((-(k as f32 + 0.5) * std::f32::consts::LN_2).to_bits() + 64);
            let mut prev = exp_core(x);
            for _ in 0..128 {
                x = f32::from_bits(x.to_bits() - 1);
                let e = exp_core(x);
                assert!(e >= prev, "not monotone at {x}");
                prev = e;
            }
        }
        for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, -100.0] {
            assert_eq!(weight(x, 0.0, 1.0), 0.0, "weight of {x} after max 0");
        }
        assert_eq!(weight(2.0, 2.0, f32::MAX), 1.0);
    }

    /// The sort keys order logits descending, then token ids ascending.
    #[test]
    fn sort_keys_order_logits_descending() {
        let vals = [
            f32::MAX,
            3.0,
            1.0,
            f32::MIN_POSITIVE,
            0.0,
            -0.0,
            -f32::MIN_POSITIVE,
            -1.0,
            f32::MIN,
        ];
        for (i, &a) in vals.iter().enumerate() {
            for (j, &b) in vals.iter().enumerate() {
                let want = b
                    .partial_cmp(&a)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(i.cmp(&j));
                assert_eq!(
                    sort_key(a, i).cmp(&sort_key(b, j)),
                    want,
                    "{a}#{i} vs {b}#{j}"
                );
            }
        }
    }

    /// The invariants documented on [`Distribution`] (and that its tokens
    /// index a row of `len` logits).
    fn assert_invariants(d: &Distribution, len: usize) {
        let e = d.entries();
        assert!(!e.is_empty());
        for w in e.windows(2) {
            assert!(
                by_probability(&w[0], &w[1]).is_lt(),
                "out of order: {:?}",
                &w
            );
        }
        assert!(e.iter().all(|x| x.1 >= f32::MIN_POSITIVE && x.1 <= 1.0));
        assert!(e.iter().all(|x| (x.0 as usize) < len.max(1)));
        let mut tokens: Vec<u32> = e.iter().map(|x| x.0).collect();
        tokens.sort_unstable();
        tokens.dedup();
        assert_eq!(tokens.len(), e.len(), "a token twice");
        let total: f64 = e.iter().map(|x| f64::from(x.1)).sum();
        assert!((total - 1.0).abs() < 1e-5, "total {total}");
    }

    /// The implementation `distribution` replaced, kept as the reference:
    /// f64 weights, a full sort, truncation on the sorted list. Returns the
    /// kept tokens, most likely first, with their f64 probabilities.
    fn reference(p: &SamplingParams, logits: &[f32]) -> Vec<(u32, f64)> {
        if logits.is_empty() {
            return vec![(0, 1.0)];
        }
        if p.is_greedy() {
            return vec![(argmax(logits), 1.0)];
        }
        let inv_t = 1.0 / f64::from(p.temperature);
        let max = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return vec![(0, 1.0)];
        }
        let mut entries: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, ((f64::from(l) - f64::from(max)) * inv_t).exp()))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        entries.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && entries.len() > p.top_k {
            entries.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let total: f64 = entries.iter().map(|e| e.1).sum();
            let want = f64::from(p.top_p) * total;
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
        let total: f64 = entries.iter().map(|e| e.1).sum();
        entries.into_iter().map(|(t, w)| (t, w / total)).collect()
    }

    /// The reference as the `Distribution` it used to build (probabilities
    /// rounded to f32 in the reference's order), for drawing from.
    fn reference_distribution(p: &SamplingParams, logits: &[f32]) -> Distribution {
        Distribution {
            entries: reference(p, logits)
                .into_iter()
                .map(|(t, q)| (t, q as f32))
                .collect(),
        }
    }

    /// `distribution` keeps the invariants and agrees with [`reference`]:
    /// the same support, except tokens too unlikely for f32 (< 1e-30) or
    /// at a top-p cut within 1e-5 of `top_p` (where rounding decides);
    /// probabilities within 1e-5 (and 1e-4 relative) after renormalising
    /// over the common support; the same order up to probabilities within
    /// that tolerance (`exact_order`: the same order).
    fn assert_matches_reference(p: &SamplingParams, logits: &[f32], exact_order: bool) {
        let fast = p.distribution(logits);
        assert_invariants(&fast, logits.len());
        let want = reference(p, logits);
        // Before the top-p cut: where each token stood and the mass before it.
        let uncut = reference(&SamplingParams { top_p: 1.0, ..*p }, logits);
        let mut before = HashMap::new();
        let mut acc = 0.0;
        for &(t, q) in &uncut {
            before.insert(t, (acc, q));
            acc += q;
        }
        let fast_p: HashMap<u32, f64> = fast
            .entries()
            .iter()
            .map(|&(t, q)| (t, f64::from(q)))
            .collect();
        let want_p: HashMap<u32, f64> = want.iter().copied().collect();
        let only_one = fast_p
            .keys()
            .filter(|t| !want_p.contains_key(t))
            .chain(want_p.keys().filter(|t| !fast_p.contains_key(t)));
        for t in only_one {
            let (cum, q) = before.get(t).copied().unwrap_or((f64::NAN, 0.0));
            assert!(
                q < 1e-30 || (cum - f64::from(p.top_p)).abs() < 1e-5,
                "{p:?}: token {t} (p {q}, mass before {cum}) in one support only"
            );
        }
        let common_fast: Vec<(u32, f64)> = fast
            .entries()
            .iter()
            .filter(|e| want_p.contains_key(&e.0))
            .map(|&(t, q)| (t, f64::from(q)))
            .collect();
        let common_want: Vec<(u32, f64)> = want
            .iter()
            .copied()
            .filter(|e| fast_p.contains_key(&e.0))
            .collect();
        assert!(!common_fast.is_empty(), "{p:?}: disjoint supports");
        let norm_fast: f64 = common_fast.iter().map(|e| e.1).sum();
        let norm_want: f64 = common_want.iter().map(|e| e.1).sum();
        for &(t, q) in &common_fast {
            let (a, b) = (q / norm_fast, want_p[&t] / norm_want);
            assert!(
                (a - b).abs() <= 1e-5 && (b < 1e-30 || (a - b).abs() <= 1e-4 * b),
                "{p:?}: token {t}: {a} vs reference {b}"
            );
        }
        for w in common_fast.windows(2) {
            let (a, b) = (want_p[&w[0].0], want_p[&w[1].0]);
            assert!(
                a >= b * (1.0 - 1e-4) || b < 1e-30,
                "{p:?}: {} before {} but the reference has {a} < {b}",
                w[0].0,
                w[1].0
            );
        }
        if exact_order {
            let fast_order: Vec<u32> = common_fast.iter().map(|e| e.0).collect();
            let want_order: Vec<u32> = common_want.iter().map(|e| e.0).collect();
            assert_eq!(fast_order, want_order, "{p:?}");
        }
    }

    /// Valid sampling settings, greedy ones included.
    fn params() -> impl Strategy<Value = SamplingParams> {
        (
            prop_oneof![1 => Just(0.0f32), 6 => 0.05f32..5.0],
            prop_oneof![3 => Just(0usize), 2 => 1usize..12, 1 => 12usize..400],
            prop_oneof![2 => Just(1.0f32), 1 => Just(0.5f32), 5 => 0.01f32..1.0],
        )
            .prop_map(|(temperature, top_k, top_p)| SamplingParams {
                temperature,
                top_k,
                top_p,
            })
    }

    /// Logits on a 1/8 grid (exact ties, distinct values far apart) with
    /// some NaN and infinities.
    fn grid_row() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![
                12 => (-160i32..160).prop_map(|k| k as f32 / 8.0),
                1 => Just(f32::NAN),
                1 => Just(f32::INFINITY),
                1 => Just(f32::NEG_INFINITY),
            ],
            0..300,
        )
    }

    /// `len` normal logits times `scale`, from `seed`.
    fn normal_row(seed: u64, len: usize, scale: f64) -> Vec<f32> {
        let mut rng = rng_from_seed(seed);
        (0..len)
            .map(|_| {
                let (u, v): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * scale) as f32
            })
            .collect()
    }

    proptest! {
        #[test]
        fn grid_rows_match_the_reference(row in grid_row(), p in params()) {
            assert_matches_reference(&p, &row, true);
        }

        /// Any bits at all, any settings: no panic, the invariants hold.
        #[test]
        fn any_input_keeps_the_invariants(
            row in prop::collection::vec(any::<f32>(), 0..64),
            temperature in any::<f32>(),
            top_k in prop_oneof![Just(0usize), 1usize..70, any::<usize>()],
            top_p in any::<f32>(),
        ) {
            let p = SamplingParams { temperature, top_k, top_p };
            assert_invariants(&p.distribution(&row), row.len());
            if let Some(t) = top_softmax(&row, 3).first() {
                prop_assert_eq!(t.0, argmax(&row));
            }
            prop_assert!(log_softmax_at(&row, 0) <= 0.0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// LM-like rows up to a realistic vocabulary.
        #[test]
        fn normal_rows_match_the_reference(
            seed in any::<u64>(),
            len in prop_oneof![1usize..64, 1000usize..33_000],
            scale in 0.1f64..20.0,
            p in params(),
        ) {
            assert_matches_reference(&p, &normal_row(seed, len, scale), false);
        }
    }

    /// A fixed seed draws the same tokens as the f64 reference except where
    /// the uniform lands within rounding of a boundary: none expected in
    /// this many draws, a handful allowed.
    #[test]
    fn same_seed_draws_match_the_reference() {
        let settings = [
            SamplingParams {
                temperature: 0.7,
                top_k: 0,
                top_p: 0.9,
            },
            SamplingParams::with_temperature(1.0),
            SamplingParams {
                temperature: 0.5,
                top_k: 20,
                top_p: 0.95,
            },
        ];
        let (mut draws, mut differ) = (0, 0);
        for (si, p) in settings.iter().enumerate() {
            for r in 0..20u64 {
                let row = normal_row(1000 * si as u64 + r, 4000, 4.0);
                let (fast, slow) = (p.distribution(&row), reference_distribution(p, &row));
                let (mut a, mut b) = (rng_from_seed(r), rng_from_seed(r));
                for _ in 0..500 {
                    draws += 1;
                    differ += usize::from(fast.sample(&mut a) != slow.sample(&mut b));
                }
            }
        }
        assert!(differ <= draws / 10_000, "{differ} of {draws} draws differ");
    }

    /// The top-k floor never excludes a top-k token, ties included.
    #[test]
    fn top_k_floor_keeps_the_top_k() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32).collect();
        for k in [1, 2, 5, 31, 32, 33, 100, 999] {
            let floor = top_k_floor(&row, k);
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            assert!(floor <= sorted[k - 1], "k {k}: floor {floor}");
        }
        assert_eq!(top_k_floor(&row, 0), f32::NEG_INFINITY);
        assert_eq!(top_k_floor(&[1.0; 10], 1), f32::NEG_INFINITY);
    }
}
