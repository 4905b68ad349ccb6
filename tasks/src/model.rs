//! The model seam: the [`Model`] trait that every crate above `tasks` uses,
//! the tasks a model has heads for, the backends, and the [`ModelRegistry`]
//! that turns the names of experiment files into models.
//!
//! A model is a backbone plus one head per task. Past this crate it is only
//! named groups of flat `f32` ([`ParamGroups`]: `backbone`, `head/<task>`)
//! described by a [`Layout`]; how it trains (dfdx's autodiff, or the gemm
//! executor for the built-in architectures it covers) stays behind the
//! trait.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use cohort_protocol::{head_group, GroupLayout, Layout, ParamGroups, TensorSpec, BACKBONE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::dfdx_backend::builtin as dfdx_builtin;
use crate::gemm::{BackboneKind, GemmModel};
use crate::train::{EvalMetrics, TaskData, TrainOutcome};
use crate::{Dataset, TasksError, TrainConfig};

/// A model as the rest of Cohort sees it. Object-safe: the node runtime,
/// the simulator and the aggregator hold an `Arc<dyn Model>` ([`SharedModel`]).
///
/// Implementations: [`DfdxModel`](crate::DfdxModel) (any dfdx 0.13 module
/// as a backbone, trained by dfdx's autodiff and optimizer kernels) and
/// [`GemmModel`] (the hand-written executor for the built-in architectures
/// it covers; the only home of the CNN).
pub trait Model: Send + Sync + fmt::Debug {
    /// The architecture's name, as in experiment files (`mlp28`, ...).
    fn name(&self) -> &str;
    /// The backend that trains it (never [`Backend::Auto`]).
    fn backend(&self) -> Backend;
    /// Input features per sample.
    fn input_dim(&self) -> usize;
    /// The tasks this model has heads for.
    fn tasks(&self) -> &[TaskSpec];
    /// `backbone` first, then `head/<task>` sorted by task name; depends only
    /// on the architecture and the (name, classes) of the tasks.
    fn layout(&self) -> Layout;
    /// Deterministic initial weights of every group. Each group comes from
    /// its own stream (seeded by `seed` and the group name), so a task's
    /// initial head does not depend on which other tasks the model has.
    fn init(&self, seed: u64) -> ParamGroups;
    /// The same architecture on the same backend with other tasks.
    fn with_tasks(&self, tasks: Vec<TaskSpec>) -> Result<SharedModel, TasksError>;
    /// Multi-task local training from `start` (which must match
    /// [`Model::layout`]); see [`crate::train`] for how tasks are mixed.
    /// `stop` is asked before every optimizer step after the first and
    /// ends training when it says so (a node's wall-clock budget; the steps
    /// done are in the outcome's metrics). Implementations must honour it.
    fn train_until(
        &self,
        start: &ParamGroups,
        data: &[TaskData<'_>],
        cfg: &TrainConfig,
        stop: &dyn Fn() -> bool,
    ) -> Result<TrainOutcome, TasksError>;
    /// [`Model::train_until`] to the end of the schedule (`cfg.epochs`,
    /// `cfg.max_steps`).
    fn train(
        &self,
        start: &ParamGroups,
        data: &[TaskData<'_>],
        cfg: &TrainConfig,
    ) -> Result<TrainOutcome, TasksError> {
        self.train_until(start, data, cfg, &|| false)
    }
    /// Accuracy and loss of `task` on `data` (all samples, or `indices`).
    /// `params` needs only the `backbone` and `head/<task>` groups (others
    /// are ignored), so a node can evaluate the global backbone with its
    /// own head.
    fn evaluate(
        &self,
        params: &ParamGroups,
        task: &str,
        data: &Dataset,
        indices: Option<&[usize]>,
    ) -> Result<EvalMetrics, TasksError>;

    /// The logits of `task` for `data` (all samples, or `indices`), row
    /// after row (`classes` values per sample): the forward pass that
    /// [`Model::evaluate`] scores. `params` as for `evaluate`.
    fn logits(
        &self,
        params: &ParamGroups,
        task: &str,
        data: &Dataset,
        indices: Option<&[usize]>,
    ) -> Result<Vec<f32>, TasksError>;

    /// The task called `name`.
    fn task(&self, name: &str) -> Option<&TaskSpec> {
        self.tasks().iter().find(|t| t.name == name)
    }

    /// The model with the backbone and the heads of `names` only (in this
    /// model's order).
    fn subset(&self, names: &[&str]) -> Result<SharedModel, TasksError> {
        for n in names {
            if self.task(n).is_none() {
                return Err(TasksError::UnknownTask((*n).to_string()));
            }
        }
        self.with_tasks(
            self.tasks()
                .iter()
                .filter(|t| names.contains(&t.name.as_str()))
                .cloned()
                .collect(),
        )
    }
}

/// How the runtime holds a model.
pub type SharedModel = Arc<dyn Model>;

/// A task a model has a head for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub classes: usize,
}

impl TaskSpec {
    pub fn new(name: impl Into<String>, classes: usize) -> Self {
        TaskSpec {
            name: name.into(),
            classes,
        }
    }
}

/// Most classes a head may have (bounds allocations driven by specs from
/// config files or peers).
pub const MAX_CLASSES: usize = 1 << 16;

/// Checks task names (non-empty, unique, no `/` or white space) and class
/// counts (2..=[`MAX_CLASSES`]).
pub fn validate_tasks(tasks: &[TaskSpec]) -> Result<(), TasksError> {
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        if t.name.is_empty() || t.name.contains('/') || t.name.chars().any(char::is_whitespace) {
            return Err(TasksError::InvalidSpec(format!(
                "bad task name `{}`",
                t.name
            )));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(TasksError::InvalidSpec(format!(
                "task `{}` appears twice",
                t.name
            )));
        }
        if !(2..=MAX_CLASSES).contains(&t.classes) {
            return Err(TasksError::InvalidSpec(format!(
                "task `{}` has {} classes (allowed 2..={MAX_CLASSES})",
                t.name, t.classes
            )));
        }
    }
    Ok(())
}

