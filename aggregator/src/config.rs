//! Engine configuration: serde structs with `Default`, TOML-friendly.

use std::collections::BTreeMap;

use cohort_protocol::codec::CodecConfig;
use cohort_protocol::messages::{Optimizer, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::privacy::PrivacyConfig;
use crate::AggError;

/// How rounds run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mode {
    /// Rounds with a barrier: sample, wait for quorum + all-in or the
    /// deadline, aggregate.
    #[default]
    Sync,
    /// FedBuff: no barrier; the model moves every `buffer_k` accepted updates.
    Async(FedBuffConfig),
}

/// FedBuff (Nguyen et al., 2022) settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FedBuffConfig {
    /// Accepted updates per model step.
    pub buffer_k: u32,
    /// Updates whose base is more than this many versions old are refused.
    pub max_staleness: u64,
    pub staleness: Discount,
}

impl Default for FedBuffConfig {
    fn default() -> Self {
        FedBuffConfig {
            buffer_k: 10,
            max_staleness: 20,
            staleness: Discount::default(),
        }
    }
}

/// Weight multiplier of an update `s` versions stale.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Discount {
    /// 1 whatever the staleness.
    Constant,
    /// `(1 + s)^-exponent`; exponent 0.5 is FedBuff's `1/sqrt(1+s)`.
    Polynomial { exponent: f64 },
}

impl Default for Discount {
    fn default() -> Self {
        Discount::Polynomial { exponent: 0.5 }
    }
}

impl Discount {
    pub fn factor(&self, staleness: u64) -> f64 {
        match *self {
            Discount::Constant => 1.0,
            Discount::Polynomial { exponent } => (1.0 + staleness as f64).powf(-exponent),
        }
    }
}

/// Who takes part in a synchronous round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// Fraction of available nodes sampled each round.
    pub fraction: f64,
    /// At least this many nodes a round (when that many are available).
    pub min_per_round: usize,
    /// A round does not start with fewer nodes available.
    pub min_available: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            fraction: 1.0,
            min_per_round: 1,
            min_available: 1,
        }
    }
}

impl Sampling {
    /// Number of nodes to sample among `available`.
    pub fn sample_size(&self, available: usize) -> usize {
        let by_fraction = (self.fraction * available as f64).ceil();
        let by_fraction = if by_fraction.is_finite() && by_fraction > 0.0 {
            by_fraction as usize
        } else {
            0
        };
        by_fraction.max(self.min_per_round).min(available)
    }
}

/// Whether a parameter group is aggregated or stays on the nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupPolicy {
    /// Aggregated over the nodes that hold it.
    #[default]
    Global,
    /// Never leaves the node (FedPer / FedRep personalized heads).
    Local,
}

/// Default of [`EngineConfig::max_samples_per_node`].
pub const DEFAULT_MAX_SAMPLES_PER_NODE: u64 = 1_000_000;
/// Default of [`EngineConfig::max_weight_share`]: no node carries more than
/// half of a group's weight.
pub const DEFAULT_MAX_WEIGHT_SHARE: f64 = 0.5;
/// Bounds on the local training settings a plan may carry (checked at start
/// by [`EngineConfig::validate`]; nodes enforce their own as well).
pub const MAX_EPOCHS: u32 = 1_000;
pub const MAX_BATCH_SIZE: u32 = 8_192;
pub const MAX_LOCAL_STEPS: u64 = 10_000_000;
/// Largest local learning rate (any optimizer).
pub const MAX_LR: f32 = 10.0;
pub const MAX_PROX_MU: f32 = 1_000.0;
/// Longest round deadline: a week.
pub const MAX_DEADLINE_MS: u64 = 7 * 24 * 3600 * 1000;

/// The default bound on an update's L2 norm for `layout`: `sqrt(P)` for
/// `P` parameters, i.e. the norm of a delta that moves every parameter by 1
/// on average (an honest round of local SGD moves them by orders of
/// magnitude less), and at least 1. It keeps every accepted value and sum
/// far from the f32 range (a 1e37 update is refused), whatever the model.
pub fn default_max_update_norm(layout: &cohort_protocol::Layout) -> f32 {
    let params: u64 = layout.groups.iter().map(|g| g.len()).sum();
    ((params as f64).sqrt() as f32).max(1.0)
}

