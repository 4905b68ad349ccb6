//! Experiment files: one serde struct with defaults backs the TOML file and
//! the command-line flags of `cohort-sim`.
//!
//! # Data sets
//!
//! Each `[[tasks]]` entry names its data with `dataset`
//! ([`cohort_tasks::DatasetSpec`]; all forms are documented in
//! [`cohort_tasks::dataset_spec`]): a built-in name (`"mnist5k"`,
//! `"penguins/species"`, ...), `"idx:FOLDER"` (MNIST-named IDX files, 10
//! classes), `"csv:PATH"` (header, last column the label, standardized,
//! stratified 80/20), or a table:
//!
//! ```toml
//! [[tasks]]
//! name = "species"
//! dataset = { csv = "penguins.csv", label = "species", features = ["bill_length_mm",
//!             "bill_depth_mm", "flipper_length_mm", "body_mass_g"], classes = "auto",
//!             scale = "standard", missing = "drop_row", test = { fraction = 0.2 } }
//!
//! [[tasks]]
//! name = "fashion5"
//! dataset = { idx = "fashion", train_images = "train-x.gz", train_labels = "train-y.gz",
//!             test_images = "test-x.gz", test_labels = "test-y.gz", classes = 5 }
//! ```
//!
//! Relative paths are relative to the experiment file's folder when it is
//! read with [`ExperimentConfig::from_file`] (as `cohort-sim --config`
//! does), else to the working directory. Scaling statistics and imputed
//! means come from the training split only. The model's input size must
//! equal the data's features per sample: a mismatch fails before the first
//! round, naming both.

use std::path::{Path, PathBuf};

use cohort_aggregator::{w0_engine, w0_strategy, EngineConfig, PrivacyConfig, StrategyConfig};
use cohort_tasks::{Backend, DatasetSpec, Partitioner};
use serde::{Deserialize, Serialize};

use crate::SimError;

/// A whole experiment. `ExperimentConfig::default()` is the embedded default
/// workload W0: digits (MNIST 5k) and fashion (Fashion-MNIST 6k/1k) on one
/// 28x28 MLP backbone, 20 clients (each holds each task with probability
/// 0.7), Dirichlet(0.5) label skew, 10 clients a round, 1 local epoch of SGD
/// (batch 32, lr 0.1), FedAvgM (server momentum 0.5), 8-bit stochastic
/// deltas with error feedback, 40 rounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    pub seed: u64,
    pub rounds: u64,
    /// Worker threads that train clients in parallel; 0 = one per core.
    pub threads: usize,
    /// Folder for metrics (CSV, JSON lines), the plot and the summary;
    /// none = print only.
    pub output: Option<PathBuf>,
    /// The model's architecture: a name of the model registry (built-in:
    /// `mlp28`, `cnn28`, `mlp8x8`, `mlp_tab4`, `resmlp28`; a program adds
    /// its own).
    pub backbone: String,
    /// Which code trains it: `auto` (gemm where it has the architecture,
    /// else dfdx), `dfdx` or `gemm`.
    pub backend: Backend,
    pub tasks: Vec<TaskConfig>,
    pub clients: ClientsConfig,
    /// How the tasks share parameters (the multi-task question).
    pub sharing: Sharing,
    /// Whether heads are aggregated (`global`) or stay on their nodes (`local`).
    pub heads: HeadPolicy,
    pub strategy: StrategyConfig,
    /// Round engine settings: mode (sync / async FedBuff), deadline, quorum,
    /// local training and codec settings sent in plans. `engine.seed` and
    /// `engine.rounds` are taken from the top-level `seed` and `rounds`.
    pub engine: EngineConfig,
    pub faults: FaultsConfig,
    pub eval: EvalConfig,
    /// Client-level differential privacy (`[privacy]`; see
    /// `cohort_aggregator::privacy`). Off by default.
    #[serde(skip_serializing_if = "PrivacyConfig::is_off")]
    pub privacy: PrivacyConfig,
    /// Checkpoints of the run in `output/checkpoint/` (`[checkpoint]`), so
    /// that `cohort-sim --resume` picks it up after a crash.
    pub checkpoint: CheckpointConfig,
}

/// When the simulation checkpoints itself (see [`crate::checkpoint`]).
/// Only runs with an `output` folder, synchronous rounds and one shared
/// federation are checkpointed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Every this many rounds (0 = never). A checkpoint costs about the
    /// model plus every trained client's state on disk; the two newest are
    /// kept.
    pub every: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every: 10 }
    }
}

