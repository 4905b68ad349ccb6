//! The round engine: registration, sampling and plans, checks of every
//! update, streaming accumulation, round closing, FedBuff. No I/O, no clock:
//! time comes in as `now_ms` from the caller.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use cohort_protocol::codec::{self, decoded_len};
use cohort_protocol::messages::{
    unpack_groups, EvalReport, NodeId, RefusalCode, RoundPlan, UpdateHeader,
};
use cohort_protocol::{
    head_group, mix_seed, task_of_group, Fingerprint, Layout, ParamGroups, BACKBONE,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::{EngineConfig, GroupPolicy, Mode};
use crate::privacy::{self, PrivacyMode, PrivacyReport, PrivacyState, RdpAccountant};
use crate::registry::{NodeView, Registry};
use crate::strategy::{AggregateInput, ClientResult, Collect, Metrics, Strategy};
use crate::AggError;

/// Longest node id the engine accepts.
pub const MAX_NODE_ID_LEN: usize = 256;
/// Refusals kept for one report; beyond it they are only counted.
pub const MAX_REFUSALS_KEPT: usize = 1024;
/// Salt of the federated-evaluation stream (see
/// [`Engine::configure_evaluate`]).
const EVAL_SALT: u64 = 0xE7A1;
/// Salt of the differential-privacy noise stream (a function of the seed
/// and the round, so noise never shifts sampling and a resume draws the
/// same).
const DP_SALT: u64 = 0xD1FF;

/// A node's hello, as the engine needs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Tasks the node holds, with its number of training samples of each.
    pub tasks: Vec<(String, u64)>,
    /// Fingerprint of the node's sub-layout: the global layout restricted to
    /// `backbone` and the heads of its tasks.
    pub fingerprint: Fingerprint,
}

/// An update whose sealed payload the caller has already opened (the engine
/// does not depend on sealing). `groups[i]` is the encoded delta of
/// `header.groups[i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenedUpdate {
    pub header: UpdateHeader,
    pub groups: Vec<Vec<u8>>,
}

/// A refused update: a code and a human-readable reason. A refusal changes
/// nothing in the model or the accumulators.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{code:?}: {message}")]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

impl Refusal {
    fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Why a node did not contribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// Reported gone by the caller.
    Dropout,
    /// Nothing accepted before the deadline.
    Timeout,
    /// Unregistered while it had a plan.
    Unregistered,
    /// The node reported an error.
    Error(String),
    /// Its updates were refused until the deadline (last refusal).
    Refused(RefusalCode),
}

/// What an accepted update did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubmitOutcome {
    pub round: u64,
    /// Versions between the update's base and the current model (async).
    pub staleness: u64,
    /// The factor its staleness earned (1 in sync mode): the delta is
    /// multiplied by it, its example weight is not (FedBuff).
    pub discount: f64,
    /// Async: this update filled the buffer and the model stepped.
    pub model_stepped: bool,
}

/// What happened in one round (sync) or one model step (async).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u64,
    /// Model version after the round.
    pub version: u64,
    /// The model moved.
    pub stepped: bool,
    pub quorum_met: bool,
    pub sampled: usize,
    pub accepted: Vec<NodeId>,
    pub failures: Vec<(NodeId, FailureReason)>,
    pub refused: Vec<(NodeId, Refusal)>,
    /// Refusals beyond [`MAX_REFUSALS_KEPT`], only counted.
    pub refused_dropped: u64,
    /// Contributors per aggregated group.
    pub contributors: BTreeMap<String, u32>,
    /// Encoded bytes of the accepted updates.
    pub bytes_received: u64,
    /// Mean staleness of the accepted updates (async).
    pub mean_staleness: f64,
    /// Groups whose combined delta was not finite and were skipped.
    pub skipped_groups: Vec<String>,
    /// The server step made a weight or an optimizer moment non-finite: it
    /// was undone (model and strategy state as before the round) and the
    /// round failed.
    #[serde(default)]
    pub rolled_back: bool,
    /// Differential privacy: epsilon spent after this round and the
    /// round's parameters (none without privacy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyReport>,
    pub eval: Option<Metrics>,
    pub closed_at_ms: u64,
}

/// Caller-supplied central evaluation, called with the version and the new
/// global weights after each model step.
pub type Evaluator = Box<dyn FnMut(u64, &ParamGroups) -> Option<Metrics> + Send>;

/// An update held out of a streamed sum: one of the heaviest of its group,
/// whose weight the share cap may still lower when the round closes.
#[derive(Debug)]
struct Held {
    weight: f64,
    /// Index of its [`ClientResult`] in the round's results.
    result: usize,
    /// The delta, already scaled (clipping, staleness discount).
    delta: Vec<f32>,
}

/// Model-sized buffers kept across rounds: a round's sums, held deltas,
/// retained deltas and rollback copies would otherwise be fresh pages,
/// zeroed by the kernel on first touch, every round. Kept up to
/// `max_retained_bytes`, which a round may hold anyway.
#[derive(Debug, Default)]
struct Spares {
    free: Vec<Vec<f32>>,
    bytes: u64,
    budget: u64,
}

/// Spare buffers kept at most, whatever their size.
const MAX_SPARES: usize = 64;

impl Spares {
    fn new(budget: u64) -> Spares {
        Spares {
            budget,
            ..Spares::default()
        }
    }

    /// A buffer of `len` values whose contents are left over: for a caller
    /// that overwrites every value.
    fn any(&mut self, len: usize) -> Vec<f32> {
        match self.free.iter().position(|v| v.capacity() >= len) {
            Some(i) => {
                let mut v = self.free.swap_remove(i);
                self.bytes -= 4 * v.capacity() as u64;
                v.resize(len, 0.0);
                v
            }
            None => vec![0.0; len],
        }
    }

    fn zeroed(&mut self, len: usize) -> Vec<f32> {
        let mut v = self.any(len);
        v.fill(0.0);
        v
    }

    fn copy_of(&mut self, src: &[f32]) -> Vec<f32> {
        let mut v = self.any(src.len());
        v.copy_from_slice(src);
        v
    }

    fn give(&mut self, v: Vec<f32>) {
        let b = 4 * v.capacity() as u64;
        if self.free.len() < MAX_SPARES && b > 0 && self.bytes + b <= self.budget {
            self.bytes += b;
            self.free.push(v);
        }
    }
}

/// Collected updates of one group.
#[derive(Debug)]
enum GroupAcc {
    Stream {
        /// Weighted sum of the updates not in `held`.
        sum: Vec<f32>,
        /// Their total weight.
        weight: f64,
        count: u32,
        /// The `ceil(1 / max_weight_share)` heaviest updates (empty when the
        /// share is not capped). Only they can need capping: an update
        /// lighter than all of them is at most `1 / (m + 1)` of the total
        /// even after they are capped. Memory stays O(model), whatever the
        /// number of contributors.
        held: Vec<Held>,
    },
    Retain {
        deltas: Vec<Vec<f32>>,
        weights: Vec<f64>,
    },
}

impl GroupAcc {
    fn new(collect: Collect, len: usize, spares: &mut Spares) -> GroupAcc {
        match collect {
            Collect::Stream => GroupAcc::Stream {
                sum: spares.zeroed(len),
                weight: 0.0,
                count: 0,
                held: Vec::new(),
            },
            Collect::Retain => GroupAcc::Retain {
                deltas: Vec::new(),
                weights: Vec::new(),
            },
        }
    }

    /// Adds an accepted update of weight `w` whose delta is `scale` times
    /// the `len` values of `part`, keeping the `hold` heaviest out of a
    /// streamed sum. Returns the bytes it retained.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        part: &codec::Checked<'_>,
        len: usize,
        w: f64,
        scale: f64,
        hold: usize,
        result: usize,
        spares: &mut Spares,
    ) -> u64 {
        let c = scale as f32;
        let mut decoded = || {
            let mut d = spares.any(len);
            part.decode_scaled(c, &mut d);
            d
        };
        match self {
            GroupAcc::Stream {
                sum,
                weight,
                count,
                held,
            } => {
                *count += 1;
                if hold == 0 {
                    part.add_scaled_to((w * scale) as f32, 1.0, sum);
                    *weight += w;
                } else if held.len() < hold {
                    held.push(Held {
                        weight: w,
                        result,
                        delta: decoded(),
                    });
                } else {
                    // The lightest held (the first of equals) goes into the
                    // sum when a heavier one comes; its buffer is reused.
                    let lightest = held.iter().enumerate().fold(0, |best, (i, h)| {
                        if h.weight < held[best].weight {
                            i
                        } else {
                            best
                        }
                    });
                    let h = &mut held[lightest];
                    if w > h.weight {
                        let m = h.weight as f32;
                        for (a, x) in sum.iter_mut().zip(&h.delta) {
                            *a += m * x;
                        }
                        *weight += h.weight;
                        part.decode_scaled(c, &mut h.delta);
                        h.weight = w;
                        h.result = result;
                    } else {
                        part.add_scaled_to(w as f32, c, sum);
                        *weight += w;
                    }
                }
                0
            }
            GroupAcc::Retain { deltas, weights } => {
                deltas.push(decoded());
                weights.push(w);
                4 * len as u64
            }
        }
    }
}

