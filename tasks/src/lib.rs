//! Cohort's learning side: the model seam, models in dfdx and on the gemm
//! executor, the flat parameter layout, local training and evaluation, data
//! sets and loaders, partitioners.
//!
//! Past this crate a model is only named groups of flat `f32`
//! ([`ParamGroups`]: `backbone`, `head/<task>`) described by a [`Layout`].
//! See `ARCHITECTURE.md` at the repository root.
//!
//! - [`model`]: the [`Model`] trait (object-safe; the runtime holds a
//!   [`SharedModel`]), [`TaskSpec`], [`Backend`], and the [`ModelRegistry`] of
//!   names experiment files may use.
//! - [`dfdx_backend`]: [`DfdxModel`], any dfdx 0.13 module as a backbone
//!   (trained by dfdx's autodiff and optimizer kernels), and the built-in
//!   dfdx architectures ([`dfdx_backend::builtin`]).
//! - [`gemm`]: [`GemmModel`], the hand-written executor for the built-in
//!   architectures it covers (the MLPs, faster; the CNN, only there).
//! - [`train`](mod@train): how tasks are mixed in local training, shared by
//!   both backends.
//! - [`data`]: [`Dataset`], [`load_idx`], [`load_csv`], [`builtin`].
//! - [`dataset_spec`]: [`DatasetSpec`], how experiment and node files name
//!   their data (built-in, `csv`, `idx`), [`DatasetSpec::load`], and
//!   [`check_input`] (does the data fit the model?).
//! - [`partition`](mod@partition): [`Partitioner`], [`partition()`].
//! - [`text`]: documents of a CSV file as next-character windows
//!   ([`TextSource`], [`TokenWindows`], [`Vocab`]).
//!
//! A program that defines its own dfdx model uses the dfdx this crate
//! builds with: [`dfdx`] is re-exported.

pub mod data;
pub mod dataset_spec;
pub mod dfdx_backend;
pub mod error;
pub mod gemm;
mod linalg;
pub mod model;
pub mod partition;
pub mod text;
pub mod train;

/// The dfdx (0.13.0) that the dfdx backend uses; define your models with it.
pub use ::dfdx;
pub use cohort_protocol::messages::{Optimizer, TaskMetrics, TrainConfig};
pub use cohort_protocol::{head_group, Fingerprint, Layout, ParamGroups, BACKBONE};
pub use data::{
    builtin, builtin_keys, builtin_names, load_csv, load_dataset, load_idx, load_idx_classes,
    stratified_split, stratified_split_fraction, Column, CsvSpec, Dataset, LabelClasses,
    LabelColumn, Split, SplitKeys,
};
pub use dataset_spec::{
    check_dataset, check_input, ClassesSpec, CsvSource, DatasetSpec, IdxSource, Missing, Scaling,
    TestSplit, MAX_AUTO_CLASSES,
};
pub use dfdx_backend::{DfdxBackbone, DfdxInit, DfdxModel};
pub use error::{FileProblem, TasksError};
pub use gemm::{BackboneKind, GemmModel, GemmNet};
pub use model::{
    validate_tasks, Backend, Model, ModelFactory, ModelRegistry, SharedModel, TaskSpec, MAX_CLASSES,
};
pub use partition::{partition, Partitioner};
pub use text::{TextLabel, TextSource, TextSplit, TokenWindows, Vocab};
pub use train::{EvalMetrics, TaskData, TrainOutcome, MAX_BATCH};
