//! Strategies, in the spirit of Flower's: a strategy may propose the initial
//! parameters (`initial_parameters`), picks the nodes of a round and their
//! training settings (`configure`), may reweight each accepted update
//! (`update_weight`), combines the accepted updates of each group
//! (`combine`, or a streamed weighted mean), steps the global model with a
//! server optimizer (`aggregate`, which also sees the per-client results and
//! the failures of the round), and configures and aggregates federated
//! evaluation (`configure_evaluate`, `aggregate_evaluate`). Its state
//! (`state` / `restore`) goes into the checkpoints.
//!
//! A strategy can live outside this crate: implement [`Strategy`] and hand a
//! `Box<dyn Strategy>` to [`crate::Engine::new`] / [`crate::Engine::resume`]
//! (the simulator takes a factory, see `cohort_simulator::Simulation`).
//! `examples/own-model/src/strategy.rs` is one.
//!
//! Conventions (all strategies):
//! - A group's input is the **delta** `w_local - w_global` of each update.
//!   The mean-based strategies receive the mean weighted by examples (backbone:
//!   `num_examples`; `head/<t>`: the samples of task `t`), computed by the
//!   engine in streaming, O(model) memory.
//! - The robust combiners (median, trimmed mean, Krum) need every delta and
//!   are **unweighted** (as in the papers and in Flower), except that
//!   multi-Krum averages its selected deltas weighted by examples, as Flower
//!   does. The engine keeps their decoded deltas, up to
//!   `EngineConfig::max_retained_bytes`.
//! - Clipping (`clip_norm`) scales each update so that its L2 norm over all
//!   the groups it carries is at most the bound, before it is combined.
//! - A group with no contributor in a round is left unchanged, and its server
//!   optimizer state (momentum, moments) is **not** advanced.
//! - The adaptive optimizers follow Reddi et al. (2021), Algorithm 2, without
//!   bias correction, with `m` and `v` starting at zero; the pseudo-gradient
//!   is the mean delta `Δ`, and the step is `w += lr * m / (sqrt(v) + tau)`.
//! - Randomness comes only from the generator the engine passes in
//!   (`&mut dyn RngCore`, seeded and checkpointed by the engine), so that a
//!   run is a function of its seed.

use std::collections::BTreeMap;
use std::fmt;

use cohort_protocol::messages::{EvalReport, NodeId, TaskMetrics, TrainConfig};
use cohort_protocol::{Layout, ParamGroups};
use rand::seq::index::sample as sample_indices;
use rand::RngCore;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::Sampling;
use crate::engine::FailureReason;
use crate::AggError;

/// Named scalar metrics (e.g. `accuracy`, `loss`).
pub type Metrics = BTreeMap<String, f64>;

/// How the engine collects the updates of a group for a strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collect {
    /// Weighted running sum: memory O(model) whatever the contributors.
    Stream,
    /// Keep every decoded delta (robust strategies), capped by
    /// `EngineConfig::max_retained_bytes`.
    Retain,
}

/// State of a strategy that must survive a restart (server optimizer
/// moments, step counters, schedules).
///
/// In a checkpoint, `name`, `steps`, `scalars` and `data` go to
/// `state.json`, `tensors` to `strategy.safetensors` (bit-exact). The
/// checkpoint checks what it can without knowing the strategy (see
/// [`crate::checkpoint`]): names of 1..=[`MAX_STATE_NAME_LEN`] bytes of
/// `[A-Za-z0-9_./:-]`, finite values, at most
/// [`MAX_STATE_TENSORS_FACTOR`] times the model's parameters in all tensors
/// together and at most [`MAX_STATE_SCALARS`] scalars. Shapes are the
/// strategy's business: [`Strategy::restore`] gets the layout to check them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyState {
    pub name: String,
    /// Server steps taken.
    pub steps: u64,
    /// Named flat `f32` tensors, named freely (the built-in strategies use
    /// `m/<group>` and `v/<group>`).
    #[serde(skip)]
    pub tensors: BTreeMap<String, Vec<f32>>,
    /// Named finite scalars (a schedule's position, a running loss, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scalars: BTreeMap<String, f64>,
    /// Anything else the strategy wants back, as JSON (opaque to the
    /// checkpoint; `null` when unused). It counts against the size bound
    /// of `state.json`.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

/// Longest name of a strategy tensor or scalar a checkpoint accepts.
pub const MAX_STATE_NAME_LEN: usize = 128;
/// A strategy's tensors hold at most this many times the model's
/// parameters in all (FedAdam holds 2: `m` and `v` per group).
pub const MAX_STATE_TENSORS_FACTOR: u64 = 4;
/// At most this many scalars in a strategy's state.
pub const MAX_STATE_SCALARS: usize = 4096;

