//! The simulation loop: the aggregator's [`Engine`] and many virtual nodes
//! running the real node runtime, with an in-process transport and a
//! virtual clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cohort_aggregator::{
    strategy_from_config, Engine, EngineConfig, FailureReason, Federation, Metrics, Mode, NodeInfo,
    RefusalCode, Strategy,
};
use cohort_node::{mix_seed, NodeRuntime, NodeState};
use cohort_protocol::codec::{self, CodecConfig, ErrorFeedback, Rounding};
use cohort_protocol::messages::{EvalMetrics, EvalReport, RoundPlan, TrainConfig};
use cohort_protocol::seal::{ReplayGuard, SealContext, SealKeyPair};
use cohort_protocol::{head_group, Fingerprint, ParamGroups, BACKBONE};
use cohort_tasks::{Dataset, ModelRegistry, SharedModel, TaskData};

/// Builds a fresh strategy for each engine a run makes (`sharing =
/// "separate"` makes one engine per task).
pub type StrategyFactory<'a> = &'a dyn Fn() -> Box<dyn Strategy>;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Normal};
use rayon::prelude::*;

use crate::checkpoint::{experiment_hash, ClientState, SimState};
use crate::config::{Attack, ExperimentConfig, HeadPolicy};
use crate::data::{choose_fraction, Population};
use crate::metrics::{RoundMetrics, TaskScore};
use crate::SimError;

/// Test samples per parallel slice of the central evaluation. Fixed (not
/// derived from the pool size) so that the slices, their batches and the
/// order their sums are combined in do not depend on `--threads`.
pub const EVAL_SLICE: usize = 512;

/// The id of virtual client `i`: sortable, so that node order is client order.
pub fn client_id(i: usize) -> String {
    format!("sim-{i:07}")
}

fn client_index(id: &str) -> Option<usize> {
    id.strip_prefix("sim-")?.parse().ok()
}

/// A client's state between rounds, stored compactly: local heads as f32,
/// error-feedback residuals quantized to 8 bits (nearest, per-chunk scale),
/// which keeps a residual at a quarter of its size while adding an error far
/// below the residual itself.
#[derive(Clone, Debug, Default)]
struct StoredState {
    local: ParamGroups,
    residuals: Vec<(String, usize, Vec<u8>)>,
}

fn residual_codec() -> CodecConfig {
    CodecConfig {
        bits: 8,
        rounding: Rounding::Nearest,
        chunk: 64,
        top_k: None,
    }
}

impl StoredState {
    fn pack(state: NodeState) -> Result<Option<Self>, SimError> {
        if state.local.is_empty() && state.residuals.is_empty() {
            return Ok(None);
        }
        let mut residuals = Vec::with_capacity(state.residuals.len());
        for (name, ef) in state.residuals {
            let bytes = codec::encode(&ef.residual, &residual_codec(), 0)?;
            residuals.push((name, ef.residual.len(), bytes));
        }
        Ok(Some(StoredState {
            local: state.local,
            residuals,
        }))
    }

    fn unpack(self) -> Result<NodeState, SimError> {
        let mut state = NodeState {
            local: self.local,
            ..NodeState::default()
        };
        for (name, len, bytes) in self.residuals {
            let residual = codec::decode(&bytes, len)?;
            state.residuals.insert(name, ErrorFeedback { residual });
        }
        Ok(state)
    }

    fn bytes(&self) -> usize {
        4 * self.local.num_values() + self.residuals.iter().map(|r| r.2.len()).sum::<usize>()
    }

    fn to_saved(&self, client: usize) -> ClientState {
        ClientState {
            client: client as u64,
            local: self
                .local
                .iter()
                .map(|(g, v)| (g.to_string(), v.to_vec()))
                .collect(),
            residuals: self
                .residuals
                .iter()
                .map(|(g, n, b)| (g.clone(), *n as u64, b.clone()))
                .collect(),
        }
    }
}

/// One client's training job for a round.
struct Job {
    client: usize,
    id: String,
    plan: RoundPlan,
    state: NodeState,
    /// Reply time on the virtual clock, from the plan.
    latency_ms: u64,
    /// Weights the client starts from (the version its plan names).
    weights: Arc<ParamGroups>,
}

/// What came back from a client.
struct Reply {
    client: usize,
    id: String,
    latency_ms: u64,
    /// The update, opened on the worker that trained it.
    result: Result<(cohort_node::RoundOutput, Opened), SimError>,
    state: NodeState,
}

/// One item of a round's work on the pool.
enum Work {
    Train(Job),
    /// Slice `slice` of task `task`'s test set (see [`CentralEval`]).
    Eval {
        task: usize,
        slice: usize,
    },
}

enum Done {
    Trained(Reply),
    /// A slice's result and how long it took (ms).
    Evaluated(Option<Result<SliceScore, SimError>>, f64),
}

/// One slice's result: task index and metrics.
type SliceScore = (usize, cohort_tasks::EvalMetrics);

/// A central evaluation of one model, cut into fixed slices of
/// [`EVAL_SLICE`] test samples (so its sums do not depend on the thread
/// count): per task, its model, the model's weights and the test set size.
struct CentralEval {
    tasks: Vec<(SharedModel, ParamGroups, usize)>,
    names: Vec<String>,
}

impl CentralEval {
    /// Every `(task, slice)`, in order.
    fn slices(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.tasks
            .iter()
            .enumerate()
            .flat_map(|(t, (.., len))| (0..len.div_ceil(EVAL_SLICE)).map(move |s| (t, s)))
    }

    fn slice(&self, pop: &Population, task: usize, slice: usize) -> Result<SliceScore, SimError> {
        let (spec, params, len) = &self.tasks[task];
        let t = &pop.tasks[task];
        let idx: Vec<usize> = (slice * EVAL_SLICE..((slice + 1) * EVAL_SLICE).min(*len)).collect();
        let m = spec.evaluate(params, &t.name, &t.split.test, Some(&idx))?;
        Ok((task, m))
    }

    /// Per-task scores from the slices' results, combined in slice order.
    fn combine(&self, parts: &[SliceScore]) -> Vec<TaskScore> {
        (0..self.tasks.len())
            .map(|task| {
                let of = || {
                    parts
                        .iter()
                        .filter(move |(t, _)| *t == task)
                        .map(|(_, m)| m)
                };
                let n: u64 = of().map(|m| m.samples).sum();
                let w = |f: fn(&cohort_tasks::EvalMetrics) -> f32| {
                    (of()
                        .map(|m| f64::from(f(m)) * m.samples as f64)
                        .sum::<f64>()
                        / n.max(1) as f64) as f32
                };
                TaskScore {
                    task: self.names[task].clone(),
                    accuracy: w(|m| m.accuracy),
                    loss: w(|m| m.loss),
                }
            })
            .collect()
    }
}

