//! Client-level differential privacy: DP-FedAvg (McMahan et al. 2018) with
//! fixed or adaptive clipping (Andrew et al. 2021) and an RDP accountant
//! ([`accountant`]). No I/O: the engine calls it.
//!
//! # What is clipped, and why the guarantee holds
//!
//! The unit of privacy is a **client** (all its data; add/remove-one
//! neighbouring). With privacy on, a synchronous round is:
//!
//! 1. **Poisson sampling**: every registered node takes part independently
//!    with probability `q = engine.sampling.fraction` (the engine draws it
//!    from its seeded generator; `min_per_round` and the strategy's
//!    `configure` are not used, since a fixed-size sample needs another
//!    analysis). The accountant analyses exactly this.
//! 2. **Clipping** of each accepted update as the aggregator decodes it:
//!    the L2 norm over *all* the groups it carries is scaled to at most `C`.
//!    In central mode this happens on the aggregator, after the node's
//!    quantization and error feedback: what is clipped is exactly what is
//!    summed (the decoded `delta + residual`, quantized), so whatever the
//!    codec and the residual hold, one client moves the sum of every group
//!    together by at most `C` in L2.
//! 3. **Uniform weights**: every update weighs 1 (example counts would let
//!    one client weigh more; `max_samples_per_node`, `update_weight` and
//!    FedNova-style reweighting do not apply).
//! 4. **Gaussian noise** of standard deviation `z * C` on every coordinate
//!    of every global group's sum, also of groups nobody sent this round
//!    (otherwise a group that moves would reveal that someone holds it).
//! 5. **Fixed denominator**: the noised sum of a group is divided by its
//!    *expected* number of contributors, `q * (registered nodes that upload
//!    the group)`, never by the realized count (which depends on the
//!    sample). Dropouts and refused updates count as a zero contribution.
//! 6. The strategy's server optimizer (FedAvg, FedAvgM, FedAdam, FedYogi,
//!    FedAdagrad, FedProx) steps on that noised mean: post-processing.
//!
//! Each round is then the sampled Gaussian mechanism with noise multiplier
//! `z`, and the accountant composes the rounds (a node's later updates may
//! depend on its earlier rounds through its error-feedback residual and its
//! local heads; each round is still one query of sensitivity `C` on the
//! clients' data given the published models, so adaptive composition
//! holds). The robust combiners (median, trimmed mean, Krum) do not combine
//! a sum and are refused with privacy on, as is FedBuff.
//!
//! **Client mode** (`mode = "client"`, for secure aggregation later): the
//! node clips its delta to `C` and adds `N(0, (z C)^2 / m)` itself, `m =
//! q * N` the expected number of contributors; the aggregator adds nothing
//! and does not clip again (that would rescale the noise). The round is
//! accounted with the noise actually summed: `z * sqrt(min(k, m) / m)` for
//! `k` accepted updates (so with Poisson fluctuations and dropouts a run
//! spends more than a `target_epsilon` solved for the full noise, and the
//! reported epsilon says so; `budget_epsilon` is central-only). The node
//! encodes without error feedback and the
//! plan must use the lossless codec (32 bits, no top-k), because a
//! quantization residual carried to the next round would be data
//! outside the clipped, noised part. Without secure aggregation the
//! aggregator sees each node's weakly noised update: the guarantee is then
//! about the released models, as in central mode, not against the
//! aggregator.
//!
//! **Adaptive clipping** (central mode): the aggregator counts the
//! accepted updates whose norm was at most `C`, adds `N(0, sigma_b^2)` to
//! the centred count, and sets `C <- C * exp(-eta (b - gamma))` with `b`
//! the noised fraction over `m` and `gamma` the target quantile. The count
//! is a second Gaussian query; by Andrew et al.'s Theorem 1 the pair is one
//! Gaussian mechanism of multiplier `z` when the sum gets `z_delta =
//! (z^-2 - (2 sigma_b)^-2)^(-1/2)`, so the accountant uses `z` and the sum's
//! noise is `z_delta * C`.
//!
//! The noise comes from ChaCha8 streams of the seed and the round, so that
//! a simulation is reproducible; a deployment mixes in a secret from the
//! operating system (`Engine::set_noise_secret`, which the aggregator
//! service calls), since a noise anyone can recompute from the seed
//! protects nothing.
//!
//! The guarantee covers the sequence of global models (and what is derived
//! from them). The aggregator's own logs and metrics lines also report
//! per-round counts and the nodes' claimed training losses, which are not
//! noised: with central DP the aggregator is trusted.

