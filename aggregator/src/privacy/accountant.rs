//! Rényi-DP accountant of the Poisson-sampled Gaussian mechanism (Mironov,
//! Talwar and Zhang 2019, "Rényi Differential Privacy of the Sampled
//! Gaussian Mechanism"), composed over rounds and converted to
//! `(epsilon, delta)`.
//!
//! Pure numerics, no I/O. It reproduces Google's `dp-accounting`
//! (`dp_accounting.rdp.RdpAccountant` with `PoissonSampledDpEvent(q,
//! GaussianDpEvent(z))`, add/remove-one neighbouring, its default orders and
//! its conversion): `aggregator/tests/fixtures/dp_accounting.json` holds its
//! numbers and the command that produced them, and
//! `aggregator/tests/privacy.rs` checks this module against them.
//!
//! The analysis is for **Poisson sampling** (every available client takes
//! part in a round independently with probability `q`), which is what the
//! engine does when privacy is on (see [`crate::privacy`]); a fixed number
//! of clients per round without replacement would need another analysis
//! (Wang, Balle and Kasiviswanathan 2019, replace-one) and is not offered.

use serde::{Deserialize, Serialize};

/// The RDP orders: `dp-accounting`'s `DEFAULT_RDP_ORDERS`
/// (`1.1, 1.2, ..., 10.9`, `11..=63`, `128`, `256`, `512`, `1024`).
pub fn default_orders() -> Vec<f64> {
    let mut o: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    o.extend((11..64).map(f64::from));
    o.extend([128.0, 256.0, 512.0, 1024.0]);
    o
}

/// `log(exp(a) + exp(b))`, exact at `-inf`.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// `log(erfc(x))`, accurate where `erfc` underflows (large `x`).
fn log_erfc(x: f64) -> f64 {
    if x < 20.0 {
        libm::erfc(x).ln()
    } else {
        log_erfc_asymptotic(x)
    }
}

/// The asymptotic series `erfc(x) ~ e^{-x^2} / (x sqrt(pi)) * (1 - 1/(2x^2)
/// + 3/(4x^4) - 15/(8x^6))`, in log space; relative error below 1e-9 from
/// `x = 20` on.
fn log_erfc_asymptotic(x: f64) -> f64 {
    let x2 = x * x;
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln()
        + (-0.5 / x2 + 0.75 / (x2 * x2) - 1.875 / (x2 * x2 * x2)).ln_1p()
}

/// `log(binom(n, k))` for integers, by log-gamma.
fn log_binom_int(n: u64, k: u64) -> f64 {
    let (n, k) = (n as f64, k as f64);
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `log |binom(n, k)|` for real `n`, by log-gamma (as `dp-accounting`'s
/// `_log_comb`; `lgamma` is the log of the absolute value of Gamma).
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `log A_alpha` for an integer order (Mironov et al., Section 3.3).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    for i in 0..=alpha {
        let log_coef = log_binom_int(alpha, i) + i as f64 * q.ln() + (alpha - i) as f64 * log1mq;
        let i = i as f64;
        let s = log_coef + (i * i - i) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

/// Terms of the fractional series before an order is given up (and
/// excluded, as `dp-accounting` does with a warning).
const MAX_STEPS_LOG_A_FRAC: u32 = 1000;

/// `log A_alpha` for a fractional order (Mironov et al., Section 3.3), the
/// series and its stopping rule as in `dp-accounting` 0.6
/// (`_compute_log_a_frac`): both halves of the integral summed in log
/// space, stopped once both terms decrease and are 30 nats below the
/// total; `+inf` (the order is useless) when it has not converged after
/// [`MAX_STEPS_LOG_A_FRAC`] terms.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let mut log_a0 = f64::NEG_INFINITY;
    let mut log_a1 = f64::NEG_INFINITY;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let sqrt2 = std::f64::consts::SQRT_2;
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let fi = f64::from(i);
        let log_coef = log_comb(alpha, fi);
        let j = alpha - fi;
        let log_t0 = log_coef + fi * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + fi * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / (sqrt2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (sqrt2 * sigma));
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// RDP of one round of the Poisson-sampled Gaussian mechanism with
/// sampling rate `q` and noise multiplier `sigma` (noise std / L2
/// sensitivity), at order `alpha > 1`.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if sigma <= 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 && alpha < 1e6 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// `(epsilon, order)` from RDP values at `orders`, for `delta`: the
/// conversion of Balle et al. 2020 (Proposition 12, in `dp-accounting`'s
/// `compute_epsilon` and Opacus' `get_privacy_spent`),
/// `eps = rdp + log1p(-1/a) - log(delta * a) / (a - 1)`, minimized over the
/// orders (orders at or below 1.01 are skipped, as `dp-accounting` does).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps.max(0.0), a);
        }
    }
    best
}