/// A sealed update opened by the worker that trained it: opening is a pure
/// function of the key and the bytes, so it runs in parallel; the replay
/// check stays on delivery, in order. The sealed bytes are dropped then,
/// only their size is kept.
struct Opened {
    sealed_len: usize,
    plain: Result<Vec<u8>, cohort_protocol::ProtocolError>,
}

/// A running simulation: one engine, one population of virtual clients.
pub struct Simulation {
    pub cfg: ExperimentConfig,
    pub pop: Population,
    pub engine: Engine,
    /// The model with every task's head.
    pub model: SharedModel,
    keys: SealKeyPair,
    replay: ReplayGuard,
    states: HashMap<usize, StoredState>,
    byzantine: Vec<usize>,
    flipped: Vec<Option<Dataset>>,
    pool: rayon::ThreadPool,
    /// Virtual time, in milliseconds.
    clock_ms: u64,
    fingerprints: HashMap<Vec<usize>, Fingerprint>,
    /// Metrics of the rounds before a resume (from the checkpoint).
    past: Vec<RoundMetrics>,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("name", &self.cfg.name)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// The top-level settings the engine and the initial weights depend on
/// (derived as `cohort-aggregator` derives them from the same file).
pub fn federation(cfg: &ExperimentConfig) -> Federation {
    Federation {
        seed: cfg.seed,
        rounds: cfg.rounds,
        clients: cfg.clients.count,
        per_round: cfg.clients.per_round,
        local_heads: match cfg.heads {
            HeadPolicy::Local => cfg.tasks.iter().map(|t| t.name.clone()).collect(),
            HeadPolicy::Global => Vec::new(),
        },
    }
}

/// The engine settings an experiment implies.
pub fn engine_config(cfg: &ExperimentConfig) -> EngineConfig {
    let mut e = federation(cfg).engine_config(&cfg.engine);
    // The top-level `[privacy]` section (an `[engine.privacy]` is used
    // when it is absent).
    if !cfg.privacy.is_off() {
        e.privacy = cfg.privacy.clone();
    }
    e
}

/// The experiment's model (`backbone` on `backend`) with a head for each of
/// the population's tasks, from `models`; an error if a task's data does not
/// fit it ([`crate::data::check_fit`]).
pub fn build_model(
    cfg: &ExperimentConfig,
    pop: &Population,
    models: &ModelRegistry,
) -> Result<SharedModel, SimError> {
    let model = models.build(
        &cfg.backbone,
        cfg.backend,
        pop.tasks.iter().map(|t| t.spec()).collect(),
    )?;
    crate::data::check_fit(&*model, &pop.tasks)?;
    Ok(model)
}

impl Simulation {
    /// Loads the data, partitions it, builds the model and the engine and
    /// registers every client.
    pub fn new(cfg: ExperimentConfig) -> Result<Self, SimError> {
        Self::with_models(cfg, &ModelRegistry::default())
    }

    /// [`Simulation::new`] with the model names of `models` (a program's
    /// own models registered next to the built-in ones).
    pub fn with_models(cfg: ExperimentConfig, models: &ModelRegistry) -> Result<Self, SimError> {
        let strategy = strategy_from_config(&cfg.strategy);
        Self::with_strategy(cfg, models, strategy)
    }

    /// [`Simulation::with_models`] driven by `strategy` instead of the one
    /// `cfg.strategy` names: any [`Strategy`], defined in this crate or
    /// not. The engine calls its `initial_parameters` on the model's
    /// seeded weights, as `cohort-aggregator` does.
    pub fn with_strategy(
        cfg: ExperimentConfig,
        models: &ModelRegistry,
        strategy: Box<dyn Strategy>,
    ) -> Result<Self, SimError> {
        cfg.validate()?;
        let pop = Population::new(&cfg)?;
        let model = build_model(&cfg, &pop, models)?;
        Self::with_model_and_strategy(cfg, pop, model, strategy)
    }

    /// Same as [`Simulation::new`] on an already built population, with
    /// the built-in models.
    pub fn with_population(cfg: ExperimentConfig, pop: Population) -> Result<Self, SimError> {
        let model = build_model(&cfg, &pop, &ModelRegistry::default())?;
        Self::with_model(cfg, pop, model)
    }

    /// A simulation of `model` (which must have a head for each of the
    /// population's tasks) on `pop`.
    pub fn with_model(
        cfg: ExperimentConfig,
        pop: Population,
        model: SharedModel,
    ) -> Result<Self, SimError> {
        let strategy = strategy_from_config(&cfg.strategy);
        Self::with_model_and_strategy(cfg, pop, model, strategy)
    }

    /// [`Simulation::with_model`] driven by `strategy` (see
    /// [`Simulation::with_strategy`]).
    pub fn with_model_and_strategy(
        cfg: ExperimentConfig,
        pop: Population,
        model: SharedModel,
        strategy: Box<dyn Strategy>,
    ) -> Result<Self, SimError> {
        crate::data::check_fit(&*model, &pop.tasks)?;
        let layout = model.layout();
        let initial = model.init(federation(&cfg).init_seed());
        let engine = Engine::new(engine_config(&cfg), layout, initial, strategy)?;
        Self::assemble(cfg, pop, model, engine)
    }