pub mod accountant;

use serde::{Deserialize, Serialize};

pub use accountant::{noise_for_epsilon, RdpAccountant};

use crate::AggError;

/// Where the noise is added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// No differential privacy.
    #[default]
    Off,
    /// The aggregator clips and adds the noise to the sum.
    Central,
    /// Each node clips and adds its share of the noise.
    Client,
}

/// Adaptive clipping (Andrew et al. 2021): `C` follows a quantile of the
/// update norms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveClip {
    /// The fraction of updates that should be under `C` (`gamma`).
    pub target_quantile: f64,
    /// Geometric step `eta`.
    pub learning_rate: f64,
    /// Std of the noise on the count of updates under `C` (`sigma_b`);
    /// default: expected contributors / 20, as in the paper.
    pub count_stddev: Option<f64>,
}

impl Default for AdaptiveClip {
    fn default() -> Self {
        AdaptiveClip {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_stddev: None,
        }
    }
}

/// The `[privacy]` section of the experiment files (`cohort-sim`'s and
/// `cohort-aggregator`'s).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    pub mode: PrivacyMode,
    /// `z`: noise std over the clip norm. Give this or `target_epsilon`.
    pub noise_multiplier: Option<f64>,
    /// Solve `z` so that the planned rounds spend this epsilon.
    pub target_epsilon: Option<f64>,
    pub delta: f64,
    /// The clip norm `C` (the initial one with `adaptive`).
    pub clip: f64,
    pub adaptive: Option<AdaptiveClip>,
    /// Stop (cleanly, as finished) before a round that would spend more.
    pub budget_epsilon: Option<f64>,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            mode: PrivacyMode::Off,
            noise_multiplier: None,
            target_epsilon: None,
            delta: 1e-5,
            clip: 1.0,
            adaptive: None,
            budget_epsilon: None,
        }
    }
}

impl PrivacyConfig {
    pub fn is_off(&self) -> bool {
        self.mode == PrivacyMode::Off
    }

    /// Checks the section on its own (the engine checks the rest).
    pub fn validate(&self) -> Result<(), AggError> {
        if self.is_off() {
            return Ok(());
        }
        let bad = |m: String| Err(AggError::Config(format!("privacy: {m}")));
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(_), Some(_)) => {
                return bad("give noise_multiplier or target_epsilon, not both".into())
            }
            (None, None) => return bad("give noise_multiplier or target_epsilon".into()),
            (Some(z), None) if !(z.is_finite() && z > 0.0) => {
                return bad(format!("noise_multiplier = {z} (must be > 0)"))
            }
            (None, Some(e)) if !(e.is_finite() && e > 0.0) => {
                return bad(format!("target_epsilon = {e} (must be > 0)"))
            }
            _ => {}
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!("delta = {} (must be in (0, 1))", self.delta));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip = {} (must be > 0)", self.clip));
        }
        if let Some(b) = self.budget_epsilon {
            if !(b.is_finite() && b > 0.0) {
                return bad(format!("budget_epsilon = {b} (must be > 0)"));
            }
            // What a client-mode round spends depends on how many shares
            // arrive, so the next round's cost is not known before it.
            if self.mode == PrivacyMode::Client {
                return bad("budget_epsilon needs mode = \"central\"".into());
            }
        }
        if let Some(a) = &self.adaptive {
            if self.mode == PrivacyMode::Client {
                return bad(
                    "adaptive clipping needs the aggregator to see the norms: use mode = \"central\""
                        .into(),
                );
            }
            if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                return bad(format!(
                    "adaptive.target_quantile = {} (must be in (0, 1))",
                    a.target_quantile
                ));
            }
            if !(a.learning_rate.is_finite() && a.learning_rate > 0.0) {
                return bad(format!(
                    "adaptive.learning_rate = {} (must be > 0)",
                    a.learning_rate
                ));
            }
            if let Some(s) = a.count_stddev {
                if !(s.is_finite() && s > 0.0) {
                    return bad(format!("adaptive.count_stddev = {s} (must be > 0)"));
                }
            }
        }
        Ok(())
    }

    /// The accounted noise multiplier for `rounds` rounds at rate `q`:
    /// the configured one, or the one solved from `target_epsilon`.
    pub fn resolve_noise(&self, q: f64, rounds: u64) -> Result<f64, AggError> {
        if let Some(z) = self.noise_multiplier {
            return Ok(z);
        }
        let Some(eps) = self.target_epsilon else {
            return Err(AggError::Config(
                "privacy: give noise_multiplier or target_epsilon".into(),
            ));
        };
        if rounds == 0 {
            return Err(AggError::Config(
                "privacy: target_epsilon needs the number of rounds".into(),
            ));
        }
        noise_for_epsilon(eps, q, rounds, self.delta).ok_or_else(|| {
            AggError::Config(format!(
                "privacy: no noise multiplier up to 1e4 reaches epsilon {eps} in {rounds} rounds at q = {q}"
            ))
        })
    }
}

