//! Bring your own model: a residual MLP written as a dfdx builder type,
//! registered under a name, and trained by a simulated federation of 20
//! clients on real data (the embedded MNIST 5k: 4000 training digits split
//! among the clients, 1000 held out), or by a real federation of processes
//! ([`net`]: one aggregator, any number of nodes, on `experiment.toml`).
//! This crate sits outside the library crates on purpose: it uses only
//! their public API, as a user's program would. README.md ("Bring your own
//! model", "With your own model") shows this code.

pub mod net;

pub mod strategy;

use cohort_aggregator::Strategy;
use cohort_simulator::config::TaskConfig;
use cohort_simulator::{
    run_experiment_with, run_experiment_with_strategy, ExperimentConfig, ExperimentResult,
    RoundMetrics,
};
use cohort_tasks::dfdx::nn::builders::{DropoutOneIn, LayerNorm1D, Linear, ReLU, Residual};
use cohort_tasks::{Backend, ModelRegistry};

/// A pre-norm residual block of width 128: `x + dropout(relu(W layernorm(x) + b))`.
/// `DropoutOneIn<10>` drops 10% in training only (dfdx's `Dropout` builder
/// would always be p = 0.5: a type cannot carry its `p`).
pub type Block = Residual<(LayerNorm1D<128>, Linear<128, 128>, ReLU, DropoutOneIn<10>)>;
/// The backbone: 784 pixels in, 128 features out. Cohort adds one linear
/// head per task on the features and federates backbone and heads.
pub type MyResMlp = (Linear<784, 128>, ReLU, Block, Block, LayerNorm1D<128>);

/// The built-in models plus ours, under the name the config uses. The const
/// generics are `MyResMlp`'s input and feature widths, checked at compile
/// time.
pub fn registry() -> ModelRegistry {
    let mut models = ModelRegistry::default();
    models.register_dfdx::<MyResMlp, 784, 128>("my_resmlp", "residual MLP, dropout 0.1");
    models
}

/// The default workload W0 (20 clients with Dirichlet(0.5) label skew, 10 a
/// round, SGD lr 0.1, FedAvgM, 8-bit deltas) with our model, on the digits
/// task only so that it takes seconds. Prints each round's central accuracy
/// (on the held-out digits).
pub fn run(rounds: u64) -> anyhow::Result<ExperimentResult> {
    let cfg = ExperimentConfig {
        rounds,
        backbone: "my_resmlp".into(),
        // A model defined in dfdx trains on the dfdx backend.
        backend: Backend::Dfdx,
        tasks: vec![TaskConfig {
            name: "digits".into(),
            dataset: "mnist5k".into(),
            holders: 1.0,
        }],
        ..ExperimentConfig::default()
    };
    simulate(&cfg)
}

/// Any experiment with our model in the registry, simulated.
pub fn simulate(cfg: &ExperimentConfig) -> anyhow::Result<ExperimentResult> {
    Ok(run_experiment_with(cfg, &registry(), print_round)?)
}

/// Our strategy ([`strategy::ScheduledMomentum`]) as the network mode uses
/// it: server momentum 0.5, a server learning rate warming up over 2 rounds
/// to 1 and decaying to 0.1 by round `rounds`, FedNova's normalization by
/// local steps.
pub fn scheduled_momentum(rounds: u64) -> Box<dyn Strategy> {
    let schedule = strategy::LrSchedule {
        peak: 1.0,
        warmup: 2,
        total: rounds,
        floor: 0.1,
    };
    Box::new(strategy::ScheduledMomentum::new(schedule, 0.5, true))
}

/// [`simulate`] with our strategy instead of the experiment's.
pub fn simulate_with_our_strategy(cfg: &ExperimentConfig) -> anyhow::Result<ExperimentResult> {
    let rounds = cfg.rounds;
    let make = move || scheduled_momentum(rounds);
    Ok(run_experiment_with_strategy(
        cfg,
        &registry(),
        &make,
        print_round,
    )?)
}

fn print_round(m: &RoundMetrics) {
    for s in &m.central {
        println!(
            "round {:>3}  {} accuracy {:.3}",
            m.round, s.task, s.accuracy
        );
    }
}
