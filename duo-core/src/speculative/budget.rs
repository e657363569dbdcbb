//! Hardware-aware draft budget (docs/architecture.md, "The algorithm"): choose γ so that the draft
//! side (CPU) finishes just before the target side (GPU),
//! `γ · t_draft_step ≈ DRAFT_FINISH_SHARE · T_target(n)`.
//!
//! Costs are learned online from measurements with exponential moving
//! averages: the draft's time per sequential forward step, and the target's
//! forward time as a linear function of the tokens it consumes,
//! `T(n) = a + b·n`, fitted by exponentially weighted least squares.
//! Samples far from the current estimate are clipped against the recent
//! noise level, so one stall does not swing the budget.

use std::cell::Cell;

use crate::stats::Ema;

/// Outlier limiting: once an estimate exists, a sample's log-ratio to it is
/// clipped to `±SPREAD_CLIP ×` the running mean absolute log-ratio, kept
/// within `[MIN_BAND, MAX_BAND]`. Ordinary noise passes unchanged, a stall
/// moves the estimate by little, and a lasting change widens the band until
/// it is followed (a factor 2 per sample at most).
const SPREAD_CLIP: f64 = 3.0;
const MIN_BAND: f64 = 0.1;
const MAX_BAND: f64 = std::f64::consts::LN_2;

/// The share of the target's forward the draft aims to fill. A draft that
/// finishes late idles the target (the side that sets the pace); one that
/// finishes early idles only the draft. With per-step timing noise of
/// ±10–20%, aiming at the exact balance point is late about half the time:
/// in the gpu-like regime a fixed γ ~15% below balance beat the balance
/// point by ~9% (docs/benchmark.md, the γ sweep).
pub const DRAFT_FINISH_SHARE: f64 = 0.85;

/// Below this weighted variance of the token counts (about ±0.5 token) the
/// slope `b` is not identifiable and the target cost is taken as flat.
const MIN_TOKEN_VARIANCE: f64 = 0.25;

/// Settings of a [`BudgetController`].
///
/// Invariants after [`BudgetController::new`] sanitises them:
/// `1 <= min_gamma <= initial_gamma <= max_gamma` and `alpha` in (0, 1].
/// `min_gamma == max_gamma` is the fixed mode.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BudgetConfig {
    /// Smallest γ ever chosen (at least 1).
    pub min_gamma: usize,
    /// Largest γ ever chosen (at least `min_gamma`).
    pub max_gamma: usize,
    /// γ used before both sides have been measured (clamped into range).
    pub initial_gamma: usize,
    /// EMA weight of each new measurement, in (0, 1].
    pub alpha: f64,
}

impl Default for BudgetConfig {
    /// Adaptive: γ in `1..=16`, 4 until measured, `alpha` 0.1 (an
    /// effective memory of about 20 rounds: noisy timings, especially the
    /// slope of the target's cost, need that much averaging).
    fn default() -> Self {
        Self {
            min_gamma: 1,
            max_gamma: 16,
            initial_gamma: 4,
            alpha: 0.1,
        }
    }
}

impl BudgetConfig {
    /// Fixed mode: γ is always `gamma` (at least 1), whatever is measured.
    pub fn fixed(gamma: usize) -> Self {
        let gamma = gamma.max(1);
        Self {
            min_gamma: gamma,
            max_gamma: gamma,
            initial_gamma: gamma,
            ..Self::default()
        }
    }

    /// True in fixed mode (`min_gamma == max_gamma`).
    pub fn is_fixed(&self) -> bool {
        self.min_gamma == self.max_gamma
    }

    /// The same settings with the invariants above enforced.
    fn sanitized(self) -> Self {
        let min_gamma = self.min_gamma.max(1);
        let max_gamma = self.max_gamma.max(min_gamma);
        let alpha = if self.alpha.is_finite() && self.alpha > 0.0 {
            self.alpha.min(1.0)
        } else {
            Self::default().alpha
        };
        Self {
            min_gamma,
            max_gamma,
            initial_gamma: self.initial_gamma.clamp(min_gamma, max_gamma),
            alpha,
        }
    }
}

