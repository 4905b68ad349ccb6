//! Cohort's node runtime: what a data owner's process does with a round plan.
//!
//! [`NodeRuntime::run_round`] takes a [`RoundPlan`](cohort_protocol::messages::RoundPlan),
//! the global weights of the node's groups and its local data, and returns the
//! sealed [`Update`](cohort_protocol::messages::Update) to send:
//! train (dfdx, through `cohort-tasks`) → delta per uploaded group → add the
//! error-feedback residual → encode → seal to the aggregator's key. Groups the
//! node holds but does not upload are *local* (personalized heads): they are
//! trained, kept in [`NodeState`], and never leave the node.
//!
//! The runtime does no I/O: the simulator calls it directly, the libp2p node
//! binary calls it from a blocking thread beside its event loop.

mod error;
mod runtime;

pub use error::NodeError;
pub use runtime::{mix_seed, NodeLimits, NodeRuntime, NodeState, RoundOutput};
