//! The aggregator's settings: the federation (read from the same experiment
//! file as `cohort-sim`) and the deployment (addresses, data folder, access
//! control), one serde struct each, with defaults.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cohort_protocol::transport::NetConfig;
use cohort_tasks::{Backend, DatasetSpec};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::{
    w0_engine, w0_strategy, AggError, EngineConfig, Federation, GroupPolicy, StrategyConfig,
};

fn bad(msg: impl Into<String>) -> AggError {
    AggError::Config(msg.into())
}

/// Settings files are small: anything beyond 1 MiB is not one.
const MAX_SETTINGS_BYTES: u64 = 1 << 20;
/// An allowlist of a million peer ids takes about 53 MB.
const MAX_ALLOWLIST_BYTES: u64 = 128 << 20;

pub(crate) fn read_small(path: &Path) -> Result<String, AggError> {
    read_text(path, MAX_SETTINGS_BYTES)
}

fn read_text(path: &Path, max: u64) -> Result<String, AggError> {
    use std::io::Read;
    let io = |source| AggError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    f.take(max + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > max {
        return Err(bad(format!("{}: larger than {max} bytes", path.display())));
    }
    Ok(text)
}

/// What the aggregator reads of an experiment file (e.g.
/// `simulator/experiments/digits-net.toml`; [`FederationConfig::load`]). The sections that only
/// a simulation has (`clients.data`, `faults`, `sharing`, `threads`,
/// `output`, ...) are ignored, so one file drives `cohort-sim` and a real
/// federation alike.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FederationConfig {
    pub name: String,
    pub seed: u64,
    pub rounds: u64,
    /// The model's architecture (a name of the model registry).
    pub backbone: String,
    /// Which code evaluates it centrally: `auto`, `dfdx` or `gemm` (both
    /// give the same layout, so nodes may train on either).
    pub backend: Backend,
    pub tasks: Vec<TaskConfig>,
    pub clients: Clients,
    /// `global`: heads are aggregated; `local`: they stay on their nodes.
    pub heads: GroupPolicy,
    pub strategy: StrategyConfig,
    pub engine: EngineConfig,
    pub eval: EvalConfig,
    /// Client-level differential privacy (`[privacy]`, the same section
    /// as `cohort-sim`'s; see [`crate::privacy`]).
    #[serde(skip_serializing_if = "crate::PrivacyConfig::is_off")]
    pub privacy: crate::PrivacyConfig,
}

/// A `[[tasks]]` entry of the experiment file: `name`, and `dataset` or
/// `classes` (see [`FederationConfig`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskConfig {
    pub name: String,
    /// The data set whose *test* split the aggregator evaluates the global
    /// model on (any form of `cohort-sim`'s experiment files: a built-in
    /// name, `idx:<folder>`, `csv:<file>`, a `csv` or `idx` table); none =
    /// no central evaluation of this task, and then `classes` must be
    /// given. Relative paths are relative to the experiment file's folder.
    pub dataset: Option<DatasetSpec>,
    /// Classes of the task's head (read from the data set when it is given).
    pub classes: Option<usize>,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            name: "digits".into(),
            dataset: Some(DatasetSpec::from_name("mnist5k")),
            classes: None,
        }
    }
}

/// How many nodes take part (`[clients]`: `count = 3`, `per_round = 3`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Clients {
    /// Nodes expected: the first round waits until this many have said
    /// hello. Later rounds need `engine.sampling.min_available`.
    pub count: usize,
    /// Nodes sampled per round.
    pub per_round: usize,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            count: 20,
            per_round: 10,
        }
    }
}

/// When the global model is evaluated (`[eval]`: `central = true`,
/// `every = 1`, `federated_every = 0`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalConfig {
    /// Evaluate the global model on each task's test set after each round.
    pub central: bool,
    pub every: u64,
    /// Ask every registered node for its local evaluation (with its own
    /// heads) every this many rounds and after the last; 0 = only after the
    /// last round.
    pub federated_every: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            central: true,
            every: 1,
            federated_every: 0,
        }
    }
}

impl Default for FederationConfig {
    /// The embedded default W0 of `cohort-sim`.
    fn default() -> Self {
        FederationConfig {
            name: "w0".into(),
            seed: 42,
            rounds: 40,
            backbone: "mlp28".into(),
            backend: Backend::Auto,
            tasks: vec![
                TaskConfig {
                    name: "digits".into(),
                    dataset: Some(DatasetSpec::from_name("mnist5k")),
                    classes: None,
                },
                TaskConfig {
                    name: "fashion".into(),
                    dataset: Some(DatasetSpec::from_name("fashion6k")),
                    classes: None,
                },
            ],
            clients: Clients::default(),
            heads: GroupPolicy::Global,
            strategy: w0_strategy(),
            engine: w0_engine(),
            eval: EvalConfig::default(),
            privacy: crate::PrivacyConfig::default(),
        }
    }
}