/// Everything collected since the last model step.
#[derive(Debug, Default)]
struct Collecting {
    groups: BTreeMap<String, GroupAcc>,
    retained_bytes: u64,
    accepted: Vec<NodeId>,
    /// One per accepted update, in submission order.
    results: Vec<ClientResult>,
    staleness_sum: u64,
    failures: Vec<(NodeId, FailureReason)>,
    refused: Vec<(NodeId, Refusal)>,
    refused_dropped: u64,
    bytes: u64,
}

impl Collecting {
    fn refuse(&mut self, node: &str, r: &Refusal) {
        if self.refused.len() < MAX_REFUSALS_KEPT {
            self.refused.push((node.to_string(), r.clone()));
        } else {
            self.refused_dropped += 1;
        }
    }
}

/// A plan handed out and not yet answered.
#[derive(Clone, Debug)]
struct Issued {
    plan: RoundPlan,
    deadline_at: u64,
}

/// The open synchronous round.
#[derive(Debug)]
struct SyncRound {
    round: u64,
    deadline_at: u64,
    plans: BTreeMap<NodeId, Issued>,
    resolved: BTreeSet<NodeId>,
    accepted: BTreeSet<NodeId>,
    last_refusal: BTreeMap<NodeId, RefusalCode>,
}

/// Differential privacy in the engine (see [`crate::privacy`]).
#[derive(Clone, Debug)]
pub(crate) struct Dp {
    /// The accounted noise multiplier.
    z: f64,
    /// Poisson sampling rate.
    q: f64,
    /// RDP of one round at `(q, z)` at the accountant's orders (the budget
    /// check, without recomputing it).
    round_rdp: Vec<f64>,
    pub(crate) state: PrivacyState,
    round: Option<DpRound>,
}

/// The privacy parameters of the open round, fixed at its start.
#[derive(Clone, Debug)]
struct DpRound {
    clip: f64,
    /// Expected contributors: `q * registered`.
    expected: f64,
    /// Per global group, the fixed denominator `q * (nodes uploading it)`.
    denominators: BTreeMap<String, f64>,
    /// Noise multiplier of the sum (below `z` with adaptive clipping).
    sum_z: f64,
    /// Adaptive clipping: std of the count's noise.
    count_std: Option<f64>,
    /// Adaptive clipping: accepted updates with a norm at most `clip`.
    under: u64,
}

/// The engine. See the crate docs for the calling sequence.
pub struct Engine {
    pub(crate) cfg: EngineConfig,
    pub(crate) layout: Layout,
    pub(crate) global: ParamGroups,
    pub(crate) version: u64,
    /// Sync: the last round started. Async: model steps taken.
    pub(crate) round: u64,
    pub(crate) strategy: Box<dyn Strategy>,
    pub(crate) rng: ChaCha8Rng,
    /// The registered nodes, compact (see [`crate::registry`]).
    pub(crate) nodes: Registry,
    sync_round: Option<SyncRound>,
    outstanding: BTreeMap<NodeId, Issued>,
    /// Async: round of each node's last accepted update (duplicate check).
    last_accepted: BTreeMap<NodeId, u64>,
    collecting: Collecting,
    spares: Spares,
    reports: VecDeque<RoundReport>,
    evaluator: Option<Evaluator>,
    /// The effective bound on an update's L2 norm.
    norm_bound: f32,
    pub(crate) dp: Option<Dp>,
    /// Mixed into the DP noise streams when set (see
    /// [`Engine::set_noise_secret`]).
    noise_secret: Option<u64>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("federation", &self.cfg.federation)
            .field("strategy", &self.strategy.name())
            .field("round", &self.round)
            .field("version", &self.version)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A new engine at version 0, round 0, on `initial` weights or on the
    /// ones the strategy's [`Strategy::initial_parameters`] gives instead
    /// (checked against `layout`: every group, its length, finite values;
    /// [`AggError::Strategy`] otherwise). [`Engine::resume`] does not call
    /// that hook: it takes the checkpoint's weights.
    pub fn new(
        cfg: EngineConfig,
        layout: Layout,
        initial: ParamGroups,
        mut strategy: Box<dyn Strategy>,
    ) -> Result<Self, AggError> {
        let initial = match strategy.initial_parameters(&layout, &initial) {
            None => initial,
            Some(own) => {
                let bad = |message: String| AggError::Strategy {
                    strategy: strategy.name().to_string(),
                    message: format!("initial parameters: {message}"),
                };
                layout.check(&own).map_err(|e| bad(e.to_string()))?;
                if let Some((g, i)) = own
                    .iter()
                    .find_map(|(g, w)| w.iter().position(|v| !v.is_finite()).map(|i| (g, i)))
                {
                    return Err(bad(format!("`{g}`[{i}] is not finite")));
                }
                own
            }
        };
        Self::build(cfg, layout, initial, strategy)
    }