/// A snapshot of the controller's estimates and decisions, for logs and
/// reports. Times are in milliseconds; `None` until measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BudgetReport {
    /// The (sanitised) settings in use.
    pub config: BudgetConfig,
    /// Estimated draft time per sequential forward step.
    pub draft_step_ms: Option<f64>,
    /// Estimated draft tokens produced per forward step (k when branches are
    /// drafted as one batch).
    pub draft_tokens_per_step: Option<f64>,
    /// Estimated fixed cost `a` of one target forward.
    pub target_base_ms: Option<f64>,
    /// Estimated cost `b` per token fed to the target.
    pub target_per_token_ms: Option<f64>,
    /// Number of draft measurements accepted.
    pub draft_samples: u64,
    /// Number of target measurements accepted.
    pub target_samples: u64,
    /// γ returned by the latest [`BudgetController::choose_gamma`] call.
    pub last_gamma: Option<usize>,
    /// Number of [`BudgetController::choose_gamma`] calls.
    pub decisions: u64,
}

/// Chooses γ per round from online measurements of both sides.
///
/// Invariants: [`choose_gamma`](Self::choose_gamma) always returns a value
/// in `[min_gamma, max_gamma]`, `initial_gamma` until both sides have been
/// measured, and the fixed γ in fixed mode. Invalid measurements (zero
/// steps, negative or non-finite times) are ignored. Decisions are recorded
/// for [`report`](Self::report) through interior mutability, so the
/// controller is `Send` but not `Sync` (share it behind a `Mutex`).
#[derive(Debug, Clone)]
pub struct BudgetController {
    config: BudgetConfig,
    /// Seconds per sequential draft forward step.
    draft_step: Ema,
    /// Draft tokens per forward step.
    draft_tokens: Ema,
    /// Weighted moments of (n, T) for the target's least-squares fit:
    /// E[n], E[T], E[n²], E[n·T] under the same exponential weights.
    n: Ema,
    t: Ema,
    nn: Ema,
    nt: Ema,
    draft_limiter: Limiter,
    target_limiter: Limiter,
    draft_samples: u64,
    target_samples: u64,
    last_gamma: Cell<Option<usize>>,
    decisions: Cell<u64>,
}

impl Default for BudgetController {
    fn default() -> Self {
        Self::new(BudgetConfig::default())
    }
}

impl BudgetController {
    /// A controller with no measurements yet; `config` is sanitised (see
    /// [`BudgetConfig`]).
    pub fn new(config: BudgetConfig) -> Self {
        let config = config.sanitized();
        let ema = || Ema::new(config.alpha);
        Self {
            config,
            draft_step: ema(),
            draft_tokens: ema(),
            n: ema(),
            t: ema(),
            nn: ema(),
            nt: ema(),
            draft_limiter: Limiter::new(config.alpha),
            target_limiter: Limiter::new(config.alpha),
            draft_samples: 0,
            target_samples: 0,
            last_gamma: Cell::new(None),
            decisions: Cell::new(0),
        }
    }

    /// Folds a finished generation's estimates into this one (a seed that
    /// new generations start from): each estimate moves `weight` of the
    /// way toward `finished`'s. Generations running at the same time each
    /// adapt their own copy and are folded in one by one as they end, so
    /// none overwrites another's measurements.
    pub fn absorb(&mut self, finished: &BudgetController, weight: f64) {
        let pairs = [
            (&mut self.draft_step, &finished.draft_step),
            (&mut self.draft_tokens, &finished.draft_tokens),
            (&mut self.n, &finished.n),
            (&mut self.t, &finished.t),
            (&mut self.nn, &finished.nn),
            (&mut self.nt, &finished.nt),
        ];
        for (mine, theirs) in pairs {
            mine.blend(theirs, weight);
        }
        self.draft_limiter
            .spread
            .blend(&finished.draft_limiter.spread, weight);
        self.target_limiter
            .spread
            .blend(&finished.target_limiter.spread, weight);
        self.draft_samples = self.draft_samples.max(finished.draft_samples);
        self.target_samples = self.target_samples.max(finished.target_samples);
    }

