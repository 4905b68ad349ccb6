//! The one error type of `cohort-aggregator` (refusals of single updates are
//! [`crate::Refusal`], which is not an error of the engine).

use thiserror::Error;

use crate::checkpoint::LOCK_FILE;

/// What can go wrong in the engine, its strategies and its checkpoints.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AggError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Protocol(#[from] cohort_protocol::ProtocolError),
    #[error("node `{0}` is not registered")]
    UnknownNode(String),
    #[error("node `{node}` refused at registration: {reason}")]
    Registration { node: String, reason: String },
    #[error("not enough nodes available: {available} < {needed}")]
    NotEnoughNodes { available: usize, needed: usize },
    #[error("round {0} is still open")]
    RoundOpen(u64),
    #[error("no round is open")]
    NoRoundOpen,
    #[error("node `{0}` has no plan in this round")]
    NotSampled(String),
    #[error("the federation has finished its {0} rounds")]
    Finished(u64),
    #[error("operation `{0}` does not exist in this mode")]
    WrongMode(&'static str),
    #[error("strategy `{strategy}`: {message}")]
    Strategy { strategy: String, message: String },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("the checkpoint holds another model than the experiment's\n  checkpoint: {checkpoint}\n  experiment: {model}")]
    ModelChanged { checkpoint: String, model: String },
    #[error(
        "{} is in use by another aggregator (its lock file {LOCK_FILE} is held); \
         stop it or use another data folder",
        path.display()
    )]
    Locked { path: std::path::PathBuf },
    #[error("I/O on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The model or a data set of the service (feature `service`).
    #[cfg(feature = "service")]
    #[error(transparent)]
    Tasks(#[from] cohort_tasks::TasksError),
    /// The network event loop stopped, or a listen address was refused.
    #[error("network: {0}")]
    Net(String),
}
