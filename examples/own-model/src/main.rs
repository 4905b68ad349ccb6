//! The residual MLP of this crate, federated three ways:
//!
//! ```text
//! cargo run --release -p cohort-example-own-model                 # simulated, 15 rounds
//! own-model sim --experiment examples/own-model/experiment.toml   # any experiment file
//! own-model aggregator --experiment examples/own-model/experiment.toml --data-dir agg --open
//! own-model node --config node.toml --connect agg/connect.toml    # on each data owner's machine
//! ```
//!
//! The flags of `aggregator` and `node` are those of `cohort-aggregator`
//! and `cohort-node` that a demo needs; the files are the same.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cohort_aggregator::service::AggregatorConfig;
use cohort_node::agent::NodeConfig;
use cohort_node::NodeError;
use cohort_simulator::ExperimentConfig;

#[derive(Debug, Parser)]
#[command(
    name = "own-model",
    about = "Federates a residual MLP defined in dfdx by this program: simulated (default), or as \
             the aggregator or a node of a real federation over libp2p."
)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// A simulated federation in this process (default: W0 on digits).
    Sim {
        /// Rounds of the default experiment.
        #[arg(long, default_value_t = 15)]
        rounds: u64,
        /// An experiment file instead (cohort-sim's format).
        #[arg(long)]
        experiment: Option<PathBuf>,
        /// With this program's own strategy (see `aggregator --our-strategy`).
        #[arg(long)]
        our_strategy: bool,
    },
    /// The aggregator of a real federation (see cohort-aggregator --help).
    Aggregator {
        /// Experiment file (cohort-sim's format).
        #[arg(long)]
        experiment: PathBuf,
        /// Identity, sealing key, checkpoints, metrics.jsonl, connect.toml.
        #[arg(long)]
        data_dir: PathBuf,
        /// Multiaddr to listen on (repeat for several).
        #[arg(long = "listen", default_value = "/ip4/0.0.0.0/tcp/7070")]
        listen: Vec<String>,
        /// Peer id allowed to join (repeat for several).
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Let any peer join (demos and tests only).
        #[arg(long)]
        open: bool,
        /// Aggregate with this program's own strategy (server momentum with
        /// a warmup + cosine server learning rate, FedNova-normalized)
        /// instead of the experiment's.
        #[arg(long)]
        our_strategy: bool,
    },
    /// A node (see cohort-node --help): its node file may name `my_resmlp`.
    Node {
        /// Node settings file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The connect.toml the aggregator wrote.
        #[arg(long)]
        connect: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let mode = Args::parse().mode.unwrap_or(Mode::Sim {
        rounds: 15,
        experiment: None,
        our_strategy: false,
    });
    if !matches!(mode, Mode::Sim { .. }) {
        use cohort_protocol::logging;
        logging::init(logging::LogFormat::Text, logging::NETWORK_FILTER);
    }
    let runtime = || tokio::runtime::Runtime::new().context("tokio runtime");
    match mode {
        Mode::Sim {
            rounds,
            experiment,
            our_strategy,
        } => {
            let result = match experiment {
                Some(path) => {
                    let cfg = ExperimentConfig::from_file(&path)?;
                    if our_strategy {
                        cohort_example_own_model::simulate_with_our_strategy(&cfg)?
                    } else {
                        cohort_example_own_model::simulate(&cfg)?
                    }
                }
                None => cohort_example_own_model::run(rounds)?,
            };
            for s in &result.final_central {
                println!(
                    "final: {} accuracy {:.3} ({:.1} s)",
                    s.task, s.accuracy, result.wall_s
                );
            }
        }
        Mode::Aggregator {
            experiment,
            data_dir,
            listen,
            allow,
            open,
            our_strategy,
        } => {
            let cfg = AggregatorConfig {
                data_dir,
                listen,
                allow,
                open,
                ..AggregatorConfig::default()
            };
            let aggregator =
                cohort_example_own_model::net::aggregator(cfg, &experiment, our_strategy)?;
            runtime()?.block_on(aggregator.run())?;
        }
        Mode::Node { config, connect } => {
            let mut cfg = NodeConfig::load(&config)?;
            if connect.is_some() {
                cfg.connect_file = connect;
            }
            let agent = cohort_example_own_model::net::node(cfg)?;
            println!(
                "own-model node {}: aggregator {}",
                agent.peer_id(),
                agent.aggregator()
            );
            match runtime()?.block_on(agent.run()) {
                Ok(()) => println!("federation finished"),
                Err(NodeError::Refused(r)) => {
                    anyhow::bail!("refused by the aggregator ({:?}): {}", r.code, r.message)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
