//! Wire messages. This file holds the core types that the other crates build
//! on (training settings, the round plan, the update); the envelope and the
//! rest of the conversation are added beside them.

use serde::{Deserialize, Serialize};

use crate::codec::CodecConfig;

/// A node's identity as the aggregator knows it: the libp2p peer id in
/// deployment, `sim-<n>` in the simulator.
pub type NodeId = String;

/// Local optimizer a node uses for its training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Optimizer {
    Sgd,
    Momentum { momentum: f32, nesterov: bool },
    Adam { beta1: f32, beta2: f32, eps: f32 },
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Sgd
    }
}

/// How a node trains locally in one round. Sent in every [`RoundPlan`], and
/// used as-is by `cohort-tasks` for centralized training too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub epochs: u32,
    pub batch_size: u32,
    pub lr: f32,
    pub optimizer: Optimizer,
    /// L2 weight decay added to the gradient (`wd * w`).
    pub weight_decay: f32,
    /// FedProx: adds `mu/2 * ||w - w_start||^2` to the loss. 0 disables it.
    pub prox_mu: f32,
    /// Groups that must not change (bit-identical after training).
    pub frozen: Vec<String>,
    /// Seed of the batch order (and of anything else random in training).
    pub seed: u64,
    /// Stop after this many optimizer steps, whatever `epochs` says.
    pub max_steps: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 32,
            lr: 0.05,
            optimizer: Optimizer::Sgd,
            weight_decay: 0.0,
            prox_mu: 0.0,
            frozen: Vec::new(),
            seed: 0,
            max_steps: None,
        }
    }
}

/// What the aggregator asks one node to do in one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub federation: String,
    pub round: u64,
    /// Version of the global weights the node must start from.
    pub base_version: u64,
    /// Groups whose delta the node sends back. A node trains every group it
    /// holds except `train.frozen`; groups it holds that are not listed here
    /// are local (personalized) and never leave the node.
    pub upload: Vec<String>,
    pub train: TrainConfig,
    pub codec: CodecConfig,
    /// Time the node has, from receiving the plan, in milliseconds.
    pub deadline_ms: u64,
}

/// Training metrics of one task in one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    pub task: String,
    pub loss: f32,
    pub samples: u64,
    pub steps: u64,
}

/// The clear part of an update: who, which round, which groups, how much
/// data. The encoded deltas travel sealed beside it, and the sealing binds
/// these fields as associated data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    pub federation: String,
    pub round: u64,
    pub base_version: u64,
    pub node: NodeId,
    /// Groups in the sealed payload, in payload order.
    pub groups: Vec<String>,
    /// Examples seen per task (weights of the per-group averages).
    pub metrics: Vec<TaskMetrics>,
    /// Examples the node trained on (weight of the backbone average).
    pub num_examples: u64,
}

/// A node's update as sent: the header and the sealed, encoded deltas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub header: UpdateHeader,
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

/// Packs the encoded groups of an update (the plaintext that gets sealed):
/// for each group, its byte length as `u64` LE, then its bytes.
pub fn pack_groups<B: AsRef<[u8]>>(encoded: &[B]) -> Vec<u8> {
    let total: usize = encoded.iter().map(|b| 8 + b.as_ref().len()).sum();
    let mut out = Vec::with_capacity(total);
    for b in encoded {
        out.extend_from_slice(&(b.as_ref().len() as u64).to_le_bytes());
        out.extend_from_slice(b.as_ref());
    }
    out
}

/// Splits a packed payload into exactly `count` encoded groups, borrowing
/// from `bytes`. Any length that overruns the payload, a missing group or a
/// trailing byte is an error.
pub fn unpack_groups(bytes: &[u8], count: usize) -> Result<Vec<&[u8]>, crate::ProtocolError> {
    let malformed = |m: &str| crate::ProtocolError::Malformed(format!("packed groups: {m}"));
    // Each group takes at least its 8-byte length: bound `count` first.
    if count > bytes.len() / 8 {
        return Err(malformed("more groups announced than bytes allow"));
    }
    let mut out = Vec::with_capacity(count);
    let mut rest = bytes;
    for _ in 0..count {
        let (len, tail) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| malformed("truncated length"))?;
        let len = u64::from_le_bytes(*len);
        if len > tail.len() as u64 {
            return Err(malformed("group overruns the payload"));
        }
        let (group, tail) = tail.split_at(len as usize);
        out.push(group);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(out)
}
