//! A node's local data: one [`LocalTask`] per task it holds, with its
//! training samples and its local test split.

use cohort_tasks::{check_dataset, partition, Dataset, Model, TaskSpec};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tracing::info;

use super::NodeConfig;
use crate::NodeError;

/// A task's data on this node: its training and local test samples (indices
/// into `data`). A program with its own data builds these itself and hands
/// them to [`super::Agent::new`].
#[derive(Clone, Debug)]
pub struct LocalTask {
    pub name: String,
    pub data: Dataset,
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

impl LocalTask {
    /// All of `data`, a seeded `holdout` fraction of it kept aside as the
    /// local test split (at least one sample stays for training).
    pub fn with_holdout(name: impl Into<String>, data: Dataset, holdout: f64, seed: u64) -> Self {
        let all: Vec<usize> = (0..data.len()).collect();
        let (train, test) = split_holdout(all, holdout, seed);
        LocalTask {
            name: name.into(),
            data,
            train,
            test,
        }
    }
}

fn split_holdout(mut idx: Vec<usize>, holdout: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    idx.shuffle(&mut rng);
    let n_test = (idx.len() as f64 * holdout).round() as usize;
    let test = idx.split_off(idx.len() - n_test.min(idx.len().saturating_sub(1)));
    (idx, test)
}

/// The tasks of a node file: each `[[tasks]]` entry's data set (its
/// training split), the node's shard of it if one is given, and the local
/// test split (`holdout`, seeded by `seed`).
pub fn load_local_tasks(cfg: &NodeConfig) -> Result<Vec<LocalTask>, NodeError> {
    let mut out = Vec::new();
    for (i, t) in cfg.tasks.iter().enumerate() {
        let split = t.dataset.load(None)?;
        let data = split.train;
        let idx: Vec<usize> = match &t.shard {
            Some(s) => {
                let mut parts = partition(&s.partitioner, &data.labels, None, s.count, s.seed)?;
                parts.get_mut(s.index).map(std::mem::take).ok_or_else(|| {
                    NodeError::Config(format!("task `{}`: no shard {}", t.name, s.index))
                })?
            }
            None => (0..data.len()).collect(),
        };
        if idx.is_empty() {
            return Err(NodeError::Config(format!(
                "task `{}`: this node's shard is empty",
                t.name
            )));
        }
        let (train, test) = split_holdout(idx, cfg.holdout, cfg.seed ^ (i as u64 + 1));
        info!(task = %t.name, train = train.len(), test = test.len(), "local data");
        out.push(LocalTask {
            name: t.name.clone(),
            data,
            train,
            test,
        });
    }
    Ok(out)
}

/// The model's task list for these tasks (name, classes of its data).
pub fn task_specs(tasks: &[LocalTask]) -> Vec<TaskSpec> {
    tasks
        .iter()
        .map(|t| TaskSpec::new(t.name.clone(), t.data.classes))
        .collect()
}

/// Checks local data against the model before anything is sent: at least
/// one task, unique names, a head for each, the model's input width and
/// class count ([`check_dataset`]), a well-formed data set
/// (`Dataset::validate`), indices in bounds, some training data.
pub fn check_tasks(model: &dyn Model, tasks: &[LocalTask]) -> Result<(), NodeError> {
    let bad = |m: String| Err(NodeError::Config(m));
    if tasks.is_empty() {
        return bad("the node holds no task".into());
    }
    for (i, t) in tasks.iter().enumerate() {
        if tasks[..i].iter().any(|u| u.name == t.name) {
            return bad(format!("task `{}` appears twice", t.name));
        }
        let Some(spec) = model.tasks().iter().find(|s| s.name == t.name) else {
            return bad(format!(
                "task `{}`: the model `{}` has no head for it",
                t.name,
                model.name()
            ));
        };
        check_dataset(model, &spec.name, &t.data)?;
        t.data.validate()?;
        if t.train.is_empty() {
            return bad(format!("task `{}`: no training samples", t.name));
        }
        if t.train.iter().chain(&t.test).any(|&i| i >= t.data.len()) {
            return bad(format!(
                "task `{}`: a sample index is out of bounds",
                t.name
            ));
        }
    }
    Ok(())
}