    /// [`Engine::new`] without the strategy's initial parameters (resume).
    pub(crate) fn build(
        cfg: EngineConfig,
        layout: Layout,
        initial: ParamGroups,
        strategy: Box<dyn Strategy>,
    ) -> Result<Self, AggError> {
        cfg.validate()?;
        layout.validate()?;
        layout.check(&initial)?;
        for (g, w) in initial.iter() {
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(AggError::Config(format!(
                    "initial weights: `{g}`[{i}] is not finite"
                )));
            }
        }
        for name in cfg.group_policy.keys() {
            if layout.group(name).is_none() {
                return Err(AggError::Config(format!(
                    "group_policy names unknown group `{name}`"
                )));
            }
        }
        for name in &cfg.train.frozen {
            if layout.group(name).is_none() {
                return Err(AggError::Config(format!(
                    "train.frozen names unknown group `{name}`"
                )));
            }
        }
        let norm_bound = cfg
            .max_update_norm
            .unwrap_or_else(|| crate::config::default_max_update_norm(&layout));
        let dp = if cfg.privacy.is_off() {
            None
        } else {
            if strategy.collect() != Collect::Stream {
                return Err(AggError::Config(format!(
                    "privacy: strategy `{}` does not combine a weighted sum (median, trimmed mean \
                     and Krum keep every update); DP-FedAvg needs one of fedavg, fedavgm, \
                     fedadam, fedyogi, fedadagrad or fedprox",
                    strategy.name()
                )));
            }
            let q = cfg.sampling.fraction;
            let z = cfg.privacy.resolve_noise(q, cfg.rounds)?;
            let accountant = RdpAccountant::default();
            let round_rdp = accountant.round_rdp(q, z);
            info!(
                q,
                noise_multiplier = z,
                clip = cfg.privacy.clip,
                "differential privacy on"
            );
            Some(Dp {
                z,
                q,
                round_rdp,
                state: PrivacyState {
                    accountant,
                    clip: cfg.privacy.clip,
                },
                round: None,
            })
        };
        let spares = Spares::new(cfg.max_retained_bytes);
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Ok(Engine {
            cfg,
            layout,
            global: initial,
            version: 0,
            round: 0,
            strategy,
            rng,
            nodes: Registry::default(),
            sync_round: None,
            outstanding: BTreeMap::new(),
            last_accepted: BTreeMap::new(),
            collecting: Collecting::default(),
            spares,
            reports: VecDeque::new(),
            evaluator: None,
            norm_bound,
            dp,
            noise_secret: None,
        })
    }

    /// Central evaluation run after each model step (its result goes in the
    /// report); replaces the strategy's own `evaluate`.
    pub fn set_evaluator(&mut self, evaluator: Evaluator) {
        self.evaluator = Some(evaluator);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn global(&self) -> &ParamGroups {
        &self.global
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn round(&self) -> u64 {
        self.round
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn strategy(&self) -> &dyn Strategy {
        self.strategy.as_ref()
    }
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }
    /// A registered node's hello.
    /// A registered node's hello as recorded, built on demand (the
    /// registry keeps no `NodeInfo`): its tasks come sorted by name.
    pub fn node(&self, id: &str) -> Option<NodeInfo> {
        self.nodes.get(id).and_then(|n| n.info(id))
    }
    /// Whether `id` is registered (without building its [`NodeInfo`]).
    pub fn is_registered(&self, id: &str) -> bool {
        self.nodes.contains_key(id)
    }
    /// Ids of the registered nodes, in order.
    pub fn node_ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.ids()
    }
    /// The groups a registered node uploads (its global groups).
    pub fn upload_groups(&self, id: &str) -> Option<&[String]> {
        self.nodes.get(id).map(|n| n.upload)
    }
    /// A synchronous round is open.
    pub fn round_open(&self) -> bool {
        self.sync_round.is_some()
    }
    /// The configured number of rounds (model steps in async) is done, or
    /// the next round would spend more than the privacy budget.
    pub fn is_finished(&self) -> bool {
        (self.cfg.rounds > 0 && self.round >= self.cfg.rounds) || self.budget_exhausted()
    }

    /// The next round would take epsilon over `privacy.budget_epsilon`.
    pub fn budget_exhausted(&self) -> bool {
        let (Some(dp), Some(budget)) = (&self.dp, self.cfg.privacy.budget_epsilon) else {
            return false;
        };
        let a = &dp.state.accountant;
        let rdp: Vec<f64> = a
            .rdp
            .iter()
            .zip(&dp.round_rdp)
            .map(|(r, p)| r + p)
            .collect();
        privacy::accountant::epsilon_from_rdp(&a.orders, &rdp, self.cfg.privacy.delta).0 > budget
    }

    /// Differential privacy: epsilon spent so far (at `privacy.delta`).
    pub fn epsilon(&self) -> Option<f64> {
        self.dp
            .as_ref()
            .map(|dp| dp.state.accountant.epsilon(self.cfg.privacy.delta))
    }

    /// Client-mode DP of the open round: the clip and each node's share of
    /// the noise, `z C / sqrt(m)` for `m` expected contributors, so that
    /// `m` shares add up to `N(0, (z C)^2)`.
    fn client_noise(&self) -> Option<cohort_protocol::messages::ClientNoise> {
        if self.cfg.privacy.mode != PrivacyMode::Client {
            return None;
        }
        let dp = self.dp.as_ref()?;
        let r = dp.round.as_ref()?;
        let m = r.expected.max(1.0);
        Some(cohort_protocol::messages::ClientNoise {
            clip: r.clip as f32,
            noise_std: (dp.z * r.clip / m.sqrt()) as f32,
        })
    }

    /// Mixes `secret` into the DP noise streams. Without it the noise is a
    /// function of the seed and the round (runs are reproducible, as the
    /// simulator needs), so anyone who knows the seed could subtract it: a
    /// deployment sets a secret from the operating system's randomness
    /// (`service::Aggregator` does). Not checkpointed; a resumed engine
    /// gets a new one.
    pub fn set_noise_secret(&mut self, secret: u64) {
        self.noise_secret = Some(secret);
    }

    /// The seed of a DP noise stream of `round`.
    fn noise_seed(&self, salt: u64, round: u64) -> u64 {
        let s = mix_seed(self.cfg.seed ^ salt, round);
        match self.noise_secret {
            Some(k) => mix_seed(s, k),
            None => s,
        }
    }

    /// Differential privacy: the accounted noise multiplier (configured,
    /// or solved from `target_epsilon`).
    pub fn noise_multiplier(&self) -> Option<f64> {
        self.dp.as_ref().map(|dp| dp.z)
    }

    /// Differential privacy: the current clip norm.
    pub fn clip_norm(&self) -> Option<f64> {
        self.dp.as_ref().map(|dp| dp.state.clip)
    }
    /// Bytes of decoded deltas kept by a retaining strategy right now.
    pub fn retained_bytes(&self) -> u64 {
        self.collecting.retained_bytes
    }
    /// The bound on an update's L2 norm in force (configured, or derived
    /// from the layout).
    pub fn max_update_norm(&self) -> f32 {
        self.norm_bound
    }

    /// Bytes held by the accumulators: the running sums of streaming
    /// strategies (O(model), whatever the contributors) plus retained deltas.
    pub fn accumulator_bytes(&self) -> u64 {
        self.collecting
            .groups
            .values()
            .map(|a| match a {
                GroupAcc::Stream { sum, held, .. } => {
                    4 * (sum.len() + held.iter().map(|h| h.delta.len()).sum::<usize>()) as u64
                }
                GroupAcc::Retain { deltas, .. } => deltas.iter().map(|d| 4 * d.len() as u64).sum(),
            })
            .sum()
    }

    /// A digest of the accumulators (sums, weights, retained deltas), for
    /// tests that a refused update changed nothing.
    pub fn accumulator_digest(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for (g, acc) in &self.collecting.groups {
            ctx.update(g.as_bytes());
            match acc {
                GroupAcc::Stream {
                    sum,
                    weight,
                    count,
                    held,
                } => {
                    ctx.update(&weight.to_le_bytes());
                    ctx.update(&count.to_le_bytes());
                    for v in sum {
                        ctx.update(&v.to_le_bytes());
                    }
                    for h in held {
                        ctx.update(&h.weight.to_le_bytes());
                        for v in &h.delta {
                            ctx.update(&v.to_le_bytes());
                        }
                    }
                }
                GroupAcc::Retain { deltas, weights } => {
                    for (d, w) in deltas.iter().zip(weights) {
                        ctx.update(&w.to_le_bytes());
                        for v in d {
                            ctx.update(&v.to_le_bytes());
                        }
                    }
                }
            }
        }
        ctx.update(&(self.collecting.accepted.len() as u64).to_le_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// The groups a node with these tasks holds, in layout order.
    pub fn groups_of(&self, tasks: &[String]) -> Vec<String> {
        self.layout
            .group_names()
            .filter(|g| {
                *g == BACKBONE || task_of_group(g).is_some_and(|t| tasks.iter().any(|x| x == t))
            })
            .map(str::to_string)
            .collect()
    }

    /// Hello: checks the node's sub-layout fingerprint and records it.
    /// Registering again replaces the previous record.
    pub fn register(&mut self, node: NodeInfo) -> Result<(), AggError> {
        let refuse = |reason: String| AggError::Registration {
            node: node.id.clone(),
            reason,
        };
        if node.id.is_empty() || node.id.len() > MAX_NODE_ID_LEN {
            return Err(refuse(format!(
                "node id must have 1..={MAX_NODE_ID_LEN} bytes"
            )));
        }
        let mut samples = BTreeMap::new();
        for (task, n) in &node.tasks {
            if *n > self.cfg.max_samples_per_node {
                warn!(
                    node = %node.id,
                    task = %task,
                    claimed = n,
                    cap = self.cfg.max_samples_per_node,
                    "hello claims more samples than max_samples_per_node; its weight is capped"
                );
            }
            if self.layout.group(&head_group(task)).is_none() {
                return Err(refuse(format!("unknown task `{task}`")));
            }
            if samples.insert(task.clone(), *n).is_some() {
                return Err(refuse(format!("task `{task}` listed twice")));
            }
        }
        let tasks: Vec<String> = samples.keys().cloned().collect();
        let held = self.groups_of(&tasks);
        // Nodes with the same tasks share the fingerprint: hash the
        // sub-layout only for a task set nobody registered yet.
        let expected = match self.nodes.known_fingerprint(&tasks) {
            Some(f) => f,
            None => self.layout.subset(&held)?.fingerprint(),
        };
        if expected != node.fingerprint {
            warn!(node = %node.id, got = %node.fingerprint, %expected, "layout fingerprint mismatch");
            return Err(refuse(format!(
                "layout fingerprint {} does not match the expected {expected}",
                node.fingerprint
            )));
        }
        let upload = held
            .into_iter()
            .filter(|g| self.cfg.policy(g) == GroupPolicy::Global)
            .collect();
        debug!(node = %node.id, "registered");
        self.nodes
            .insert(&node.id, &samples, upload, node.fingerprint);
        Ok(())
    }

    /// The node is gone: it leaves the pool, and a plan it held becomes a
    /// failure.
    pub fn unregister(&mut self, node: &str) {
        if self.nodes.remove(node) {
            debug!(node, "unregistered");
        }
        self.last_accepted.remove(node);
        self.fail(node, FailureReason::Unregistered);
    }

    /// A dropout, error or timeout reported by the caller. Ignored for a
    /// node without a pending plan.
    pub fn fail(&mut self, node: &str, reason: FailureReason) {
        if let Some(r) = self.sync_round.as_mut() {
            if r.plans.contains_key(node) && !r.resolved.contains(node) {
                r.resolved.insert(node.to_string());
                info!(node, ?reason, round = r.round, "node failed");
                self.collecting.failures.push((node.to_string(), reason));
                return;
            }
        }
        if self.outstanding.remove(node).is_some() {
            info!(node, ?reason, "node failed");
            self.collecting.failures.push((node.to_string(), reason));
        }
    }

    fn plan(
        &self,
        node: NodeView<'_>,
        round: u64,
        train: cohort_protocol::messages::TrainConfig,
        deadline_ms: u64,
    ) -> RoundPlan {
        let upload = node
            .upload
            .iter()
            .filter(|g| !train.frozen.contains(g))
            .cloned()
            .collect();
        RoundPlan {
            federation: self.cfg.federation.clone(),
            round,
            base_version: self.version,
            upload,
            train,
            codec: self.cfg.codec.clone(),
            deadline_ms,
            privacy: self.client_noise(),
        }
    }

    /// Sync: samples the nodes of the next round and returns their plans
    /// (in node order).
    pub fn start_round(&mut self, now_ms: u64) -> Result<Vec<(NodeId, RoundPlan)>, AggError> {
        if !matches!(self.cfg.mode, Mode::Sync) {
            return Err(AggError::WrongMode("start_round"));
        }
        if let Some(r) = &self.sync_round {
            return Err(AggError::RoundOpen(r.round));
        }
        if self.is_finished() {
            return Err(AggError::Finished(self.cfg.rounds));
        }
        let available: Vec<NodeId> = self.nodes.id_list();
        let needed = self.cfg.sampling.min_available.max(1);
        if available.len() < needed {
            return Err(AggError::NotEnoughNodes {
                available: available.len(),
                needed,
            });
        }
        let round = self.round + 1;
        let base = self.cfg.train_for(round);
        let picked = if let Some(dp) = self.dp.as_mut() {
            // Poisson sampling, which the accountant analyses: each node
            // independently with probability q, then (in node order) its
            // training settings and seed.
            let q = dp.q;
            let chosen: Vec<NodeId> = available
                .iter()
                .filter(|_| rand::Rng::gen::<f64>(&mut self.rng) < q)
                .cloned()
                .collect();
            let mut denominators = BTreeMap::new();
            for g in self.layout.group_names() {
                // Only groups that can be uploaded get a (noised) mean.
                if self.cfg.policy(g) != GroupPolicy::Global
                    || self.cfg.train.frozen.iter().any(|f| f == g)
                {
                    continue;
                }
                let holders = self.nodes.holders(g);
                denominators.insert(g.to_string(), q * holders as f64);
            }
            let expected = q * available.len() as f64;
            let (sum_z, count_std) = match &self.cfg.privacy.adaptive {
                None => (dp.z, None),
                Some(a) => {
                    let std = a.count_stddev.unwrap_or(expected / 20.0);
                    let sum_z = privacy::update_noise_multiplier(dp.z, std).ok_or_else(|| {
                        AggError::Config(format!(
                            "privacy: the count's noise (std {std}) must exceed half the noise \
                             multiplier {}; raise adaptive.count_stddev or sample more nodes",
                            dp.z
                        ))
                    })?;
                    (sum_z, Some(std))
                }
            };
            dp.round = Some(DpRound {
                clip: dp.state.clip,
                expected,
                denominators,
                sum_z,
                count_std,
                under: 0,
            });
            chosen
                .into_iter()
                .map(|node| {
                    let mut train = self.strategy.train_config(round, &node, &base);
                    train.seed = rand::RngCore::next_u64(&mut self.rng);
                    (node, train)
                })
                .collect()
        } else {
            self.strategy
                .configure(round, &available, &self.cfg.sampling, &base, &mut self.rng)
        };
        let deadline_at = now_ms.saturating_add(self.cfg.deadline_ms);
        let mut plans = BTreeMap::new();
        let mut out = Vec::with_capacity(picked.len());
        for (id, train) in picked {
            let Some(node) = self.nodes.get(&id) else {
                continue;
            };
            let plan = self.plan(node, round, train, self.cfg.deadline_ms);
            plans.insert(
                id.clone(),
                Issued {
                    plan: plan.clone(),
                    deadline_at,
                },
            );
            out.push((id, plan));
        }
        // Under DP an empty Poisson sample is a round like any other
        // (resampling would change the analysis).
        if out.is_empty() && self.dp.is_none() {
            return Err(AggError::NotEnoughNodes {
                available: available.len(),
                needed: 1,
            });
        }
        self.round = round;
        info!(
            round,
            sampled = out.len(),
            available = available.len(),
            "round started"
        );
        self.sync_round = Some(SyncRound {
            round,
            deadline_at,
            plans,
            resolved: BTreeSet::new(),
            accepted: BTreeSet::new(),
            last_refusal: BTreeMap::new(),
        });
        Ok(out)
    }

    /// Sync: the plan of a sampled node of the open round (with the time
    /// left). Async: a fresh plan on the current model.
    pub fn plan_for(&mut self, node: &str, now_ms: u64) -> Result<RoundPlan, AggError> {
        let Some(entry) = self.nodes.get(node) else {
            return Err(AggError::UnknownNode(node.to_string()));
        };
        match self.cfg.mode {
            Mode::Sync => {
                let r = self.sync_round.as_ref().ok_or(AggError::NoRoundOpen)?;
                match r.plans.get(node) {
                    Some(i) if !r.resolved.contains(node) => {
                        let mut plan = i.plan.clone();
                        plan.deadline_ms = r.deadline_at.saturating_sub(now_ms);
                        Ok(plan)
                    }
                    _ => Err(AggError::NotSampled(node.to_string())),
                }
            }
            Mode::Async(_) => {
                if self.is_finished() {
                    return Err(AggError::Finished(self.cfg.rounds));
                }
                let round = self.version;
                let base = self.cfg.train_for(round);
                let mut train = self.strategy.train_config(round, node, &base);
                train.seed = rand::RngCore::next_u64(&mut self.rng);
                let plan = self.plan(entry, round, train, self.cfg.deadline_ms);
                let deadline_at = now_ms.saturating_add(self.cfg.deadline_ms);
                self.outstanding.insert(
                    node.to_string(),
                    Issued {
                        plan: plan.clone(),
                        deadline_at,
                    },
                );
                Ok(plan)
            }
        }
    }

    /// The plan that an update of `node` would answer now, read-only: in
    /// sync mode its plan in the open round unless it was answered or
    /// failed already, in async mode its outstanding plan. A transport
    /// checks an update's header against it before it pays for opening the
    /// seal (the engine checks everything again after).
    pub fn open_plan(&self, node: &str) -> Option<&RoundPlan> {
        match self.cfg.mode {
            Mode::Sync => {
                let r = self.sync_round.as_ref()?;
                if r.resolved.contains(node) || r.accepted.contains(node) {
                    return None;
                }
                r.plans.get(node).map(|i| &i.plan)
            }
            Mode::Async(_) => self.outstanding.get(node).map(|i| &i.plan),
        }
    }

    /// Checks an opened update and, if it passes, adds it to the round's
    /// accumulators. A refusal changes nothing but the report.
    pub fn submit(&mut self, update: OpenedUpdate, now_ms: u64) -> Result<SubmitOutcome, Refusal> {
        let groups: Vec<&[u8]> = update.groups.iter().map(Vec::as_slice).collect();
        self.submit_groups(&update.header, &groups, now_ms)
    }

    /// Same as [`Engine::submit`], from the packed plaintext of a sealed
    /// update (`messages::pack_groups` layout).
    pub fn submit_packed(
        &mut self,
        header: &UpdateHeader,
        packed: &[u8],
        now_ms: u64,
    ) -> Result<SubmitOutcome, Refusal> {
        match unpack_groups(packed, header.groups.len()) {
            Ok(groups) => self.submit_groups(header, &groups, now_ms),
            Err(e) => {
                let r = Refusal::new(RefusalCode::Malformed, e.to_string());
                self.log_refusal(&header.node, &r);
                Err(r)
            }
        }
    }

    /// Same as [`Engine::submit`], with borrowed encoded groups.
    pub fn submit_groups(
        &mut self,
        header: &UpdateHeader,
        groups: &[&[u8]],
        now_ms: u64,
    ) -> Result<SubmitOutcome, Refusal> {
        match self.check_and_accumulate(header, groups, now_ms) {
            Ok(o) => Ok(o),
            Err(r) => {
                self.log_refusal(&header.node, &r);
                Err(r)
            }
        }
    }

    fn log_refusal(&mut self, node: &str, r: &Refusal) {
        warn!(node, code = ?r.code, reason = %r.message, "update refused");
        // Only registered nodes get a line in the report: anyone can make
        // up ids, and the report must stay bounded.
        if self.nodes.contains_key(node) {
            self.collecting.refuse(node, r);
            if let Some(round) = self.sync_round.as_mut() {
                if round.plans.contains_key(node) {
                    round.last_refusal.insert(node.to_string(), r.code);
                }
            }
        }
    }

    fn check_and_accumulate(
        &mut self,
        h: &UpdateHeader,
        encoded: &[&[u8]],
        now_ms: u64,
    ) -> Result<SubmitOutcome, Refusal> {
        use RefusalCode as C;
        if h.federation != self.cfg.federation {
            return Err(Refusal::new(
                C::WrongFederation,
                format!("federation `{}`", h.federation),
            ));
        }
        let Some(node) = self.nodes.get(&h.node) else {
            return Err(Refusal::new(
                C::UnknownNode,
                format!("node `{}` is not registered", h.node),
            ));
        };
        // Round, base version, deadline, duplicates: which plan answers this?
        let (plan, staleness, discount) = match &self.cfg.mode {
            Mode::Sync => {
                let Some(r) = &self.sync_round else {
                    return Err(if h.round <= self.round {
                        Refusal::new(C::LateUpdate, format!("round {} is closed", h.round))
                    } else {
                        Refusal::new(C::WrongRound, format!("round {} has not started", h.round))
                    });
                };
                if h.round < r.round {
                    return Err(Refusal::new(
                        C::LateUpdate,
                        format!("round {} is closed", h.round),
                    ));
                }
                if h.round != r.round {
                    return Err(Refusal::new(
                        C::WrongRound,
                        format!("round {} is not the open round {}", h.round, r.round),
                    ));
                }
                let Some(issued) = r.plans.get(&h.node) else {
                    return Err(Refusal::new(
                        C::NotSampled,
                        format!("not sampled in round {}", r.round),
                    ));
                };
                if r.accepted.contains(&h.node) {
                    return Err(Refusal::new(
                        C::Duplicate,
                        format!("already has an update in round {}", r.round),
                    ));
                }
                if r.resolved.contains(&h.node) {
                    return Err(Refusal::new(
                        C::LateUpdate,
                        "recorded as failed in this round",
                    ));
                }
                if now_ms > r.deadline_at {
                    return Err(Refusal::new(
                        C::LateUpdate,
                        format!("{} ms after the deadline", now_ms - r.deadline_at),
                    ));
                }
                if h.base_version != issued.plan.base_version {
                    return Err(Refusal::new(
                        C::StaleBase,
                        format!(
                            "base version {} instead of {}",
                            h.base_version, issued.plan.base_version
                        ),
                    ));
                }
                (&issued.plan, 0, 1.0)
            }
            Mode::Async(fb) => {
                // The configured steps are done: updates still in flight
                // must not start another.
                if self.is_finished() {
                    return Err(Refusal::new(
                        C::Finished,
                        format!("the run took its {} model steps", self.cfg.rounds),
                    ));
                }
                if self.last_accepted.get(&h.node) == Some(&h.round)
                    && !self.outstanding.contains_key(&h.node)
                {
                    return Err(Refusal::new(
                        C::Duplicate,
                        format!("already has an update for round {}", h.round),
                    ));
                }
                let Some(issued) = self.outstanding.get(&h.node) else {
                    return Err(Refusal::new(C::NotSampled, "no plan outstanding"));
                };
                if h.round != issued.plan.round {
                    return Err(Refusal::new(
                        C::WrongRound,
                        format!("round {} is not the plan's {}", h.round, issued.plan.round),
                    ));
                }
                if h.base_version != issued.plan.base_version {
                    return Err(Refusal::new(
                        C::StaleBase,
                        format!(
                            "base version {} instead of {}",
                            h.base_version, issued.plan.base_version
                        ),
                    ));
                }
                if now_ms > issued.deadline_at {
                    return Err(Refusal::new(
                        C::LateUpdate,
                        format!("{} ms after the deadline", now_ms - issued.deadline_at),
                    ));
                }
                let staleness = self.version.saturating_sub(h.base_version);
                if staleness > fb.max_staleness {
                    return Err(Refusal::new(
                        C::StaleBase,
                        format!(
                            "staleness {staleness} over the maximum {}",
                            fb.max_staleness
                        ),
                    ));
                }
                (&issued.plan, staleness, fb.staleness.factor(staleness))
            }
        };
        // Groups: allowed for this node, in the plan, each once.
        if encoded.len() != h.groups.len() {
            return Err(Refusal::new(
                C::Malformed,
                format!("{} groups named, {} sent", h.groups.len(), encoded.len()),
            ));
        }
        if h.groups.is_empty() {
            return Err(Refusal::new(C::Malformed, "no group"));
        }
        let mut seen = BTreeSet::new();
        let mut total_len = 0u64;
        let mut lens = Vec::with_capacity(h.groups.len());
        for (g, bytes) in h.groups.iter().zip(encoded) {
            if !seen.insert(g.as_str()) {
                return Err(Refusal::new(
                    C::Malformed,
                    format!("group `{g}` sent twice"),
                ));
            }
            if !plan.upload.contains(g) {
                let why = match self.layout.group(g) {
                    None => "unknown group",
                    Some(_) if self.cfg.policy(g) == GroupPolicy::Local => {
                        "local group, never uploaded"
                    }
                    Some(_) if !node.upload.contains(g) => "group the node does not hold",
                    Some(_) => "group not in the plan",
                };
                return Err(Refusal::new(C::GroupNotAllowed, format!("`{g}`: {why}")));
            }
            let expected = self.layout.group(g).map(|gl| gl.len()).unwrap_or(0);
            let got = decoded_len(bytes)
                .map_err(|e| Refusal::new(C::Malformed, format!("`{g}`: {e}")))?;
            if got != expected {
                return Err(Refusal::new(
                    C::WrongLength,
                    format!("`{g}` holds {got} values, the layout says {expected}"),
                ));
            }
            lens.push(expected as usize);
            total_len += expected;
        }
        let mut weights = claimed_weights(h, &node, plan, self.cfg.max_samples_per_node)?;
        let collect = self.strategy.collect();
        if collect == Collect::Retain {
            let need = total_len.saturating_mul(4);
            if self.collecting.retained_bytes.saturating_add(need) > self.cfg.max_retained_bytes {
                return Err(Refusal::new(
                    C::MemoryCap,
                    format!(
                        "{} + {need} bytes retained would exceed the cap of {}",
                        self.collecting.retained_bytes, self.cfg.max_retained_bytes
                    ),
                ));
            }
        }
        // Check every part before anything counts, so that a refusal
        // (malformed, norm) leaves the accumulators untouched.
        let (checked, sq) = check_parts(h, encoded, &lens)?;
        let norm = sq.sqrt();
        let bound = self.norm_bound;
        if norm > f64::from(bound) {
            return Err(Refusal::new(
                C::NormTooLarge,
                format!("L2 norm {norm:.6e} over the bound {bound:.6e}"),
            ));
        }
        // Under central DP the round's clip norm; in client mode the node
        // clipped and noised already (clipping again would rescale its
        // noise).
        let clip_bound = match self.dp.as_ref().and_then(|d| d.round.as_ref()) {
            Some(r) if self.cfg.privacy.mode == PrivacyMode::Central => Some(r.clip),
            Some(_) => None,
            None => self.strategy.clip_norm().map(f64::from),
        };
        let clip = match clip_bound {
            Some(c) if norm > c && norm > 0.0 => c / norm,
            _ => 1.0,
        };
        let under_clip = clip_bound.is_some_and(|c| norm <= c);
        // FedBuff scales a stale delta down (it does not just reweight it):
        // the discount multiplies the delta, the examples weight it, so the
        // mean is sum(n_i s_i d_i) / sum(n_i).
        let scale = clip * discount;
        // What the strategy sees of this update; it may reweight it (a
        // strategy method taking `&self`: a refusal still changes nothing).
        let steps: u64 = h
            .metrics
            .iter()
            .map(|m| m.steps)
            .fold(0, u64::saturating_add);
        let mut result = ClientResult {
            node: h.node.clone(),
            round: plan.round,
            base_version: h.base_version,
            num_examples: h.num_examples,
            weights: h
                .groups
                .iter()
                .cloned()
                .zip(weights.iter().copied())
                .collect(),
            metrics: h.metrics.clone(),
            steps: (steps > 0).then_some(steps),
            norm,
            clip_scale: clip,
            staleness,
            discount,
        };
        let dp_on = self.dp.is_some();
        for (g, w) in h.groups.iter().zip(weights.iter_mut()) {
            // DP: uniform weights, whatever the examples or the strategy.
            let own = if dp_on {
                1.0
            } else {
                self.strategy.update_weight(g, &result, *w)
            };
            if !(own > 0.0 && own.is_finite()) {
                return Err(Refusal::new(
                    C::BadWeight,
                    format!("`{g}`: the strategy gave the weight {own}"),
                ));
            }
            *w = own;
        }
        for (g, &w) in h.groups.iter().zip(&weights) {
            result.weights.insert(g.clone(), w);
        }
        let result_index = self.collecting.results.len();
        // Accepted: commit.
        let round = plan.round;
        let bytes: u64 = encoded.iter().map(|b| b.len() as u64).sum();
        let hold = held_capacity(self.cfg.max_weight_share);
        for (((g, part), &len), &w) in h.groups.iter().zip(&checked).zip(&lens).zip(&weights) {
            let spares = &mut self.spares;
            let acc = self
                .collecting
                .groups
                .entry(g.clone())
                .or_insert_with(|| GroupAcc::new(collect, len, spares));
            self.collecting.retained_bytes +=
                acc.add(part, len, w, scale, hold, result_index, spares);
        }
        if let Some(r) = self.dp.as_mut().and_then(|d| d.round.as_mut()) {
            r.under += u64::from(under_clip);
        }
        self.collecting.accepted.push(h.node.clone());
        self.collecting.results.push(result);
        self.collecting.bytes += bytes;
        self.collecting.staleness_sum += staleness;
        debug!(node = %h.node, round, staleness, "update accepted");
        let mut model_stepped = false;
        match &self.cfg.mode {
            Mode::Sync => {
                if let Some(r) = self.sync_round.as_mut() {
                    r.accepted.insert(h.node.clone());
                    r.resolved.insert(h.node.clone());
                }
            }
            Mode::Async(fb) => {
                let k = fb.buffer_k as usize;
                self.outstanding.remove(&h.node);
                self.last_accepted.insert(h.node.clone(), round);
                if self.collecting.accepted.len() >= k {
                    self.step_async(now_ms);
                    model_stepped = true;
                }
            }
        }
        Ok(SubmitOutcome {
            round,
            staleness,
            discount,
            model_stepped,
        })
    }

    /// Combines what was collected and steps the model. Returns the report
    /// fields it fills.
    fn step_model(
        &mut self,
        round: u64,
        now_ms: u64,
        sampled: usize,
        quorum_met: bool,
    ) -> RoundReport {
        let collecting = std::mem::take(&mut self.collecting);
        let mut results = collecting.results;
        let mut report = RoundReport {
            round,
            version: self.version,
            sampled,
            quorum_met,
            accepted: collecting.accepted,
            failures: collecting.failures,
            refused: collecting.refused,
            refused_dropped: collecting.refused_dropped,
            bytes_received: collecting.bytes,
            closed_at_ms: now_ms,
            ..RoundReport::default()
        };
        if !report.accepted.is_empty() {
            report.mean_staleness = collecting.staleness_sum as f64 / report.accepted.len() as f64;
        }
        // DP: the round is accounted whether or not the model moves.
        let dp_round = self.dp.as_mut().and_then(|d| d.round.take());
        if let Some(r) = &dp_round {
            report.privacy = Some(self.account_round(r, report.accepted.len()));
        }
        if !quorum_met {
            return report;
        }
        let mut combined = BTreeMap::new();
        let groups = match &dp_round {
            Some(r) => self.dp_combine(r, collecting.groups, round),
            None => collecting.groups,
        };
        if let (Some(r), Some(p)) = (&dp_round, report.privacy.as_mut()) {
            p.under_clip = self.adapt_clip(r, report.accepted.len(), round);
        }
        for (g, acc) in groups {
            let (delta, count) = match acc {
                GroupAcc::Stream {
                    sum,
                    weight,
                    count,
                    held,
                } => {
                    let mean = capped_mean(sum, weight, &held, self.cfg.max_weight_share);
                    let Some((delta, cap)) = mean else {
                        continue;
                    };
                    // The weights the held updates were combined with.
                    if let Some(c) = cap {
                        for h in &held {
                            if let Some(w) = results
                                .get_mut(h.result)
                                .and_then(|r| r.weights.get_mut(&g))
                            {
                                *w = w.min(c);
                            }
                        }
                    }
                    for h in held {
                        self.spares.give(h.delta);
                    }
                    (delta, count)
                }
                GroupAcc::Retain { deltas, weights } => {
                    let combined = self.strategy.combine(&g, &deltas, &weights);
                    let count = deltas.len() as u32;
                    for d in deltas {
                        self.spares.give(d);
                    }
                    match combined {
                        Ok(d) => (d, count),
                        Err(e) => {
                            warn!(group = %g, error = %e, "combine failed; group left unchanged");
                            report.skipped_groups.push(g);
                            continue;
                        }
                    }
                }
            };
            if !all_finite(&delta) {
                warn!(group = %g, "combined delta is not finite; group left unchanged");
                report.skipped_groups.push(g);
                continue;
            }
            report.contributors.insert(g.clone(), count);
            combined.insert(g, delta);
        }
        if combined.is_empty() {
            return report;
        }
        let stepped = self.step_or_roll_back(round, &combined, &results, &mut report);
        for (g, delta) in combined {
            if !stepped {
                report.skipped_groups.push(g);
            }
            self.spares.give(delta);
        }
        if !stepped {
            report.contributors.clear();
            return report;
        }
        self.version += 1;
        report.version = self.version;
        report.stepped = true;
        report.eval = match self.evaluator.as_mut() {
            Some(f) => f(self.version, &self.global),
            None => self.strategy.evaluate(self.version, &self.global),
        };
        info!(
            round,
            version = self.version,
            accepted = report.accepted.len(),
            failures = report.failures.len(),
            refused = report.refused.len(),
            "model stepped"
        );
        report
    }

    /// The strategy's step with the round's combined deltas. Undoes it
    /// (model and strategy state) when the strategy fails or leaves
    /// anything non-finite; returns whether the step stands.
    fn step_or_roll_back(
        &mut self,
        round: u64,
        combined: &BTreeMap<String, Vec<f32>>,
        results: &[ClientResult],
        report: &mut RoundReport,
    ) -> bool {
        // What the step may change, to undo it.
        let mut saved_weights: Vec<(String, Vec<f32>)> = Vec::new();
        for g in combined.keys() {
            if let Some(w) = self.global.get(g) {
                saved_weights.push((g.clone(), self.spares.copy_of(w)));
            }
        }
        let saved_strategy = self.strategy.state();
        let input = AggregateInput::new(round, combined)
            .with_results(results)
            .with_failures(&report.failures);
        let stands = match self.strategy.aggregate(&input, &mut self.global) {
            Err(e) => {
                warn!(error = %e, round, "strategy failed to aggregate; model unchanged this round");
                false
            }
            Ok(()) => {
                let weights_finite = combined
                    .keys()
                    .all(|g| self.global.get(g).is_some_and(all_finite));
                let stands = weights_finite && self.strategy.is_finite();
                if !stands {
                    warn!(
                        round,
                        weights_finite,
                        "SERVER STEP ROLLED BACK: the step made the model or the optimizer \
                         state non-finite; model and strategy state restored, the round fails"
                    );
                    report.rolled_back = true;
                }
                stands
            }
        };
        for (g, w) in saved_weights {
            if stands {
                self.spares.give(w);
            } else {
                if let Some(broken) = self.global.insert(g, w) {
                    self.spares.give(broken);
                }
            }
        }
        if !stands {
            if let Err(e) = self.strategy.restore(saved_strategy, &self.layout) {
                warn!(error = %e, round, "could not restore the strategy state");
            }
        }
        stands
    }

    /// Composes the round into the accountant: the sampled Gaussian
    /// mechanism at `(q, z)`; in client mode with the noise the accepted
    /// shares actually add up to, `z * sqrt(min(k, m) / m)`.
    fn account_round(&mut self, r: &DpRound, accepted: usize) -> PrivacyReport {
        let delta = self.cfg.privacy.delta;
        let client = self.cfg.privacy.mode == PrivacyMode::Client;
        let Some(dp) = self.dp.as_mut() else {
            return PrivacyReport::default();
        };
        let z = if client {
            let k = accepted as f64;
            if k == 0.0 || r.expected <= 0.0 {
                // Nothing is released: the model cannot move.
                f64::INFINITY
            } else {
                dp.z * (k.min(r.expected) / r.expected).sqrt()
            }
        } else {
            dp.z
        };
        if z.is_finite() {
            if z == dp.z {
                dp.state.accountant.add(&dp.round_rdp, 1);
            } else {
                dp.state.accountant.compose(dp.q, z, 1);
            }
        } else {
            dp.state.accountant.rounds += 1;
        }
        PrivacyReport {
            epsilon: dp.state.accountant.epsilon(delta),
            delta,
            q: dp.q,
            noise_multiplier: z,
            clip: r.clip,
            rounds: dp.state.accountant.rounds,
            under_clip: None,
        }
    }

    /// DP: every global group's sum (uniform weights, clipped updates),
    /// plus `N(0, (sum_z * C)^2)` per coordinate in central mode, over its
    /// fixed denominator. Returned as streamed groups of total weight 1, so
    /// that the mean below passes them through unchanged.
    fn dp_combine(
        &self,
        r: &DpRound,
        mut groups: BTreeMap<String, GroupAcc>,
        round: u64,
    ) -> BTreeMap<String, GroupAcc> {
        let central = self.cfg.privacy.mode == PrivacyMode::Central;
        let std = r.sum_z * r.clip;
        let mut rng = ChaCha8Rng::seed_from_u64(self.noise_seed(DP_SALT, round));
        let normal = rand_distr::Normal::new(0.0f64, std).ok();
        let mut out = BTreeMap::new();
        for (g, &den) in &r.denominators {
            let len = self.layout.group(g).map(|gl| gl.len()).unwrap_or(0) as usize;
            let (mut sum, count) = match groups.remove(g) {
                Some(GroupAcc::Stream {
                    sum, count, held, ..
                }) => {
                    let mut s: Vec<f64> = sum.iter().map(|&x| f64::from(x)).collect();
                    for h in &held {
                        for (a, x) in s.iter_mut().zip(&h.delta) {
                            *a += h.weight * f64::from(*x);
                        }
                    }
                    (s, count)
                }
                _ => (vec![0.0; len], 0),
            };
            if den.is_nan() || den <= 0.0 {
                continue;
            }
            if central {
                if let Some(n) = &normal {
                    for a in sum.iter_mut() {
                        *a += rand_distr::Distribution::sample(n, &mut rng);
                    }
                }
            }
            out.insert(
                g.clone(),
                GroupAcc::Stream {
                    sum: sum.iter().map(|&a| (a / den) as f32).collect(),
                    weight: 1.0,
                    count,
                    held: Vec::new(),
                },
            );
        }
        out
    }

    /// Adaptive clipping: the noised fraction of updates under the clip,
    /// and the next clip norm. The count's noise comes from its own stream.
    fn adapt_clip(&mut self, r: &DpRound, accepted: usize, round: u64) -> Option<f64> {
        let a = self.cfg.privacy.adaptive.clone()?;
        let std = r.count_std?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.noise_seed(DP_SALT ^ 0xC0, round));
        let noise = rand_distr::Normal::new(0.0f64, std)
            .map(|n| rand_distr::Distribution::sample(&n, &mut rng))
            .unwrap_or(0.0);
        // Centred count (sensitivity 1/2 under add/remove), fixed denominator.
        let centred = r.under as f64 - accepted as f64 / 2.0 + noise;
        let fraction = if r.expected > 0.0 {
            centred / r.expected + 0.5
        } else {
            0.5
        };
        if let Some(dp) = self.dp.as_mut() {
            dp.state.clip = privacy::next_clip(r.clip, fraction, &a);
        }
        Some(fraction)
    }

    fn step_async(&mut self, now_ms: u64) {
        self.round += 1;
        let report = self.step_model(self.round, now_ms, 0, true);
        self.reports.push_back(report);
    }

    /// Closes the sync round when every sampled node answered (accepted or
    /// failed) or at the deadline; in async mode expires plans past their
    /// deadline and hands out the reports of model steps. Returns at most
    /// one report per call.
    pub fn poll(&mut self, now_ms: u64) -> Option<RoundReport> {
        match self.cfg.mode {
            Mode::Sync => {
                let r = self.sync_round.as_ref()?;
                let all_in = r.plans.keys().all(|n| r.resolved.contains(n));
                if !all_in && now_ms < r.deadline_at {
                    return None;
                }
                let r = self.sync_round.take()?;
                for n in r.plans.keys().filter(|n| !r.resolved.contains(*n)) {
                    let reason = match r.last_refusal.get(n) {
                        Some(code) => FailureReason::Refused(*code),
                        None => FailureReason::Timeout,
                    };
                    self.collecting.failures.push((n.clone(), reason));
                }
                let sampled = r.plans.len();
                let needed = ((f64::from(self.cfg.quorum) * sampled as f64).ceil() as usize).max(1);
                let quorum_met = r.accepted.len() >= needed;
                if !quorum_met {
                    warn!(
                        round = r.round,
                        accepted = r.accepted.len(),
                        needed,
                        "quorum not met; model unchanged"
                    );
                }
                Some(self.step_model(r.round, now_ms, sampled, quorum_met))
            }
            Mode::Async(_) => {
                let expired: Vec<NodeId> = self
                    .outstanding
                    .iter()
                    .filter(|(_, i)| now_ms > i.deadline_at)
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in expired {
                    self.fail(&n, FailureReason::Timeout);
                }
                self.reports.pop_front()
            }
        }
    }

    /// Federated evaluation after `round`: the registered nodes (in order)
    /// the strategy picks with [`Strategy::configure_evaluate`] (default:
    /// all). Its generator is a stream of its own, ChaCha8 seeded with
    /// `mix_seed(seed ^ 0xE7A1, round)`: a function of the seed and the
    /// round only, so evaluating (or not, or twice) never changes the
    /// sampling of training rounds, and a resumed engine picks the same
    /// nodes.
    pub fn configure_evaluate(&mut self, round: u64) -> Vec<NodeId> {
        let available: Vec<NodeId> = self.nodes.id_list();
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(self.cfg.seed ^ EVAL_SALT, round));
        self.strategy
            .configure_evaluate(round, &available, &mut rng)
    }

    /// Federated evaluation of `round`: hands the nodes' reports and the
    /// nodes that did not report to [`Strategy::aggregate_evaluate`].
    /// Reports are peer input, so the engine passes on only the first
    /// report of each registered node, and of it only the task entries
    /// with a finite loss, an accuracy in `[0, 1]` and at least one sample,
    /// their samples capped by `max_samples_per_node`.
    pub fn aggregate_evaluate(
        &mut self,
        round: u64,
        results: &[EvalReport],
        failures: &[(NodeId, FailureReason)],
    ) -> Option<Metrics> {
        let mut seen = BTreeSet::new();
        let cap = self.cfg.max_samples_per_node;
        let clean: Vec<EvalReport> = results
            .iter()
            .filter(|r| self.nodes.contains_key(&r.node) && seen.insert(r.node.as_str()))
            .map(|r| EvalReport {
                metrics: r
                    .metrics
                    .iter()
                    .filter(|m| {
                        m.samples > 0 && m.loss.is_finite() && (0.0..=1.0).contains(&m.accuracy)
                    })
                    .map(|m| cohort_protocol::messages::EvalMetrics {
                        samples: m.samples.min(cap),
                        ..m.clone()
                    })
                    .collect(),
                ..r.clone()
            })
            .collect();
        self.strategy.aggregate_evaluate(round, &clean, failures)
    }

    /// What a node downloads: the named groups of the global model (unknown
    /// names are skipped). Local groups keep their initial values, which a
    /// new node may start its personal head from.
    pub fn weights_for<S: AsRef<str>>(&self, groups: &[S]) -> ParamGroups {
        groups
            .iter()
            .filter_map(|g| {
                self.global
                    .get(g.as_ref())
                    .map(|v| (g.as_ref().to_string(), v.to_vec()))
            })
            .collect()
    }

    /// Replaces the global weights (resume).
    pub(crate) fn restore_parts(
        &mut self,
        global: ParamGroups,
        round: u64,
        version: u64,
        rng: ChaCha8Rng,
    ) {
        self.global = global;
        self.round = round;
        self.version = version;
        self.rng = rng;
    }
}

