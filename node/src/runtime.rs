use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use cohort_protocol::codec::{CodecConfig, ErrorFeedback};
use cohort_protocol::messages::{
    pack_groups_into, packed_len, RoundPlan, TaskMetrics, Update, UpdateHeader,
};
pub use cohort_protocol::mix_seed;
use cohort_protocol::seal::{
    seal_in_place, sealed_header_len, SealContext, SealPublicKey, TAG_LEN,
};
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

/// What this node accepts of a plan, whatever the aggregator says. The
/// aggregator's plan is an input from a peer: a plan outside these limits is
/// refused ([`NodeError::BadPlan`]), or cut down where doing less is safe
/// (steps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeLimits {
    /// Optimizer steps per round at most: a plan asking for more (by its
    /// epochs or its `max_steps`) trains this many, which bounds the CPU
    /// time of a round (with `max_batch_size`).
    pub max_steps: u64,
    /// Wall-clock budget of local training: once it is spent, training
    /// stops before its next step and the node sends what it has (the
    /// steps done are in its metrics). None: no time budget (and rounds
    /// stay deterministic, which a budget cannot promise).
    pub max_train_ms: Option<u64>,
    /// Plans with more epochs are refused.
    pub max_epochs: u32,
    /// Plans with smaller batches are refused (small batches leak more
    /// about single samples).
    pub min_batch_size: u32,
    pub max_batch_size: u32,
    /// Plans with a larger (or a negative, or non-finite) learning rate are
    /// refused.
    pub max_lr: f32,
    /// Groups that never leave this node whatever the plan says: trained,
    /// kept in the node's state, never uploaded.
    pub local_groups: BTreeSet<String>,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            max_steps: 100_000,
            max_train_ms: None,
            max_epochs: 1_000,
            min_batch_size: 1,
            max_batch_size: 8_192,
            max_lr: 10.0,
            local_groups: BTreeSet::new(),
        }
    }
}

