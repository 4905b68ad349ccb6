//! [`Aggregator`]: the settings, the model, the strategy and the evaluator
//! of a federation's aggregator, and how it starts (lock, resume or initial
//! weights, identity, keys, Swarm) before the service task takes over.

use std::path::Path;
use std::sync::Arc;

use cohort_protocol::p2p::SubmitCap;
use cohort_protocol::seal::SealKeyPair;
use cohort_protocol::transport::{
    build_swarm_with, event_loop, load_or_create_identity, Admission,
};
use cohort_protocol::{Layout, ParamGroups};
use cohort_tasks::{check_input, Dataset, ModelRegistry, SharedModel, TaskSpec};
use libp2p::Multiaddr;
use tracing::info;

use super::{
    allowlist, AggregatorConfig, CentralEvaluator, FederationConfig, Parts, Service,
    TestSetEvaluator,
};
use crate::{checkpoint, strategy_from_config, AggError, Engine, Strategy};

/// Makes the strategy of a run: once to resume from a checkpoint, and again
/// if there is none to resume from.
pub type StrategyFactory = Arc<dyn Fn() -> Box<dyn Strategy> + Send + Sync>;

/// An aggregator ready to run. See the [module docs](super) for an example.
pub struct Aggregator {
    cfg: AggregatorConfig,
    fed: FederationConfig,
    model: SharedModel,
    strategy: StrategyFactory,
    evaluator: Option<Arc<dyn CentralEvaluator>>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator")
            .field("federation", &self.fed.name)
            .field("data_dir", &self.cfg.data_dir)
            .field("model", &self.model.name())
            .field("central_evaluation", &self.evaluator.is_some())
            .finish()
    }
}

/// The model of an experiment file: `backbone` on `backend` from `models`,
/// one head per task, its classes read from the task's data set (or given
/// by `classes`). Also returns the test splits of the tasks that name a data
/// set, for central evaluation.
pub fn build_model(
    fed: &FederationConfig,
    models: &ModelRegistry,
) -> Result<(SharedModel, Vec<(String, Dataset)>), AggError> {
    let mut tasks = Vec::new();
    let mut splits = Vec::new();
    for t in &fed.tasks {
        let classes = match &t.dataset {
            Some(spec) => {
                let split = spec.load(None)?;
                let classes = split.test.classes;
                splits.push((t.name.clone(), split));
                classes
            }
            None => t.classes.unwrap_or(0),
        };
        tasks.push(TaskSpec::new(t.name.clone(), t.classes.unwrap_or(classes)));
    }
    let model = models.build(&fed.backbone, fed.backend, tasks)?;
    let mut tests = Vec::with_capacity(splits.len());
    for (task, split) in splits {
        // The data against the model's input, naming both sizes.
        check_input(model.as_ref(), &task, &split)?;
        tests.push((task, split.test));
    }
    Ok((model, tests))
}

impl Aggregator {
    /// The aggregator `cohort-aggregator` runs: the model named by the
    /// experiment (`fed.backbone` on `fed.backend`) from `models`, the
    /// strategy of `fed.strategy`, and central evaluation on the test split
    /// of every task that names a data set.
    pub fn from_config(
        cfg: AggregatorConfig,
        fed: FederationConfig,
        models: &ModelRegistry,
    ) -> Result<Self, AggError> {
        fed.validate()?;
        let (model, tests) = build_model(&fed, models)?;
        let mut agg = Self::new(cfg, fed, model)?;
        if !tests.is_empty() {
            agg.evaluator = Some(Arc::new(TestSetEvaluator::new(agg.model.clone(), tests)));
        }
        Ok(agg)
    }

    /// An aggregator of `model`, which must have exactly the experiment's
    /// tasks. The strategy is `fed.strategy`'s and there is no central
    /// evaluation until [`Aggregator::with_evaluator`] or
    /// [`Aggregator::with_test_sets`] says how.
    pub fn new(
        cfg: AggregatorConfig,
        fed: FederationConfig,
        model: SharedModel,
    ) -> Result<Self, AggError> {
        fed.validate()?;
        let want: Vec<&str> = fed.tasks.iter().map(|t| t.name.as_str()).collect();
        let mut have: Vec<&str> = model.tasks().iter().map(|t| t.name.as_str()).collect();
        let mut sorted_want = want.clone();
        sorted_want.sort_unstable();
        have.sort_unstable();
        if sorted_want != have {
            return Err(AggError::Config(format!(
                "the model `{}` has heads for {have:?}, the experiment's tasks are {want:?}",
                model.name()
            )));
        }
        let scfg = fed.strategy.clone();
        Ok(Aggregator {
            cfg,
            fed,
            model,
            strategy: Arc::new(move || strategy_from_config(&scfg)),
            evaluator: None,
        })
    }

    /// Aggregates with a strategy of your own instead of `fed.strategy`
    /// (any [`Strategy`], defined anywhere). Called once or twice: to
    /// resume from a checkpoint, whose strategy state it must accept, and
    /// to start afresh.
    pub fn with_strategy(
        mut self,
        make: impl Fn() -> Box<dyn Strategy> + Send + Sync + 'static,
    ) -> Self {
        self.strategy = Arc::new(make);
        self
    }