/// Each group's weight: examples for the backbone, the task's samples for a
/// head, never more than the node registered (times the epochs); a claim
/// beyond the operator's cap `max_samples` weighs as the cap.
fn claimed_weights(
    h: &UpdateHeader,
    node: &NodeView<'_>,
    plan: &RoundPlan,
    max_samples: u64,
) -> Result<Vec<f64>, Refusal> {
    let epochs = u64::from(plan.train.epochs.max(1));
    let mut weights = Vec::with_capacity(h.groups.len());
    for g in &h.groups {
        let (claimed, registered) = match task_of_group(g) {
            Some(task) => {
                let claimed: u64 = h
                    .metrics
                    .iter()
                    .filter(|m| m.task == task)
                    .map(|m| m.samples)
                    .fold(0, u64::saturating_add);
                (claimed, node.samples.get(task).copied().unwrap_or(0))
            }
            None => (
                h.num_examples,
                node.samples.values().copied().fold(0, u64::saturating_add),
            ),
        };
        if claimed == 0 || claimed > registered.saturating_mul(epochs) {
            return Err(Refusal::new(
                RefusalCode::BadWeight,
                format!(
                    "`{g}`: {claimed} examples claimed, {registered} registered x {epochs} epochs"
                ),
            ));
        }
        weights.push(claimed.min(max_samples) as f64);
    }
    Ok(weights)
}

