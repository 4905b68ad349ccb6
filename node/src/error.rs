use thiserror::Error;

/// Everything that can go wrong in the node runtime.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("the plan is for federation `{got}`, this node belongs to `{expected}`")]
    WrongFederation { expected: String, got: String },
    #[error("the plan asks for group `{0}`, which this node does not hold")]
    UnknownGroup(String),
    #[error("no weights for group `{0}`: neither sent by the aggregator nor kept locally")]
    MissingWeights(String),
    #[error("node has no training data for any of its tasks")]
    NoData,
    #[error(transparent)]
    Tasks(#[from] cohort_tasks::TasksError),
    #[error(transparent)]
    Protocol(#[from] cohort_protocol::ProtocolError),
}