/// One accepted update, as the strategy sees it in
/// [`Strategy::update_weight`] and [`AggregateInput::results`].
///
/// The metrics, loss and steps are what the node claims in its clear
/// header: only the sample counts are checked (against its registration)
/// and bounded (`max_samples_per_node`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientResult {
    pub node: NodeId,
    /// The round of the plan the update answers (async: the model version
    /// it was planned on).
    pub round: u64,
    /// The model version the node trained from.
    pub base_version: u64,
    /// Examples claimed for the backbone (`UpdateHeader::num_examples`).
    pub num_examples: u64,
    /// The weight of each group the update carries. In
    /// [`Strategy::update_weight`]: the engine's weight (examples, capped
    /// by `max_samples_per_node`). In [`AggregateInput::results`]: the
    /// weight it was combined with, after `update_weight` and, in a
    /// streamed mean, after the `max_weight_share` cap.
    pub weights: BTreeMap<String, f64>,
    /// Per-task training metrics from the header (loss, samples, steps).
    pub metrics: Vec<TaskMetrics>,
    /// Local optimizer steps (the sum over the header's tasks), when the
    /// node reported any.
    pub steps: Option<u64>,
    /// L2 norm of the update over all its groups, before clipping.
    pub norm: f64,
    /// The factor clipping scaled the delta by (1: not clipped).
    pub clip_scale: f64,
    /// Versions between its base and the model it went into (async; 0 in
    /// sync mode).
    pub staleness: u64,
    /// The staleness discount that multiplied its delta (1 in sync mode).
    pub discount: f64,
}

impl ClientResult {
    /// The weight of `group` (see [`ClientResult::weights`]).
    pub fn weight(&self, group: &str) -> Option<f64> {
        self.weights.get(group).copied()
    }
}

/// What [`Strategy::aggregate`] gets. Built by the engine; the fields may
/// grow, so a strategy's own tests build it with [`AggregateInput::new`].
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct AggregateInput<'a> {
    /// The round (async: the model step) being closed.
    pub round: u64,
    /// One combined delta per group that had contributors this round.
    pub combined: &'a BTreeMap<String, Vec<f32>>,
    /// Every accepted update of the round, in submission order.
    pub results: &'a [ClientResult],
    /// Nodes that did not contribute, with the reason.
    pub failures: &'a [(NodeId, FailureReason)],
}

impl<'a> AggregateInput<'a> {
    /// An input without results or failures.
    pub fn new(round: u64, combined: &'a BTreeMap<String, Vec<f32>>) -> Self {
        AggregateInput {
            round,
            combined,
            results: &[],
            failures: &[],
        }
    }

    /// The same, with these per-client results.
    pub fn with_results(mut self, results: &'a [ClientResult]) -> Self {
        self.results = results;
        self
    }

    /// The same, with these failures.
    pub fn with_failures(mut self, failures: &'a [(NodeId, FailureReason)]) -> Self {
        self.failures = failures;
        self
    }
}

/// A federated strategy. The engine owns one and drives it; it does no I/O.
///
/// Only [`Strategy::name`], [`Strategy::aggregate`], [`Strategy::state`]
/// and [`Strategy::restore`] must be written; everything else has a
/// default that behaves like FedAvg.
pub trait Strategy: Send + fmt::Debug {
    /// The strategy's name; a checkpoint of another name is refused by the
    /// built-in strategies' `restore`.
    fn name(&self) -> &str;

    /// Initial parameters: called once by [`crate::Engine::new`] (never on
    /// resume) with the model's seeded initial weights. `Some` replaces
    /// them; the engine checks them against the layout (every group, its
    /// length, finite values) and refuses bad ones with
    /// [`AggError::Strategy`]. Default: `None` (keep the proposal).
    fn initial_parameters(
        &mut self,
        _layout: &Layout,
        _proposed: &ParamGroups,
    ) -> Option<ParamGroups> {
        None
    }

    /// How updates are collected for [`Strategy::combine`].
    fn collect(&self) -> Collect {
        Collect::Stream
    }

    /// Bound on the L2 norm of each update (all its groups); larger updates
    /// are scaled down to it before they are combined.
    fn clip_norm(&self) -> Option<f32> {
        None
    }

    /// Training settings of `node` in `round` (FedProx puts its mu here).
    fn train_config(&mut self, _round: u64, _node: &str, base: &TrainConfig) -> TrainConfig {
        base.clone()
    }

    /// Picks the nodes of a synchronous round among `available` (sorted) and
    /// gives each its training settings. The default samples uniformly
    /// without replacement and draws one training seed per node, all from
    /// `rng` (the engine's seeded, checkpointed generator), so that a round
    /// is a function of the seed and of its position.
    fn configure(
        &mut self,
        round: u64,
        available: &[NodeId],
        sampling: &Sampling,
        base: &TrainConfig,
        rng: &mut dyn RngCore,
    ) -> Vec<(NodeId, TrainConfig)> {
        default_configure(self, round, available, sampling, base, rng)
    }

    /// The weight of one accepted update in `group`'s combination, from
    /// the engine's `weight` (examples; see [`ClientResult::weights`]).
    /// Called once per group of each update, after all its checks passed
    /// and before it counts, so it applies to streamed and retained groups
    /// alike; `max_weight_share` still caps the result in a streamed mean.
    /// A weight that is not finite and positive refuses the update
    /// (`BadWeight`). Default: `weight` (FedNova would divide by
    /// `result.steps`).
    fn update_weight(&self, _group: &str, _result: &ClientResult, weight: f64) -> f64 {
        weight
    }

