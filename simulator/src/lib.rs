//! Many virtual Cohort nodes in one process.
//!
//! A [`Simulation`] drives the aggregator's transport-free `Engine` and runs
//! the real node runtime (train, delta, error feedback, encode, seal) for
//! each sampled client, in parallel on a rayon pool; the only thing it
//! replaces is the network, by an in-process delivery on a virtual clock.
//! [`run_experiment`] adds the multi-task questions (shared backbone vs one
//! federation per task vs local-only), personalized evaluation, metrics
//! files and the plot; [`run_experiment_on`] does the same on data a program
//! built itself ([`LoadedTask`]). [`runs`] is the run folder (what a run
//! leaves on disk, repeats over seeds), [`compare`] puts finished runs side
//! by side.

pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod data;
mod error;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod runs;
mod schedule;

use std::path::Path;

pub use config::ExperimentConfig;
pub use data::{LoadedTask, Population};
pub use error::SimError;
pub use metrics::{RoundMetrics, TaskScore};
pub use run::{
    build_model, client_id, engine_config, federation, local_only, PersonalScore, Simulation,
    StrategyFactory,
};

use cohort_aggregator::{strategy_from_config, Metrics};
use cohort_protocol::{Layout, ParamGroups};
use cohort_tasks::ModelRegistry;
use config::Sharing;

/// Everything an experiment produced.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExperimentResult {
    pub name: String,
    pub sharing: String,
    pub rounds: Vec<RoundMetrics>,
    /// Central accuracy per task after the last round.
    pub final_central: Vec<TaskScore>,
    pub personalized: Vec<PersonalScore>,
    /// Federated evaluation after the last round, as the strategy's
    /// `aggregate_evaluate` combined the clients' reports (the default:
    /// `accuracy/<task>`, `loss/<task>`, `samples/<task>`, `nodes`,
    /// `failures`). Computed with `eval.personalized`, from the same
    /// evaluations as `personalized[..].before`. With `sharing =
    /// "separate"`, the maps of the per-task federations merged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federated: Option<Metrics>,
    /// Local-only baseline: per task, accuracy on the clients' own held-out
    /// data (`before`) and on the central test set (`after`).
    pub local_only: Vec<PersonalScore>,
    pub wall_s: f64,
    /// The final global weights: one set, or one per task with `sharing =
    /// "separate"`; none for local-only training.
    #[serde(skip)]
    pub weights: Vec<FinalWeights>,
}

/// The global model of one federation after its last round.
#[derive(Clone, Debug)]
pub struct FinalWeights {
    /// The task of a per-task federation (`sharing = "separate"`), else none.
    pub task: Option<String>,
    pub layout: Layout,
    pub global: ParamGroups,
}

impl FinalWeights {
    fn of(sim: &Simulation, task: Option<String>) -> Self {
        FinalWeights {
            task,
            layout: sim.engine.layout().clone(),
            global: sim.engine.global().clone(),
        }
    }
}

impl ExperimentResult {
    /// Central accuracy of `task` after the last round.
    pub fn accuracy(&self, task: &str) -> Option<f32> {
        self.final_central
            .iter()
            .find(|s| s.task == task)
            .map(|s| s.accuracy)
    }
}

/// Runs an experiment as its config says; with `cfg.output` set, that folder
/// becomes its run folder ([`runs::RunDir`]: experiment, metrics, summaries,
/// final weights, plots; refused if it holds a run already). `on_round`
/// sees every round.
pub fn run_experiment(
    cfg: &ExperimentConfig,
    on_round: impl FnMut(&RoundMetrics),
) -> Result<ExperimentResult, SimError> {
    run_experiment_with(cfg, &ModelRegistry::default(), on_round)
}

/// [`run_experiment`] with the model names of `models`: a program registers
/// its own dfdx models there, and `cfg.backbone` names one of them.
pub fn run_experiment_with(
    cfg: &ExperimentConfig,
    models: &ModelRegistry,
    on_round: impl FnMut(&RoundMetrics),
) -> Result<ExperimentResult, SimError> {
    cfg.validate()?;
    let tasks = data::load_tasks(cfg)?;
    run_experiment_on(cfg, models, tasks, on_round)
}

/// [`run_experiment_with`] on data a program loaded or built itself: one
/// [`LoadedTask`] (`LoadedTask::new(name, Split { train, test })`) per task
/// of `cfg.tasks`, matched by name; `cfg.tasks` give the names and holder
/// fractions, their `dataset` settings are not read. Every task's data is
/// checked against the model before anything trains.
pub fn run_experiment_on(
    cfg: &ExperimentConfig,
    models: &ModelRegistry,
    tasks: Vec<LoadedTask>,
    on_round: impl FnMut(&RoundMetrics),
) -> Result<ExperimentResult, SimError> {
    let strategy = cfg.strategy.clone();
    let make = move || strategy_from_config(&strategy);
    run_experiment_custom(cfg, models, tasks, &make, on_round)
}