/// Which code trains a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The fastest backend that runs the architecture: gemm where it has
    /// the architecture, dfdx otherwise.
    #[default]
    Auto,
    /// dfdx 0.13's autodiff and optimizer kernels.
    Dfdx,
    /// The hand-written gemm executor (built-in architectures only).
    Gemm,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Dfdx => "dfdx",
            Backend::Gemm => "gemm",
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = TasksError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Backend::Auto),
            "dfdx" => Ok(Backend::Dfdx),
            "gemm" => Ok(Backend::Gemm),
            _ => Err(TasksError::UnknownBackend(s.to_string())),
        }
    }
}

/// The layout of `tasks`' heads on `features` backbone outputs, sorted by
/// task name, after the backbone group.
pub(crate) fn layout_with_heads(
    backbone: Vec<TensorSpec>,
    features: usize,
    tasks: &[TaskSpec],
) -> Layout {
    let mut sorted: Vec<&TaskSpec> = tasks.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut groups = vec![GroupLayout {
        name: BACKBONE.to_string(),
        tensors: backbone,
    }];
    for t in sorted {
        let g = head_group(&t.name);
        let (c, f) = (t.classes as u64, features as u64);
        groups.push(GroupLayout {
            tensors: vec![
                TensorSpec {
                    name: format!("{g}.weight"),
                    shape: vec![c, f],
                    offset: 0,
                },
                TensorSpec {
                    name: format!("{g}.bias"),
                    shape: vec![c],
                    offset: c * f,
                },
            ],
            name: g,
        });
    }
    Layout { groups }
}

/// FNV-1a of a group name: the stream id of its initial weights.
pub(crate) fn stream_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The seeded generator of group `group`'s initial weights.
pub(crate) fn group_rng(seed: u64, group: &str) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream_of(group));
    rng
}

fn fill_uniform(rng: &mut ChaCha8Rng, out: &mut [f32], bound: f32) {
    for v in out {
        *v = rng.gen_range(-bound..bound);
    }
}

/// Initial head weights `U(±1/sqrt(features))`, bias zero, for every head
/// group of `layout`.
pub(crate) fn init_heads(layout: &Layout, seed: u64, out: &mut ParamGroups) {
    for g in layout.groups.iter().filter(|g| g.name != BACKBONE) {
        let mut v = vec![0.0; g.len() as usize];
        let w = &g.tensors[0];
        let features = w.shape.get(1).copied().unwrap_or(1).max(1);
        let n = w.shape.iter().product::<u64>() as usize;
        fill_uniform(
            &mut group_rng(seed, &g.name),
            &mut v[..n],
            1.0 / (features as f32).sqrt(),
        );
        out.insert(&g.name, v);
    }
}