    /// Combines retained deltas of one group (only called when
    /// [`Strategy::collect`] is [`Collect::Retain`]). `weights` are the
    /// update weights (examples, staleness-discounted).
    fn combine(
        &self,
        _group: &str,
        deltas: &[Vec<f32>],
        weights: &[f64],
    ) -> Result<Vec<f32>, AggError> {
        weighted_mean(deltas, weights)
    }

    /// Steps the global model: `input.combined` holds one combined delta
    /// per group that had contributors this round; other groups must stay
    /// unchanged. `input.results` are the accepted updates, `input.failures`
    /// the nodes that did not contribute. An error, or a step that leaves a
    /// weight or the strategy's state non-finite, is undone by the engine
    /// (weights and [`Strategy::state`] as before) and the round fails.
    fn aggregate(
        &mut self,
        input: &AggregateInput<'_>,
        global: &mut ParamGroups,
    ) -> Result<(), AggError>;

    /// Federated evaluation: which of the `available` nodes (sorted)
    /// evaluate the model after `round`. `rng` is a stream of its own
    /// (see [`crate::Engine::configure_evaluate`]). Default: all of them.
    fn configure_evaluate(
        &mut self,
        _round: u64,
        available: &[NodeId],
        _rng: &mut dyn RngCore,
    ) -> Vec<NodeId> {
        available.to_vec()
    }

    /// Federated evaluation: combines the nodes' reports of `round` (and
    /// the nodes that did not report) into metrics. Default:
    /// [`weighted_eval_metrics`] (per task, the sample-weighted mean
    /// accuracy and loss).
    fn aggregate_evaluate(
        &mut self,
        _round: u64,
        results: &[EvalReport],
        failures: &[(NodeId, FailureReason)],
    ) -> Option<Metrics> {
        weighted_eval_metrics(results, failures)
    }

    /// Evaluation hook, called after each model step. The engine also
    /// accepts a caller-supplied evaluator, which takes precedence.
    fn evaluate(&mut self, _round: u64, _global: &ParamGroups) -> Option<Metrics> {
        None
    }

    /// The state to checkpoint (and to restore if a step is undone).
    fn state(&self) -> StrategyState;

    /// Restores a state from [`Strategy::state`] (a checkpoint, or the
    /// state before a step that the engine undid). `layout` is the model's:
    /// check the tensors' shapes against it and refuse a state that does
    /// not fit with a typed error ([`AggError::Checkpoint`]). After an
    /// error the engine does not use the strategy as is: it restores
    /// another state or drops it.
    fn restore(&mut self, state: StrategyState, layout: &Layout) -> Result<(), AggError>;

    /// Every tensor and scalar of the strategy's state is finite.
    /// The engine checks it after every server step and undoes a step that
    /// breaks it. The default looks at [`Strategy::state`].
    fn is_finite(&self) -> bool {
        let s = self.state();
        s.tensors.values().all(|t| t.iter().all(|v| v.is_finite()))
            && s.scalars.values().all(|v| v.is_finite())
    }
}

/// The default [`Strategy::configure`]: samples `sampling.sample_size`
/// nodes uniformly without replacement from `available`, then, in node
/// order, asks `strategy.train_config` for each and draws its training
/// seed from `rng`. A strategy that overrides `configure` can call it.
pub fn default_configure<S: Strategy + ?Sized>(
    strategy: &mut S,
    round: u64,
    available: &[NodeId],
    sampling: &Sampling,
    base: &TrainConfig,
    rng: &mut dyn RngCore,
) -> Vec<(NodeId, TrainConfig)> {
    let n = sampling.sample_size(available.len());
    let mut picked: Vec<usize> = sample_indices(rng, available.len(), n).into_vec();
    // Plans in node order, whatever order the sampler drew them in.
    picked.sort_unstable();
    picked
        .into_iter()
        .filter_map(|i| available.get(i))
        .map(|node| {
            let mut train = strategy.train_config(round, node, base);
            train.seed = rng.next_u64();
            (node.clone(), train)
        })
        .collect()
}

/// The default federated-evaluation aggregate: per task `t`,
/// `accuracy/<t>` and `loss/<t>` (means weighted by samples) and
/// `samples/<t>`, plus `nodes` (reports with at least one usable task) and
/// `failures`. A task entry with no samples or a non-finite accuracy or
/// loss is skipped. `None` when nothing is usable.
pub fn weighted_eval_metrics(
    results: &[EvalReport],
    failures: &[(NodeId, FailureReason)],
) -> Option<Metrics> {
    // Per task: (samples, accuracy * samples, loss * samples).
    let mut sums: BTreeMap<&str, (f64, f64, f64)> = BTreeMap::new();
    let mut nodes = 0u64;
    for r in results {
        let mut used = false;
        for m in &r.metrics {
            if m.samples == 0 || !m.accuracy.is_finite() || !m.loss.is_finite() {
                continue;
            }
            let n = m.samples as f64;
            let e = sums.entry(m.task.as_str()).or_default();
            e.0 += n;
            e.1 += f64::from(m.accuracy) * n;
            e.2 += f64::from(m.loss) * n;
            used = true;
        }
        nodes += u64::from(used);
    }
    if sums.is_empty() {
        return None;
    }
    let mut out = Metrics::new();
    for (task, (n, acc, loss)) in sums {
        out.insert(format!("accuracy/{task}"), acc / n);
        out.insert(format!("loss/{task}"), loss / n);
        out.insert(format!("samples/{task}"), n);
    }
    out.insert("nodes".into(), nodes as f64);
    out.insert("failures".into(), failures.len() as f64);
    Some(out)
}