/// Checks each encoded part against its length and returns the checked
/// parts with the update's sum of squares. Each encoding is read once and
/// no decoded copy is kept: the commit decodes straight into the sums.
fn check_parts<'b>(
    h: &UpdateHeader,
    encoded: &[&'b [u8]],
    lens: &[usize],
) -> Result<(Vec<codec::Checked<'b>>, f64), Refusal> {
    let mut checked = Vec::with_capacity(encoded.len());
    let mut sq = 0.0f64;
    for ((g, bytes), &len) in h.groups.iter().zip(encoded).zip(lens) {
        let c = codec::check(bytes, len)
            .map_err(|e| Refusal::new(RefusalCode::Malformed, format!("`{g}`: {e}")))?;
        // A checked encoding holds finite values whose squares cannot
        // overflow an f64 sum; kept as a guard all the same.
        if !c.sum_squares().is_finite() {
            return Err(Refusal::new(
                RefusalCode::NonFinite,
                format!("`{g}` decodes to a value that is not finite"),
            ));
        }
        sq += c.sum_squares();
        checked.push(c);
    }
    Ok((checked, sq))
}

/// Updates kept out of a streamed sum so that the share cap can still lower
/// their weight: `ceil(1 / share)`, none when the share is not capped.
fn held_capacity(share: f64) -> usize {
    if !(share > 0.0 && share < 1.0) {
        return 0;
    }
    (1.0 / share).ceil().min(1024.0) as usize
}

