//! `cohort-node`: a data owner's node in a Cohort federation. A thin main
//! over [`cohort_node::agent::Agent`]: flags over the node file, then run.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cohort_node::agent::{peer_id_of, Agent, NodeConfig};
use cohort_node::NodeError;
use cohort_protocol::logging::{self, LogFormat};
use cohort_tasks::ModelRegistry;

/// Exit code when the aggregator refuses this node for good.
const EXIT_REFUSED: i32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "cohort-node",
    version,
    about = "A data owner's node in a Cohort federation: it dials the aggregator, follows its round \
             plans, trains on local data, and sends sealed, quantized updates.",
    long_about = "A data owner's node in a Cohort federation.\n\n\
        The node dials the aggregator over libp2p, says hello (its tasks, their sample counts and the \
        fingerprint of its model), then asks for round plans: for each it downloads the model, trains \
        on its local data (off the network thread), encodes the delta with error feedback, seals it to \
        the aggregator's key and submits it. When the aggregator asks, it evaluates the global model \
        with its own heads on its local test split and reports. It reconnects with backoff when the \
        connection is lost. Its identity and its state (local heads, error-feedback residuals) live \
        in --data-dir and survive restarts.\n\n\
        Data and tasks come from the --config file ([[tasks]] with name, dataset and optional shard); \
        so does the model (backbone, e.g. mlp28) and its training backend (--backend: dfdx, dfdx 0.13's \
        autodiff, for every architecture but the CNN; gemm, the hand-written executor of the built-in \
        architectures, faster on the MLPs and the only one for cnn28; auto, the default, picks gemm where \
        it can).\n\n\
        The aggregator admits only allowed peer ids: send its operator the output of \
        `cohort-node --data-dir <dir> --print-peer-id`. A peer that is not allowed is refused at the \
        connection, without an answer: the node keeps retrying and says so in its log.\n\n\
        Exit codes: 0 when the federation has finished, 3 when the aggregator refuses this node \
        (another federation, protocol version or model), 1 on other errors."
)]
struct Args {
    /// Node settings file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The aggregator's multiaddr, ending in /p2p/<peer id>.
    #[arg(long)]
    aggregator: Option<String>,
    /// The aggregator's sealing key (cohort-pk1:...).
    #[arg(long)]
    aggregator_key: Option<String>,
    /// The connect.toml the aggregator wrote (address, peer id, key, federation).
    #[arg(long)]
    connect: Option<PathBuf>,
    /// The federation's name (the aggregator's engine.federation).
    #[arg(long)]
    federation: Option<String>,
    /// Folder for the identity and the persisted state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Training backend: auto (gemm where it has the architecture, else
    /// dfdx), dfdx, gemm. Both backends of an architecture share its
    /// layout, so the aggregator does not care which one a node uses.
    #[arg(long)]
    backend: Option<cohort_tasks::Backend>,
    /// Print this node's peer id (creating its identity if needed) and exit.
    #[arg(long)]
    print_peer_id: bool,
    /// Print the effective settings and exit.
    #[arg(long)]
    print_config: bool,
    /// Log lines on stderr: text (coloured only on a terminal without
    /// NO_COLOR) or json (one object per line: timestamp, level, target,
    /// fields.message, spans). RUST_LOG filters them.
    #[arg(long, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The node file with the flags applied over it.
fn settings(args: &Args) -> anyhow::Result<NodeConfig> {
    let mut cfg = match &args.config {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig::default(),
    };
    if let Some(a) = &args.aggregator {
        cfg.aggregator = Some(a.clone());
    }
    if let Some(b) = args.backend {
        cfg.backend = b;
    }
    if let Some(k) = &args.aggregator_key {
        cfg.aggregator_key = Some(k.clone());
    }
    if let Some(c) = &args.connect {
        cfg.connect_file = Some(c.clone());
    }
    if let Some(f) = &args.federation {
        cfg.federation = f.clone();
    }
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_format, logging::NETWORK_FILTER);
    let cfg = settings(&args)?;
    if args.print_config {
        println!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    if args.print_peer_id {
        println!("{}", peer_id_of(&cfg.data_dir)?);
        return Ok(());
    }
    let agent =
        Agent::from_config(cfg, &ModelRegistry::default()).context("setting up the node")?;
    println!(
        "cohort-node {}: federation `{}`, aggregator {}",
        agent.peer_id(),
        agent.federation(),
        agent.aggregator()
    );
    // One thread for the event loop and the session (training has its own,
    // from the blocking pool): fewer wake-ups across threads per request,
    // which on a machine shared by many nodes is most of a node's CPU.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(agent.run()) {
        Ok(()) => {
            println!("federation finished");
            Ok(())
        }
        Err(NodeError::Refused(r)) => {
            eprintln!("refused by the aggregator ({:?}): {}", r.code, r.message);
            std::process::exit(EXIT_REFUSED);
        }
        Err(e) => Err(e.into()),
    }
}