/// How the deltas of one group are combined.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Combiner {
    /// Weighted mean (streamed).
    Mean,
    /// Coordinate-wise median (Yin et al., 2018).
    Median,
    /// Coordinate-wise mean after dropping the `floor(beta * n)` largest and
    /// smallest values (Yin et al., 2018).
    TrimmedMean { beta: f32 },
    /// Krum / multi-Krum (Blanchard et al., 2017): `f` assumed Byzantine
    /// nodes, the `m` best-scored deltas are averaged (`m = 1`: Krum).
    Krum { f: usize, m: usize },
}

/// The server optimizer that turns a combined delta into a model step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerOpt {
    /// `w += lr * Δ` (FedAvg: lr 1).
    Sgd { lr: f32 },
    /// FedAvgM (Hsu et al., 2019): `m = momentum * m + Δ; w += lr * m`.
    Momentum { lr: f32, momentum: f32 },
    /// FedAdagrad: `m = b1 m + (1-b1) Δ; v += Δ²`.
    Adagrad { lr: f32, beta1: f32, tau: f32 },
    /// FedAdam: `v = b2 v + (1-b2) Δ²`.
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
    /// FedYogi: `v = v - (1-b2) Δ² sign(v - Δ²)`.
    Yogi {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
}

/// The built-in strategies: a combiner, a server optimizer, optional
/// clipping and FedProx's mu. Build them with [`strategy_from_config`].
#[derive(Clone, Debug)]
pub struct ServerStrategy {
    name: String,
    combiner: Combiner,
    opt: ServerOpt,
    clip_norm: Option<f32>,
    prox_mu: f32,
    steps: u64,
    /// First moment / momentum per group.
    m: BTreeMap<String, Vec<f32>>,
    /// Second moment per group.
    v: BTreeMap<String, Vec<f32>>,
}

impl ServerStrategy {
    pub fn new(name: impl Into<String>, combiner: Combiner, opt: ServerOpt) -> Self {
        ServerStrategy {
            name: name.into(),
            combiner,
            opt,
            clip_norm: None,
            prox_mu: 0.0,
            steps: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    pub fn with_clip_norm(mut self, clip: Option<f32>) -> Self {
        self.clip_norm = clip;
        self
    }

    pub fn with_prox_mu(mut self, mu: f32) -> Self {
        self.prox_mu = mu;
        self
    }

    pub fn combiner(&self) -> Combiner {
        self.combiner
    }

    pub fn server_opt(&self) -> ServerOpt {
        self.opt
    }

    fn step_group(&mut self, group: &str, w: &mut [f32], delta: &[f32]) -> Result<(), AggError> {
        if w.len() != delta.len() {
            return Err(AggError::Strategy {
                strategy: self.name.clone(),
                message: format!(
                    "group `{group}`: delta of {} values for {} weights",
                    delta.len(),
                    w.len()
                ),
            });
        }
        let n = w.len();
        match self.opt {
            ServerOpt::Sgd { lr } => {
                for (wi, di) in w.iter_mut().zip(delta) {
                    *wi += lr * di;
                }
            }
            ServerOpt::Momentum { lr, momentum } => {
                let m = moment(&mut self.m, group, n);
                for ((wi, mi), di) in w.iter_mut().zip(m.iter_mut()).zip(delta) {
                    *mi = momentum * *mi + di;
                    *wi += lr * *mi;
                }
            }
            ServerOpt::Adagrad { lr, beta1, tau } => {
                let m = moment(&mut self.m, group, n);
                let v = moment(&mut self.v, group, n);
                for (((wi, mi), vi), di) in
                    w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(delta)
                {
                    *mi = beta1 * *mi + (1.0 - beta1) * di;
                    *vi += di * di;
                    *wi += lr * *mi / (vi.sqrt() + tau);
                }
            }
            ServerOpt::Adam {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                let m = moment(&mut self.m, group, n);
                let v = moment(&mut self.v, group, n);
                for (((wi, mi), vi), di) in
                    w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(delta)
                {
                    *mi = beta1 * *mi + (1.0 - beta1) * di;
                    *vi = beta2 * *vi + (1.0 - beta2) * di * di;
                    *wi += lr * *mi / (vi.sqrt() + tau);
                }
            }
            ServerOpt::Yogi {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                let m = moment(&mut self.m, group, n);
                let v = moment(&mut self.v, group, n);
                for (((wi, mi), vi), di) in
                    w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(delta)
                {
                    let d2 = di * di;
                    *mi = beta1 * *mi + (1.0 - beta1) * di;
                    *vi -= (1.0 - beta2) * d2 * sign(*vi - d2);
                    *wi += lr * *mi / (vi.sqrt() + tau);
                }
            }
        }
        Ok(())
    }
}

/// The moment vector of `group`, created at zero (or reset if the length
/// changed, which a validated layout rules out).
fn moment<'a>(map: &'a mut BTreeMap<String, Vec<f32>>, group: &str, n: usize) -> &'a mut Vec<f32> {
    let e = map.entry(group.to_string()).or_insert_with(|| vec![0.0; n]);
    if e.len() != n {
        *e = vec![0.0; n];
    }
    e
}

