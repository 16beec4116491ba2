//! Pearson's chi-square goodness-of-fit test, to judge whether observed
//! backend counts match configured weights without timing or fixed slack.

/// Chi-square statistic of `observed` counts against expected proportions
/// `weights` (need not sum to 1). Categories with zero weight must observe 0
/// (else the statistic is infinite) and contribute nothing.
pub fn chi_square(observed: &[u64], weights: &[f64]) -> f64 {
    assert_eq!(
        observed.len(),
        weights.len(),
        "one weight per observed count"
    );
    let total: f64 = observed.iter().map(|&o| o as f64).sum();
    let wsum: f64 = weights.iter().sum();
    assert!(wsum > 0.0, "weights must not all be zero");
    observed
        .iter()
        .zip(weights)
        .map(|(&o, &w)| {
            let expected = total * w / wsum;
            let d = o as f64 - expected;
            if expected == 0.0 {
                if o == 0 { 0.0 } else { f64::INFINITY }
            } else {
                d * d / expected
            }
        })
        .sum()
}

/// Upper-tail p-value P(X >= stat) for X ~ chi-square with `dof` degrees of
/// freedom: Q(dof/2, stat/2), the regularized upper incomplete gamma.
pub fn chi_square_p_value(stat: f64, dof: u32) -> f64 {
    assert!(dof > 0, "dof must be > 0");
    if stat.is_nan() {
        return f64::NAN;
    }
    if stat <= 0.0 {
        return 1.0;
    }
    if stat.is_infinite() {
        return 0.0;
    }
    gamma_q(f64::from(dof) / 2.0, stat / 2.0)
}

/// Regularized upper incomplete gamma Q(a, x), as in Numerical Recipes:
/// the series for P when x < a + 1, else Lentz's continued fraction for Q.
fn gamma_q(a: f64, x: f64) -> f64 {
    const EPS: f64 = 1e-15;
    const TINY: f64 = 1e-300;
    const MAX_ITER: usize = 10_000;
    let log_prefix = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        // P(a, x) = e^-x x^a / Gamma(a+1) * sum x^n / ((a+1)...(a+n))
        let (mut term, mut sum, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..MAX_ITER {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * EPS {
                break;
            }
        }
        (1.0 - sum * log_prefix.exp()).max(0.0)
    } else {
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..MAX_ITER {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < EPS {
                break;
            }
        }
        (log_prefix.exp() * h).min(1.0)
    }
}

/// ln Gamma(x) for x > 0 by the Lanczos approximation (g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1-x) = pi / sin(pi x).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let series = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |acc, (i, &c)| acc + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn ln_gamma_known() {
        assert!(close(ln_gamma(1.0), 0.0, 1e-12));
        assert!(close(ln_gamma(5.0), 24f64.ln(), 1e-12));
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-12
        ));
    }

    #[test]
    fn p_values_against_tables() {
        // (stat, dof, p) from standard chi-square tables.
        for (stat, dof, p) in [
            (13.8155, 2, 0.001),
            (3.841, 1, 0.05),
            (6.635, 1, 0.01),
            (5.991, 2, 0.05),
            (11.070, 5, 0.05),
            (23.209, 10, 0.01),
            (124.342, 100, 0.05),
            (0.0158, 1, 0.90),
        ] {
            let got = chi_square_p_value(stat, dof);
            assert!(
                close(got, p, p * 2e-3),
                "stat {stat} dof {dof}: {got} != {p}"
            );
        }
        // dof 2 has a closed form: exp(-x/2); covers the series branch too.
        for x in [0.1, 1.0, 2.5, 40.0] {
            assert!(close(chi_square_p_value(x, 2), (-x / 2.0f64).exp(), 1e-12));
        }
        assert_eq!(chi_square_p_value(0.0, 3), 1.0);
        assert_eq!(chi_square_p_value(f64::INFINITY, 3), 0.0);
    }

    #[test]
    fn statistic() {
        assert_eq!(chi_square(&[50, 50], &[1.0, 1.0]), 0.0);
        // expected 25/75: (40-25)^2/25 + (60-75)^2/75 = 9 + 3
        assert!(close(chi_square(&[40, 60], &[1.0, 3.0]), 12.0, 1e-12));
        assert_eq!(chi_square(&[0, 10], &[0.0, 1.0]), 0.0);
        assert!(chi_square(&[1, 10], &[0.0, 1.0]).is_infinite());
    }
}