    /// The simulation around a built engine: the pool, the Byzantine
    /// clients, every client registered.
    fn assemble(
        cfg: ExperimentConfig,
        pop: Population,
        spec: SharedModel,
        engine: Engine,
    ) -> Result<Self, SimError> {
        let threads = if cfg.threads == 0 {
            rayon::current_num_threads()
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cohort-sim-{i}"))
            .build()
            .map_err(|e| SimError::Config(format!("thread pool: {e}")))?;
        let byzantine = choose_fraction(
            pop.clients(),
            cfg.faults.byzantine,
            mix_seed(cfg.seed, 0xB42),
        );
        let flipped = (0..pop.tasks.len())
            .map(|t| {
                (matches!(cfg.faults.attack, Attack::LabelFlip) && !byzantine.is_empty())
                    .then(|| pop.flipped(t))
            })
            .collect();
        let keys = SealKeyPair::generate()?;
        let mut sim = Simulation {
            cfg,
            pop,
            engine,
            model: spec,
            keys,
            replay: ReplayGuard::default(),
            states: HashMap::new(),
            byzantine,
            flipped,
            pool,
            clock_ms: 0,
            fingerprints: HashMap::new(),
            past: Vec::new(),
        };
        for c in 0..sim.pop.clients() {
            let info = sim.node_info(c)?;
            sim.engine.register(info)?;
        }
        Ok(sim)
    }

    fn node_info(&mut self, client: usize) -> Result<NodeInfo, SimError> {
        let tasks = self.pop.client_tasks(client);
        let fingerprint = match self.fingerprints.get(&tasks) {
            Some(f) => *f,
            None => {
                let names: Vec<&str> = tasks
                    .iter()
                    .map(|&t| self.pop.tasks[t].name.as_str())
                    .collect();
                let f = self.model.subset(&names)?.layout().fingerprint();
                self.fingerprints.insert(tasks.clone(), f);
                f
            }
        };
        Ok(NodeInfo {
            id: client_id(client),
            tasks: tasks
                .iter()
                .map(|&t| {
                    (
                        self.pop.tasks[t].name.clone(),
                        self.pop.train_count(client, t) as u64,
                    )
                })
                .collect(),
            fingerprint,
        })
    }

    pub fn is_byzantine(&self, client: usize) -> bool {
        self.byzantine.binary_search(&client).is_ok()
    }

    /// Bytes of per-client state held between rounds.
    pub fn state_bytes(&self) -> usize {
        self.states.values().map(StoredState::bytes).sum()
    }

    /// Clients with stored state.
    pub fn clients_with_state(&self) -> usize {
        self.states.len()
    }

    fn take_state(&mut self, client: usize) -> Result<NodeState, SimError> {
        match self.states.remove(&client) {
            Some(s) => s.unpack(),
            None => Ok(NodeState::default()),
        }
    }

    fn put_state(&mut self, client: usize, mut state: NodeState) -> Result<(), SimError> {
        if !self.cfg.clients.keep_residuals {
            state.residuals.clear();
        }
        if let Some(s) = StoredState::pack(state)? {
            self.states.insert(client, s);
        }
        Ok(())
    }

    fn latency(&self, round: u64, client: usize) -> u64 {
        let mean = self.cfg.faults.latency_mean_ms;
        if mean <= 0.0 {
            return 0;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(
            mix_seed(self.cfg.seed, 0x1A7),
            mix_seed(round, client as u64),
        ));
        Exp::new(1.0 / mean)
            .map(|e| e.sample(&mut rng).round() as u64)
            .unwrap_or(0)
    }

    fn drops_out(&self, round: u64, client: usize) -> bool {
        let p = self.cfg.faults.dropout;
        if p <= 0.0 {
            return false;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(
            mix_seed(self.cfg.seed, 0xD20),
            mix_seed(round, client as u64),
        ));
        rng.gen::<f64>() < p
    }

    /// Trains a batch of jobs on the pool, largest first, and evaluates
    /// `central`'s slices after them on whichever worker is free; replies
    /// come back in job order.
    fn train_jobs(
        &self,
        jobs: Vec<Job>,
        central: Option<&CentralEval>,
    ) -> Result<(Vec<Reply>, Option<(Vec<TaskScore>, f64)>), SimError> {
        let ctx = TrainCtx {
            model: &self.model,
            pop: &self.pop,
            flipped: &self.flipped,
            byzantine: &self.byzantine,
            attack: self.cfg.faults.attack,
            federation: &self.engine.config().federation,
            key: self.keys.public(),
            keys: &self.keys,
            seed: self.cfg.seed,
        };
        let n_jobs = jobs.len();
        let mut work: Vec<(u64, usize, Work)> = jobs
            .into_iter()
            .enumerate()
            .map(|(i, job)| (self.job_samples(job.client), i, Work::Train(job)))
            .collect();
        // Largest first; ties in job order, so the list is a function of
        // the plans alone.
        work.sort_by_key(|(samples, i, _)| (std::cmp::Reverse(*samples), *i));
        let order: Vec<usize> = work.iter().map(|(_, i, _)| *i).collect();
        let mut items: Vec<Work> = work.into_iter().map(|(.., w)| w).collect();
        if let Some(c) = central {
            items.extend(c.slices().map(|(task, slice)| Work::Eval { task, slice }));
        }
        let pop = &self.pop;
        let done = crate::schedule::run_queue(&self.pool, items, |w| match w {
            Work::Train(job) => Done::Trained(ctx.train(job)),
            Work::Eval { task, slice } => {
                let t = Instant::now();
                let r = central.map(|c| c.slice(pop, task, slice));
                Done::Evaluated(r, t.elapsed().as_secs_f64() * 1e3)
            }
        });
        let mut replies: Vec<Option<Reply>> = (0..n_jobs).map(|_| None).collect();
        let (mut parts, mut eval_ms) = (Vec::new(), 0.0);
        for (k, d) in done.into_iter().enumerate() {
            match d {
                Done::Trained(r) => replies[order[k]] = Some(r),
                Done::Evaluated(m, ms) => {
                    eval_ms += ms;
                    parts.extend(m.transpose()?);
                }
            }
        }
        let workers = self.pool.current_num_threads().max(1) as f64;
        let scores = central.map(|c| (c.combine(&parts), eval_ms / workers));
        Ok((replies.into_iter().flatten().collect(), scores))
    }

    /// Training samples of `client` over its tasks: the cost a round's
    /// schedule sorts by.
    fn job_samples(&self, client: usize) -> u64 {
        self.pop
            .client_tasks(client)
            .iter()
            .map(|&t| self.pop.train_count(client, t) as u64)
            .sum()
    }

    /// Checks a reply against replays and hands its update, opened by the
    /// worker, to the engine at virtual time `now`. Returns the refusal
    /// code, if any.
    fn deliver(
        &mut self,
        reply: &cohort_node::RoundOutput,
        plain: Result<Vec<u8>, cohort_protocol::ProtocolError>,
        now: u64,
    ) -> Option<RefusalCode> {
        let h = &reply.update.header;
        let ctx = SealContext::of_update(h);
        let opened = self.replay.check_and_record(&ctx).and_then(|()| plain);
        match opened {
            Ok(plain) => self
                .engine
                .submit_packed(h, &plain, now)
                .err()
                .map(|r| r.code),
            Err(e) => {
                self.engine.fail(
                    &h.node,
                    FailureReason::Error(format!("unsealing failed: {e}")),
                );
                Some(RefusalCode::Malformed)
            }
        }
    }

    /// Central evaluation of the global model on each task's test set,
    /// split into slices of [`EVAL_SLICE`] samples evaluated in parallel on
    /// the pool.
    pub fn evaluate_central(&self) -> Result<Vec<TaskScore>, SimError> {
        let (central, pop) = (self.central_eval()?, &self.pop);
        let parts =
            crate::schedule::run_queue(&self.pool, central.slices().collect(), |(task, slice)| {
                central.slice(pop, task, slice)
            });
        let parts: Vec<SliceScore> = parts.into_iter().collect::<Result<_, _>>()?;
        Ok(central.combine(&parts))
    }

    /// The central evaluation of the current global model, ready to run.
    fn central_eval(&self) -> Result<CentralEval, SimError> {
        let global = self.engine.global();
        let tasks = self
            .pop
            .tasks
            .iter()
            .map(|t| {
                let spec = self.model.subset(&[t.name.as_str()])?;
                let params: ParamGroups = [BACKBONE.to_string(), head_group(&t.name)]
                    .into_iter()
                    .filter_map(|g| global.get(&g).map(|v| (g, v.to_vec())))
                    .collect();
                Ok((spec, params, t.split.test.len()))
            })
            .collect::<Result<_, SimError>>()?;
        let names = self.pop.tasks.iter().map(|t| t.name.clone()).collect();
        Ok(CentralEval { tasks, names })
    }

    /// Runs one synchronous round: plans, dropouts, parallel training,
    /// sealed delivery on the virtual clock, close, evaluation.
    pub fn sync_round(&mut self) -> Result<RoundMetrics, SimError> {
        let started = Instant::now();
        let (mut m, _) = self.train_round(false)?;
        if self.should_eval(m.round) {
            let t = Instant::now();
            m.central = self.evaluate_central()?;
            m.eval_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        m.wall_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(m)
    }

    /// A synchronous round without its own central evaluation. With
    /// `eval_start`, the pool evaluates the weights the round starts from
    /// (the previous round's model) in the same pass as the training:
    /// returns those scores and the evaluation's share of the pass (its
    /// busy time over the workers).
    fn train_round(
        &mut self,
        eval_start: bool,
    ) -> Result<(RoundMetrics, Option<(Vec<TaskScore>, f64)>), SimError> {
        let t0 = self.clock_ms;
        let plans = self.engine.start_round(t0)?;
        let round = self.engine.round();
        let weights = Arc::new(self.engine.global().clone());
        let mut m = RoundMetrics {
            round,
            sampled: plans.len(),
            ..RoundMetrics::default()
        };
        let mut jobs = Vec::with_capacity(plans.len());
        for (id, plan) in plans {
            let Some(client) = client_index(&id) else {
                continue;
            };
            if self.drops_out(round, client) {
                self.engine.fail(&id, FailureReason::Dropout);
                m.dropped += 1;
                continue;
            }
            m.bytes_down += 4 * self.download_values(client, &plan) as u64;
            let state = self.take_state(client)?;
            let latency_ms = self.latency(round, client);
            jobs.push(Job {
                client,
                id,
                plan,
                state,
                latency_ms,
                weights: Arc::clone(&weights),
            });
        }
        let central = if eval_start {
            Some(self.central_eval()?)
        } else {
            None
        };
        let (replies, scores) = self.train_jobs(jobs, central.as_ref())?;
        self.deliver_all(replies, t0, &mut m)?;
        Ok((m, scores))
    }

    /// Hands a round's replies to the engine in order of arrival on the
    /// virtual clock (ties by client: the engine's streaming sums then do
    /// not depend on the thread count), closes the round, and fills `m`.
    fn deliver_all(
        &mut self,
        mut replies: Vec<Reply>,
        t0: u64,
        m: &mut RoundMetrics,
    ) -> Result<(), SimError> {
        replies.sort_by_key(|r| (r.latency_ms, r.client));
        let mut loss: HashMap<String, (f64, u64)> = HashMap::new();
        let mut last = t0;
        for r in replies {
            let Reply {
                client,
                id,
                latency_ms,
                result,
                state,
            } = r;
            self.put_state(client, state)?;
            let now = t0 + latency_ms;
            last = last.max(now);
            match result {
                Ok((out, o)) => {
                    m.bytes_up += o.sealed_len as u64;
                    match self.deliver(&out, o.plain, now) {
                        None => {
                            for tm in &out.update.header.metrics {
                                let e = loss.entry(tm.task.clone()).or_default();
                                e.0 += f64::from(tm.loss) * tm.samples as f64;
                                e.1 += tm.samples;
                            }
                        }
                        Some(RefusalCode::LateUpdate) => m.late += 1,
                        Some(_) => m.refused += 1,
                    }
                }
                Err(e) => {
                    tracing::warn!(client, error = %e, "client failed");
                    self.engine.fail(&id, FailureReason::Error(e.to_string()));
                    m.refused += 1;
                }
            }
        }
        let report = match self.engine.poll(last) {
            Some(r) => r,
            None => {
                last = t0 + self.engine.config().deadline_ms;
                self.engine
                    .poll(last)
                    .ok_or_else(|| SimError::Config("round did not close at its deadline".into()))?
            }
        };
        self.clock_ms = last.max(t0 + 1);
        m.version = report.version;
        m.accepted = report.accepted.len();
        m.privacy = report.privacy.clone();
        m.train_loss = self.loss_scores(loss);
        Ok(())
    }

    fn loss_scores(&self, loss: HashMap<String, (f64, u64)>) -> Vec<TaskScore> {
        self.pop
            .tasks
            .iter()
            .filter_map(|t| {
                let (s, n) = loss.get(&t.name)?;
                (*n > 0).then(|| TaskScore {
                    task: t.name.clone(),
                    accuracy: f32::NAN,
                    loss: (s / *n as f64) as f32,
                })
            })
            .collect()
    }

    fn should_eval(&self, round: u64) -> bool {
        self.cfg.eval.central
            && (round.is_multiple_of(self.cfg.eval.every.max(1)) || round >= self.cfg.rounds)
    }

    /// Values a client downloads for a plan: the uploaded (global) groups it
    /// trains.
    fn download_values(&self, _client: usize, plan: &RoundPlan) -> usize {
        let g = self.engine.global();
        plan.upload
            .iter()
            .filter_map(|n| g.get(n))
            .map(<[f32]>::len)
            .sum()
    }

    /// Runs the experiment to the end, calling `on_round` after each round
    /// (sync) or model step (async). Returns the metrics of every round,
    /// those restored by [`Simulation::resume`] first. With `cfg.output`
    /// and `checkpoint.every = N > 0`, a sync run checkpoints itself after
    /// every N-th round (not after the last) into
    /// `output/checkpoint/` (see [`crate::checkpoint`]), after `on_round`
    /// saw the round.
    pub fn run(
        &mut self,
        mut on_round: impl FnMut(&RoundMetrics),
    ) -> Result<Vec<RoundMetrics>, SimError> {
        let mut out = std::mem::take(&mut self.past);
        match self.engine.config().mode.clone() {
            Mode::Sync => {
                // The central evaluation of round r reads the weights round
                // r + 1 starts from, so it runs in round r + 1's pass over
                // the pool, on the workers the largest clients leave idle.
                // A round whose row must be complete at once (the last, or
                // one a checkpoint follows) evaluates alone.
                let mut held: Option<RoundMetrics> = None;
                while !self.engine.is_finished() {
                    let started = Instant::now();
                    let (mut m, scores) = self.train_round(held.is_some())?;
                    if let Some(mut prev) = held.take() {
                        let (central, eval_ms) = scores.unwrap_or_default();
                        prev.central = central;
                        prev.eval_ms = eval_ms;
                        on_round(&prev);
                        out.push(prev);
                    }
                    let eval_now = self.engine.is_finished() || self.checkpoint_due();
                    if self.should_eval(m.round) && !eval_now {
                        m.wall_ms = started.elapsed().as_secs_f64() * 1e3;
                        held = Some(m);
                        continue;
                    }
                    if self.should_eval(m.round) {
                        let t = Instant::now();
                        m.central = self.evaluate_central()?;
                        m.eval_ms = t.elapsed().as_secs_f64() * 1e3;
                    }
                    m.wall_ms = started.elapsed().as_secs_f64() * 1e3;
                    on_round(&m);
                    out.push(m);
                    self.maybe_checkpoint(&out)?;
                }
            }
            Mode::Async(_) => self.run_async(&mut |m| {
                on_round(&m);
                out.push(m);
            })?,
        }
        Ok(out)
    }

    /// FedBuff on the virtual clock: `per_round` clients are always in
    /// flight; each finishes after its latency, its update goes in, and a new
    /// client gets a plan on the current model. Jobs whose inputs are fixed
    /// train in parallel ahead of their delivery time.
    fn run_async(&mut self, emit: &mut dyn FnMut(RoundMetrics)) -> Result<(), SimError> {
        struct InFlight {
            finish: u64,
            job: Option<Job>,
            reply: Option<Reply>,
        }
        let n = self.pop.clients();
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(self.cfg.seed, 0xA5));
        let mut busy = std::collections::HashSet::new();
        let mut flight: Vec<InFlight> = Vec::new();
        let mut issued = 0u64;
        let mut step_started = Instant::now();
        let mut m = RoundMetrics::default();
        let mut loss: HashMap<String, (f64, u64)> = HashMap::new();
        let mut snapshot = (
            self.engine.version(),
            Arc::new(self.engine.global().clone()),
        );
        let max_issues = self
            .cfg
            .rounds
            .saturating_mul(64)
            .saturating_mul(self.cfg.clients.per_round as u64)
            .max(1000);
        loop {
            while flight.len() < self.cfg.clients.per_round
                && busy.len() < n
                && !self.engine.is_finished()
            {
                let client = loop {
                    let c = rng.gen_range(0..n);
                    if !busy.contains(&c) {
                        break c;
                    }
                };
                let id = client_id(client);
                let plan = self.engine.plan_for(&id, self.clock_ms)?;
                issued += 1;
                if issued > max_issues {
                    return Err(SimError::Config(
                        "async run made no progress: every update was refused".into(),
                    ));
                }
                if snapshot.0 != self.engine.version() {
                    snapshot = (
                        self.engine.version(),
                        Arc::new(self.engine.global().clone()),
                    );
                }
                let latency = self.latency(issued, client).max(1);
                m.sampled += 1;
                if self.drops_out(issued, client) {
                    self.engine.fail(&id, FailureReason::Dropout);
                    m.dropped += 1;
                    continue;
                }
                busy.insert(client);
                m.bytes_down += 4 * self.download_values(client, &plan) as u64;
                let state = self.take_state(client)?;
                let job = Job {
                    client,
                    id,
                    plan,
                    state,
                    latency_ms: latency,
                    weights: Arc::clone(&snapshot.1),
                };
                flight.push(InFlight {
                    finish: self.clock_ms + latency,
                    job: Some(job),
                    reply: None,
                });
            }
            if flight.is_empty() {
                break;
            }
            let Some(next) = (0..flight.len()).min_by_key(|&i| {
                (
                    flight[i].finish,
                    flight[i].job.as_ref().map_or(0, |j| j.client),
                )
            }) else {
                break;
            };
            if flight[next].reply.is_none() {
                let jobs: Vec<Job> = flight.iter_mut().filter_map(|f| f.job.take()).collect();
                let mut replies = self.train_jobs(jobs, None)?.0.into_iter();
                for f in flight.iter_mut().filter(|f| f.reply.is_none()) {
                    f.reply = replies.next();
                }
            }
            let f = flight.swap_remove(next);
            self.clock_ms = self.clock_ms.max(f.finish);
            let Some(Reply {
                client,
                id,
                result,
                state,
                ..
            }) = f.reply
            else {
                continue;
            };
            busy.remove(&client);
            self.put_state(client, state)?;
            match result {
                Ok((out, o)) => {
                    m.bytes_up += o.sealed_len as u64;
                    match self.deliver(&out, o.plain, self.clock_ms) {
                        None => {
                            m.accepted += 1;
                            for tm in &out.update.header.metrics {
                                let e = loss.entry(tm.task.clone()).or_default();
                                e.0 += f64::from(tm.loss) * tm.samples as f64;
                                e.1 += tm.samples;
                            }
                        }
                        Some(RefusalCode::LateUpdate | RefusalCode::StaleBase) => m.late += 1,
                        Some(_) => m.refused += 1,
                    }
                }
                Err(e) => {
                    self.engine.fail(&id, FailureReason::Error(e.to_string()));
                    m.refused += 1;
                }
            }
            while let Some(report) = self.engine.poll(self.clock_ms) {
                m.round = report.round;
                m.version = report.version;
                m.train_loss = self.loss_scores(std::mem::take(&mut loss));
                if self.should_eval(report.round) {
                    let t = Instant::now();
                    m.central = self.evaluate_central()?;
                    m.eval_ms = t.elapsed().as_secs_f64() * 1e3;
                }
                m.wall_ms = step_started.elapsed().as_secs_f64() * 1e3;
                step_started = Instant::now();
                emit(std::mem::take(&mut m));
            }
            if self.engine.is_finished() {
                // Updates still in flight are simply never delivered.
                for f in flight.drain(..) {
                    if let Some(j) = f.job {
                        self.put_state(j.client, j.state)?;
                    }
                    if let Some(r) = f.reply {
                        self.put_state(r.client, r.state)?;
                    }
                }
                break;
            }
        }
        Ok(())
    }
}

/// Checkpoints and resume (the file format: [`crate::checkpoint`]).
impl Simulation {
    /// The metrics restored from a checkpoint by [`Simulation::resume`]
    /// (empty otherwise, and once [`Simulation::run`] took them).
    pub fn restored_rounds(&self) -> &[RoundMetrics] {
        &self.past
    }

