//! The node's settings: one serde struct with defaults backs the TOML file
//! (`cohort-node --config`), the flags, and a program's own node.

use std::path::{Path, PathBuf};

use cohort_protocol::transport::NetConfig;
use cohort_tasks::{Backend, Partitioner};
use serde::{Deserialize, Serialize};

use crate::{NodeError, NodeLimits};

fn bad(msg: impl Into<String>) -> NodeError {
    NodeError::Config(msg.into())
}

/// Everything a node needs besides its model: where the aggregator is,
/// its data, its folder, its limits. `NodeConfig::default()` is a node of
/// the embedded W0 (`mlp28`, the `digits` task on MNIST 5k).
///
/// ```
/// use cohort_node::agent::NodeConfig;
/// let cfg: NodeConfig = toml::from_str(r#"
///     connect_file = "agg/connect.toml"
///     data_dir = "node-1"
///     [[tasks]]
///     name = "digits"
///     dataset = "mnist5k"
///     shard = { index = 0, count = 3 }
/// "#).unwrap();
/// cfg.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The aggregator's multiaddr, ending in `/p2p/<its peer id>`.
    pub aggregator: Option<String>,
    /// The aggregator's sealing key (`cohort-pk1:...`), as it prints it.
    pub aggregator_key: Option<String>,
    /// Or: the `connect.toml` the aggregator writes into its data folder
    /// (address, peer id, key and federation in one file).
    pub connect_file: Option<PathBuf>,
    /// Federation name (taken from the connect file when one is given).
    pub federation: String,
    /// Identity, persisted state (local heads, error-feedback residuals).
    pub data_dir: PathBuf,
    /// The model's architecture (a name of the model registry); must match
    /// the aggregator's experiment.
    pub backbone: String,
    /// Which code trains it here: `auto` (gemm where it has the
    /// architecture, else dfdx), `dfdx` or `gemm`. Both backends of an
    /// architecture have the same layout.
    pub backend: Backend,
    pub tasks: Vec<NodeTask>,
    /// Fraction of the node's samples kept aside as its local test split.
    pub holdout: f64,
    /// Seed of the local test split.
    pub seed: u64,
    pub backoff: Backoff,
    pub net: NetConfig,
    /// What this node accepts of a plan (`[limits]`: max_steps,
    /// max_train_ms, max_epochs, min_batch_size, max_batch_size, max_lr,
    /// local_groups), whatever the aggregator asks.
    pub limits: NodeLimits,
}

/// One task the node holds and where its data is (a `[[tasks]]` entry of
/// the node file; see [`NodeConfig`] for an example).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeTask {
    pub name: String,
    /// A built-in data set or `idx:<folder>` (see `cohort-sim --help`).
    pub dataset: String,
    /// Keep only one part of the data set's training split (demos and
    /// tests, where every node reads the same public data set); none = all.
    pub shard: Option<Shard>,
}

impl Default for NodeTask {
    fn default() -> Self {
        NodeTask {
            name: "digits".into(),
            dataset: "mnist5k".into(),
            shard: None,
        }
    }
}

/// Part `index` of the data set split into `count` parts by `partitioner`
/// (seeded: every node computes the same split and keeps its part), e.g.
/// `shard = { index = 0, count = 3, partitioner = { kind = "iid" } }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    #[serde(default)]
    pub partitioner: Partitioner,
    #[serde(default)]
    pub seed: u64,
}

/// Reconnection: exponential backoff with jitter, from `initial_ms` to
/// `max_ms` (`[backoff]` in the node file, e.g. `initial_ms = 100`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 250,
            max_ms: 10_000,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            aggregator: None,
            aggregator_key: None,
            connect_file: None,
            federation: "w0".into(),
            data_dir: PathBuf::from("cohort-node-data"),
            backbone: "mlp28".into(),
            backend: Backend::Auto,
            tasks: vec![NodeTask::default()],
            holdout: 0.2,
            seed: 0,
            backoff: Backoff::default(),
            net: NetConfig::default(),
            limits: NodeLimits::default(),
        }
    }
}

/// The aggregator's `connect.toml`.
#[derive(Clone, Debug, Deserialize)]
struct ConnectFile {
    pub federation: String,
    pub aggregator_key: String,
    pub addrs: Vec<String>,
}

impl NodeConfig {
    /// Reads a node file (TOML); unknown keys are errors.
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = read_small(path)?;
        toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))
    }

    /// Checks what can be checked without the data and the aggregator.
    pub fn validate(&self) -> Result<(), NodeError> {
        if self.tasks.is_empty() {
            return Err(bad("the node holds no task: add a [[tasks]] entry"));
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if self.tasks[..i].iter().any(|u| u.name == t.name) {
                return Err(bad(format!("task `{}` appears twice", t.name)));
            }
            if let Some(s) = &t.shard {
                if s.count == 0 || s.index >= s.count {
                    return Err(bad(format!(
                        "task `{}`: shard index must be below count",
                        t.name
                    )));
                }
            }
        }
        self.check_settings()
    }

    /// The checks that do not concern `tasks`.
    pub(crate) fn check_settings(&self) -> Result<(), NodeError> {
        if !(0.0..1.0).contains(&self.holdout) {
            return Err(bad("holdout must be in [0, 1)"));
        }
        if self.backoff.initial_ms == 0 || self.backoff.max_ms < self.backoff.initial_ms {
            return Err(bad("backoff: need 0 < initial_ms <= max_ms"));
        }
        Ok(())
    }

    /// The aggregator's address (the one to dial) and sealing key. A connect
    /// file gives the federation too (it replaces `federation`); a TCP
    /// address on loopback is preferred when the file lists several.
    pub fn aggregator(&mut self) -> Result<(String, String), NodeError> {
        if let Some(path) = &self.connect_file {
            let text = read_small(path)?;
            let c: ConnectFile =
                toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
            self.federation = c.federation;
            let addr = self.aggregator.clone().or_else(|| pick_addr(&c.addrs));
            let Some(addr) = addr else {
                return Err(bad(format!("{} lists no address", path.display())));
            };
            return Ok((addr, c.aggregator_key));
        }
        match (&self.aggregator, &self.aggregator_key) {
            (Some(a), Some(k)) => Ok((a.clone(), k.clone())),
            _ => Err(bad(
                "say where the aggregator is: --aggregator <multiaddr>/p2p/<peer id> and \
                 --aggregator-key cohort-pk1:..., or --connect <its connect.toml>",
            )),
        }
    }
}

/// Settings files are small: anything beyond 1 MiB is not one.
fn read_small(path: &Path) -> Result<String, NodeError> {
    use std::io::Read;
    const MAX: u64 = 1 << 20;
    let f = std::fs::File::open(path).map_err(NodeError::io(path))?;
    let mut text = String::new();
    f.take(MAX + 1)
        .read_to_string(&mut text)
        .map_err(NodeError::io(path))?;
    if text.len() as u64 > MAX {
        return Err(bad(format!("{}: larger than 1 MiB", path.display())));
    }
    Ok(text)
}

fn pick_addr(addrs: &[String]) -> Option<String> {
    addrs
        .iter()
        .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
        .or_else(|| addrs.iter().find(|a| a.contains("/tcp/")))
        .or_else(|| addrs.first())
        .cloned()
}