/// Yogi's sign: 0 at 0.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Strategy for ServerStrategy {
    fn name(&self) -> &str {
        &self.name
    }

    fn collect(&self) -> Collect {
        match self.combiner {
            Combiner::Mean => Collect::Stream,
            _ => Collect::Retain,
        }
    }

    fn clip_norm(&self) -> Option<f32> {
        self.clip_norm
    }

    fn train_config(&mut self, _round: u64, _node: &str, base: &TrainConfig) -> TrainConfig {
        let mut t = base.clone();
        if self.prox_mu > 0.0 {
            t.prox_mu = self.prox_mu;
        }
        t
    }

    fn combine(
        &self,
        _group: &str,
        deltas: &[Vec<f32>],
        weights: &[f64],
    ) -> Result<Vec<f32>, AggError> {
        match self.combiner {
            Combiner::Mean => weighted_mean(deltas, weights),
            Combiner::Median => median(deltas),
            Combiner::TrimmedMean { beta } => trimmed_mean(deltas, beta),
            Combiner::Krum { f, m } => krum(deltas, weights, f, m),
        }
    }

    fn aggregate(
        &mut self,
        input: &AggregateInput<'_>,
        global: &mut ParamGroups,
    ) -> Result<(), AggError> {
        for (group, delta) in input.combined {
            let Some(w) = global.get_mut(group) else {
                return Err(AggError::Strategy {
                    strategy: self.name.clone(),
                    message: format!("unknown group `{group}`"),
                });
            };
            self.step_group(group, w, delta)?;
        }
        self.steps += 1;
        Ok(())
    }

    fn state(&self) -> StrategyState {
        let mut tensors = BTreeMap::new();
        for (g, m) in &self.m {
            tensors.insert(format!("m/{g}"), m.clone());
        }
        for (g, v) in &self.v {
            tensors.insert(format!("v/{g}"), v.clone());
        }
        StrategyState {
            name: self.name.clone(),
            steps: self.steps,
            tensors,
            ..StrategyState::default()
        }
    }

    fn is_finite(&self) -> bool {
        self.m
            .values()
            .chain(self.v.values())
            .all(|t| t.iter().all(|v| v.is_finite()))
    }

    /// Refuses a state of another strategy name, a tensor not named
    /// `m/<group>` or `v/<group>`, and one whose length is not its group's
    /// in `layout`. Checks everything before it changes anything.
    fn restore(&mut self, state: StrategyState, layout: &Layout) -> Result<(), AggError> {
        if state.name != self.name {
            return Err(AggError::Checkpoint(format!(
                "checkpoint holds strategy `{}`, the engine was given `{}`",
                state.name, self.name
            )));
        }
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (k, t) in state.tensors {
            let (map, g) = if let Some(g) = k.strip_prefix("m/") {
                (&mut m, g)
            } else if let Some(g) = k.strip_prefix("v/") {
                (&mut v, g)
            } else {
                return Err(AggError::Checkpoint(format!(
                    "unknown strategy tensor `{k}`"
                )));
            };
            if layout.group(g).map(|gl| gl.len()) != Some(t.len() as u64) {
                return Err(AggError::Checkpoint(format!(
                    "strategy tensor `{k}` does not fit the layout"
                )));
            }
            map.insert(g.to_string(), t);
        }
        self.steps = state.steps;
        self.m = m;
        self.v = v;
        Ok(())
    }
}

fn check_same_len(deltas: &[Vec<f32>]) -> Result<usize, AggError> {
    let n = deltas
        .first()
        .map(Vec::len)
        .ok_or_else(|| AggError::Strategy {
            strategy: "combine".into(),
            message: "no delta to combine".into(),
        })?;
    if deltas.iter().any(|d| d.len() != n) {
        return Err(AggError::Strategy {
            strategy: "combine".into(),
            message: "deltas of different lengths".into(),
        });
    }
    Ok(n)
}

/// `sum(w_i d_i) / sum(w_i)`, accumulated in f64, in the given order.
pub fn weighted_mean(deltas: &[Vec<f32>], weights: &[f64]) -> Result<Vec<f32>, AggError> {
    let n = check_same_len(deltas)?;
    let total: f64 = weights.iter().take(deltas.len()).sum();
    if weights.len() != deltas.len() || !(total > 0.0 && total.is_finite()) {
        return Err(AggError::Strategy {
            strategy: "mean".into(),
            message: "weights must be positive".into(),
        });
    }
    let mut acc = vec![0.0f64; n];
    for (d, &w) in deltas.iter().zip(weights) {
        for (a, x) in acc.iter_mut().zip(d) {
            *a += w * f64::from(*x);
        }
    }
    Ok(acc.into_iter().map(|a| (a / total) as f32).collect())
}