/// One task of the experiment and where its data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    /// Where the task's data comes from (see the [module docs](self)): a
    /// built-in data set (`mnist5k`, `fashion6k`, `digits8x8`,
    /// `penguins/species`, ...), `idx:<folder>` for a folder holding the
    /// four gzipped IDX files of MNIST / Fashion-MNIST
    /// (`train-images-idx3-ubyte.gz`, ...), e.g.
    /// `idx:/usr/share/datasets/fashion-mnist`, `csv:<path>`, or a `csv` /
    /// `idx` table. Not read when the data is handed over in code
    /// ([`crate::run_experiment_on`], [`crate::data::Population::from_tasks`]).
    pub dataset: DatasetSpec,
    /// Fraction of the clients that hold this task (each client holds at
    /// least one task).
    pub holders: f64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            name: "digits".into(),
            dataset: "mnist5k".into(),
            holders: 1.0,
        }
    }
}

/// The population of virtual clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientsConfig {
    /// Registered clients.
    pub count: usize,
    /// Clients sampled per round (sync) or training at once (async).
    pub per_round: usize,
    pub data: ClientData,
    /// Keep each trained client's error-feedback residuals (8-bit, about
    /// one byte per uploaded parameter) for its next round. With many
    /// registered clients and many sampled a round, these grow with the
    /// number of distinct clients that trained (18 KB each on the 8x8 digits
    /// MLP: 180 MB per round of 10,000 new clients); `false` drops them,
    /// as a client that rarely comes back would, and keeps only local heads.
    pub keep_residuals: bool,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        ClientsConfig {
            count: 20,
            per_round: 10,
            data: ClientData::default(),
            keep_residuals: true,
        }
    }
}

/// How clients get their data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientData {
    /// Each task's training set is split among the clients that hold it:
    /// every sample goes to exactly one client.
    Partition { partitioner: Partitioner },
    /// For populations far larger than the data: client `i`'s samples are
    /// drawn on demand from a seed derived from `i` (label proportions
    /// from Dirichlet(alpha), then `samples` draws), so nothing is stored per
    /// registered client. Clients overlap in the samples they draw.
    Sampled { samples: usize, alpha: f64 },
}

impl Default for ClientData {
    fn default() -> Self {
        ClientData::Partition {
            partitioner: Partitioner::Dirichlet { alpha: 0.5 },
        }
    }
}

/// The multi-task question: what is shared between tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// One federation, one backbone shared by all tasks.
    #[default]
    SharedBackbone,
    /// One federation per task, each with its own backbone (run one after
    /// the other with the same settings).
    Separate,
    /// No federation: each client trains alone on its own data for the same
    /// number of local epochs; evaluated on the clients' own test splits.
    LocalOnly,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadPolicy {
    #[default]
    Global,
    Local,
}

/// Failure injection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsConfig {
    /// Probability that a sampled client drops out of a round (no update).
    pub dropout: f64,
    /// Stragglers: each client's reply time in a round is drawn from an
    /// exponential distribution with this mean, on a virtual clock; the
    /// engine's deadline cuts the slow. 0 = every reply is instant.
    pub latency_mean_ms: f64,
    /// Fraction of the registered clients that are Byzantine.
    pub byzantine: f64,
    pub attack: Attack,
}

impl Default for FaultsConfig {
    fn default() -> Self {
        FaultsConfig {
            dropout: 0.0,
            latency_mean_ms: 0.0,
            byzantine: 0.0,
            attack: Attack::default(),
        }
    }
}

/// What a Byzantine client does.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Attack {
    /// Sends `-scale` times its honest delta.
    SignFlip { scale: f32 },
    /// Sends `factor` times its honest delta.
    Scale { factor: f32 },
    /// Sends Gaussian noise of standard deviation `std` instead of its delta.
    Noise { std: f32 },
    /// Trains on labels mapped `y -> classes - 1 - y`.
    LabelFlip,
}

