//! Cohort's node: what a data owner's process does.
//!
//! - [`NodeRuntime::run_round`] takes a
//!   [`RoundPlan`](cohort_protocol::messages::RoundPlan), the global weights
//!   of the node's groups and its local data, and returns the sealed
//!   [`Update`](cohort_protocol::messages::Update) to send: train (through
//!   the [`cohort_tasks::Model`] it holds) → delta per uploaded group → add
//!   the error-feedback residual → encode → seal to the aggregator's key.
//!   Groups the node holds but does not upload are *local* (personalized
//!   heads): they are trained, kept in [`NodeState`], and never leave the
//!   node. The runtime does no I/O: the simulator calls it directly.
//! - [`agent::Agent`] (feature `net`, on by default) is the network driver
//!   that `cohort-node` runs: hello, plans, downloads, training off the
//!   event loop, submit, evaluation, reconnection, persisted state. A
//!   program runs it with its own model and data (see
//!   `examples/own-model`).

#[cfg(feature = "net")]
pub mod agent;
mod error;
mod runtime;

pub use error::NodeError;
pub use runtime::{mix_seed, NodeLimits, NodeRuntime, NodeState, RoundOutput};