/// He-uniform backbone for ReLU networks: every tensor of rank 2 or more is
/// `U(±sqrt(6 / fan_in))` (fan_in = the product of all but the first
/// dimension), everything else zero. The rule of the built-in
/// architectures on both backends, so that a backend switch does not
/// change the start.
pub(crate) fn he_uniform_backbone(tensors: &[TensorSpec], seed: u64) -> Vec<f32> {
    let len: u64 = tensors
        .iter()
        .map(|t| t.shape.iter().product::<u64>())
        .sum();
    let mut v = vec![0.0; len as usize];
    let mut rng = group_rng(seed, BACKBONE);
    for t in tensors.iter().filter(|t| t.shape.len() >= 2) {
        let fan_in = t.shape[1..].iter().product::<u64>().max(1);
        let n = t.shape.iter().product::<u64>() as usize;
        let off = t.offset as usize;
        fill_uniform(&mut rng, &mut v[off..off + n], (6.0 / fan_in as f32).sqrt());
    }
    v
}

/// Builds a model for a list of tasks.
pub type ModelFactory = Arc<dyn Fn(Vec<TaskSpec>) -> Result<SharedModel, TasksError> + Send + Sync>;

#[derive(Clone, Default)]
struct Entry {
    description: String,
    dfdx: Option<ModelFactory>,
    gemm: Option<ModelFactory>,
}

/// The model names an experiment file may use, and how to build each on
/// each backend. [`ModelRegistry::default`] holds the built-in
/// architectures; a program adds its own with [`ModelRegistry::register`]
/// or [`ModelRegistry::register_dfdx`].
#[derive(Clone)]
pub struct ModelRegistry {
    entries: BTreeMap<String, Entry>,
}

impl fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("names", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for ModelRegistry {
    /// The built-in architectures (see [`ModelRegistry::describe`]).
    fn default() -> Self {
        let mut r = ModelRegistry::empty();
        for kind in BackboneKind::ALL {
            r.register(
                kind.name(),
                Backend::Gemm,
                kind.description(),
                move |tasks| Ok(Arc::new(GemmModel::new(kind, tasks)?)),
            );
        }
        dfdx_builtin::register(&mut r);
        r
    }
}

impl ModelRegistry {
    /// No names at all.
    pub fn empty() -> Self {
        ModelRegistry {
            entries: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) how `name` is built on `backend` (`Dfdx` or
    /// `Gemm`; `Auto` counts as `Dfdx`). The description of the first
    /// registration of a name is kept.
    pub fn register<F>(&mut self, name: &str, backend: Backend, description: &str, factory: F)
    where
        F: Fn(Vec<TaskSpec>) -> Result<SharedModel, TasksError> + Send + Sync + 'static,
    {
        let e = self.entries.entry(name.to_string()).or_default();
        if e.description.is_empty() {
            e.description = description.to_string();
        }
        let f: ModelFactory = Arc::new(factory);
        match backend {
            Backend::Gemm => e.gemm = Some(f),
            Backend::Dfdx | Backend::Auto => e.dfdx = Some(f),
        }
    }

    /// Builds `name` with `tasks` on `backend` (`Auto`: gemm where it has
    /// the architecture, else dfdx).
    pub fn build(
        &self,
        name: &str,
        backend: Backend,
        tasks: Vec<TaskSpec>,
    ) -> Result<SharedModel, TasksError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| TasksError::UnknownModel {
                name: name.to_string(),
                known: self.names().collect::<Vec<_>>().join(", "),
            })?;
        let f = match backend {
            Backend::Auto => e.gemm.as_ref().or(e.dfdx.as_ref()),
            Backend::Dfdx => e.dfdx.as_ref(),
            Backend::Gemm => e.gemm.as_ref(),
        };
        let f = f.ok_or_else(|| TasksError::BackendUnavailable {
            model: name.to_string(),
            backend,
            available: Self::backends_of(e),
        })?;
        f(tasks)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn backends_of(e: &Entry) -> String {
        let mut v = Vec::new();
        if e.dfdx.is_some() {
            v.push("dfdx");
        }
        if e.gemm.is_some() {
            v.push("gemm");
        }
        v.join(", ")
    }

    /// One line per name: what it is and which backends train it.
    pub fn describe(&self) -> String {
        self.entries
            .iter()
            .map(|(n, e)| format!("{n}: {} [{}]", e.description, Self::backends_of(e)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