/// [`run_experiment_with`] driven by the strategies `make_strategy`
/// builds instead of the one `cfg.strategy` names: a program's own
/// [`Strategy`](cohort_aggregator::Strategy) runs here exactly as a built-in one (and the same value
/// can drive `cohort_aggregator::Engine` in a deployment). It is called
/// once per engine: once, or once per task with `sharing = "separate"`.
pub fn run_experiment_with_strategy(
    cfg: &ExperimentConfig,
    models: &ModelRegistry,
    make_strategy: StrategyFactory<'_>,
    on_round: impl FnMut(&RoundMetrics),
) -> Result<ExperimentResult, SimError> {
    cfg.validate()?;
    let tasks = data::load_tasks(cfg)?;
    run_experiment_custom(cfg, models, tasks, make_strategy, on_round)
}

/// The general form of the above: a program's own data ([`run_experiment_on`])
/// and its own strategy ([`run_experiment_with_strategy`]) together.
pub fn run_experiment_custom(
    cfg: &ExperimentConfig,
    models: &ModelRegistry,
    tasks: Vec<LoadedTask>,
    make_strategy: StrategyFactory<'_>,
    on_round: impl FnMut(&RoundMetrics),
) -> Result<ExperimentResult, SimError> {
    run_inner(cfg, models, tasks, make_strategy, on_round, false)
}

/// The experiment of a run folder (its `experiment.toml`, as the run
/// wrote it at its start), with `output` set to the folder: what
/// [`resume_experiment`] continues. Data set paths in it are read
/// relative to the working directory, as when the run started.
pub fn resume_config(folder: &Path) -> Result<ExperimentConfig, SimError> {
    let mut cfg = runs::RunDir::open(folder)?.read_experiment()?;
    cfg.output = Some(folder.to_path_buf());
    Ok(cfg)
}

/// Continues the run of `cfg.output` (see [`resume_config`]) from its
/// newest good checkpoint (`output/checkpoint/`, see [`checkpoint`]),
/// with the built-in strategies: the metrics files are rewritten up to the
/// checkpoint's round (dropping rows written after it) and the run goes
/// on, ending bit-identical to an uninterrupted run (same weights, same
/// metrics but the wall times). Sync runs of one shared federation only;
/// FedBuff and `sharing = "separate"` / `"local"` are refused.
pub fn resume_experiment(
    cfg: &ExperimentConfig,
    models: &ModelRegistry,
    on_round: impl FnMut(&RoundMetrics),
) -> Result<ExperimentResult, SimError> {
    cfg.validate()?;
    if cfg.output.is_none() {
        return Err(SimError::Config(
            "resume: the experiment has no output folder to resume".into(),
        ));
    }
    let tasks = data::load_tasks(cfg)?;
    let strategy = cfg.strategy.clone();
    let make = move || strategy_from_config(&strategy);
    run_inner(cfg, models, tasks, &make, on_round, true)
}