impl FederationConfig {
    /// Reads an experiment file (the sections only a simulation has are
    /// ignored) and validates it.
    pub fn load(path: &Path) -> Result<Self, AggError> {
        let text = read_small(path)?;
        let mut cfg: FederationConfig =
            toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new(""));
        for t in &mut cfg.tasks {
            t.dataset = t.dataset.as_ref().map(|d| d.resolved(base));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), AggError> {
        if self.tasks.is_empty() {
            return Err(bad("at least one task is needed"));
        }
        let mut seen = BTreeSet::new();
        for t in &self.tasks {
            if t.name.is_empty() || t.name.contains('/') || !seen.insert(&t.name) {
                return Err(bad(format!(
                    "task names must be unique, non-empty, without `/` (`{}`)",
                    t.name
                )));
            }
            match &t.dataset {
                Some(d) => d.validate()?,
                None if t.classes.is_none() => {
                    return Err(bad(format!("task `{}`: give a dataset or classes", t.name)))
                }
                None => {}
            }
        }
        if self.clients.count == 0 || self.clients.per_round == 0 {
            return Err(bad(
                "clients.count and clients.per_round must be at least 1",
            ));
        }
        if self.clients.per_round > self.clients.count {
            return Err(bad("clients.per_round cannot exceed clients.count"));
        }
        if self.rounds == 0 {
            return Err(bad("rounds must be at least 1"));
        }
        // The engine settings as the engine will get them: bad train or
        // codec settings stop the aggregator here, naming the field, instead
        // of failing every node at its first round.
        self.engine_config()
            .validate()
            .map_err(|e| bad(format!("in the [engine] section of the experiment: {e}")))?;
        Ok(())
    }

    /// The top-level settings the engine and the initial weights depend
    /// on, derived as `cohort-sim` derives them from the same file.
    pub fn federation(&self) -> Federation {
        Federation {
            seed: self.seed,
            rounds: self.rounds,
            clients: self.clients.count,
            per_round: self.clients.per_round,
            local_heads: match self.heads {
                GroupPolicy::Local => self.tasks.iter().map(|t| t.name.clone()).collect(),
                GroupPolicy::Global => Vec::new(),
            },
        }
    }

    /// The engine settings (see [`Federation::engine_config`]).
    pub fn engine_config(&self) -> EngineConfig {
        let mut e = self.federation().engine_config(&self.engine);
        // As `cohort-sim`: the top-level `[privacy]`, else `[engine.privacy]`.
        if !self.privacy.is_off() {
            e.privacy = self.privacy.clone();
        }
        e
    }
}

/// Deployment settings of `cohort-aggregator` (file `--config`, each field
/// also a flag); the [module docs](super) build one in code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Experiment file (the format of `cohort-sim`); none = the embedded W0.
    pub experiment: Option<PathBuf>,
    /// Identity, sealing key, checkpoints and metrics live here.
    pub data_dir: PathBuf,
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Peer ids allowed to join. Empty and `open = false`: nobody can join.
    pub allow: Vec<String>,
    /// A file with one allowed peer id per line (`#` starts a comment).
    pub allow_file: Option<PathBuf>,
    /// Let any peer join (tests and demos only).
    pub open: bool,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Past global versions kept in memory so that a node holding one of
    /// them downloads only the lossless delta (XOR + deflate) to the current
    /// version; 0 = always full weights.
    pub delta_versions: usize,
    /// The first round waits for `clients.count` nodes, at most this long
    /// (then it starts with the nodes there are). Also after a restart.
    pub start_wait_s: u64,
    /// After the last round, keep answering this long (nodes learn that the
    /// run is over and send their final evaluations), then exit.
    pub linger_s: u64,
    pub net: NetConfig,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            experiment: None,
            data_dir: PathBuf::from("cohort-aggregator-data"),
            listen: vec![
                "/ip4/0.0.0.0/tcp/7070".into(),
                "/ip4/0.0.0.0/udp/7070/quic-v1".into(),
            ],
            allow: Vec::new(),
            allow_file: None,
            open: false,
            keep_checkpoints: 3,
            delta_versions: 1,
            start_wait_s: 60,
            linger_s: 10,
            net: NetConfig::default(),
        }
    }
}

impl AggregatorConfig {
    /// Reads a deployment file (TOML); unknown keys are errors.
    pub fn load(path: &Path) -> Result<Self, AggError> {
        let text = read_small(path)?;
        toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))
    }
}

/// Who may join: `None` lets everyone in (`open`); otherwise the peer ids
/// of `allow` and `allow_file`, each checked.
pub fn allowlist(cfg: &AggregatorConfig) -> Result<Option<BTreeSet<PeerId>>, AggError> {
    if cfg.open {
        return Ok(None);
    }
    let mut ids: Vec<(String, String)> = cfg
        .allow
        .iter()
        .map(|s| (s.clone(), "--allow".to_string()))
        .collect();
    if let Some(path) = &cfg.allow_file {
        let text = read_text(path, MAX_ALLOWLIST_BYTES)?;
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                ids.push((line.to_string(), format!("{}:{}", path.display(), i + 1)));
            }
        }
    }
    let mut out = BTreeSet::new();
    for (id, from) in ids {
        let peer: PeerId = id
            .parse()
            .map_err(|_| bad(format!("{from}: `{id}` is not a peer id")))?;
        out.insert(peer);
    }
    Ok(Some(out))
}