/// The weight cap `c` such that no update weighs more than `share` of the
/// capped total: `c = share * (streamed + sum(min(h_i, c)))` (water-filling
/// over the held weights), or None when no update is over its share.
/// Updates in the streamed sum never need capping (see [`GroupAcc`]). When
/// the cap cannot be met (fewer than `1 / share` contributors), all held
/// updates weigh the same.
fn weight_cap(streamed: f64, held: &[f64], share: f64) -> Option<f64> {
    let total: f64 = streamed + held.iter().sum::<f64>();
    let max = held.iter().copied().fold(0.0f64, f64::max);
    if held.is_empty() || max <= share * total {
        return None;
    }
    let mut desc: Vec<f64> = held.to_vec();
    desc.sort_unstable_by(|a, b| b.total_cmp(a));
    let mut rest = total;
    for j in 1..=desc.len() {
        rest -= desc[j - 1];
        let denom = 1.0 - j as f64 * share;
        if denom <= 0.0 {
            break;
        }
        let c = share * rest.max(0.0) / denom;
        let next = desc.get(j).copied().unwrap_or(0.0);
        if c > 0.0 && c <= desc[j - 1] && c >= next {
            return Some(c);
        }
    }
    // Infeasible: equal weights for the held updates (then the streamed
    // sum is empty, as every update is held).
    desc.last().copied().filter(|c| *c > 0.0)
}