/// Maps an f32 to an i32 whose integer order is the float's total order
/// (an involution: applying it twice gives the bits back). Integer sorts of
/// the small columns below are much faster than float comparisons.
#[inline(always)]
fn order_key(x: f32) -> i32 {
    let b = x.to_bits() as i32;
    b ^ ((((b >> 31) as u32) >> 1) as i32)
}

#[inline(always)]
fn from_key(k: i32) -> f32 {
    f32::from_bits((k ^ ((((k >> 31) as u32) >> 1) as i32)) as u32)
}

/// Coordinates per parallel task, and per transposed block inside it (a
/// block of columns fits in L1).
const PAR_CHUNK: usize = 16 * 1024;
const BLOCK: usize = 256;

/// Up to this many deltas, [`LANES`] columns at a time go through a sorting
/// network (branch-free min/max across the lanes); more are transposed and
/// sorted one column at a time.
const SMALL_K: usize = 32;
const LANES: usize = 16;

/// Batcher's odd-even merge sort for the next power of two above `k`,
/// without the comparators that reach a position `>= k`: with `+inf` padded
/// there, those never swap, so the rest sorts `k` values.
fn sorting_network(k: usize) -> Vec<(u8, u8)> {
    let n = k.next_power_of_two();
    let mut net = Vec::new();
    let mut p = 1;
    while p < n {
        let mut step = p;
        while step >= 1 {
            let mut j = step % p;
            while j + step < n {
                for i in 0..step.min(n - j - step) {
                    let (a, b) = (i + j, i + j + step);
                    if a / (2 * p) == b / (2 * p) && b < k {
                        net.push((a as u8, b as u8));
                    }
                }
                j += 2 * step;
            }
            step /= 2;
        }
        p *= 2;
    }
    net
}

/// What a robust combiner takes from a sorted column of `k` values.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// The middle value; the mean of the two middle ones when `k` is even.
    Median,
    /// The mean of the values after dropping `cut` at each end, summed in
    /// ascending order.
    Trimmed { cut: usize },
}

impl Pick {
    fn of_column(self, col: &[i32]) -> f32 {
        let k = col.len();
        match self {
            Pick::Median if k % 2 == 1 => from_key(col[k / 2]),
            Pick::Median => {
                let (lo, hi) = (from_key(col[k / 2 - 1]), from_key(col[k / 2]));
                ((f64::from(lo) + f64::from(hi)) / 2.0) as f32
            }
            Pick::Trimmed { cut } => {
                let s: f64 = col[cut..k - cut]
                    .iter()
                    .map(|&x| f64::from(from_key(x)))
                    .sum();
                (s / (k - 2 * cut) as f64) as f32
            }
        }
    }

    /// [`Pick::of_column`] of each lane of `rows[..k]` (row `i` holds the
    /// `i`-th smallest of every lane), the same arithmetic lane-wise.
    #[inline(always)]
    fn of_rows(self, rows: &[[i32; LANES]], out: &mut [f32]) {
        let k = rows.len();
        // -0.0, the neutral element of f64's `Sum`, as in `of_column`.
        let mut v = [-0.0f64; LANES];
        let kept = match self {
            Pick::Median if k % 2 == 1 => {
                for (o, x) in out.iter_mut().zip(rows[k / 2]) {
                    *o = from_key(x);
                }
                return;
            }
            Pick::Median => &rows[k / 2 - 1..k / 2 + 1],
            Pick::Trimmed { cut } => &rows[cut..k - cut],
        };
        for row in kept {
            for (a, &x) in v.iter_mut().zip(row) {
                *a += f64::from(from_key(x));
            }
        }
        let n = kept.len() as f64;
        for (o, a) in out.iter_mut().zip(v) {
            *o = (a / n) as f32;
        }
    }
}

/// One parallel task's coordinates `base..base+out.len()` through the
/// network, [`LANES`] at a time. Compiled once per instruction set by
/// `pulp` (AVX2's integer min/max where the CPU has them), the same
/// results on every path.
struct NetworkSort<'a> {
    deltas: &'a [Vec<f32>],
    net: &'a [(u8, u8)],
    pick: Pick,
    base: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for NetworkSort<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let k = self.deltas.len();
        let mut rows = [[0i32; LANES]; SMALL_K];
        for (c, out) in self.out.chunks_mut(LANES).enumerate() {
            let start = self.base + c * LANES;
            for (row, d) in rows.iter_mut().zip(self.deltas) {
                for (key, x) in row.iter_mut().zip(&d[start..start + out.len()]) {
                    *key = order_key(*x);
                }
            }
            for &(a, b) in self.net {
                let (x, y) = (rows[usize::from(a)], rows[usize::from(b)]);
                for l in 0..LANES {
                    rows[usize::from(a)][l] = x[l].min(y[l]);
                    rows[usize::from(b)][l] = x[l].max(y[l]);
                }
            }
            self.pick.of_rows(&rows[..k], out);
        }
    }
}

