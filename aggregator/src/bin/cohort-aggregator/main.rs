//! `cohort-aggregator`: the aggregator of a real federation over libp2p.
//!
//! One task runs the event loop that owns the Swarm; the service task owns
//! the engine and answers through channels (see `service.rs`).

mod config;
mod service;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use cohort_aggregator::{checkpoint, strategy_from_config, Engine};
use cohort_protocol::p2p::SubmitCap;
use cohort_protocol::seal::SealKeyPair;
use cohort_protocol::transport::{
    build_swarm_with, event_loop, load_or_create_identity, Admission,
};
use cohort_tasks::{load_dataset, Dataset, ModelRegistry, SharedModel, TaskSpec};
use libp2p::Multiaddr;
use tracing::info;

use config::{allowlist, AggregatorConfig, FederationConfig};
use service::{Parts, Service};

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
}

fn settings(args: &Args) -> anyhow::Result<(AggregatorConfig, FederationConfig)> {
    let mut cfg = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
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
    fed.validate()?;
    Ok((cfg, fed))
}

/// The experiment's model (`backbone` on `backend`, a head per task) and
/// the central test sets of the tasks that name a data set.
fn build_model(
    fed: &FederationConfig,
    models: &ModelRegistry,
) -> anyhow::Result<(SharedModel, Vec<(String, Dataset)>)> {
    let mut tasks = Vec::new();
    let mut tests = Vec::new();
    for t in &fed.tasks {
        let classes = match &t.dataset {
            Some(name) => {
                let split = load_dataset(name).with_context(|| format!("task `{}`", t.name))?;
                let classes = split.test.classes;
                tests.push((t.name.clone(), split.test));
                classes
            }
            None => t.classes.unwrap_or(0),
        };
        tasks.push(TaskSpec::new(t.name.clone(), t.classes.unwrap_or(classes)));
    }
    let model = models
        .build(&fed.backbone, fed.backend, tasks)
        .with_context(|| format!("the experiment's model `{}`", fed.backbone))?;
    Ok((model, tests))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn,libp2p_request_response=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (cfg, fed) = settings(&args)?;
    if args.print_config {
        println!("# deployment\n{}", toml::to_string_pretty(&cfg)?);
        println!("# federation\n{}", toml::to_string_pretty(&fed)?);
        return Ok(());
    }
    let (model, tests) = build_model(&fed, &ModelRegistry::default())?;
    let layout = model.layout();
    if let Some(path) = &args.export_initial {
        let bytes =
            checkpoint::weights_to_safetensors(&layout, &model.init(fed.federation().init_seed()))?;
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
        return Ok(());
    }
    let allow = allowlist(&cfg)?;
    if allow.as_ref().is_some_and(|a| a.is_empty()) {
        bail!("nobody may join: give --allow <peer id>, --allow-file <file>, or --open");
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // One aggregator per data folder: held until the process ends.
    let _lock = cohort_aggregator::checkpoint::lock_dir(&cfg.data_dir)?;
    let engine_cfg = fed.engine_config();
    let checkpoints = cfg.data_dir.join("checkpoints");
    let resumed = Engine::resume(
        &checkpoints,
        engine_cfg.clone(),
        strategy_from_config(&fed.strategy),
    )
    .with_context(|| {
        format!(
            "resuming from {} (a different experiment needs another --data-dir)",
            checkpoints.display()
        )
    })?;
    let engine = match resumed {
        Some(e) => {
            e.check_layout(&layout).map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "the checkpoints in {} are of another model: use another --data-dir, or the experiment they were written for",
                    checkpoints.display()
                ))
            })?;
            info!(
                round = e.round(),
                version = e.version(),
                "resumed from checkpoint"
            );
            e
        }
        None => Engine::new(
            engine_cfg,
            layout,
            model.init(fed.federation().init_seed()),
            strategy_from_config(&fed.strategy),
        )?,
    };

    let identity = load_or_create_identity(&cfg.data_dir.join("identity.key"))?;
    let keys = SealKeyPair::load_or_create(&cfg.data_dir.join("seal.key"))?;
    let peer_id = identity.public().to_peer_id();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        // Admission at the connection: with an allowlist, a stranger is
        // refused once its identity is authenticated, before any stream.
        let submit_cap = SubmitCap::default();
        let admission = Admission {
            allow: allow.as_ref().map(|a| a.iter().copied().collect()),
            serve: true,
            submit_cap: submit_cap.clone(),
        };
        let swarm = build_swarm_with(identity, &cfg.net, admission)?;
        let (mut client, events, lp) = event_loop(swarm);
        tokio::spawn(lp.run());
        for a in &cfg.listen {
            let addr: Multiaddr = a
                .parse()
                .with_context(|| format!("`{a}` is not a multiaddr"))?;
            client.listen(addr).await.map_err(anyhow::Error::msg)?;
        }
        let parts = Parts {
            engine,
            fed,
            model,
            tests,
            keys,
            allow,
            client,
            peer_id,
            submit_cap,
            control_limit: cfg.net.limits.max_control,
        };
        let service = Service::new(parts, &cfg)?;
        service.run(events).await
    })
}