/// The weighted mean of a streamed group with the share cap applied to its
/// held updates, and the cap if one applied; None when the total weight is
/// not positive.
fn capped_mean(
    mut sum: Vec<f32>,
    streamed: f64,
    held: &[Held],
    share: f64,
) -> Option<(Vec<f32>, Option<f64>)> {
    let weights: Vec<f64> = held.iter().map(|h| h.weight).collect();
    let cap = weight_cap(streamed, &weights, share);
    let capped: Vec<f64> = weights
        .iter()
        .map(|&w| cap.map_or(w, |c| w.min(c)))
        .collect();
    let total = streamed + capped.iter().sum::<f64>();
    if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || !total.is_finite() {
        return None;
    }
    if let Some(c) = cap {
        debug!(cap = c, "weight share capped");
    }
    // In place, spans of blocks on the pool (see [`MeanSpan`]).
    let arch = pulp::Arch::new();
    let mean_span = |(span, out): (usize, &mut [f32])| {
        arch.dispatch(MeanSpan {
            first: span * PAR_SPAN,
            out,
            held,
            weights: &capped,
            total,
        })
    };
    if sum.len() > PAR_SPAN {
        sum.par_chunks_mut(PAR_SPAN).enumerate().for_each(mean_span);
    } else {
        mean_span((0, &mut sum));
    }
    Some((sum, cap))
}

