//! Cohort's aggregator library: strategies, the transport-free round engine
//! and checkpoints. The libp2p binary and the simulator drive the same
//! [`Engine`]; it does no I/O (except [`checkpoint`], on a folder the caller
//! names), reads no clock (time comes in as `now_ms`) and logs with
//! `tracing`.
//!
//! # Calling sequence
//!
//! Any [`Strategy`] drives the engine: a built-in one
//! ([`strategy_from_config`]) or a program's own (`Box::new(MyStrategy)`,
//! see `examples/own-model/src/strategy.rs`); the engine sees only the
//! trait. The strategy is handed over once, at construction:
//!
//! ```text
//! // Start: Engine::new calls strategy.initial_parameters(&layout, &initial) once
//! // (checked against the layout); a restart resumes instead, with a fresh strategy
//! // value whose restore(state, &layout) the checkpoint calls (never initial_parameters):
//! let mut e = match Engine::resume(dir, cfg.clone(), make_strategy())? {
//!     Some(e) => e,                                           // newest good checkpoint
//!     None => Engine::new(cfg, layout, initial, make_strategy())?,
//! };
//! e.check_layout(&model_layout)?;                             // after a resume: same model?
//! e.register(NodeInfo { id, tasks, fingerprint })?;           // hello; sub-layout fingerprint checked
//! // synchronous rounds
//! let plans = e.start_round(now)?;                            // sample + one RoundPlan per node
//! //   send each node its plan and e.weights_for(&plan.upload-or-held groups)
//! e.submit(OpenedUpdate { header, groups }, now)              // or submit_packed(&header, &opened_plaintext, now)
//!   -> Ok(SubmitOutcome) | Err(Refusal { code, message })    // refusals change nothing
//! e.fail(node, FailureReason::Dropout); e.unregister(node);   // what the transport saw
//! if let Some(report) = e.poll(now) { e.save_checkpoint(dir)?; }   // closes at all-in or at the deadline
//! //   closing calls strategy.aggregate(&AggregateInput { round, combined, results, failures }, &mut global)
//! // federated evaluation after a round (optional):
//! let asked = e.configure_evaluate(round);                    // strategy.configure_evaluate (default: all)
//! //   send Evaluate to `asked`, collect EvalReports (and who did not answer)
//! let metrics = e.aggregate_evaluate(round, &reports, &failures);   // sanitized, then strategy.aggregate_evaluate
//! // asynchronous (FedBuff): no start_round; e.plan_for(node, now) on request,
//! // submit as above; the model steps every K accepted updates; poll hands out the reports.
//! ```
//!
//! # Strategies
//!
//! [`Strategy`] follows Flower's: `initial_parameters`, `configure` (pick
//! nodes and their [`TrainConfig`](cohort_protocol::messages::TrainConfig);
//! randomness only from the `&mut dyn RngCore` the engine passes, its own
//! checkpointed ChaCha8), `update_weight` (per update and group, e.g.
//! FedNova's `examples / steps`), `combine` (robust strategies), `aggregate`
//! (the server step, with an [`AggregateInput`]: the combined deltas, one
//! [`ClientResult`] per accepted update (node, claimed examples, the weight
//! it was combined with, its header's training metrics, local steps, L2
//! norm before clipping, clip factor, staleness, discount) and the
//! failures), `configure_evaluate` / `aggregate_evaluate` (federated
//! evaluation; default: all nodes, sample-weighted means per task), and
//! `state` / `restore` ([`StrategyState`]: steps, free-named tensors,
//! scalars, opaque JSON), which the checkpoints store without a naming
//! rule (see [`checkpoint`] for the bounds they check).
//!
//! # Decisions
//! - Weights: the backbone by `header.num_examples`, `head/<t>` by the
//!   samples of task `t` in `header.metrics`; each claim must be positive and
//!   at most the samples the node registered times the plan's epochs.
//!   A group is aggregated over the updates that carry it only.
//!   A claim counts for at most `EngineConfig::max_samples_per_node`, and in
//!   a weighted mean no update carries more than `max_weight_share` (default
//!   1/2) of a group's weight: the heaviest `ceil(1/share)` updates of a
//!   group are held beside the streamed sum and capped by water-filling when
//!   the round closes.
//! - Norm bound: `max_update_norm`, by default `sqrt(parameters)` (see
//!   [`default_max_update_norm`]).
//! - After every server step the touched weights and the strategy's state
//!   (momentum, moments) must be finite; otherwise the step is undone (model
//!   and strategy state as before), the round fails (`rolled_back`), and the
//!   version does not move.
//! - Group policy `local`: never in a plan's `upload`, refused if sent, never
//!   changed on the aggregator.
//! - Checks, in order, before anything counts: federation, registered node,
//!   round / plan / deadline / duplicate / base version (and staleness in
//!   async), groups allowed, encoded lengths (`decoded_len` against the
//!   layout), sample weights, retained-memory cap, decoding, finite values,
//!   L2 norm bound over the whole update. The checks read each encoding once
//!   (`codec::check`: sum of squares a block at a time, no decoded copy);
//!   only when all pass is it decoded, straight into the running sum.
//! - Mean-based strategies accumulate `weight * delta` per group in `f32` in
//!   **submission order** (the simulator submits in node-id order so that
//!   runs are deterministic); memory is O(model) whatever the number of
//!   contributors. Median, trimmed mean and Krum keep the decoded deltas, up
//!   to `EngineConfig::max_retained_bytes` (refusal `MemoryCap` beyond).
//! - FedBuff: an update `s` versions stale has its delta multiplied by the
//!   discount (default `1/sqrt(1+s)`) while its example weight is unchanged,
//!   so stale updates move the model less (as in Nguyen et al.); beyond
//!   `max_staleness` it is refused.
//! - Sampling uses ChaCha8 seeded from `cfg.seed`; its position is saved in
//!   checkpoints, so a resumed engine (with the same nodes registered)
//!   samples and steps bit-identically. Federated evaluation draws from a
//!   separate stream derived from the seed and the round
//!   ([`Engine::configure_evaluate`]), so it never shifts training sampling.
//! - A sync round closes when every sampled node is accepted or failed, or at
//!   the deadline (unanswered nodes become `Timeout`, or `Refused(code)` if
//!   their updates were refused). Below quorum the model does not move, and
//!   the round still ends.
//! - Differential privacy (`EngineConfig::privacy`, see [`privacy`]):
//!   Poisson sampling, every update clipped over all its groups, uniform
//!   weights, Gaussian noise on every global group's sum, a fixed
//!   denominator, and an RDP accountant whose epsilon goes in each
//!   [`RoundReport`]; robust combiners and FedBuff are refused.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod experiment;
pub mod privacy;
mod registry;
#[cfg(feature = "service")]
pub mod service;
pub mod strategy;

/// Refusal codes are the wire's: the engine's refusals go to nodes as they are.
pub use cohort_protocol::messages::RefusalCode;
pub use config::{
    default_max_update_norm, validate_codec, validate_train, w0_engine, w0_strategy, Discount,
    EngineConfig, FedBuffConfig, GroupPolicy, LrSchedule, Mode, Sampling,
};
pub use engine::{
    Engine, Evaluator, FailureReason, NodeInfo, OpenedUpdate, Refusal, RoundReport, SubmitOutcome,
};
pub use error::AggError;
pub use experiment::Federation;
pub use privacy::{
    AdaptiveClip, PrivacyConfig, PrivacyMode, PrivacyOverrides, PrivacyReport, PrivacyState,
};
pub use strategy::{
    default_configure, server_strategy, strategy_from_config, weighted_eval_metrics,
    AdaptiveParams, AggregateInput, ClientResult, Collect, Combiner, KrumParams, Metrics,
    MomentumParams, ProxParams, ServerOpt, ServerStrategy, Strategy, StrategyConfig, StrategyKind,
    StrategyState, TrimParams, MAX_STATE_NAME_LEN, MAX_STATE_SCALARS, MAX_STATE_TENSORS_FACTOR,
};