/// Everything the engine needs to know, apart from the layout, the initial
/// weights and the strategy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    pub federation: String,
    pub seed: u64,
    pub mode: Mode,
    pub sampling: Sampling,
    /// Time a sampled node has, from the start of the round (sync) or from
    /// its plan (async).
    pub deadline_ms: u64,
    /// Fraction of the sampled nodes whose updates a sync round needs.
    pub quorum: f32,
    /// Sent in every plan (the strategy may adjust it, e.g. FedProx's mu).
    pub train: TrainConfig,
    pub codec: CodecConfig,
    /// Policy per group name; groups not listed are `global`.
    pub group_policy: BTreeMap<String, GroupPolicy>,
    /// Updates whose L2 norm (all groups together) is above this are
    /// refused. None: the default derived from the model,
    /// [`default_max_update_norm`] (`sqrt(parameters)`, the norm of a delta
    /// that moves every parameter by 1 on average).
    pub max_update_norm: Option<f32>,
    /// Cap on the example weight of one node in one group (its claimed
    /// samples beyond it count as this many): the operator's bound on what a
    /// hello may claim.
    pub max_samples_per_node: u64,
    /// Largest share of a group's total weight one update may carry in a
    /// weighted mean, in (0, 1]; heavier updates are capped (water-filling)
    /// so that no single node outweighs the rest. 1 disables the cap; with
    /// fewer than `1 / share` contributors the mean is unweighted.
    pub max_weight_share: f64,
    /// Rounds (sync) or model steps (async) to run; 0 = no limit.
    pub rounds: u64,
    /// Cap on decoded deltas kept in memory by strategies that must retain
    /// every update (median, trimmed mean, Krum); beyond it updates are
    /// refused with [`crate::RefusalCode::MemoryCap`].
    pub max_retained_bytes: u64,
    /// Client-level differential privacy (see [`crate::privacy`]). The
    /// experiment files set it from their top-level `[privacy]` section.
    /// Left out of the serialized config when off, so that the config hash
    /// of checkpoints without privacy does not change.
    #[serde(default, skip_serializing_if = "PrivacyConfig::is_off")]
    pub privacy: PrivacyConfig,
    /// How the local learning rate `train.lr` changes from round to round.
    /// Left out of the serialized config when constant, so that the config
    /// hash of older checkpoints does not change.
    #[serde(default, skip_serializing_if = "LrSchedule::is_constant")]
    pub lr_schedule: LrSchedule,
}

/// The local learning rate of each round, from `train.lr` (the rate of round
/// 1). The aggregator puts the round's rate in its plans, so nodes need no
/// schedule of their own; FedBuff (async) uses the model version as the
/// round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// `train.lr` in every round.
    #[default]
    Constant,
    /// `train.lr * gamma^(round - 1)`.
    Exponential { gamma: f32 },
    /// Half a cosine from `train.lr` at round 1 down to `final_lr` at the
    /// last round (`rounds`, which must be set); `final_lr` after it.
    Cosine { final_lr: f32 },
}

impl LrSchedule {
    pub fn is_constant(&self) -> bool {
        matches!(self, LrSchedule::Constant)
    }

    /// The learning rate of `round` (1-based) out of `rounds`.
    pub fn lr(&self, base: f32, round: u64, rounds: u64) -> f32 {
        let r = round.max(1);
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Exponential { gamma } => {
                let steps = i32::try_from(r - 1).unwrap_or(i32::MAX);
                (base * gamma.powi(steps)).max(f32::MIN_POSITIVE)
            }
            LrSchedule::Cosine { final_lr } => {
                if rounds <= 1 || r >= rounds {
                    return if rounds <= 1 { base } else { final_lr };
                }
                let t = (r - 1) as f64 / (rounds - 1) as f64;
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                (f64::from(final_lr) + (f64::from(base) - f64::from(final_lr)) * cos) as f32
            }
        }
    }

    fn validate(&self, base: f32, rounds: u64) -> Result<(), AggError> {
        let bad = |m: String| Err(AggError::Config(m));
        match *self {
            LrSchedule::Constant => Ok(()),
            LrSchedule::Exponential { gamma } => {
                if !(gamma.is_finite() && gamma > 0.0 && gamma <= 1.0) {
                    return bad(format!("lr_schedule: gamma = {gamma} (allowed (0, 1])"));
                }
                Ok(())
            }
            LrSchedule::Cosine { final_lr } => {
                if rounds == 0 {
                    return bad("lr_schedule: cosine needs rounds (the round it ends at)".into());
                }
                if !(final_lr.is_finite() && final_lr > 0.0 && final_lr <= base) {
                    return bad(format!(
                        "lr_schedule: final_lr = {final_lr} (allowed (0, train.lr = {base}])"
                    ));
                }
                Ok(())
            }
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            federation: "cohort".into(),
            seed: 0,
            mode: Mode::Sync,
            sampling: Sampling::default(),
            deadline_ms: 60_000,
            quorum: 0.5,
            train: TrainConfig::default(),
            codec: CodecConfig::default(),
            group_policy: BTreeMap::new(),
            max_update_norm: None,
            max_samples_per_node: DEFAULT_MAX_SAMPLES_PER_NODE,
            max_weight_share: DEFAULT_MAX_WEIGHT_SHARE,
            rounds: 0,
            max_retained_bytes: 1 << 30,
            privacy: PrivacyConfig::default(),
            lr_schedule: LrSchedule::Constant,
        }
    }
}

