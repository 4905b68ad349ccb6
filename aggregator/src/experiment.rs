//! What an experiment file's top level implies for the engine and the
//! initial weights, written once: `cohort-sim` and `cohort-aggregator` both
//! call [`Federation::engine_config`] and [`Federation::init_seed`], so a
//! simulation and a deployment of the same file start from bit-identical
//! weights and the same engine settings.

use cohort_protocol::{head_group, mix_seed};

use crate::{EngineConfig, GroupPolicy};

/// The top-level settings of an experiment that the engine depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Federation {
    pub seed: u64,
    pub rounds: u64,
    /// Registered (or expected) nodes.
    pub clients: usize,
    /// Nodes sampled per round.
    pub per_round: usize,
    /// Tasks whose heads stay on their nodes (`heads = "local"`).
    pub local_heads: Vec<String>,
}

/// Salts of the derived seeds (part of the experiment's meaning: changing
/// one changes every run's numbers).
const INIT_SALT: u64 = 0x1417;
const TRAIN_SALT: u64 = 0x7EA1;

/// The seed of the initial weights of an experiment with seed `seed`.
pub fn init_seed(seed: u64) -> u64 {
    mix_seed(seed, INIT_SALT)
}

impl Federation {
    /// The seed the model's initial weights are drawn from.
    pub fn init_seed(&self) -> u64 {
        init_seed(self.seed)
    }

    /// `base` with the seed, the rounds, the sampling (fraction and
    /// minimum from the clients; at least one and at most all nodes
    /// available) and the local heads of this federation.
    pub fn engine_config(&self, base: &EngineConfig) -> EngineConfig {
        let mut e = base.clone();
        e.seed = self.seed;
        e.rounds = self.rounds;
        e.train.seed = mix_seed(self.seed, TRAIN_SALT);
        let n = self.clients.max(1);
        e.sampling.fraction = self.per_round as f64 / n as f64;
        e.sampling.min_per_round = self.per_round;
        e.sampling.min_available = e.sampling.min_available.min(n).max(1);
        for t in &self.local_heads {
            e.group_policy.insert(head_group(t), GroupPolicy::Local);
        }
        e
    }
}

impl crate::Engine {
    /// Refuses to go on with a model whose layout is not this engine's (a
    /// restart with another backbone or other tasks than the checkpoint's):
    /// the error names both layouts.
    pub fn check_layout(&self, model: &cohort_protocol::Layout) -> Result<(), crate::AggError> {
        if self.layout() == model {
            return Ok(());
        }
        Err(crate::AggError::ModelChanged {
            checkpoint: describe_layout(self.layout()),
            model: describe_layout(model),
        })
    }
}

/// `group [tensor shape, ...] (values)` per group, for error messages.
pub fn describe_layout(layout: &cohort_protocol::Layout) -> String {
    layout
        .groups
        .iter()
        .map(|g| {
            let tensors: Vec<String> = g
                .tensors
                .iter()
                .map(|t| {
                    let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
                    format!("{} {}", t.name, dims.join("x"))
                })
                .collect();
            format!("{} [{}] ({} values)", g.name, tensors.join(", "), g.len())
        })
        .collect::<Vec<_>>()
        .join("; ")
}
