//! Cohort's aggregator library: strategies and the transport-free round
//! engine, driven alike by the libp2p binary and by the simulator.
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod strategy;

pub use config::{Discount, EngineConfig, FedBuffConfig, GroupPolicy, Mode, Sampling};
pub use engine::{
    Engine, Evaluator, FailureReason, NodeInfo, OpenedUpdate, Refusal, RefusalCode, RoundReport, SubmitOutcome,
};
pub use error::AggError;
pub use strategy::{
    server_strategy, strategy_from_config, Collect, Combiner, Metrics, ServerOpt, ServerStrategy, Strategy,
    StrategyConfig, StrategyKind, StrategyState,
};
