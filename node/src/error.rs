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
    /// The plan breaks this node's limits or makes no sense (the field is
    /// named). A refusal: the node backs off and asks again.
    #[error("plan refused: {0}")]
    BadPlan(String),
    /// The global weights sent do not fit the model or are not finite.
    #[error("weights refused: {0}")]
    BadWeights(String),
    /// Local training produced a non-finite or out-of-range delta; nothing
    /// is sent and the node's state is unchanged.
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error(transparent)]
    Tasks(#[from] cohort_tasks::TasksError),
    #[error(transparent)]
    Protocol(#[from] cohort_protocol::ProtocolError),
    /// A node setting that cannot work (the field is named).
    #[error("node settings: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The persisted state (`state.bin`) cannot be read into this model.
    #[error("{path}: {reason}; move the file aside to start afresh")]
    State {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The aggregator will never take this node (not allowed, another
    /// federation, protocol version or model); `cohort-node` exits with 3.
    #[cfg(feature = "net")]
    #[error("refused by the aggregator ({:?}): {}", .0.code, .0.message)]
    Refused(cohort_protocol::messages::Refusal),
    /// The node's own machinery failed (its event loop or training thread).
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    /// The error comes from what the aggregator sent (plan, weights) or
    /// from training on it, not from this node's own setup: the round is
    /// refused, and the node should back off and try again rather than
    /// stop. `NoData` and a data set that does not fit the model are the
    /// node's own problems.
    pub fn is_refusal(&self) -> bool {
        match self {
            NodeError::WrongFederation { .. }
            | NodeError::UnknownGroup(_)
            | NodeError::MissingWeights(_)
            | NodeError::BadPlan(_)
            | NodeError::BadWeights(_)
            | NodeError::Diverged(_)
            | NodeError::Protocol(_) => true,
            NodeError::Tasks(e) => matches!(
                e,
                cohort_tasks::TasksError::InvalidConfig(_) | cohort_tasks::TasksError::Layout(_)
            ),
            _ => false,
        }
    }

    /// Only the network driver (`agent`, feature `net`) touches files.
    #[cfg(feature = "net")]
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
        move |source| NodeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