/// Command-line overrides of a [`PrivacyConfig`]: the `--dp-*` flags of
/// `cohort-sim` and `cohort-aggregator`, applied by [`PrivacyConfig::apply`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrivacyOverrides {
    /// `central`, `client` or `off`.
    pub mode: Option<String>,
    pub target_epsilon: Option<f64>,
    pub noise_multiplier: Option<f64>,
    pub clip: Option<f64>,
    pub delta: Option<f64>,
    /// Turns adaptive clipping on, to this quantile.
    pub adaptive_quantile: Option<f64>,
    pub budget_epsilon: Option<f64>,
}

impl PrivacyConfig {
    /// Applies command-line overrides: any of them turns privacy on
    /// (central) unless a mode is given or the file set one; an epsilon or
    /// a noise multiplier replaces the file's way of fixing the noise.
    pub fn apply(&mut self, o: &PrivacyOverrides) -> Result<(), AggError> {
        let any = o.target_epsilon.is_some()
            || o.noise_multiplier.is_some()
            || o.clip.is_some()
            || o.delta.is_some()
            || o.adaptive_quantile.is_some()
            || o.budget_epsilon.is_some();
        match o.mode.as_deref() {
            None if any && self.is_off() => self.mode = PrivacyMode::Central,
            None => {}
            Some("central") => self.mode = PrivacyMode::Central,
            Some("client") => self.mode = PrivacyMode::Client,
            Some("off") => self.mode = PrivacyMode::Off,
            Some(m) => {
                return Err(AggError::Config(format!(
                    "privacy mode `{m}`: use central, client or off"
                )))
            }
        }
        if let Some(e) = o.target_epsilon {
            self.target_epsilon = Some(e);
            self.noise_multiplier = None;
        }
        if let Some(z) = o.noise_multiplier {
            self.noise_multiplier = Some(z);
            self.target_epsilon = None;
        }
        if let Some(c) = o.clip {
            self.clip = c;
        }
        if let Some(d) = o.delta {
            self.delta = d;
        }
        if let Some(q) = o.adaptive_quantile {
            self.adaptive
                .get_or_insert_with(AdaptiveClip::default)
                .target_quantile = q;
        }
        if let Some(b) = o.budget_epsilon {
            self.budget_epsilon = Some(b);
        }
        Ok(())
    }
}

/// Andrew et al.'s split: the sum's noise multiplier when the count gets
/// `count_std` and the pair must be worth `z`; `None` when the count's
/// noise is too small for it (`2 sigma_b <= z`).
pub fn update_noise_multiplier(z: f64, count_std: f64) -> Option<f64> {
    let rest = z.powi(-2) - (2.0 * count_std).powi(-2);
    (rest > 0.0).then(|| rest.powf(-0.5))
}

/// The next clip norm of adaptive clipping, from the noised fraction of
/// updates that were under the current one.
pub fn next_clip(clip: f64, noised_fraction: f64, a: &AdaptiveClip) -> f64 {
    clip * (-a.learning_rate * (noised_fraction - a.target_quantile)).exp()
}

/// What the engine keeps between rounds (checkpointed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyState {
    pub accountant: RdpAccountant,
    /// The current clip norm.
    pub clip: f64,
}

/// Privacy of one round, in its report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyReport {
    /// Spent after this round, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    /// Sampling rate of the round.
    pub q: f64,
    /// The accounted noise multiplier of the round.
    pub noise_multiplier: f64,
    /// The clip norm used in this round.
    pub clip: f64,
    /// Rounds accounted so far.
    pub rounds: u64,
    /// Adaptive clipping: noised fraction of updates under the clip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub under_clip: Option<f64>,
}
