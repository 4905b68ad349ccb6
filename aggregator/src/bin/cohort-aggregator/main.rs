//! `cohort-aggregator`: the aggregator of a real federation over libp2p. A
//! thin main over [`cohort_aggregator::service::Aggregator`]: flags over the
//! deployment and experiment files, then run.

use std::path::PathBuf;

use clap::Parser;
use cohort_aggregator::service::{Aggregator, AggregatorConfig, FederationConfig};
use cohort_aggregator::AggError;
use cohort_protocol::logging::{self, LogFormat};
use cohort_tasks::ModelRegistry;

#[derive(Debug, Parser)]
#[command(
    name = "cohort-aggregator",
    version,
    about = "The aggregator of a Cohort federation: nodes connect over libp2p (TCP or QUIC, Noise, Yamux), \
             receive round plans and the model, and send sealed, quantized updates.",
    long_about = "The aggregator of a Cohort federation.\n\n\
        It reads the same experiment file as cohort-sim (rounds, tasks, strategy, engine settings; the \
        simulation-only sections are ignored), keeps its libp2p identity, its sealing key, a checkpoint \
        per round and metrics.jsonl in --data-dir, and resumes from the newest checkpoint when restarted.\n\n\
        Access control: only the peer ids given with --allow or --allow-file may join, fetch the model or \
        submit; everyone else is refused at the connection (right after the handshake, before any \
        request) with a logged reason. A node prints its peer id with \
        `cohort-node id`. --open lets anyone in (tests and demos only).\n\n\
        At start it prints what node operators need: its addresses, peer id and sealing key (also written \
        to <data-dir>/connect.toml)."
)]
struct Args {
    /// Deployment settings file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Experiment file in cohort-sim's format; default: the embedded W0.
    #[arg(long)]
    experiment: Option<PathBuf>,
    /// Folder for the identity, the sealing key, checkpoints and metrics.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Multiaddr to listen on (repeat for several). Default: TCP and QUIC on port 7070.
    #[arg(long = "listen")]
    listen: Vec<String>,
    /// Peer id allowed to join (repeat for several).
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// File with one allowed peer id per line.
    #[arg(long)]
    allow_file: Option<PathBuf>,
    /// Let any peer join (no access control).
    #[arg(long)]
    open: bool,
    /// Override the experiment's number of rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Override the experiment's clients.count (nodes awaited before round 1).
    #[arg(long)]
    nodes: Option<usize>,
    /// Override clients.per_round (nodes sampled per round).
    #[arg(long)]
    per_round: Option<usize>,
    /// Override engine.deadline_ms (time a round waits for its nodes).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Seconds to keep answering after the last round.
    #[arg(long)]
    linger_s: Option<u64>,
    /// Past model versions kept for delta downloads (0 = full downloads only).
    #[arg(long)]
    delta_versions: Option<usize>,
    /// Print the effective settings and exit.
    #[arg(long)]
    print_config: bool,
    /// Write the initial global weights (safetensors, as checkpoints are)
    /// to FILE and exit: the weights `cohort-sim` starts from for the same
    /// experiment file.
    #[arg(long, value_name = "FILE")]
    export_initial: Option<PathBuf>,
    /// Differential privacy (the experiment's `[privacy]`): central, client
    /// or off. Any other --dp-* flag implies central unless the file or
    /// this flag says otherwise.
    #[arg(long)]
    dp_mode: Option<String>,
    /// Differential privacy: solve the noise multiplier for this epsilon
    /// over the planned rounds.
    #[arg(long)]
    dp_epsilon: Option<f64>,
    /// Differential privacy: the noise multiplier (noise std / clip norm).
    #[arg(long)]
    dp_noise_multiplier: Option<f64>,
    /// Differential privacy: the clip norm (initial one when adaptive).
    #[arg(long)]
    dp_clip: Option<f64>,
    /// Differential privacy: delta.
    #[arg(long)]
    dp_delta: Option<f64>,
    /// Differential privacy: adaptive clipping to this quantile.
    #[arg(long)]
    dp_adaptive_quantile: Option<f64>,
    /// Differential privacy: stop before a round that would spend more.
    #[arg(long)]
    dp_budget: Option<f64>,
    /// Log lines on stderr: text (coloured only on a terminal without
    /// NO_COLOR) or json (one object per line: timestamp, level, target,
    /// fields.message, spans). RUST_LOG filters them.
    #[arg(long, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn settings(args: &Args) -> anyhow::Result<(AggregatorConfig, FederationConfig)> {
    let mut cfg = match &args.config {
        Some(p) => AggregatorConfig::load(p)?,
        None => AggregatorConfig::default(),
    };
    if let Some(e) = &args.experiment {
        cfg.experiment = Some(e.clone());
    }
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if !args.listen.is_empty() {
        cfg.listen = args.listen.clone();
    }
    cfg.allow.extend(args.allow.iter().cloned());
    if let Some(f) = &args.allow_file {
        cfg.allow_file = Some(f.clone());
    }
    cfg.open |= args.open;
    if let Some(l) = args.linger_s {
        cfg.linger_s = l;
    }
    if let Some(d) = args.delta_versions {
        cfg.delta_versions = d;
    }
    let mut fed = match &cfg.experiment {
        Some(p) => FederationConfig::load(p)?,
        None => FederationConfig::default(),
    };
    if let Some(r) = args.rounds {
        fed.rounds = r;
    }
    if let Some(n) = args.nodes {
        fed.clients.count = n;
    }
    if let Some(n) = args.per_round {
        fed.clients.per_round = n;
    }
    if let Some(d) = args.deadline_ms {
        fed.engine.deadline_ms = d;
    }
    fed.privacy.apply(&cohort_aggregator::PrivacyOverrides {
        mode: args.dp_mode.clone(),
        target_epsilon: args.dp_epsilon,
        noise_multiplier: args.dp_noise_multiplier,
        clip: args.dp_clip,
        delta: args.dp_delta,
        adaptive_quantile: args.dp_adaptive_quantile,
        budget_epsilon: args.dp_budget,
    })?;
    fed.validate()?;
    Ok((cfg, fed))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_format, logging::NETWORK_FILTER);
    let (cfg, fed) = settings(&args)?;
    if args.print_config {
        println!("# deployment\n{}", toml::to_string_pretty(&cfg)?);
        println!("# federation\n{}", toml::to_string_pretty(&fed)?);
        return Ok(());
    }
    let data_dir = cfg.data_dir.clone();
    let aggregator = Aggregator::from_config(cfg, fed, &ModelRegistry::default())?;
    if let Some(path) = &args.export_initial {
        aggregator.export_initial(path)?;
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(aggregator.run()).map_err(|e| {
        let hint = match &e {
            AggError::ModelChanged { .. } => Some(
                "the checkpoints are of another model: use another --data-dir, or the experiment they were written for",
            ),
            AggError::Checkpoint(_) => {
                Some("resuming failed (a different experiment needs another --data-dir)")
            }
            _ => None,
        };
        let e = anyhow::Error::new(e);
        match hint {
            Some(h) => e.context(format!("{h}: {}", data_dir.join("checkpoints").display())),
            None => e,
        }
    })
}
