use std::collections::BTreeMap;

use cohort_protocol::codec::{CodecConfig, ErrorFeedback};
use cohort_protocol::messages::{pack_groups, RoundPlan, TaskMetrics, Update, UpdateHeader};
use cohort_protocol::seal::{seal, SealContext, SealPublicKey};
pub use cohort_protocol::mix_seed;
use cohort_protocol::{codec, ParamGroups};
use cohort_tasks::{SharedModel, TaskData};
use serde::{Deserialize, Serialize};

use crate::NodeError;

/// What a node keeps between rounds: the weights of its local groups and the
/// error-feedback residual of each uploaded group. Both exist only once the
/// node has taken part in a round, so a node that never trained costs nothing.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeState {
    pub local: ParamGroups,
    pub residuals: BTreeMap<String, ErrorFeedback>,
}

impl NodeState {
    /// Bytes held by this state (weights and residuals).
    pub fn bytes(&self) -> usize {
        4 * (self.local.num_values()
            + self
                .residuals
                .values()
                .map(|r| r.residual.len())
                .sum::<usize>())
    }
}

/// One node: its identity, its model (the backbone and the heads of its
/// tasks), the aggregator's sealing key, and its state.
#[derive(Debug)]
pub struct NodeRuntime {
    pub id: String,
    pub federation: String,
    pub model: SharedModel,
    pub aggregator_key: SealPublicKey,
    pub state: NodeState,
}

/// The result of a round on a node.
#[derive(Debug)]
pub struct RoundOutput {
    pub update: Update,
    /// The weights after local training (all of the node's groups).
    pub trained: ParamGroups,
    /// Bytes of the encoded deltas before sealing.
    pub encoded_bytes: u64,
}

fn str_seed(s: &str) -> u64 {
    // FNV-1a: stable across platforms and releases, unlike DefaultHasher.
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl NodeRuntime {
    pub fn new(
        id: impl Into<String>,
        federation: impl Into<String>,
        model: SharedModel,
        aggregator_key: SealPublicKey,
    ) -> Self {
        NodeRuntime {
            id: id.into(),
            federation: federation.into(),
            model,
            aggregator_key,
            state: NodeState::default(),
        }
    }

    /// The names of the groups this node holds.
    pub fn groups(&self) -> Vec<String> {
        self.model
            .layout()
            .group_names()
            .map(str::to_string)
            .collect()
    }

    /// The weights this node starts a round from: uploaded (global) groups
    /// from `global`, local groups from its state, or from `global` the first
    /// time (a personalized head starts from the global initialization).
    pub fn start_weights(
        &self,
        plan: &RoundPlan,
        global: &ParamGroups,
    ) -> Result<ParamGroups, NodeError> {
        let mut start = ParamGroups::new();
        for name in self.model.layout().group_names() {
            let uploaded = plan.upload.iter().any(|g| g == name);
            let w = if uploaded {
                global.get(name)
            } else {
                self.state.local.get(name).or_else(|| global.get(name))
            };
            let w = w.ok_or_else(|| NodeError::MissingWeights(name.to_string()))?;
            start.insert(name, w.to_vec());
        }
        Ok(start)
    }

    /// Runs one round: trains on `data`, encodes the deltas of the uploaded
    /// groups with error feedback, seals them, and keeps local groups.
    pub fn run_round(
        &mut self,
        plan: &RoundPlan,
        global: &ParamGroups,
        data: &[TaskData<'_>],
    ) -> Result<RoundOutput, NodeError> {
        self.run_round_with(plan, global, data, |_, _| {})
    }

    /// [`run_round`](Self::run_round) with a hook that may alter each
    /// group's delta before it is encoded: how the simulator makes a node
    /// Byzantine (sign flip, scaling, noise) through the honest code path.
    pub fn run_round_with<F>(
        &mut self,
        plan: &RoundPlan,
        global: &ParamGroups,
        data: &[TaskData<'_>],
        mut tamper: F,
    ) -> Result<RoundOutput, NodeError>
    where
        F: FnMut(&str, &mut Vec<f32>),
    {
        if plan.federation != self.federation {
            return Err(NodeError::WrongFederation {
                expected: self.federation.clone(),
                got: plan.federation.clone(),
            });
        }
        let layout = self.model.layout();
        if let Some(g) = plan.upload.iter().find(|g| layout.group(g).is_none()) {
            return Err(NodeError::UnknownGroup(g.clone()));
        }
        if data.iter().all(|d| d.indices.is_empty()) {
            return Err(NodeError::NoData);
        }
        let start = self.start_weights(plan, global)?;
        let node_seed = mix_seed(mix_seed(plan.train.seed, str_seed(&self.id)), plan.round);
        let mut train_cfg = plan.train.clone();
        train_cfg.seed = node_seed;
        let outcome = self.model.train(&start, data, &train_cfg)?;

        let mut encoded = Vec::with_capacity(plan.upload.len());
        for (i, name) in plan.upload.iter().enumerate() {
            let (Some(new), Some(old)) = (outcome.params.get(name), start.get(name)) else {
                return Err(NodeError::MissingWeights(name.clone()));
            };
            let mut delta: Vec<f32> = new.iter().zip(old).map(|(n, o)| n - o).collect();
            tamper(name, &mut delta);
            let seed = mix_seed(node_seed, i as u64 + 1);
            encoded.push(self.encode_group(name, &delta, &plan.codec, seed)?);
        }
        for name in layout.group_names() {
            if !plan.upload.iter().any(|g| g == name) {
                if let Some(w) = outcome.params.get(name) {
                    self.state.local.insert(name, w.to_vec());
                }
            }
        }

        let encoded_bytes = encoded.iter().map(|e| e.len() as u64).sum();
        // The aggregator weights each head by the task's local data size.
        let metrics: Vec<TaskMetrics> = outcome
            .metrics
            .iter()
            .map(|m| {
                let n = data
                    .iter()
                    .filter(|d| d.task == m.task)
                    .map(|d| d.indices.len() as u64)
                    .sum();
                TaskMetrics {
                    samples: n,
                    ..m.clone()
                }
            })
            .collect();
        let num_examples = data.iter().map(|d| d.indices.len() as u64).sum();
        let header = UpdateHeader {
            federation: plan.federation.clone(),
            round: plan.round,
            base_version: plan.base_version,
            node: self.id.clone(),
            groups: plan.upload.clone(),
            metrics,
            num_examples,
        };
        let sealed = seal(
            &self.aggregator_key,
            &SealContext::of_update(&header),
            &pack_groups(&encoded),
        )?;
        Ok(RoundOutput {
            update: Update { header, sealed },
            trained: outcome.params,
            encoded_bytes,
        })
    }

    /// Encodes one group's delta. Lossy settings carry the residual over to
    /// the next round (error feedback); raw 32-bit encoding loses nothing, so
    /// it keeps no residual.
    fn encode_group(
        &mut self,
        name: &str,
        delta: &[f32],
        cfg: &CodecConfig,
        seed: u64,
    ) -> Result<Vec<u8>, NodeError> {
        if cfg.bits == 32 && cfg.top_k.is_none() {
            return Ok(codec::encode(delta, cfg, seed)?);
        }
        let ef = self.state.residuals.entry(name.to_string()).or_default();
        Ok(ef.encode(delta, cfg, seed)?)
    }
}