impl EngineConfig {
    /// `train` with the learning rate of `round` (see [`LrSchedule`]).
    pub fn train_for(&self, round: u64) -> TrainConfig {
        let mut t = self.train.clone();
        t.lr = self.lr_schedule.lr(t.lr, round, self.rounds);
        t
    }

    pub fn policy(&self, group: &str) -> GroupPolicy {
        self.group_policy.get(group).copied().unwrap_or_default()
    }

    /// Checks every setting, naming the field of the first bad one. The
    /// train and codec settings go into every plan: a bad one must stop the
    /// aggregator at start, not every node at its first round.
    pub fn validate(&self) -> Result<(), AggError> {
        let bad = |m: &str| Err(AggError::Config(m.to_string()));
        if self.deadline_ms == 0 || self.deadline_ms > MAX_DEADLINE_MS {
            return Err(AggError::Config(format!(
                "deadline_ms = {} (allowed 1..={MAX_DEADLINE_MS})",
                self.deadline_ms
            )));
        }
        if self.max_samples_per_node == 0 {
            return bad("max_samples_per_node must be at least 1");
        }
        if !(self.max_weight_share.is_finite()
            && self.max_weight_share > 0.0
            && self.max_weight_share <= 1.0)
        {
            return bad("max_weight_share must be in (0, 1]");
        }
        validate_train(&self.train)?;
        self.lr_schedule.validate(self.train.lr, self.rounds)?;
        validate_codec(&self.codec)?;
        if !(self.sampling.fraction.is_finite()
            && self.sampling.fraction >= 0.0
            && self.sampling.fraction <= 1.0)
        {
            return bad("sampling.fraction must be in [0, 1]");
        }
        if !(self.quorum.is_finite() && (0.0..=1.0).contains(&self.quorum)) {
            return bad("quorum must be in [0, 1]");
        }
        if let Some(n) = self.max_update_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad("max_update_norm must be finite and positive");
            }
        }
        self.privacy.validate()?;
        if !self.privacy.is_off() {
            if !matches!(self.mode, Mode::Sync) {
                return bad("privacy: FedBuff (async) is not supported with differential privacy; use mode sync");
            }
            if self.sampling.fraction.is_nan() || self.sampling.fraction <= 0.0 {
                return bad("privacy: sampling.fraction (the Poisson rate q) must be in (0, 1]");
            }
            if self.privacy.mode == crate::privacy::PrivacyMode::Client
                && (self.codec.bits != 32 || self.codec.top_k.is_some())
            {
                return bad(
                    "privacy: mode = \"client\" needs the lossless codec (codec.bits = 32, no top_k): \
                     an error-feedback residual would carry un-noised data into later rounds",
                );
            }
        }
        if let Mode::Async(fb) = &self.mode {
            if fb.buffer_k == 0 {
                return bad("async buffer_k must be at least 1");
            }
            if let Discount::Polynomial { exponent } = fb.staleness {
                if !(exponent.is_finite() && exponent >= 0.0) {
                    return bad("staleness exponent must be finite and >= 0");
                }
            }
        }
        Ok(())
    }
}