impl Default for Attack {
    fn default() -> Self {
        Attack::SignFlip { scale: 4.0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate the global model on each task's central test set.
    pub central: bool,
    /// Evaluate every `every` rounds (and after the last).
    pub every: u64,
    /// Personalized evaluation at the end: each of up to `clients` clients
    /// fine-tunes its heads for `epochs` epochs on its own training data and
    /// evaluates on its own held-out split (`holdout` of its samples).
    pub personalized: bool,
    pub personalize_epochs: u32,
    pub personalize_clients: usize,
    pub holdout: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            central: true,
            every: 1,
            personalized: false,
            personalize_epochs: 1,
            personalize_clients: 20,
            holdout: 0.2,
        }
    }
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        ExperimentConfig {
            name: "w0".into(),
            seed: 42,
            rounds: 40,
            threads: 0,
            output: None,
            backbone: "mlp28".into(),
            backend: Backend::Auto,
            tasks: vec![
                TaskConfig {
                    name: "digits".into(),
                    dataset: "mnist5k".into(),
                    holders: 0.7,
                },
                TaskConfig {
                    name: "fashion".into(),
                    dataset: "fashion6k".into(),
                    holders: 0.7,
                },
            ],
            clients: ClientsConfig::default(),
            sharing: Sharing::SharedBackbone,
            heads: HeadPolicy::Global,
            strategy: w0_strategy(),
            engine: w0_engine(),
            faults: FaultsConfig::default(),
            eval: EvalConfig::default(),
            privacy: PrivacyConfig::default(),
            checkpoint: CheckpointConfig::default(),
        }
    }
}

impl ExperimentConfig {
    /// Reads and parses the experiment file at `path`; relative data set
    /// paths in it become relative to the file's folder.
    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_toml(&text)
            .map_err(|e| SimError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new(""));
        for t in &mut cfg.tasks {
            t.dataset = t.dataset.resolved(base);
        }
        Ok(cfg)
    }

    /// Parses an experiment file's text (relative data set paths stay
    /// relative to the working directory; see [`ExperimentConfig::from_file`]).
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        let cfg: ExperimentConfig =
            toml::from_str(text).map_err(|e| SimError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> Result<String, SimError> {
        toml::to_string_pretty(self).map_err(|e| SimError::Config(e.to_string()))
    }

    /// Checks what serde cannot: ranges and consistency.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Config(m));
        if self.tasks.is_empty() {
            return bad("at least one task is needed".into());
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if self.tasks[..i].iter().any(|u| u.name == t.name) {
                return bad(format!("task `{}` appears twice", t.name));
            }
            if t.name.is_empty() || t.name.contains('/') {
                return bad(format!(
                    "task name `{}` must be non-empty and contain no `/`",
                    t.name
                ));
            }
            t.dataset
                .validate()
                .map_err(|e| SimError::Config(format!("task `{}`: {e}", t.name)))?;
            if !(t.holders > 0.0 && t.holders <= 1.0) {
                return bad(format!(
                    "task `{}`: holders must be in (0, 1], got {}",
                    t.name, t.holders
                ));
            }
        }
        if self.clients.count == 0 {
            return bad("clients.count must be at least 1".into());
        }
        if self.clients.per_round == 0 || self.clients.per_round > self.clients.count {
            return bad(format!(
                "clients.per_round must be in 1..={} (clients.count), got {}",
                self.clients.count, self.clients.per_round
            ));
        }
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        for (name, p) in [
            ("faults.dropout", self.faults.dropout),
            ("faults.byzantine", self.faults.byzantine),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} must be a probability in [0, 1], got {p}"));
            }
        }
        if !(self.faults.latency_mean_ms >= 0.0 && self.faults.latency_mean_ms.is_finite()) {
            return bad("faults.latency_mean_ms must be finite and >= 0".into());
        }
        if !(0.0..1.0).contains(&self.eval.holdout) {
            return bad(format!(
                "eval.holdout must be in [0, 1), got {}",
                self.eval.holdout
            ));
        }
        if let ClientData::Sampled { samples, alpha } = self.clients.data {
            if samples == 0 || !(alpha > 0.0 && alpha.is_finite()) {
                return bad("clients.data: sampled needs samples >= 1 and alpha > 0".into());
            }
        }
        self.privacy
            .validate()
            .map_err(|e| SimError::Config(e.to_string()))?;
        if !self.privacy.is_off() && self.sharing == Sharing::Separate {
            return bad(
                "privacy: sharing = \"separate\" runs one federation per task, each spending \
                 the budget on the same clients; use shared_backbone"
                    .into(),
            );
        }
        if self.engine.train.batch_size == 0 || self.engine.train.epochs == 0 {
            return bad("engine.train: batch_size and epochs must be at least 1".into());
        }
        Ok(())
    }
}