    /// The settings in use (sanitised).
    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    /// Records a drafting call that produced `tokens` tokens in
    /// `forward_steps` sequential forward calls taking `secs` in all.
    /// Ignored when `forward_steps == 0` or `secs` is negative or not finite.
    pub fn observe_draft(&mut self, tokens: usize, forward_steps: usize, secs: f64) {
        if forward_steps == 0 || !secs.is_finite() || secs < 0.0 {
            return;
        }
        let steps = forward_steps as f64;
        let per_step = self.draft_limiter.clip(secs / steps, self.draft_step.get());
        self.draft_step.update(per_step);
        self.draft_tokens.update(tokens as f64 / steps);
        self.draft_samples += 1;
    }

    /// Records one target forward that consumed `fed_tokens` tokens in
    /// `secs`. Feed verification forwards only (a prompt prefill is far
    /// outside the linear regime). Ignored when `fed_tokens == 0` or `secs`
    /// is negative or not finite.
    pub fn observe_target(&mut self, fed_tokens: usize, secs: f64) {
        if fed_tokens == 0 || !secs.is_finite() || secs < 0.0 {
            return;
        }
        let n = fed_tokens as f64;
        let secs = self.target_limiter.clip(secs, self.target_time(fed_tokens));
        self.n.update(n);
        self.t.update(secs);
        self.nn.update(n * n);
        self.nt.update(n * secs);
        self.target_samples += 1;
    }

    /// γ for a round in which the target consumes `target_tokens` tokens
    /// (0 counts as 1):
    /// `round(DRAFT_FINISH_SHARE · T(target_tokens) / t_draft_step)`, clamped to
    /// `[min_gamma, max_gamma]`. Returns `initial_gamma` until both sides
    /// have been measured, and always the fixed γ in fixed mode. The
    /// decision is recorded for [`report`](Self::report).
    pub fn choose_gamma(&self, target_tokens: usize) -> usize {
        let c = &self.config;
        let estimate = self
            .draft_step
            .get()
            .zip(self.target_time(target_tokens.max(1)))
            .map(|(step, target)| DRAFT_FINISH_SHARE * target / step);
        let gamma = match estimate {
            _ if c.is_fixed() => c.min_gamma,
            // Saturating float-to-int cast: +inf (a free draft step) gives max.
            Some(ratio) if !ratio.is_nan() => {
                (ratio.round() as usize).clamp(c.min_gamma, c.max_gamma)
            }
            _ => c.initial_gamma,
        };
        self.last_gamma.set(Some(gamma));
        self.decisions.set(self.decisions.get().saturating_add(1));
        gamma
    }

    /// A draft step's measured cost over a target forward of `target_tokens`
    /// tokens, once both have been measured.
    pub fn draft_over_target(&self, target_tokens: usize) -> Option<f64> {
        let step = self.draft_step.get()?;
        let target = self.target_time(target_tokens.max(1))?;
        (target > 0.0).then(|| step / target)
    }

    /// The measured seconds of one draft step.
    pub fn draft_step_secs(&self) -> Option<f64> {
        self.draft_step.get()
    }

    /// A target forward over `tokens` tokens in one-token forwards
    /// (`T(n) / T(1)` of the fitted line), once measured.
    pub fn verify_cost(&self, tokens: usize) -> Option<f64> {
        let one = self.target_time(1)?;
        let many = self.target_time(tokens.max(1))?;
        (one > 0.0).then(|| many / one)
    }

    /// Current estimates and decision history.
    pub fn report(&self) -> BudgetReport {
        let ms = |s: f64| s * 1e3;
        let (a, b) = self.target_fit().unzip();
        BudgetReport {
            config: self.config,
            draft_step_ms: self.draft_step.get().map(ms),
            draft_tokens_per_step: self.draft_tokens.get(),
            target_base_ms: a.map(ms),
            target_per_token_ms: b.map(ms),
            draft_samples: self.draft_samples,
            target_samples: self.target_samples,
            last_gamma: self.last_gamma.get(),
            decisions: self.decisions.get(),
        }
    }