/// [`run_experiment_custom`], or with `resume` its continuation from the
/// checkpoints of `cfg.output`.
fn run_inner(
    cfg: &ExperimentConfig,
    models: &ModelRegistry,
    tasks: Vec<LoadedTask>,
    make_strategy: StrategyFactory<'_>,
    mut on_round: impl FnMut(&RoundMetrics),
    resume: bool,
) -> Result<ExperimentResult, SimError> {
    cfg.validate()?;
    let tasks = data::order_tasks(cfg, tasks)?;
    let whole = models.build(
        &cfg.backbone,
        cfg.backend,
        tasks.iter().map(|t| t.spec()).collect(),
    )?;
    data::check_fit(&*whole, &tasks)?;
    let started = std::time::Instant::now();
    let task_names: Vec<String> = cfg.tasks.iter().map(|t| t.name.clone()).collect();
    let run_dir = match &cfg.output {
        Some(dir) if resume => Some(runs::RunDir::open(dir)?),
        Some(dir) => {
            let d = runs::RunDir::fresh(dir)?;
            d.write_experiment(cfg)?;
            Some(d)
        }
        None => None,
    };
    let mut writer = match &run_dir {
        Some(dir) => Some(metrics::MetricsWriter::create_with(
            dir.path(),
            &task_names,
            !cfg.privacy.is_off() || !cfg.engine.privacy.is_off(),
        )?),
        None => None,
    };
    let mut result = ExperimentResult {
        name: cfg.name.clone(),
        sharing: format!("{:?}", cfg.sharing),
        ..ExperimentResult::default()
    };
    let mut write_err = None;
    // A row into the files; `on_round` sees it unless it is one restored
    // from a checkpoint.
    let mut record = |m: &RoundMetrics, new: bool| {
        if let Some(w) = writer.as_mut() {
            if let Err(e) = w.write(m) {
                write_err.get_or_insert(e);
            }
        }
        if new {
            on_round(m);
        }
    };
    match cfg.sharing {
        Sharing::SharedBackbone => {
            let mut sim = if resume {
                resumed(cfg, models, tasks, make_strategy)?
            } else {
                simulation(cfg.clone(), models, tasks, make_strategy())?
            };
            // The rows before the checkpoint: the files end as an
            // uninterrupted run's (rows written after it are dropped).
            for m in sim.restored_rounds() {
                record(m, false);
            }
            result.rounds = sim.run(|m| record(m, true))?;
            result.final_central = sim.evaluate_central()?;
            result.weights.push(FinalWeights::of(&sim, None));
            if cfg.eval.personalized {
                (result.personalized, result.federated) = sim.client_eval()?;
            }
        }
        Sharing::Separate => {
            // One federation per task, same settings; rounds are merged by
            // number so that the metrics read like one run.
            for (t, data) in cfg.tasks.iter().zip(tasks) {
                let mut one = cfg.clone();
                one.tasks = vec![config::TaskConfig {
                    holders: 1.0,
                    ..t.clone()
                }];
                one.output = None;
                let mut sim = simulation(one, models, vec![data], make_strategy())?;
                let rounds = sim.run(|_| {})?;
                merge_rounds(&mut result.rounds, rounds);
                result.final_central.extend(sim.evaluate_central()?);
                result
                    .weights
                    .push(FinalWeights::of(&sim, Some(t.name.clone())));
                if cfg.eval.personalized {
                    let (personal, federated) = sim.client_eval()?;
                    result.personalized.extend(personal);
                    if let Some(f) = federated {
                        result.federated.get_or_insert_with(Metrics::new).extend(f);
                    }
                }
            }
            for m in &result.rounds {
                record(m, true);
            }
        }
        Sharing::LocalOnly => {
            let pop = data::Population::from_tasks(cfg, tasks)?;
            result.local_only = local_only(cfg, &pop, models)?;
            result.final_central = result
                .local_only
                .iter()
                .map(|p| TaskScore {
                    task: p.task.clone(),
                    accuracy: p.after,
                    loss: f32::NAN,
                })
                .collect();
        }
    }
    if let Some(e) = write_err {
        return Err(e);
    }
    result.wall_s = started.elapsed().as_secs_f64();
    if let Some(dir) = &run_dir {
        dir.write_results(&result)?;
    }
    Ok(result)
}

/// A simulation of `cfg` on `tasks` resumed from `cfg.output`'s checkpoints.
fn resumed(
    cfg: &ExperimentConfig,
    models: &ModelRegistry,
    tasks: Vec<LoadedTask>,
    make_strategy: StrategyFactory<'_>,
) -> Result<Simulation, SimError> {
    let dir = cfg
        .output
        .as_deref()
        .map(checkpoint::dir_of)
        .ok_or_else(|| SimError::Config("resume: no output folder".into()))?;
    let pop = data::Population::from_tasks(cfg, tasks)?;
    let model = build_model(cfg, &pop, models)?;
    Simulation::resume(cfg.clone(), pop, model, make_strategy, &dir)
}

/// A simulation of `cfg` on `tasks` with the models of `models`.
fn simulation(
    cfg: ExperimentConfig,
    models: &ModelRegistry,
    tasks: Vec<LoadedTask>,
    strategy: Box<dyn cohort_aggregator::Strategy>,
) -> Result<Simulation, SimError> {
    let pop = data::Population::from_tasks(&cfg, tasks)?;
    let model = build_model(&cfg, &pop, models)?;
    Simulation::with_model_and_strategy(cfg, pop, model, strategy)
}

fn merge_rounds(into: &mut Vec<RoundMetrics>, rounds: Vec<RoundMetrics>) {
    for m in rounds {
        match into.iter_mut().find(|r| r.round == m.round) {
            Some(r) => {
                r.central.extend(m.central);
                r.train_loss.extend(m.train_loss);
                r.sampled += m.sampled;
                r.accepted += m.accepted;
                r.dropped += m.dropped;
                r.late += m.late;
                r.refused += m.refused;
                r.bytes_up += m.bytes_up;
                r.bytes_down += m.bytes_down;
                r.wall_ms += m.wall_ms;
                r.eval_ms += m.eval_ms;
            }
            None => into.push(m),
        }
    }
}