    /// Scores the global model after rounds (every `fed.eval.every` and
    /// after the last, when `fed.eval.central`) with your own evaluator.
    pub fn with_evaluator(mut self, evaluator: Arc<dyn CentralEvaluator>) -> Self {
        self.evaluator = Some(evaluator);
        self
    }

    /// Central evaluation on these (task, test set) pairs with the model.
    pub fn with_test_sets(self, tests: Vec<(String, Dataset)>) -> Result<Self, AggError> {
        for (task, test) in &tests {
            if !self.model.tasks().iter().any(|t| &t.name == task) {
                return Err(AggError::Config(format!(
                    "test set for `{task}`: the model has no such task"
                )));
            }
            cohort_tasks::check_dataset(self.model.as_ref(), task, test)?;
        }
        let model = self.model.clone();
        Ok(self.with_evaluator(Arc::new(TestSetEvaluator::new(model, tests))))
    }

    /// The model's layout (what nodes must match).
    pub fn layout(&self) -> Layout {
        self.model.layout()
    }

    /// The weights a new run starts from: the model's seeded init, the
    /// seed derived from the experiment as `cohort-sim` derives it.
    pub fn initial_weights(&self) -> ParamGroups {
        self.model.init(self.fed.federation().init_seed())
    }

    /// Writes [`Aggregator::initial_weights`] as safetensors (the format of
    /// checkpoints).
    pub fn export_initial(&self, path: &Path) -> Result<(), AggError> {
        let bytes = checkpoint::weights_to_safetensors(&self.layout(), &self.initial_weights())?;
        std::fs::write(path, bytes).map_err(|source| AggError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The engine: resumed from the newest good checkpoint in the data
    /// folder, or new from the initial weights.
    fn engine(&self) -> Result<Engine, AggError> {
        let engine_cfg = self.fed.engine_config();
        let checkpoints = self.cfg.data_dir.join("checkpoints");
        let layout = self.layout();
        let mut engine = match Engine::resume(&checkpoints, engine_cfg.clone(), (self.strategy)())?
        {
            Some(e) => {
                e.check_layout(&layout)?;
                info!(
                    round = e.round(),
                    version = e.version(),
                    "resumed from checkpoint"
                );
                Ok(e)
            }
            None => Engine::new(
                engine_cfg,
                layout,
                self.initial_weights(),
                (self.strategy)(),
            ),
        }?;
        // A deployment's DP noise must not be reproducible from the
        // experiment file's seed.
        engine.set_noise_secret(rand::random());
        Ok(engine)
    }

    /// Runs the aggregator until the last round is done and the linger
    /// time has passed. Holds the data folder's lock meanwhile (a second
    /// aggregator on it is refused: [`AggError::Locked`]). Needs a
    /// multi-threaded tokio runtime (checkpoints and evaluations run on
    /// blocking threads).
    pub async fn run(self) -> Result<(), AggError> {
        let allow = allowlist(&self.cfg)?;
        if allow.as_ref().is_some_and(|a| a.is_empty()) {
            return Err(AggError::Config(
                "nobody may join: allow some peer ids (--allow, --allow-file) or open the federation (--open)".into(),
            ));
        }
        let data_dir = &self.cfg.data_dir;
        std::fs::create_dir_all(data_dir).map_err(|source| AggError::Io {
            path: data_dir.clone(),
            source,
        })?;
        // One aggregator per data folder: held until this returns.
        let _lock = checkpoint::lock_dir(data_dir)?;
        let engine = self.engine()?;
        let identity = load_or_create_identity(&data_dir.join("identity.key"))?;
        let keys = SealKeyPair::load_or_create(&data_dir.join("seal.key"))?;
        let peer_id = identity.public().to_peer_id();
        // Admission at the connection: with an allowlist, a stranger is
        // refused once its identity is authenticated, before any stream.
        let submit_cap = SubmitCap::default();
        let admission = Admission {
            allow: allow.as_ref().map(|a| a.iter().copied().collect()),
            serve: true,
            submit_cap: submit_cap.clone(),
        };
        let swarm = build_swarm_with(identity, &self.cfg.net, admission)?;
        let (mut client, events, lp) = event_loop(swarm);
        let net = tokio::spawn(lp.run());
        for a in &self.cfg.listen {
            let addr: Multiaddr = a
                .parse()
                .map_err(|_| AggError::Config(format!("`{a}` is not a multiaddr")))?;
            client.listen(addr).await.map_err(AggError::Net)?;
        }
        let parts = Parts {
            engine,
            fed: self.fed,
            evaluator: self.evaluator,
            keys,
            allow,
            client,
            peer_id,
            submit_cap,
            control_limit: self.cfg.net.limits.max_control,
        };
        let result = Service::new(parts, &self.cfg)?.run(events).await;
        net.abort();
        result
    }
}