    /// Estimated target forward time (seconds) for `n` fed tokens.
    /// The fitted seconds of a target forward over `n` tokens.
    pub fn target_time(&self, n: usize) -> Option<f64> {
        self.target_fit().map(|(a, b)| a + b * n as f64)
    }

    /// The fitted `(a, b)` of `T(n) = a + b·n`, in seconds, with `a, b >= 0`.
    ///
    /// Weighted least squares over the EMA moments. When the token counts
    /// barely vary the cost is taken as flat (`b = 0`); a negative slope is
    /// clamped to 0, and a negative intercept to 0 (the line then passes
    /// through the origin and the weighted mean).
    fn target_fit(&self) -> Option<(f64, f64)> {
        let (n, t, nn, nt) = (self.n.get()?, self.t.get()?, self.nn.get()?, self.nt.get()?);
        let var = nn - n * n;
        let slope = if var >= MIN_TOKEN_VARIANCE {
            ((nt - n * t) / var).max(0.0)
        } else {
            0.0
        };
        let intercept = t - slope * n;
        if intercept >= 0.0 {
            Some((intercept, slope))
        } else {
            Some((0.0, t / n))
        }
    }
}

/// Clips samples that stray far from the current estimate (see
/// [`SPREAD_CLIP`]). Invariant: the returned sample lies within a factor
/// `e^MAX_BAND` (= 2) of a positive estimate.
#[derive(Debug, Clone, Copy)]
struct Limiter {
    /// EMA of |ln(sample / estimate)| after clipping.
    spread: Ema,
}

impl Limiter {
    fn new(alpha: f64) -> Self {
        Self {
            spread: Ema::new(alpha),
        }
    }