/// One node: its identity, its model (the backbone and the heads of its
/// tasks), the aggregator's sealing key, its limits and its state.
#[derive(Debug)]
pub struct NodeRuntime {
    pub id: String,
    pub federation: String,
    pub model: SharedModel,
    pub aggregator_key: SealPublicKey,
    pub state: NodeState,
    pub limits: NodeLimits,
    /// Seed of the client-side DP noise. `None` (a real node): from the
    /// operating system, so that nobody who knows the plan (the
    /// aggregator derives its seeds) can subtract the noise. The simulator
    /// sets one so that runs are a function of their seed.
    pub noise_seed: Option<u64>,
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
            limits: NodeLimits::default(),
            noise_seed: None,
        }
    }

    /// The same node with other limits.
    pub fn with_limits(mut self, limits: NodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Checks a plan against this node's limits and returns the groups it
    /// will upload (the plan's, minus the node's local groups) and the
    /// step cap of the round.
    pub fn check_plan(&self, plan: &RoundPlan) -> Result<(Vec<String>, u64), NodeError> {
        let bad = |m: String| Err(NodeError::BadPlan(m));
        if plan.federation != self.federation {
            return Err(NodeError::WrongFederation {
                expected: self.federation.clone(),
                got: plan.federation.clone(),
            });
        }
        let layout = self.model.layout();
        let mut seen = BTreeSet::new();
        for g in &plan.upload {
            if layout.group(g).is_none() {
                return Err(NodeError::UnknownGroup(g.clone()));
            }
            if !seen.insert(g.as_str()) {
                return bad(format!("upload names `{g}` twice"));
            }
        }
        let l = &self.limits;
        let t = &plan.train;
        if t.epochs == 0 || t.epochs > l.max_epochs {
            return bad(format!(
                "train.epochs = {} (this node allows 1..={})",
                t.epochs, l.max_epochs
            ));
        }
        if t.batch_size < l.min_batch_size.max(1) || t.batch_size > l.max_batch_size {
            return bad(format!(
                "train.batch_size = {} (this node allows {}..={})",
                t.batch_size,
                l.min_batch_size.max(1),
                l.max_batch_size
            ));
        }
        if !(t.lr.is_finite() && t.lr >= 0.0 && t.lr <= l.max_lr) {
            return bad(format!(
                "train.lr = {} (this node allows [0, {}])",
                t.lr, l.max_lr
            ));
        }
        if t.max_steps == Some(0) {
            return bad("train.max_steps = 0".into());
        }
        plan.codec
            .validate()
            .map_err(|e| NodeError::BadPlan(format!("codec: {e}")))?;
        if let Some(dp) = plan.privacy {
            if !(dp.clip.is_finite()
                && dp.clip > 0.0
                && dp.noise_std.is_finite()
                && dp.noise_std >= 0.0)
            {
                return bad(format!(
                    "privacy: clip {} and noise std {} must be finite and positive",
                    dp.clip, dp.noise_std
                ));
            }
            // A residual of the un-noised delta would leave the privacy path.
            if plan.codec.bits != 32 || plan.codec.top_k.is_some() {
                return bad(
                    "privacy: client-side noise needs the lossless codec (32 bits, no top-k)"
                        .into(),
                );
            }
        }
        let upload: Vec<String> = plan
            .upload
            .iter()
            .filter(|g| !l.local_groups.contains(*g))
            .cloned()
            .collect();
        if upload.len() < plan.upload.len() {
            tracing::warn!(
                asked = ?plan.upload,
                kept_local = ?l.local_groups,
                "the plan asks for groups this node keeps local: they are not uploaded"
            );
        }
        if upload.is_empty() {
            return bad("nothing this node may upload".into());
        }
        let steps = t.max_steps.unwrap_or(u64::MAX).min(l.max_steps);
        Ok((upload, steps))
    }

    /// Checks the weights a round starts from: every group of the model,
    /// of its length, every value finite.
    fn check_weights(&self, start: &ParamGroups) -> Result<(), NodeError> {
        let layout = self.model.layout();
        for g in &layout.groups {
            let w = start
                .get(&g.name)
                .ok_or_else(|| NodeError::MissingWeights(g.name.clone()))?;
            if w.len() as u64 != g.len() {
                return Err(NodeError::BadWeights(format!(
                    "`{}` has {} values, the model {}",
                    g.name,
                    w.len(),
                    g.len()
                )));
            }
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(NodeError::BadWeights(format!(
                    "`{}`[{i}] is not finite",
                    g.name
                )));
            }
        }
        Ok(())
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
            let uploaded =
                plan.upload.iter().any(|g| g == name) && !self.limits.local_groups.contains(name);
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
        let (upload, max_steps) = self.check_plan(plan)?;
        let layout = self.model.layout();
        if data.iter().all(|d| d.indices.is_empty()) {
            return Err(NodeError::NoData);
        }
        let start = self.start_weights(plan, global)?;
        self.check_weights(&start)?;
        let node_seed = mix_seed(mix_seed(plan.train.seed, str_seed(&self.id)), plan.round);
        let mut train_cfg = plan.train.clone();
        train_cfg.seed = node_seed;
        train_cfg.max_steps = Some(max_steps);
        let outcome = match self.limits.max_train_ms {
            Some(ms) => {
                let deadline = Instant::now() + std::time::Duration::from_millis(ms);
                self.model
                    .train_until(&start, data, &train_cfg, &|| Instant::now() >= deadline)?
            }
            None => self.model.train(&start, data, &train_cfg)?,
        };

        // Every delta is computed and checked before anything is encoded,
        // so that a refusal leaves the residuals and local groups as they
        // were.
        let mut deltas = Vec::with_capacity(upload.len());
        for name in &upload {
            let (Some(new), Some(old)) = (outcome.params.get(name), start.get(name)) else {
                return Err(NodeError::MissingWeights(name.clone()));
            };
            let mut delta: Vec<f32> = new.iter().zip(old).map(|(n, o)| n - o).collect();
            tamper(name, &mut delta);
            if let Some(i) = delta
                .iter()
                .position(|v| !(v.is_finite() && v.abs() <= codec::MAX_SCALE))
            {
                return Err(NodeError::Diverged(format!(
                    "delta of `{name}`[{i}] = {}",
                    delta[i]
                )));
            }
            deltas.push(delta);
        }
        for (name, w) in outcome.params.iter() {
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(NodeError::Diverged(format!("`{name}`[{i}] = {}", w[i])));
            }
        }
        if let Some(dp) = plan.privacy {
            self.clip_and_noise(&mut deltas, dp, node_seed);
        }
        let saved_residuals = self.state.residuals.clone();
        let mut encoded = Vec::with_capacity(upload.len());
        for (i, (name, delta)) in upload.iter().zip(&deltas).enumerate() {
            let seed = mix_seed(node_seed, i as u64 + 1);
            match self.encode_group(name, delta, &plan.codec, seed) {
                Ok(e) => encoded.push(e),
                Err(e) => {
                    self.state.residuals = saved_residuals;
                    return Err(e);
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
            groups: upload.clone(),
            metrics,
            num_examples,
        };
        // The groups are packed straight into the buffer sealed in place:
        // one copy of the update, where packing then sealing made two.
        let ctx = SealContext::of_update(&header);
        let room = sealed_header_len(&ctx);
        let mut sealed = Vec::with_capacity(room + packed_len(&encoded) + TAG_LEN);
        sealed.resize(room, 0);
        pack_groups_into(&encoded, &mut sealed);
        if let Err(e) = seal_in_place(&self.aggregator_key, &ctx, &mut sealed) {
            self.state.residuals = saved_residuals;
            return Err(e.into());
        }
        // Committed: local groups keep their trained weights.
        for name in layout.group_names() {
            if !upload.iter().any(|g| g == name) {
                if let Some(w) = outcome.params.get(name) {
                    self.state.local.insert(name, w.to_vec());
                }
            }
        }
        Ok(RoundOutput {
            update: Update { header, sealed },
            trained: outcome.params,
            encoded_bytes,
        })
    }

    /// Client-side DP: scales the deltas of all uploaded groups together to
    /// an L2 norm of at most `clip`, then adds `N(0, noise_std^2)` to every
    /// value (the plan was checked to be lossless, so no residual keeps
    /// anything of the un-noised delta).
    fn clip_and_noise(
        &self,
        deltas: &mut [Vec<f32>],
        dp: cohort_protocol::messages::ClientNoise,
        node_seed: u64,
    ) {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let sq: f64 = deltas
            .iter()
            .flat_map(|d| d.iter())
            .map(|&x| f64::from(x) * f64::from(x))
            .sum();
        let norm = sq.sqrt();
        if norm > f64::from(dp.clip) && norm > 0.0 {
            let s = (f64::from(dp.clip) / norm) as f32;
            deltas.iter_mut().flatten().for_each(|x| *x *= s);
        }
        let mut rng = match self.noise_seed {
            Some(seed) => rand_chacha::ChaCha8Rng::seed_from_u64(mix_seed(seed, node_seed)),
            None => rand_chacha::ChaCha8Rng::from_entropy(),
        };
        if let Ok(n) = rand_distr::Normal::new(0.0f64, f64::from(dp.noise_std)) {
            for x in deltas.iter_mut().flatten() {
                *x += n.sample(&mut rng) as f32;
            }
        }
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