/// Checks the local training settings of a plan (`train.*` fields).
pub fn validate_train(t: &TrainConfig) -> Result<(), AggError> {
    let bad = |m: String| Err(AggError::Config(m));
    if t.epochs == 0 || t.epochs > MAX_EPOCHS {
        return bad(format!(
            "train.epochs = {} (allowed 1..={MAX_EPOCHS})",
            t.epochs
        ));
    }
    if t.batch_size == 0 || t.batch_size > MAX_BATCH_SIZE {
        return bad(format!(
            "train.batch_size = {} (allowed 1..={MAX_BATCH_SIZE})",
            t.batch_size
        ));
    }
    if !(t.lr.is_finite() && t.lr > 0.0 && t.lr <= MAX_LR) {
        return bad(format!("train.lr = {} (allowed (0, {MAX_LR}])", t.lr));
    }
    if !(t.weight_decay.is_finite() && (0.0..1.0).contains(&t.weight_decay)) {
        return bad(format!(
            "train.weight_decay = {} (allowed [0, 1))",
            t.weight_decay
        ));
    }
    if !(t.prox_mu.is_finite() && (0.0..=MAX_PROX_MU).contains(&t.prox_mu)) {
        return bad(format!(
            "train.prox_mu = {} (allowed [0, {MAX_PROX_MU}])",
            t.prox_mu
        ));
    }
    if let Some(s) = t.max_steps {
        if s == 0 || s > MAX_LOCAL_STEPS {
            return bad(format!(
                "train.max_steps = {s} (allowed 1..={MAX_LOCAL_STEPS})"
            ));
        }
    }
    match t.optimizer {
        Optimizer::Sgd => {}
        Optimizer::Momentum { momentum, .. } => {
            if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
                return bad(format!(
                    "train.optimizer.momentum = {momentum} (allowed [0, 1))"
                ));
            }
        }
        Optimizer::Adam { beta1, beta2, eps } => {
            if !(beta1.is_finite() && (0.0..1.0).contains(&beta1)) {
                return bad(format!("train.optimizer.beta1 = {beta1} (allowed [0, 1))"));
            }
            if !(beta2.is_finite() && (0.0..1.0).contains(&beta2)) {
                return bad(format!("train.optimizer.beta2 = {beta2} (allowed [0, 1))"));
            }
            if !(eps.is_finite() && eps > 0.0) {
                return bad(format!(
                    "train.optimizer.eps = {eps} (must be finite and > 0)"
                ));
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(g) = t.frozen.iter().find(|g| !seen.insert(g.as_str())) {
        return bad(format!("train.frozen names `{g}` twice"));
    }
    Ok(())
}

/// Checks the codec settings of a plan (`codec.*` fields).
pub fn validate_codec(c: &CodecConfig) -> Result<(), AggError> {
    if !matches!(c.bits, 1 | 2 | 4 | 8 | 16 | 32) {
        return Err(AggError::Config(format!(
            "codec.bits = {} (use 32, 16, 8, 4, 2 or 1)",
            c.bits
        )));
    }
    c.validate()
        .map_err(|e| AggError::Config(format!("codec: {e}")))
}

/// The engine settings of the embedded default workload W0 (`cohort-sim`
/// with no arguments, `cohort-aggregator` without an experiment file):
/// federation `w0`, 1 local epoch of SGD (batch 32, lr 0.1), 8-bit deltas.
pub fn w0_engine() -> EngineConfig {
    let mut engine = EngineConfig {
        federation: "w0".into(),
        ..EngineConfig::default()
    };
    engine.train.epochs = 1;
    engine.train.batch_size = 32;
    engine.train.lr = 0.1;
    engine.codec.bits = 8;
    engine
}

/// W0's strategy: FedAvgM with server momentum 0.5, which closes most of
/// the gap that label skew opens between federated and centralized training
/// (see BENCHMARKS.md).
pub fn w0_strategy() -> crate::StrategyConfig {
    crate::StrategyConfig {
        kind: crate::StrategyKind::FedAvgM(crate::MomentumParams {
            server_lr: 1.0,
            momentum: 0.5,
        }),
        clip_norm: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_size_by_fraction_and_minimum() {
        let s = Sampling {
            fraction: 0.1,
            min_per_round: 3,
            min_available: 1,
        };
        assert_eq!(s.sample_size(100), 10);
        assert_eq!(s.sample_size(101), 11); // ceil
        assert_eq!(s.sample_size(20), 3); // minimum wins
        assert_eq!(s.sample_size(2), 2); // never more than available
        assert_eq!(s.sample_size(0), 0);
    }

    #[test]
    fn staleness_discounts() {
        assert_eq!(Discount::Constant.factor(9), 1.0);
        assert_eq!(Discount::default().factor(3), 0.5); // 1/sqrt(4)
        assert_eq!(Discount::Polynomial { exponent: 1.0 }.factor(4), 0.2);
    }

    #[test]
    fn config_reads_from_toml_with_defaults() {
        let cfg: EngineConfig = toml::from_str(
            r#"
            federation = "w0"
            seed = 3
            quorum = 0.8
            max_update_norm = 10.0
            [mode]
            kind = "async"
            buffer_k = 5
            [sampling]
            fraction = 0.1
            [group_policy]
            "head/a" = "local"
            [train]
            lr = 0.1
            "#,
        )
        .expect("toml");
        assert_eq!(cfg.federation, "w0");
        assert_eq!(
            cfg.mode,
            Mode::Async(FedBuffConfig {
                buffer_k: 5,
                ..FedBuffConfig::default()
            })
        );
        assert_eq!(cfg.sampling.fraction, 0.1);
        assert_eq!(cfg.sampling.min_per_round, 1);
        assert_eq!(cfg.policy("head/a"), GroupPolicy::Local);
        assert_eq!(cfg.policy("head/b"), GroupPolicy::Global);
        assert_eq!(cfg.train.lr, 0.1);
        assert_eq!(cfg.train.batch_size, 32);
        assert_eq!(cfg.deadline_ms, EngineConfig::default().deadline_ms);
        cfg.validate().expect("valid");
        let back: EngineConfig = toml::from_str(&toml::to_string(&cfg).expect("ser")).expect("de");
        assert_eq!(back, cfg);
        let bad = EngineConfig {
            quorum: 1.5,
            ..EngineConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn lr_schedules_start_at_train_lr_and_end_where_they_say() {
        let cos = LrSchedule::Cosine { final_lr: 0.0001 };
        assert_eq!(cos.lr(0.002, 1, 90), 0.002);
        assert!((cos.lr(0.002, 90, 90) - 0.0001).abs() < 1e-9);
        let mid = cos.lr(0.002, 45, 89); // halfway: the mean of the two
        assert!((mid - 0.00105).abs() < 1e-7, "{mid}");
        let lrs: Vec<f32> = (1..=90).map(|r| cos.lr(0.002, r, 90)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "not decreasing");
        assert_eq!(cos.lr(0.002, 200, 90), 0.0001);
        let exp = LrSchedule::Exponential { gamma: 0.5 };
        assert_eq!(exp.lr(0.4, 3, 0), 0.1);
        assert_eq!(LrSchedule::Constant.lr(0.3, 7, 10), 0.3);
    }

    #[test]
    fn lr_schedule_from_toml_and_checked() {
        let cfg: EngineConfig =
            toml::from_str("rounds = 10\nlr_schedule = { kind = \"cosine\", final_lr = 0.01 }\n")
                .expect("parses");
        assert_eq!(cfg.lr_schedule, LrSchedule::Cosine { final_lr: 0.01 });
        cfg.validate().expect("valid");
        assert_eq!(cfg.train_for(1).lr, cfg.train.lr);
        assert_eq!(cfg.train_for(10).lr, 0.01);
        // Constant is left out, so configs (and checkpoint hashes) without a
        // schedule serialize as before.
        let plain = toml::to_string(&EngineConfig::default()).expect("serializes");
        assert!(!plain.contains("lr_schedule"), "{plain}");
        let no_rounds = EngineConfig {
            rounds: 0,
            ..cfg.clone()
        };
        assert!(no_rounds.validate().is_err(), "cosine without rounds");
        let above = EngineConfig {
            lr_schedule: LrSchedule::Cosine { final_lr: 1.0 },
            ..cfg.clone()
        };
        assert!(above.validate().is_err(), "final_lr above train.lr");
        let gamma = EngineConfig {
            lr_schedule: LrSchedule::Exponential { gamma: 1.5 },
            ..cfg
        };
        assert!(gamma.validate().is_err(), "gamma above 1");
    }
}