/// Each coordinate's column of values, sorted ascending, reduced by `pick`.
/// Coordinates are independent, so the parallel split does not change the
/// result (deterministic whatever the thread count).
fn per_column_sorted(deltas: &[Vec<f32>], pick: Pick) -> Result<Vec<f32>, AggError> {
    let n = check_same_len(deltas)?;
    let k = deltas.len();
    let mut out = vec![0.0f32; n];
    if k <= SMALL_K {
        let net = sorting_network(k);
        let arch = pulp::Arch::new();
        out.par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .for_each(|(c, out)| {
                arch.dispatch(NetworkSort {
                    deltas,
                    net: &net,
                    pick,
                    base: c * PAR_CHUNK,
                    out,
                });
            });
        return Ok(out);
    }
    out.par_chunks_mut(PAR_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = c * PAR_CHUNK;
            let mut buf = vec![0i32; BLOCK * k];
            for (b, block) in chunk.chunks_mut(BLOCK).enumerate() {
                let start = base + b * BLOCK;
                // Transpose: column i of the block is buf[i*k .. (i+1)*k].
                for (j, d) in deltas.iter().enumerate() {
                    for (i, x) in d[start..start + block.len()].iter().enumerate() {
                        buf[i * k + j] = order_key(*x);
                    }
                }
                for (i, o) in block.iter_mut().enumerate() {
                    let col = &mut buf[i * k..(i + 1) * k];
                    col.sort_unstable();
                    *o = pick.of_column(col);
                }
            }
        });
    Ok(out)
}

/// Coordinate-wise median; the mean of the two middle values when the count
/// is even.
pub fn median(deltas: &[Vec<f32>]) -> Result<Vec<f32>, AggError> {
    per_column_sorted(deltas, Pick::Median)
}

/// Coordinate-wise trimmed mean: drops `floor(beta * n)` values at each end
/// (fewer if that would leave nothing), averages the rest.
pub fn trimmed_mean(deltas: &[Vec<f32>], beta: f32) -> Result<Vec<f32>, AggError> {
    let k = deltas.len().max(1);
    let cut = ((f64::from(beta.clamp(0.0, 0.5)) * k as f64).floor() as usize).min((k - 1) / 2);
    per_column_sorted(deltas, Pick::Trimmed { cut })
}

/// Krum's scores: for each delta, the sum of its squared distances to its
/// `n - f - 2` nearest others (at least 1).
pub fn krum_scores(deltas: &[Vec<f32>], f: usize) -> Result<Vec<f64>, AggError> {
    check_same_len(deltas)?;
    let k = deltas.len();
    let mut dist = vec![0.0f64; k * k];
    for i in 0..k {
        for j in i + 1..k {
            let d: f64 = deltas[i]
                .iter()
                .zip(&deltas[j])
                .map(|(a, b)| {
                    let x = f64::from(*a) - f64::from(*b);
                    x * x
                })
                .sum();
            dist[i * k + j] = d;
            dist[j * k + i] = d;
        }
    }
    let neighbours = k.saturating_sub(f + 2).clamp(1, k.saturating_sub(1).max(1));
    Ok((0..k)
        .map(|i| {
            let mut row: Vec<f64> = (0..k)
                .filter(|&j| j != i)
                .map(|j| dist[i * k + j])
                .collect();
            row.sort_unstable_by(f64::total_cmp);
            row.iter().take(neighbours).sum()
        })
        .collect())
}

