//! The aggregator's settings: the federation (read from the same experiment
//! file as `cohort-sim`) and the deployment (addresses, data folder, access
//! control), one serde struct each, with defaults.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cohort_aggregator::{
    w0_engine, w0_strategy, EngineConfig, Federation, GroupPolicy, StrategyConfig,
};
use cohort_protocol::transport::NetConfig;
use cohort_tasks::Backend;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// What the aggregator reads of an experiment file. The sections that only
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskConfig {
    pub name: String,
    /// The data set whose *test* split the aggregator evaluates the global
    /// model on (a built-in name or `idx:<folder>`); none = no central
    /// evaluation of this task, and then `classes` must be given.
    pub dataset: Option<String>,
    /// Classes of the task's head (read from the data set when it is given).
    pub classes: Option<usize>,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            name: "digits".into(),
            dataset: Some("mnist5k".into()),
            classes: None,
        }
    }
}

/// How many nodes take part.
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
                    dataset: Some("mnist5k".into()),
                    classes: None,
                },
                TaskConfig {
                    name: "fashion".into(),
                    dataset: Some("fashion6k".into()),
                    classes: None,
                },
            ],
            clients: Clients::default(),
            heads: GroupPolicy::Global,
            strategy: w0_strategy(),
            engine: w0_engine(),
            eval: EvalConfig::default(),
        }
    }
}

impl FederationConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading experiment file {}", path.display()))?;
        let cfg: FederationConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.tasks.is_empty() {
            bail!("at least one task is needed");
        }
        let mut seen = BTreeSet::new();
        for t in &self.tasks {
            if t.name.is_empty() || t.name.contains('/') || !seen.insert(&t.name) {
                bail!(
                    "task names must be unique, non-empty, without `/` (`{}`)",
                    t.name
                );
            }
            if t.dataset.is_none() && t.classes.is_none() {
                bail!("task `{}`: give a dataset or classes", t.name);
            }
        }
        if self.clients.count == 0 || self.clients.per_round == 0 {
            bail!("clients.count and clients.per_round must be at least 1");
        }
        if self.clients.per_round > self.clients.count {
            bail!("clients.per_round cannot exceed clients.count");
        }
        if self.rounds == 0 {
            bail!("rounds must be at least 1");
        }
        // The engine settings as the engine will get them: bad train or
        // codec settings stop the aggregator here, naming the field, instead
        // of failing every node at its first round.
        self.engine_config()
            .validate()
            .context("in the [engine] section of the experiment")?;
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
        self.federation().engine_config(&self.engine)
    }
}

/// Deployment settings of `cohort-aggregator` (file `--config`, each field
/// also a flag).
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

/// Who may join: `None` lets everyone in.
pub fn allowlist(cfg: &AggregatorConfig) -> anyhow::Result<Option<BTreeSet<PeerId>>> {
    if cfg.open {
        return Ok(None);
    }
    let mut ids: Vec<(String, String)> = cfg
        .allow
        .iter()
        .map(|s| (s.clone(), "--allow".to_string()))
        .collect();
    if let Some(path) = &cfg.allow_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading allowlist {}", path.display()))?;
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
            .with_context(|| format!("{from}: `{id}` is not a peer id"))?;
        out.insert(peer);
    }
    Ok(Some(out))
}