    /// `sample` (finite, >= 0) clipped against `estimate`; unchanged while
    /// there is no positive estimate.
    fn clip(&mut self, sample: f64, estimate: Option<f64>) -> f64 {
        let Some(estimate) = estimate.filter(|&e| e > 0.0) else {
            return sample;
        };
        let band = self
            .spread
            .get()
            .map_or(MAX_BAND, |s| (SPREAD_CLIP * s).clamp(MIN_BAND, MAX_BAND));
        // A zero sample gives ln 0 = -inf, clipped to -band.
        let r = (sample / estimate).ln().clamp(-band, band);
        self.spread.update(r.abs());
        estimate * r.exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::rng_from_seed;
    use rand::Rng as _;

    /// Two generations that ran at the same time, one under a slow draft
    /// (a shared, busy worker) and one under a fast one, both end up in
    /// the seed: neither overwrites the other, and a fresh generation
    /// starts between the two.
    #[test]
    fn finished_generations_fold_into_the_seed() {
        let mut seed = BudgetController::default();
        let (mut slow, mut fast) = (seed.clone(), seed.clone());
        for _ in 0..50 {
            slow.observe_draft(4, 4, 4.0 * 4e-3);
            slow.observe_target(8, 30e-3);
            fast.observe_draft(4, 4, 4.0 * 1e-3);
            fast.observe_target(8, 30e-3);
        }
        seed.absorb(&slow, 0.5);
        seed.absorb(&fast, 0.5);
        let step = seed.draft_step_secs().unwrap();
        assert!(step > 1e-3 && step < 4e-3, "{step}");
        let (g_slow, g_fast, g_seed) = (
            slow.choose_gamma(8),
            fast.choose_gamma(8),
            seed.choose_gamma(8),
        );
        assert!(
            g_slow <= g_seed && g_seed <= g_fast,
            "{g_slow} {g_seed} {g_fast}"
        );
    }

    /// Synthetic costs: draft step `d` ms, target `a + b·n` ms.
    struct Costs {
        d: f64,
        a: f64,
        b: f64,
    }

    impl Costs {
        fn balanced(&self, n: usize) -> usize {
            (DRAFT_FINISH_SHARE * (self.a + self.b * n as f64) / self.d).round() as usize
        }

        /// Feeds one round: a draft of `steps` steps and a target forward of
        /// `n` tokens, each time multiplied by `noise()`.
        fn feed(
            &self,
            c: &mut BudgetController,
            n: usize,
            steps: usize,
            mut noise: impl FnMut() -> f64,
        ) {
            c.observe_draft(steps, steps, steps as f64 * self.d * 1e-3 * noise());
            c.observe_target(n, (self.a + self.b * n as f64) * 1e-3 * noise());
        }
    }

    #[test]
    fn initial_gamma_before_measurements() {
        let mut c = BudgetController::default();
        assert_eq!(c.choose_gamma(1), 4);
        // One side alone is not enough.
        c.observe_draft(4, 4, 0.02);
        assert_eq!(c.choose_gamma(1), 4);
        let r = c.report();
        assert_eq!(r.last_gamma, Some(4));
        assert_eq!(r.decisions, 2);
        assert_eq!(r.target_base_ms, None);
    }

    #[test]
    fn converges_to_balanced_gamma() {
        let costs = Costs {
            d: 4.0,
            a: 21.0,
            b: 2.0,
        };
        let mut c = BudgetController::default();
        for i in 0..200 {
            costs.feed(&mut c, 1 + i % 8, 1 + i % 5, || 1.0);
        }
        for n in [1, 2, 4, 8, 12] {
            assert_eq!(c.choose_gamma(n), costs.balanced(n), "n = {n}");
        }
        let r = c.report();
        assert!((r.draft_step_ms.unwrap() - 4.0).abs() < 1e-6, "{r:?}");
        assert!((r.target_base_ms.unwrap() - 21.0).abs() < 1e-3, "{r:?}");
        assert!((r.target_per_token_ms.unwrap() - 2.0).abs() < 1e-3, "{r:?}");
        assert_eq!(r.draft_tokens_per_step, Some(1.0));
        assert_eq!(r.last_gamma, Some(costs.balanced(12)));
        assert_eq!(r.decisions, 5);
        assert_eq!((r.draft_samples, r.target_samples), (200, 200));
    }

    #[test]
    fn follows_a_change_in_costs() {
        let mut c = BudgetController::default();
        let before = Costs {
            d: 4.0,
            a: 20.0,
            b: 2.0,
        };
        for i in 0..100 {
            before.feed(&mut c, 1 + i % 6, 4, || 1.0);
        }
        assert_eq!(c.choose_gamma(4), before.balanced(4));
        // The CPU gets twice as slow (e.g. contention).
        let after = Costs { d: 7.0, ..before };
        for i in 0..100 {
            after.feed(&mut c, 1 + i % 6, 4, || 1.0);
        }
        assert_eq!(c.choose_gamma(4), after.balanced(4));
    }

    #[test]
    fn bounds_are_respected() {
        let config = BudgetConfig {
            min_gamma: 2,
            max_gamma: 10,
            initial_gamma: 50,
            alpha: 0.2,
        };
        let mut c = BudgetController::new(config);
        assert_eq!(c.choose_gamma(1), 10, "initial is clamped into range");
        // Target far slower than a draft step: max.
        let slow_target = Costs {
            d: 1.0,
            a: 100.0,
            b: 1.0,
        };
        for i in 0..50 {
            slow_target.feed(&mut c, 1 + i % 4, 3, || 1.0);
        }
        assert_eq!(c.choose_gamma(4), 10);
        // Draft far slower than the target: min.
        let mut c = BudgetController::new(config);
        let slow_draft = Costs {
            d: 100.0,
            a: 10.0,
            b: 1.0,
        };
        for i in 0..50 {
            slow_draft.feed(&mut c, 1 + i % 4, 3, || 1.0);
        }
        assert_eq!(c.choose_gamma(4), 2);
        // A free draft step (0 s) gives max, without panicking.
        let mut c = BudgetController::new(config);
        c.observe_draft(3, 3, 0.0);
        c.observe_target(1, 0.01);
        assert_eq!(c.choose_gamma(1), 10);
    }

    #[test]
    fn config_is_sanitized() {
        let c = BudgetController::new(BudgetConfig {
            min_gamma: 0,
            max_gamma: 0,
            initial_gamma: 0,
            alpha: f64::NAN,
        });
        let cfg = *c.config();
        assert_eq!((cfg.min_gamma, cfg.max_gamma, cfg.initial_gamma), (1, 1, 1));
        assert_eq!(cfg.alpha, 0.1);
        assert_eq!(c.choose_gamma(3), 1);
    }

    #[test]
    fn invalid_measurements_are_ignored() {
        let mut c = BudgetController::default();
        c.observe_draft(0, 0, 0.01);
        c.observe_draft(1, 1, f64::NAN);
        c.observe_draft(1, 1, -1.0);
        c.observe_target(0, 0.01);
        c.observe_target(3, f64::INFINITY);
        let r = c.report();
        assert_eq!((r.draft_samples, r.target_samples), (0, 0));
        assert_eq!(c.choose_gamma(1), 4);
    }

    #[test]
    fn fixed_mode_ignores_measurements() {
        let mut c = BudgetController::new(BudgetConfig::fixed(16));
        assert!(c.config().is_fixed());
        assert_eq!(c.choose_gamma(1), 16);
        let costs = Costs {
            d: 10.0,
            a: 5.0,
            b: 0.0,
        };
        for _ in 0..20 {
            costs.feed(&mut c, 2, 2, || 1.0);
        }
        assert_eq!(c.choose_gamma(1), 16);
        assert_eq!(c.choose_gamma(30), 16);
        assert_eq!(
            BudgetController::new(BudgetConfig::fixed(0)).choose_gamma(1),
            1
        );
        let r = c.report();
        assert_eq!((r.last_gamma, r.decisions), (Some(16), 3));
        assert!(r.draft_step_ms.is_some(), "estimates are still reported");
    }

    #[test]
    fn flat_target_cost_with_constant_token_count() {
        // Every round feeds one token: b is not identifiable, T is flat.
        let costs = Costs {
            d: 3.0,
            a: 24.0,
            b: 0.0,
        };
        let mut c = BudgetController::default();
        for _ in 0..30 {
            costs.feed(&mut c, 1, 8, || 1.0);
        }
        assert_eq!(c.choose_gamma(1), costs.balanced(1));
        assert_eq!(c.report().target_per_token_ms, Some(0.0));
    }

    #[test]
    fn robust_to_noise_and_stalls() {
        // ±25% multiplicative noise, and 2% of measurements stall 10x.
        let costs = Costs {
            d: 4.0,
            a: 26.0,
            b: 1.2,
        };
        let mut c = BudgetController::default();
        let mut rng = rng_from_seed(11);
        let mut noise = move || {
            if rng.random::<f64>() < 0.02 {
                10.0
            } else {
                rng.random_range(0.75..1.25)
            }
        };
        let (mut within_one, mut total) = (0, 0);
        for i in 0..600 {
            let n = 1 + i % 8;
            costs.feed(&mut c, n, 1 + i % 7, &mut noise);
            if i >= 100 {
                let gamma = c.choose_gamma(n);
                let want = costs.balanced(n);
                assert!(
                    gamma.abs_diff(want) <= 2,
                    "round {i}: γ {gamma}, balanced {want}"
                );
                within_one += usize::from(gamma.abs_diff(want) <= 1);
                total += 1;
            }
        }
        assert!(
            within_one * 100 >= total * 95,
            "{within_one} of {total} within ±1"
        );
    }

    #[test]
    fn controller_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<BudgetController>();
    }

    #[test]
    fn report_serializes() {
        let c = BudgetController::default();
        c.choose_gamma(1);
        let json = serde_json::to_value(c.report()).unwrap();
        assert_eq!(json["last_gamma"], 4);
        assert_eq!(json["decisions"], 1);
        assert!(json["draft_step_ms"].is_null());
    }
}
