//! Engine configuration: serde structs with `Default`, TOML-friendly.

use std::collections::BTreeMap;

use cohort_protocol::codec::CodecConfig;
use cohort_protocol::messages::TrainConfig;
use serde::{Deserialize, Serialize};

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
    /// Updates whose L2 norm (all groups together) is above this are refused.
    pub max_update_norm: Option<f32>,
    /// Rounds (sync) or model steps (async) to run; 0 = no limit.
    pub rounds: u64,
    /// Cap on decoded deltas kept in memory by strategies that must retain
    /// every update (median, trimmed mean, Krum); beyond it updates are
    /// refused with [`crate::RefusalCode::MemoryCap`].
    pub max_retained_bytes: u64,
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
            rounds: 0,
            max_retained_bytes: 1 << 30,
        }
    }
}

impl EngineConfig {
    pub fn policy(&self, group: &str) -> GroupPolicy {
        self.group_policy.get(group).copied().unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), AggError> {
        let bad = |m: &str| Err(AggError::Config(m.to_string()));
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
}