/// Krum (`m = 1`) or multi-Krum: the example-weighted mean of the `m` deltas
/// with the lowest scores (ties go to the earlier submission).
pub fn krum(
    deltas: &[Vec<f32>],
    weights: &[f64],
    f: usize,
    m: usize,
) -> Result<Vec<f32>, AggError> {
    let scores = krum_scores(deltas, f)?;
    let mut order: Vec<usize> = (0..deltas.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(m.clamp(1, deltas.len()));
    order.sort_unstable();
    let chosen: Vec<Vec<f32>> = order.iter().map(|&i| deltas[i].clone()).collect();
    let w: Vec<f64> = order
        .iter()
        .map(|&i| weights.get(i).copied().unwrap_or(1.0))
        .collect();
    weighted_mean(&chosen, &w)
}

/// Parameters of the adaptive server optimizers (Reddi et al. defaults as in
/// Flower: lr 0.1, beta1 0.9, beta2 0.99, tau 1e-9).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaptiveParams {
    pub server_lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        AdaptiveParams {
            server_lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-9,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MomentumParams {
    pub server_lr: f32,
    pub momentum: f32,
}

impl Default for MomentumParams {
    fn default() -> Self {
        MomentumParams {
            server_lr: 1.0,
            momentum: 0.9,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxParams {
    pub mu: f32,
}

impl Default for ProxParams {
    fn default() -> Self {
        ProxParams { mu: 0.01 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrimParams {
    pub beta: f32,
}

impl Default for TrimParams {
    fn default() -> Self {
        TrimParams { beta: 0.1 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KrumParams {
    pub f: usize,
    pub m: usize,
}

impl Default for KrumParams {
    fn default() -> Self {
        KrumParams { f: 1, m: 1 }
    }
}

/// Which strategy, tagged by `name` (TOML: `name = "fedadam"`, then its
/// parameters beside it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name")]
pub enum StrategyKind {
    #[default]
    #[serde(rename = "fedavg")]
    FedAvg,
    #[serde(rename = "fedavgm")]
    FedAvgM(MomentumParams),
    #[serde(rename = "fedadam")]
    FedAdam(AdaptiveParams),
    #[serde(rename = "fedyogi")]
    FedYogi(AdaptiveParams),
    #[serde(rename = "fedadagrad")]
    FedAdagrad(AdaptiveParams),
    #[serde(rename = "fedprox")]
    FedProx(ProxParams),
    #[serde(rename = "median")]
    Median,
    #[serde(rename = "trimmed_mean")]
    TrimmedMean(TrimParams),
    #[serde(rename = "krum")]
    Krum(KrumParams),
}

/// A strategy as written in a config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    #[serde(flatten)]
    pub kind: StrategyKind,
    /// Clip each update to this L2 norm before combining.
    #[serde(default)]
    pub clip_norm: Option<f32>,
}

/// Builds a built-in strategy.
pub fn strategy_from_config(cfg: &StrategyConfig) -> Box<dyn Strategy> {
    Box::new(server_strategy(cfg))
}

/// Same as [`strategy_from_config`], with the concrete type.
pub fn server_strategy(cfg: &StrategyConfig) -> ServerStrategy {
    let sgd1 = ServerOpt::Sgd { lr: 1.0 };
    let s = match cfg.kind {
        StrategyKind::FedAvg => ServerStrategy::new("fedavg", Combiner::Mean, sgd1),
        StrategyKind::FedAvgM(p) => ServerStrategy::new(
            "fedavgm",
            Combiner::Mean,
            ServerOpt::Momentum {
                lr: p.server_lr,
                momentum: p.momentum,
            },
        ),
        StrategyKind::FedAdam(p) => ServerStrategy::new(
            "fedadam",
            Combiner::Mean,
            ServerOpt::Adam {
                lr: p.server_lr,
                beta1: p.beta1,
                beta2: p.beta2,
                tau: p.tau,
            },
        ),
        StrategyKind::FedYogi(p) => ServerStrategy::new(
            "fedyogi",
            Combiner::Mean,
            ServerOpt::Yogi {
                lr: p.server_lr,
                beta1: p.beta1,
                beta2: p.beta2,
                tau: p.tau,
            },
        ),
        StrategyKind::FedAdagrad(p) => ServerStrategy::new(
            "fedadagrad",
            Combiner::Mean,
            ServerOpt::Adagrad {
                lr: p.server_lr,
                beta1: p.beta1,
                tau: p.tau,
            },
        ),
        StrategyKind::FedProx(p) => {
            ServerStrategy::new("fedprox", Combiner::Mean, sgd1).with_prox_mu(p.mu)
        }
        StrategyKind::Median => ServerStrategy::new("median", Combiner::Median, sgd1),
        StrategyKind::TrimmedMean(p) => {
            ServerStrategy::new("trimmed_mean", Combiner::TrimmedMean { beta: p.beta }, sgd1)
        }
        StrategyKind::Krum(p) => {
            ServerStrategy::new("krum", Combiner::Krum { f: p.f, m: p.m }, sgd1)
        }
    };
    s.with_clip_norm(cfg.clip_norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The network compiled for the CPU's widest instruction set gives the
    /// bits of the same loop without it (what a CPU without AVX2 runs).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        use pulp::WithSimd;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let n = 1_000;
        for k in [2usize, 7, 20, 32] {
            let d: Vec<Vec<f32>> = (0..k)
                .map(|_| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
                .collect();
            let net = sorting_network(k);
            for pick in [Pick::Median, Pick::Trimmed { cut: k / 5 }] {
                let run = |scalar: bool| {
                    let mut out = vec![0.0f32; n];
                    let op = NetworkSort {
                        deltas: &d,
                        net: &net,
                        pick,
                        base: 0,
                        out: &mut out,
                    };
                    if scalar {
                        op.with_simd(pulp::Scalar::new());
                    } else {
                        pulp::Arch::new().dispatch(op);
                    }
                    out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(run(true), run(false), "k = {k}, {pick:?}");
            }
        }
    }

    /// By the 0-1 principle a comparator network sorts every input if it
    /// sorts every input of zeros and ones: checked exhaustively up to 20
    /// values (bit `i` of `x` is position `i`).
    #[test]
    fn the_sorting_network_sorts_every_zero_one_input() {
        for k in 1..=20usize {
            let net = sorting_network(k);
            for input in 0u32..(1 << k) {
                let mut x = input;
                for &(a, b) in &net {
                    let (ba, bb) = ((x >> a) & 1, (x >> b) & 1);
                    if ba > bb {
                        x ^= (1 << a) | (1 << b);
                    }
                }
                let ones = input.count_ones();
                let sorted = ((1u32 << ones) - 1) << (k as u32 - ones);
                assert_eq!(x, sorted, "k = {k}, input {input:b}");
            }
        }
    }
}
