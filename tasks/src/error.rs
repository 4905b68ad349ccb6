//! The one error type of `cohort-tasks`.

use std::path::PathBuf;

use cohort_protocol::ProtocolError;
use thiserror::Error;

/// What is wrong inside a data file. Always wrapped in
/// [`TasksError::BadFile`], which names the file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FileProblem {
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("wrong magic number {got:#010x}, expected {expected:#010x}")]
    BadMagic { expected: u32, got: u32 },
    #[error("wrong dimensions: {0}")]
    Dimensions(String),
    #[error("label `{label}` at {at} is out of range (classes: {classes})")]
    LabelOutOfRange {
        at: String,
        label: String,
        classes: usize,
    },
    #[error("line {line}, column `{column}`: `{value}` is not a number")]
    NotNumeric {
        line: u64,
        column: String,
        value: String,
    },
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge { what: String, limit: u64 },
    #[error("{0} bytes after the end of the data")]
    TrailingData(u64),
    #[error("unknown column `{0}`")]
    UnknownColumn(String),
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Everything that can go wrong in this crate. Nothing a file or a peer
/// controls panics: it ends up here.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TasksError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    BadFile { path: PathBuf, problem: FileProblem },
    #[error(transparent)]
    Layout(#[from] ProtocolError),
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel { name: String, known: String },
    #[error("model `{model}` has no {backend} backend (it runs on: {available})")]
    BackendUnavailable {
        model: String,
        backend: crate::Backend,
        available: String,
    },
    #[error("unknown backend `{0}` (known: auto, dfdx, gemm)")]
    UnknownBackend(String),
    #[error("training backend: {0}")]
    Backend(String),
    #[error("unknown task `{0}`")]
    UnknownTask(String),
    #[error("unknown built-in data set `{0}`")]
    UnknownDataset(String),
    #[error("invalid model spec: {0}")]
    InvalidSpec(String),
    #[error("invalid training config: {0}")]
    InvalidConfig(String),
    /// A data set's feature count differs from the model's input size.
    #[error("task `{task}`: data set `{dataset}` has {features} features per sample, model `{model}` takes {input}")]
    InputMismatch {
        task: String,
        dataset: String,
        features: usize,
        model: String,
        input: usize,
    },
    #[error("data does not fit the model: {0}")]
    DataMismatch(String),
    #[error("invalid partition request: {0}")]
    InvalidPartition(String),
}

impl TasksError {
    pub(crate) fn bad_file(path: impl Into<PathBuf>, problem: FileProblem) -> Self {
        TasksError::BadFile {
            path: path.into(),
            problem,
        }
    }

    /// The file problem, if this is a [`TasksError::BadFile`].
    pub fn file_problem(&self) -> Option<&FileProblem> {
        match self {
            TasksError::BadFile { problem, .. } => Some(problem),
            _ => None,
        }
    }
}
