//! Cohort's learning side: backbones and heads, the flat parameter layout,
//! local training and evaluation, data sets and loaders, partitioners.
//!
//! Past this crate a model is only named groups of flat `f32`
//! ([`ParamGroups`]: `backbone`, `head/<task>`) described by a [`Layout`].
//! See `ARCHITECTURE.md` at the repository root.
//!
//! - [`model`]: [`BackboneKind`], [`TaskSpec`], [`ModelSpec`] (layout, init),
//!   [`Model`] (flat weights, forward/backward).
//! - [`train`](mod@train): [`train()`] (multi-task local training; how tasks are mixed is
//!   documented there) and [`evaluate`].
//! - [`data`]: [`Dataset`], [`load_idx`], [`load_csv`], [`builtin`].
//! - [`partition`](mod@partition): [`Partitioner`], [`partition()`].

pub mod data;
pub mod error;
mod linalg;
pub mod model;
pub mod partition;
pub mod train;

pub use cohort_protocol::messages::{Optimizer, TaskMetrics, TrainConfig};
pub use cohort_protocol::{head_group, Fingerprint, Layout, ParamGroups, BACKBONE};
pub use data::{
    builtin, builtin_keys, builtin_names, load_csv, load_dataset, load_idx, load_idx_classes,
    stratified_split, Column, CsvSpec, Dataset, LabelClasses, LabelColumn, Split, SplitKeys,
};
pub use error::{FileProblem, TasksError};
pub use model::{BackboneKind, Model, ModelSpec, TaskSpec};
pub use partition::{partition, Partitioner};
pub use train::{evaluate, train, EvalMetrics, TaskData, TrainOutcome};
