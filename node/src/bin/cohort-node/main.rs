//! `cohort-node`: a data owner's node in a Cohort federation.

mod agent;
mod config;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use cohort_node::NodeRuntime;
use cohort_protocol::seal::SealPublicKey;
use cohort_protocol::transport::{
    build_swarm_with, event_loop, load_or_create_identity, Admission, NetEvent,
};
use cohort_tasks::{load_dataset, partition, ModelRegistry, TaskSpec};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tracing::{debug, info};

use agent::{load_state, Agent, LocalTask, RefusedForGood, EXIT_REFUSED};
use config::NodeConfig;

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
}

fn load_tasks(cfg: &NodeConfig) -> anyhow::Result<Vec<LocalTask>> {
    let mut out = Vec::new();
    for (i, t) in cfg.tasks.iter().enumerate() {
        let split = load_dataset(&t.dataset).with_context(|| format!("task `{}`", t.name))?;
        let data = split.train;
        let mut idx: Vec<usize> = match &t.shard {
            Some(s) => {
                let mut parts = partition(&s.partitioner, &data.labels, None, s.count, s.seed)?;
                std::mem::take(&mut parts[s.index])
            }
            None => (0..data.len()).collect(),
        };
        if idx.is_empty() {
            bail!("task `{}`: this node's shard is empty", t.name);
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ (i as u64 + 1));
        idx.shuffle(&mut rng);
        let n_test = (idx.len() as f64 * cfg.holdout).round() as usize;
        let test = idx.split_off(idx.len() - n_test.min(idx.len().saturating_sub(1)));
        info!(task = %t.name, train = idx.len(), test = test.len(), "local data");
        out.push(LocalTask {
            name: t.name.clone(),
            data,
            train: idx,
            test,
        });
    }
    Ok(out)
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
    if args.print_config {
        println!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let identity = load_or_create_identity(&cfg.data_dir.join("identity.key"))?;
    let peer_id = identity.public().to_peer_id();
    if args.print_peer_id {
        println!("{peer_id}");
        return Ok(());
    }
    let (addr, key) = cfg.aggregator()?;
    let addr: Multiaddr = addr
        .parse()
        .with_context(|| format!("`{addr}` is not a multiaddr"))?;
    let Some(Protocol::P2p(aggregator)) = addr.iter().last() else {
        bail!("the aggregator's address must end in /p2p/<its peer id>: {addr}");
    };
    let aggregator: PeerId = aggregator;
    let key: SealPublicKey = key
        .parse()
        .with_context(|| format!("`{key}` is not a sealing key"))?;

    let tasks = load_tasks(&cfg)?;
    let spec = ModelRegistry::default()
        .build(
            &cfg.backbone,
            cfg.backend,
            tasks
                .iter()
                .map(|t| TaskSpec::new(t.name.clone(), t.data.classes))
                .collect(),
        )
        .with_context(|| format!("the model `{}`", cfg.backbone))?;
    let mut runtime = NodeRuntime::new(peer_id.to_string(), cfg.federation.clone(), spec, key);
    runtime.limits = cfg.limits.clone();
    let state_path = cfg.data_dir.join("state.bin");
    runtime.state = load_state(&state_path, &runtime)?;
    println!(
        "cohort-node {peer_id}: federation `{}`, aggregator {addr}",
        cfg.federation
    );

    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async move {
        // A node talks to its aggregator only, and only asks: no other peer
        // holds a connection, and no inbound request is accepted at all.
        let swarm = build_swarm_with(identity, &cfg.net, Admission::client_of([aggregator]))?;
        let (client, mut events, lp) = event_loop(swarm);
        tokio::spawn(lp.run());
        // The loop reports connections (and would hand over requests): read
        // them, so that nothing piles up whatever the aggregator does.
        tokio::spawn(async move {
            while let Some(e) = events.next().await {
                match e {
                    NetEvent::Connected(p) => debug!(peer = %p, "connected"),
                    NetEvent::Disconnected(p) => debug!(peer = %p, "disconnected"),
                    // Never happens (no inbound protocol); dropping the
                    // channel is the answer.
                    NetEvent::Request { peer, .. } => debug!(%peer, "inbound request dropped"),
                    NetEvent::Listening(_) | NetEvent::InboundFailure { .. } => {}
                }
            }
        });
        let request_timeout =
            std::time::Duration::from_secs(cfg.net.request_timeout_s.max(1).saturating_add(30));
        let mut agent = Agent::new(
            client,
            aggregator,
            addr,
            runtime,
            tasks,
            state_path,
            cfg.backoff.clone(),
        );
        agent.request_timeout = request_timeout;
        agent.run().await
    });
    match result {
        Ok(()) => {
            println!("federation finished");
            Ok(())
        }
        Err(e) => match e.downcast_ref::<RefusedForGood>() {
            Some(r) => {
                eprintln!("{r}");
                std::process::exit(EXIT_REFUSED);
            }
            None => Err(e),
        },
    }
}
