use thiserror::Error;

/// Everything that can go wrong in a simulation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SimError {
    #[error("experiment config: {0}")]
    Config(String),
    #[error(transparent)]
    Tasks(#[from] cohort_tasks::TasksError),
    #[error(transparent)]
    Aggregator(#[from] cohort_aggregator::AggError),
    #[error(transparent)]
    Protocol(#[from] cohort_protocol::ProtocolError),
    #[error("client {client}: {source}")]
    Node {
        client: usize,
        source: cohort_node::NodeError,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A checkpoint that cannot be resumed from: damaged, truncated, of
    /// another experiment or model, or not fitting the population.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A run folder that cannot be used: taken, damaged, not a run.
    #[error("run folder {path}: {reason}")]
    Run {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("plot: {0}")]
    Plot(String),
}