    /// The virtual clock, in milliseconds.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Checkpoints after a round when the config asks for it (see
    /// [`Simulation::run`]).
    fn maybe_checkpoint(&self, rows: &[RoundMetrics]) -> Result<(), SimError> {
        match &self.cfg.output {
            Some(out) if self.checkpoint_due() => {
                self.save_checkpoint(&crate::checkpoint::dir_of(out), rows)?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether the config asks for a checkpoint after the round just run.
    fn checkpoint_due(&self) -> bool {
        let every = self.cfg.checkpoint.every;
        self.cfg.output.is_some()
            && every != 0
            && self.engine.round().is_multiple_of(every)
            && !self.engine.is_finished()
            && resumable(&self.cfg).is_ok()
    }

    /// Writes a checkpoint of the state between two sync rounds into `dir`:
    /// the engine's and the simulator's (clock, client states, `rows`, the
    /// metrics of every round so far). Returns the engine's folder.
    pub fn save_checkpoint(
        &self,
        dir: &std::path::Path,
        rows: &[RoundMetrics],
    ) -> Result<std::path::PathBuf, SimError> {
        self.resumable()?;
        let engine = self.engine.checkpoint()?;
        let mut clients: Vec<ClientState> =
            self.states.iter().map(|(&c, st)| st.to_saved(c)).collect();
        clients.sort_by_key(|c| c.client);
        let sim = SimState::new(
            experiment_hash(&self.cfg)?,
            self.engine.round(),
            self.clock_ms,
            clients,
            rows,
        );
        crate::checkpoint::write(dir, &engine, &sim)
    }

    /// The modes a checkpoint holds everything of.
    fn resumable(&self) -> Result<(), SimError> {
        resumable(&self.cfg)
    }

    /// Resumes a simulation of `cfg` on `pop` and `model` from the newest
    /// good checkpoint in `dir` (an older one when the newest is damaged,
    /// with an error line), with a strategy from `make_strategy` (of the
    /// kind that wrote it). The checkpoint must be of this experiment
    /// ([`experiment_hash`]) and this model. Then [`Simulation::run`]
    /// continues where it stopped and ends as the uninterrupted run would.
    pub fn resume(
        cfg: ExperimentConfig,
        pop: Population,
        model: SharedModel,
        make_strategy: StrategyFactory<'_>,
        dir: &std::path::Path,
    ) -> Result<Self, SimError> {
        resumable(&cfg)?;
        crate::data::check_fit(&*model, &pop.tasks)?;
        let found = cohort_aggregator::checkpoint::all(dir)?;
        let Some((_, newest)) = found.first() else {
            return Err(SimError::Checkpoint {
                path: dir.to_path_buf(),
                reason: "no checkpoint to resume from (the run stopped before its first one: \
                         start it again)"
                    .into(),
            });
        };
        let mut newest_error = None;
        for (round, path) in &found {
            let sim_path = crate::checkpoint::sim_file(dir, *round);
            match Self::load_one(&cfg, &pop, &model, make_strategy, path, &sim_path) {
                Ok((engine, saved)) => {
                    let mut sim = Self::assemble(cfg, pop, model, engine)?;
                    sim.restore(saved, &sim_path)?;
                    return Ok(sim);
                }
                Err(e) => {
                    tracing::error!(round, path = %path.display(), error = %e,
                        "checkpoint unusable: trying the previous one");
                    newest_error.get_or_insert(e);
                }
            }
        }
        Err(newest_error.unwrap_or_else(|| SimError::Checkpoint {
            path: newest.clone(),
            reason: "unusable".into(),
        }))
    }

    /// Reads and checks one checkpoint: the simulator's file, then the
    /// engine's folder (with a fresh strategy).
    fn load_one(
        cfg: &ExperimentConfig,
        pop: &Population,
        model: &SharedModel,
        make_strategy: StrategyFactory<'_>,
        engine_path: &std::path::Path,
        sim_path: &std::path::Path,
    ) -> Result<(Engine, SimState), SimError> {
        let layout = model.layout();
        let limit = crate::checkpoint::size_bound(cfg, layout.num_params());
        let saved = crate::checkpoint::read_sim(sim_path, limit)?;
        let fail = |reason: String| SimError::Checkpoint {
            path: sim_path.to_path_buf(),
            reason,
        };
        if saved.experiment != experiment_hash(cfg)? {
            return Err(fail(
                "written by another experiment than the run folder's experiment.toml".into(),
            ));
        }
        let engine = Engine::resume_from(engine_path, engine_config(cfg), make_strategy())?;
        engine.check_layout(&layout)?;
        if engine.round() != saved.round {
            return Err(fail(format!(
                "of round {}, the engine's checkpoint of round {}",
                saved.round,
                engine.round()
            )));
        }
        check_clients(&saved.clients, pop, &layout, cfg.heads).map_err(fail)?;
        Ok((engine, saved))
    }

    /// Puts the simulator's saved state in place.
    fn restore(&mut self, saved: SimState, path: &std::path::Path) -> Result<(), SimError> {
        self.past = saved.rows(path)?;
        self.clock_ms = saved.clock_ms;
        for c in saved.clients {
            let st = StoredState {
                local: c.local.into_iter().collect(),
                residuals: c
                    .residuals
                    .into_iter()
                    .map(|(g, n, b)| (g, n as usize, b))
                    .collect(),
            };
            self.states.insert(c.client as usize, st);
        }
        Ok(())
    }
}

/// Checkpoints hold everything of a sync run of one shared federation.
fn resumable(cfg: &ExperimentConfig) -> Result<(), SimError> {
    if matches!(engine_config(cfg).mode, Mode::Async(_)) {
        return Err(SimError::Config(
            "checkpoints: FedBuff (mode = \"async\") runs cannot be checkpointed or resumed \
             (their in-flight jobs and partly filled buffer are not saved)"
                .into(),
        ));
    }
    if cfg.sharing != crate::config::Sharing::SharedBackbone {
        return Err(SimError::Config(
            "checkpoints: only sharing = \"shared_backbone\" runs are checkpointed".into(),
        ));
    }
    Ok(())
}

/// Each saved client state against the population and the model: a known
/// client, listed once in order; local groups that are heads of its own
/// tasks (with local heads) of the model's length; residuals of the
/// model's groups of its tasks, encodings holding the group's length.
fn check_clients(
    clients: &[ClientState],
    pop: &Population,
    layout: &cohort_protocol::Layout,
    heads: HeadPolicy,
) -> Result<(), String> {
    let mut last = None;
    for c in clients {
        let idx = usize::try_from(c.client)
            .ok()
            .filter(|&i| i < pop.clients())
            .ok_or_else(|| format!("client {} is not of this population", c.client))?;
        if last.is_some_and(|l| l >= idx) {
            return Err(format!("client {idx} out of order or twice"));
        }
        last = Some(idx);
        let own: Vec<String> = std::iter::once(BACKBONE.to_string())
            .chain(
                pop.client_tasks(idx)
                    .into_iter()
                    .map(|t| head_group(&pop.tasks[t].name)),
            )
            .collect();
        let len_of = |g: &str| -> Option<u64> {
            own.iter()
                .any(|o| o == g)
                .then(|| layout.group(g).map(|l| l.len()))
                .flatten()
        };
        for (g, v) in &c.local {
            let ok =
                heads == HeadPolicy::Local && g != BACKBONE && len_of(g) == Some(v.len() as u64);
            if !ok {
                return Err(format!("client {idx}: local group `{g}` does not fit"));
            }
        }
        for (g, n, bytes) in &c.residuals {
            if len_of(g) != Some(*n) || codec::decoded_len(bytes).ok() != Some(*n) {
                return Err(format!("client {idx}: the residual of `{g}` does not fit"));
            }
        }
    }
    Ok(())
}

/// What a training worker needs: shared, read-only parts of the simulation.
struct TrainCtx<'a> {
    model: &'a SharedModel,
    pop: &'a Population,
    flipped: &'a [Option<Dataset>],
    byzantine: &'a [usize],
    attack: Attack,
    federation: &'a str,
    key: cohort_protocol::seal::SealPublicKey,
    /// The aggregator's key pair, to open updates where they were made.
    keys: &'a SealKeyPair,
    /// The experiment's seed (client-side DP noise).
    seed: u64,
}

impl TrainCtx<'_> {
    /// Runs the real node runtime for one job.
    fn train(&self, job: Job) -> Reply {
        let Job {
            client,
            id,
            plan,
            state,
            latency_ms,
            weights,
        } = job;
        let byz = self.byzantine.binary_search(&client).is_ok();
        let pop = self.pop;
        let task_ids = pop.client_tasks(client);
        let names: Vec<&str> = task_ids
            .iter()
            .map(|&t| pop.tasks[t].name.as_str())
            .collect();
        let parts: Vec<(usize, Vec<usize>)> = task_ids
            .iter()
            .map(|&t| (t, pop.client_data(client, t).0))
            .collect();
        let mut node_state = NodeState::default();
        let result = (|| -> Result<(cohort_node::RoundOutput, Opened), SimError> {
            let node_spec = self.model.subset(&names)?;
            let mut node = NodeRuntime::new(id.clone(), self.federation, node_spec, self.key);
            node.state = state;
            // Client-side DP noise: a function of the experiment's seed.
            node.noise_seed = Some(mix_seed(self.seed ^ 0xD1FF, client as u64));
            let data: Vec<TaskData<'_>> = parts
                .iter()
                .map(|(t, idx)| {
                    let set = match (&self.flipped[*t], byz) {
                        (Some(f), true) => f,
                        _ => &pop.tasks[*t].split.train,
                    };
                    TaskData {
                        task: pop.tasks[*t].name.as_str(),
                        data: set,
                        indices: idx.as_slice(),
                    }
                })
                .collect();
            let noise_seed = mix_seed(plan.train.seed ^ 0x0015E, client as u64);
            let attack = self.attack;
            let out = node.run_round_with(&plan, &weights, &data, |_, delta| {
                if byz {
                    tamper(attack, delta, noise_seed);
                }
            });
            node_state = std::mem::take(&mut node.state);
            let mut out = out.map_err(|source| SimError::Node { client, source })?;
            let ctx = SealContext::of_update(&out.update.header);
            let opened = Opened {
                sealed_len: out.update.sealed.len(),
                plain: self.keys.open(&ctx, &out.update.sealed),
            };
            out.update.sealed = Vec::new();
            // The simulator never reads the trained weights (the state it
            // keeps is in `node.state`): a round of 10,000 would hold them all.
            out.trained = ParamGroups::new();
            Ok((out, opened))
        })();
        Reply {
            client,
            id,
            latency_ms,
            result,
            state: node_state,
        }
    }
}

/// Turns an honest delta into a Byzantine one.
fn tamper(attack: Attack, delta: &mut [f32], seed: u64) {
    match attack {
        Attack::SignFlip { scale } => delta.iter_mut().for_each(|d| *d *= -scale),
        Attack::Scale { factor } => delta.iter_mut().for_each(|d| *d *= factor),
        Attack::Noise { std } => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            if let Ok(n) = Normal::new(0.0f32, std) {
                delta.iter_mut().for_each(|d| *d = n.sample(&mut rng));
            }
        }
        Attack::LabelFlip => {}
    }
}

/// Accuracy of one task on the clients' own held-out data.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PersonalScore {
    pub task: String,
    pub clients: usize,
    /// The model as the federation left it.
    pub before: f32,
    /// After each client fine-tuned its head(s) on its own training data.
    pub after: f32,
}

/// One client's results: per task (task index, held-out samples, the
/// first evaluation, the second number).
type ClientScores = Vec<(usize, usize, EvalMetrics, f32)>;

/// Runs `eval(client, task, single-task spec, train indices, held-out
/// indices)` for every task of each of `clients` that has both training
/// and held-out samples, in parallel on `pool`; returns the results per
/// client, in the order of `clients`.
fn per_client_scores<F>(
    pool: &rayon::ThreadPool,
    pop: &Population,
    spec: &SharedModel,
    clients: &[usize],
    eval: F,
) -> Result<Vec<(usize, ClientScores)>, SimError>
where
    F: Fn(usize, usize, &SharedModel, &[usize], &[usize]) -> Result<(EvalMetrics, f32), SimError>
        + Sync,
{
    let results: Vec<Result<(usize, ClientScores), SimError>> = pool.install(|| {
        clients
            .par_iter()
            .map(|&c| {
                let mut out = Vec::new();
                for t in pop.client_tasks(c) {
                    let (tr, held) = pop.client_data(c, t);
                    if tr.is_empty() || held.is_empty() {
                        continue;
                    }
                    let s = spec.subset(&[pop.tasks[t].name.as_str()])?;
                    let (a, b) = eval(c, t, &s, &tr, &held)?;
                    out.push((t, held.len(), a, b));
                }
                Ok((c, out))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Per task: the number of clients and the means of the two numbers of
/// [`per_client_scores`] (the first evaluation's accuracy, the second
/// number), weighted by held-out samples, summed in client order.
fn combine_scores(pop: &Population, scores: &[(usize, ClientScores)]) -> Vec<PersonalScore> {
    let mut sums = vec![(0usize, 0.0f64, 0.0f64, 0usize); pop.tasks.len()];
    for (_, r) in scores {
        for (t, n, a, b) in r {
            let s = &mut sums[*t];
            s.0 += n;
            s.1 += f64::from(a.accuracy) * *n as f64;
            s.2 += f64::from(*b) * *n as f64;
            s.3 += 1;
        }
    }
    pop.tasks
        .iter()
        .zip(sums)
        .filter(|(_, s)| s.0 > 0)
        .map(|(t, s)| PersonalScore {
            task: t.name.clone(),
            clients: s.3,
            before: (s.1 / s.0 as f64) as f32,
            after: (s.2 / s.0 as f64) as f32,
        })
        .collect()
}

/// The groups of `spec` taken from `w`.
fn groups_of(spec: &SharedModel, w: &ParamGroups) -> ParamGroups {
    spec.layout()
        .group_names()
        .filter_map(|g| w.get(g).map(|v| (g.to_string(), v.to_vec())))
        .collect()
}

impl Simulation {
    /// Personalized evaluation: up to `eval.personalize_clients` clients
    /// fine-tune their heads (the backbone frozen) for
    /// `eval.personalize_epochs` epochs on their own training data, then
    /// evaluate on their held-out split. Needs `eval.holdout > 0`.
    pub fn personalized_eval(&mut self) -> Result<Vec<PersonalScore>, SimError> {
        Ok(self.client_eval()?.0)
    }

    /// Federated and personalized evaluation in one pass. The clients are
    /// the first `eval.personalize_clients` of those the strategy picks
    /// with `Engine::configure_evaluate` (by default every client, so
    /// clients `0..k`). Each evaluates the global model with its own local
    /// heads on its held-out split (federated evaluation: these reports go
    /// to the strategy's `aggregate_evaluate`, whose metrics are the
    /// second value), then fine-tunes its heads as
    /// [`Simulation::personalized_eval`] describes (the first value:
    /// `before` is the federated accuracy, `after` the fine-tuned one).
    /// The strategy gets no failures: a virtual client does not fail to
    /// evaluate (an error stops the run), and a picked client without
    /// training or held-out data is left out.
    pub fn client_eval(&mut self) -> Result<(Vec<PersonalScore>, Option<Metrics>), SimError> {
        let k = self.cfg.eval.personalize_clients.min(self.pop.clients());
        let round = self.engine.round();
        let clients: Vec<usize> = self
            .engine
            .configure_evaluate(round)
            .iter()
            .filter_map(|id| client_index(id))
            .filter(|&c| c < self.pop.clients())
            .take(k)
            .collect();
        let mut train = self.engine.config().train.clone();
        train.epochs = self.cfg.eval.personalize_epochs.max(1);
        train.frozen = vec![BACKBONE.to_string()];
        let global = self.engine.global();
        let states = &self.states;
        let pop = &self.pop;
        let scores = per_client_scores(
            &self.pool,
            pop,
            &self.model,
            &clients,
            |c, t, s, tr, held| {
                let mut params = groups_of(s, global);
                // A client's own (local) heads replace the aggregator's copies.
                if let Some(st) = states.get(&c) {
                    for (name, v) in st.local.iter() {
                        if params.contains(name) {
                            params.insert(name, v.to_vec());
                        }
                    }
                }
                let name = pop.tasks[t].name.as_str();
                let data = &pop.tasks[t].split.train;
                let before = s.evaluate(&params, name, data, Some(held))?;
                let cfg = TrainConfig {
                    seed: mix_seed(train.seed, c as u64),
                    ..train.clone()
                };
                let tuned = s.train(
                    &params,
                    &[TaskData {
                        task: name,
                        data,
                        indices: tr,
                    }],
                    &cfg,
                )?;
                let after = s.evaluate(&tuned.params, name, data, Some(held))?;
                Ok((eval_metrics(name, &before), after.accuracy))
            },
        )?;
        let reports: Vec<EvalReport> = scores
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(c, r)| EvalReport {
                node: client_id(*c),
                round,
                version: self.engine.version(),
                metrics: r.iter().map(|(_, _, m, _)| m.clone()).collect(),
            })
            .collect();
        let federated = self.engine.aggregate_evaluate(round, &reports, &[]);
        Ok((combine_scores(&self.pop, &scores), federated))
    }
}

/// The wire's evaluation metrics of `task` from the model's.
fn eval_metrics(task: &str, m: &cohort_tasks::EvalMetrics) -> EvalMetrics {
    EvalMetrics {
        task: task.to_string(),
        accuracy: m.accuracy,
        loss: m.loss,
        samples: m.samples,
    }
}

/// Local-only training, the baseline of the multi-task questions: each of up
/// to `eval.personalize_clients` clients trains alone, from the same initial
/// weights, for as many epochs as it would have trained in the federation
/// (`rounds x epochs`). Returns per task the mean accuracy on the clients'
/// own held-out data (`before`) and on the central test set (`after`), both
/// weighted by held-out samples.
pub fn local_only(
    cfg: &ExperimentConfig,
    pop: &Population,
    models: &ModelRegistry,
) -> Result<Vec<PersonalScore>, SimError> {
    let spec = build_model(cfg, pop, models)?;
    let init = spec.init(federation(cfg).init_seed());
    let mut train = cfg.engine.train.clone();
    train.epochs = train
        .epochs
        .saturating_mul(u32::try_from(cfg.rounds).unwrap_or(u32::MAX));
    let threads = if cfg.threads == 0 {
        rayon::current_num_threads()
    } else {
        cfg.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| SimError::Config(format!("thread pool: {e}")))?;
    let k = cfg.eval.personalize_clients.min(pop.clients());
    let clients: Vec<usize> = (0..k).collect();
    let scores = per_client_scores(&pool, pop, &spec, &clients, |c, t, s, tr, held| {
        let name = pop.tasks[t].name.as_str();
        let data = &pop.tasks[t].split.train;
        let cfg_c = TrainConfig {
            seed: mix_seed(train.seed, c as u64),
            ..train.clone()
        };
        let trained = s.train(
            &groups_of(s, &init),
            &[TaskData {
                task: name,
                data,
                indices: tr,
            }],
            &cfg_c,
        )?;
        let local = s.evaluate(&trained.params, name, data, Some(held))?;
        let central = s.evaluate(&trained.params, name, &pop.tasks[t].split.test, None)?;
        Ok((eval_metrics(name, &local), central.accuracy))
    })?;
    Ok(combine_scores(pop, &scores))
}