/// One span of [`capped_mean`]: `out` holds the streamed sum of values
/// `first..`, and becomes their mean. A block of f64 at a time; per value
/// the additions come in the same order as one value at a time: the
/// streamed sum, then each held update. Compiled for the CPU's widest
/// instruction set by `pulp`, the same bits on every path.
struct MeanSpan<'a> {
    first: usize,
    out: &'a mut [f32],
    held: &'a [Held],
    weights: &'a [f64],
    total: f64,
}

impl pulp::WithSimd for MeanSpan<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        const BLOCK: usize = 512;
        let mut acc = [0.0f64; BLOCK];
        for (b, block) in self.out.chunks_mut(BLOCK).enumerate() {
            let start = self.first + b * BLOCK;
            let acc = &mut acc[..block.len()];
            for (a, &s) in acc.iter_mut().zip(block.iter()) {
                *a = f64::from(s);
            }
            for (h, &w) in self.held.iter().zip(self.weights) {
                let d = h.delta.get(start..).unwrap_or(&[]);
                for (a, &x) in acc.iter_mut().zip(d) {
                    *a += w * f64::from(x);
                }
            }
            for (o, a) in block.iter_mut().zip(acc.iter()) {
                *o = (a / self.total) as f32;
            }
        }
    }
}

/// Values per span of the round's model-sized passes handed to a thread;
/// a group no longer than one span stays on the caller's thread.
const PAR_SPAN: usize = 1 << 17;

/// Every value is finite; spans of a long slice on the pool. Blocks are
/// folded without an early exit (which would keep the loop from
/// vectorizing); a block with a non-finite value ends the scan.
fn all_finite(v: &[f32]) -> bool {
    let span = |c: &[f32]| {
        c.chunks(4096)
            .all(|b| b.iter().fold(true, |ok, x| ok & x.is_finite()))
    };
    if v.len() > PAR_SPAN {
        v.par_chunks(PAR_SPAN).all(span)
    } else {
        span(v)
    }
}