/// Composes rounds of the sampled Gaussian mechanism: the RDP at each
/// order adds up. Its state (the per-order sums) goes into checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    pub orders: Vec<f64>,
    pub rdp: Vec<f64>,
    /// Rounds composed.
    pub rounds: u64,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        RdpAccountant::new(default_orders())
    }
}

impl RdpAccountant {
    pub fn new(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        RdpAccountant {
            orders,
            rdp,
            rounds: 0,
        }
    }

    /// The RDP of `rounds` rounds at rate `q`, noise multiplier `sigma`.
    pub fn round_rdp(&self, q: f64, sigma: f64) -> Vec<f64> {
        self.orders
            .iter()
            .map(|&a| rdp_sampled_gaussian(q, sigma, a))
            .collect()
    }

    /// Adds `rounds` rounds at rate `q` and noise multiplier `sigma`.
    pub fn compose(&mut self, q: f64, sigma: f64, rounds: u64) {
        let per = self.round_rdp(q, sigma);
        self.add(&per, rounds);
    }

    /// Adds `rounds` rounds of the per-order RDP `per` (from
    /// [`RdpAccountant::round_rdp`]). Sums saturate at `f64::MAX` (an
    /// order that is useless stays so, and the state stays JSON-safe).
    pub fn add(&mut self, per: &[f64], rounds: u64) {
        for (r, p) in self.rdp.iter_mut().zip(per) {
            *r = (*r + p * rounds as f64).min(f64::MAX);
        }
        self.rounds += rounds;
    }

    /// Epsilon spent so far at `delta`.
    pub fn epsilon(&self, delta: f64) -> f64 {
        epsilon_from_rdp(&self.orders, &self.rdp, delta).0
    }

    /// Epsilon after `rounds` more rounds at `(q, sigma)`, without
    /// changing the accountant (the budget check).
    pub fn epsilon_after(&self, q: f64, sigma: f64, rounds: u64, delta: f64) -> f64 {
        let per = self.round_rdp(q, sigma);
        let rdp: Vec<f64> = self
            .rdp
            .iter()
            .zip(per)
            .map(|(r, p)| r + p * rounds as f64)
            .collect();
        epsilon_from_rdp(&self.orders, &rdp, delta).0
    }
}

/// Epsilon of `rounds` rounds at rate `q`, noise multiplier `sigma`.
pub fn epsilon(q: f64, sigma: f64, rounds: u64, delta: f64) -> f64 {
    RdpAccountant::default().epsilon_after(q, sigma, rounds, delta)
}

/// The smallest noise multiplier (to a relative 1e-4) whose `rounds`
/// rounds at rate `q` spend at most `target_epsilon` at `delta`, by
/// bisection (epsilon falls as the noise grows). `None` when even a noise
/// multiplier of 1e4 does not reach it.
pub fn noise_for_epsilon(target_epsilon: f64, q: f64, rounds: u64, delta: f64) -> Option<f64> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return None;
    }
    let eps = |z: f64| epsilon(q, z, rounds, delta);
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while eps(hi) > target_epsilon {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            return None;
        }
    }
    while hi - lo > 1e-4 * hi {
        let mid = 0.5 * (lo + hi);
        if eps(mid) > target_epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sampling_is_the_gaussian_mechanism() {
        // q = 1: RDP of the Gaussian mechanism is alpha / (2 sigma^2).
        let r = rdp_sampled_gaussian(1.0, 2.0, 10.0);
        assert!((r - 10.0 / 8.0).abs() < 1e-12);
        // Integer and fractional paths agree near an integer order.
        let a = rdp_sampled_gaussian(0.01, 1.1, 5.0);
        let b = rdp_sampled_gaussian(0.01, 1.1, 5.0 + 1e-9);
        assert!((a - b).abs() / a < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn more_noise_less_epsilon_and_bisection_inverts() {
        let e1 = epsilon(0.01, 1.0, 1000, 1e-5);
        let e2 = epsilon(0.01, 2.0, 1000, 1e-5);
        assert!(e2 < e1);
        let z = noise_for_epsilon(e1, 0.01, 1000, 1e-5).expect("solvable");
        assert!((z - 1.0).abs() < 1e-3, "{z}");
    }

    #[test]
    fn log_erfc_series_matches_erfc_where_both_work() {
        for x in [10.0, 15.0, 19.9, 25.0] {
            let exact = libm::erfc(x).ln();
            let series = log_erfc_asymptotic(x);
            assert!(
                (exact - series).abs() < 1e-6 * exact.abs(),
                "{x}: {exact} {series}"
            );
        }
    }
}
