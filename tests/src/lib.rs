//! Helpers shared by the integration tests in `tests/tests/`.

use cohort_aggregator::StrategyConfig;
use cohort_simulator::config::{ClientData, TaskConfig};
use cohort_simulator::ExperimentConfig;
use cohort_tasks::{Backend, ModelRegistry, Partitioner, SharedModel, TaskSpec};

/// FedAvg on the 8x8 digits: `clients` clients, all of them every round.
pub fn digits(clients: usize, partitioner: Partitioner, rounds: u64) -> ExperimentConfig {
    let mut cfg = ExperimentConfig {
        name: "digits".into(),
        seed: 3,
        rounds,
        backbone: "mlp8x8".into(),
        tasks: vec![TaskConfig {
            name: "digits".into(),
            dataset: "digits8x8".into(),
            holders: 1.0,
        }],
        strategy: StrategyConfig::default(),
        ..ExperimentConfig::default()
    };
    cfg.clients.count = clients;
    cfg.clients.per_round = clients;
    cfg.clients.data = ClientData::Partition { partitioner };
    cfg.engine.federation = "digits".into();
    cfg.engine.train.epochs = 3;
    cfg.engine.train.batch_size = 8;
    cfg.engine.train.lr = 0.2;
    cfg.engine.codec.bits = 32;
    cfg
}

/// The built-in model `name` (on `auto`) with the given tasks.
pub fn builtin_model(name: &str, tasks: &[(&str, usize)]) -> SharedModel {
    ModelRegistry::default()
        .build(
            name,
            Backend::Auto,
            tasks.iter().map(|(t, c)| TaskSpec::new(*t, *c)).collect(),
        )
        .expect("built-in model")
}

/// Central accuracy of `task` after the last round, in percent.
pub fn pct(r: &cohort_simulator::ExperimentResult, task: &str) -> f32 {
    100.0 * r.accuracy(task).unwrap_or(f32::NAN)
}

pub mod net;
