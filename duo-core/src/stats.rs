//! Small statistics helpers: the chi-square goodness-of-fit test used by the
//! sampling-fidelity tests, and exponential moving averages.

/// Result of a chi-square goodness-of-fit test.
#[derive(Debug, Clone, Copy)]
pub struct ChiSquare {
    pub statistic: f64,
    pub degrees_of_freedom: usize,
    pub p_value: f64,
}

/// Pearson's chi-square test of observed `counts` against `probs`.
///
/// Cells whose expected count is below 5 are pooled into one cell (so the
/// test stays valid for long-tailed distributions). `probs` need not sum to
/// exactly 1: they are renormalised.
pub fn chi_square(counts: &[u32], probs: &[f32]) -> ChiSquare {
    let n: f64 = counts.iter().map(|&c| f64::from(c)).sum();
    let total_p: f64 = probs.iter().map(|&p| f64::from(p)).sum();
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (i, &c) in counts.iter().enumerate() {
        let e = n * f64::from(probs.get(i).copied().unwrap_or(0.0)) / total_p;
        if e < 5.0 {
            pool_o += f64::from(c);
            pool_e += e;
        } else {
            cells.push((f64::from(c), e));
        }
    }
    if pool_e > 0.0 || pool_o > 0.0 {
        cells.push((pool_o, pool_e.max(1e-12)));
    }
    let statistic: f64 = cells.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
    let df = cells.len().saturating_sub(1).max(1);
    ChiSquare {
        statistic,
        degrees_of_freedom: df,
        p_value: gamma_q(df as f64 / 2.0, statistic / 2.0),
    }
}

/// Regularised upper incomplete gamma function Q(a, x).
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if x < a + 1.0 {
        // Series for P(a, x).
        let mut sum = 1.0 / a;
        let mut term = sum;
        let mut ap = a;
        for _ in 0..1000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * (-x + a * x.ln() - ln_gamma(a)).exp()
    } else {
        // Continued fraction for Q(a, x) (modified Lentz).
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (-x + a * x.ln() - ln_gamma(a)).exp() * h
    }
}

/// ln Γ(x) for x > 0 (Lanczos approximation).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 6] = [
        76.180_091_729_471_46,
        -86.505_320_329_416_77,
        24.014_098_240_830_91,
        -1.231_739_572_450_155,
        0.001_208_650_973_866_179,
        -0.000_005_395_239_384_953,
    ];
    let mut y = x;
    let tmp = x + 5.5;
    let tmp = tmp - (x + 0.5) * tmp.ln();
    let mut ser = 1.000_000_000_190_015;
    for g in G {
        y += 1.0;
        ser += g / y;
    }
    -tmp + (2.506_628_274_631_000_5 * ser / x).ln()
}

/// Exponential moving average; `None` until the first sample.
#[derive(Debug, Clone, Copy)]
pub struct Ema {
    alpha: f64,
    value: Option<f64>,
}

impl Ema {
    /// `alpha` in (0, 1]: the weight of each new sample.
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha: alpha.clamp(1e-6, 1.0),
            value: None,
        }
    }

    pub fn update(&mut self, sample: f64) {
        if !sample.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => sample,
            Some(v) => v + self.alpha * (sample - v),
        });
    }

    pub fn get(&self) -> Option<f64> {
        self.value
    }

    /// Moves this estimate `weight` (in [0, 1]) of the way toward
    /// `other`'s; takes `other`'s when this one has none, keeps this one
    /// when `other` has none.
    pub fn blend(&mut self, other: &Ema, weight: f64) {
        let w = weight.clamp(0.0, 1.0);
        self.value = match (self.value, other.value) {
            (Some(a), Some(b)) => Some(a + w * (b - a)),
            (a, b) => a.or(b),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_p_values_are_sane() {
        // Known value: statistic 3.84 with 1 df has p ~= 0.05.
        assert!((gamma_q(0.5, 3.841_458_8 / 2.0) - 0.05).abs() < 1e-4);
        // 10 df, statistic 18.307 -> p = 0.05.
        assert!((gamma_q(5.0, 18.307 / 2.0) - 0.05).abs() < 1e-3);
        let fair = chi_square(&[250, 250, 250, 250], &[0.25; 4]);
        assert!(fair.p_value > 0.99);
        let skewed = chi_square(&[400, 200, 200, 200], &[0.25; 4]);
        assert!(skewed.p_value < 1e-6);
    }

    #[test]
    fn ema_tracks() {
        let mut e = Ema::new(0.5);
        assert!(e.get().is_none());
        e.update(2.0);
        e.update(4.0);
        assert_eq!(e.get(), Some(3.0));
        e.update(f64::NAN);
        assert_eq!(e.get(), Some(3.0));
    }
}
