//! `cohort-sim`: run a federated, multi-task experiment in one process.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cohort_aggregator::{FedBuffConfig, Mode, StrategyConfig};
use cohort_protocol::codec::TopK;
use cohort_protocol::logging::{self, LogFormat};
use cohort_simulator::checkpoint::experiment_hash;
use cohort_simulator::compare::{compare, Comparison, Run};
use cohort_simulator::config::{Attack, ClientData, HeadPolicy, Sharing, TaskConfig};
use cohort_simulator::metrics::summary_table;
use cohort_simulator::runs::{run_repeats, RunDir, DEFAULT_BASE};
use cohort_simulator::{
    resume_config, resume_experiment, run_experiment, ExperimentConfig, ExperimentResult,
    RoundMetrics,
};
use cohort_tasks::{Backend, ModelRegistry, Partitioner};
use indicatif::{ProgressBar, ProgressStyle};

/// Runs a federated, multi-task learning experiment with many virtual nodes in
/// one process: the real node runtime (local training, 8-bit deltas with
/// error feedback, sealing) and the real aggregator engine, over an
/// in-process transport on a virtual clock.
///
/// Models train on one of two backends (`--backend`): dfdx (dfdx 0.13's
/// autodiff and optimizer kernels; every architecture but the CNN) or gemm
/// (the hand-written executor of the built-in architectures, about 1.5x
/// faster on the MLPs, the only one that runs `cnn28`). `auto`, the
/// default, picks gemm where it has the architecture; so W0 trains on gemm.
///
/// With no arguments it runs the embedded default workload W0: two tasks,
/// `digits` (MNIST 5k) and `fashion` (Fashion-MNIST 6k/1k), on one 28x28 MLP
/// backbone; 20 clients holding one or both tasks with Dirichlet(0.5) label
/// skew; 10 clients a round; 1 local epoch of SGD (batch 32, lr 0.1); FedAvgM
/// (server momentum 0.5); 8-bit stochastic deltas with error feedback; 40
/// rounds.
///
/// Settings come from the defaults, then `--config FILE` (TOML, see
/// `simulator/experiments/`), then the flags below. `--print-config` shows the
/// resulting experiment file.
///
/// Every run leaves a folder, `runs/<name>-<YYYYMMDD-HHMMSS>/` (UTC) unless
/// `--output` names one, and prints its path last: experiment.toml,
/// metrics.csv, metrics.jsonl, summary.txt, summary.json, result.json,
/// weights.safetensors (the final global weights) and plots/ (accuracy,
/// loss, traffic, clients and, with DP, privacy; SVG and PNG). `--no-save`
/// keeps nothing. `--seeds 1,2,3` or `--repeat N` runs once per seed into
/// seed-<N>/ subfolders and reports mean and sd of the final and best
/// accuracy; `--compare RUN RUN..` puts finished runs side by side.
///
/// Your own data: a task's `dataset` may be `csv:PATH`, `idx:FOLDER` or a
/// `csv` / `idx` table (see `--task` and `simulator/experiments/README.md`);
/// relative paths in an experiment file are relative to its folder. The
/// model's input must match the data's features per sample, or the run
/// stops before the first round with an error naming both.
#[derive(Debug, Parser)]
#[command(name = "cohort-sim", version, about, long_about)]
struct Cli {
    /// Experiment file (TOML). Flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the effective experiment as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Registered clients.
    #[arg(long)]
    clients: Option<usize>,
    /// Clients sampled per round (sync) or in flight (async).
    #[arg(long)]
    per_round: Option<usize>,
    /// Rounds (sync) or model steps (async).
    #[arg(long)]
    rounds: Option<u64>,
    /// A task as NAME=DATASET, repeatable; replaces the tasks of the file.
    /// DATASET: mnist5k, fashion6k, digits8x8, penguins/species,
    /// penguins/island, penguins/sex, idx:FOLDER (MNIST-format gzipped IDX
    /// files, 10 classes, e.g. idx:/usr/share/datasets/fashion-mnist), or
    /// csv:PATH (a header, the last column the label, every other column a
    /// numeric feature, classes = sorted distinct labels, standardized with
    /// the train split's statistics, stratified 80/20). Experiment files also
    /// take tables: dataset = { csv = "f.csv", label = "species", features =
    /// [..], classes = "auto" | [..] | N, scale = "standard" | "minmax" |
    /// "none" | FACTOR, na = [..], missing = "drop_row" | "mean", test = {
    /// fraction = 0.2, seed = N } or test_file = ".." } and dataset = { idx =
    /// "FOLDER", train_images = "..", train_labels = "..", test_images = "..",
    /// test_labels = "..", classes = N } (see simulator/experiments/README.md).
    #[arg(long = "task", value_name = "NAME=DATASET")]
    tasks: Vec<String>,
    /// Model architecture: mlp28, cnn28 (gemm only), mlp8x8, mlp_tab4,
    /// resmlp28 (dfdx only); see `--list-models`.
    #[arg(long)]
    backbone: Option<String>,
    /// Training backend: auto (gemm where it has the architecture, else
    /// dfdx), dfdx, gemm.
    #[arg(long)]
    backend: Option<Backend>,
    /// List the model names and the backends that train each, and exit.
    #[arg(long)]
    list_models: bool,
    /// Partitioner: iid, natural (one client per document of a text data set), dirichlet:ALPHA, shards:PER_CLIENT, quantity:SIGMA,
    /// or sampled:SAMPLES:ALPHA (clients draw their data on demand; for very
    /// large populations).
    #[arg(long)]
    partition: Option<String>,
    /// Strategy: fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox,
    /// median, trimmed_mean, krum.
    #[arg(long)]
    strategy: Option<String>,
    /// A strategy parameter as KEY=VALUE, repeatable (e.g. server_lr=0.01,
    /// beta=0.2, mu=0.1, f=2).
    #[arg(long = "strategy-param", value_name = "KEY=VALUE")]
    strategy_params: Vec<String>,
    /// Clip each update to this L2 norm before combining.
    #[arg(long)]
    clip_norm: Option<f32>,
    /// Bits per value of the deltas: 32, 16, 8, 4, 2, 1.
    #[arg(long)]
    bits: Option<u8>,
    /// Top-k sparsification: a fraction (0.01) or a count (1000).
    #[arg(long)]
    top_k: Option<String>,
    /// sync, or async (FedBuff).
    #[arg(long)]
    mode: Option<String>,
    /// Async: accepted updates per model step.
    #[arg(long)]
    buffer_k: Option<u32>,
    /// Local epochs per round.
    #[arg(long)]
    epochs: Option<u32>,
    /// Local batch size.
    #[arg(long)]
    batch: Option<u32>,
    /// Local learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// Heads: global (aggregated) or local (personalized, never sent).
    #[arg(long)]
    heads: Option<String>,
    /// shared (one backbone for all tasks), separate (one federation per
    /// task), local (no federation).
    #[arg(long)]
    sharing: Option<String>,
    /// Probability that a sampled client drops out of a round.
    #[arg(long)]
    dropout: Option<f64>,
    /// Mean reply latency in ms on the virtual clock (exponential).
    #[arg(long)]
    latency_ms: Option<f64>,
    /// Round deadline in ms on the virtual clock.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Fraction of Byzantine clients.
    #[arg(long)]
    byzantine: Option<f64>,
    /// Attack of the Byzantine clients: `sign_flip[:SCALE]`, scale:FACTOR,
    /// noise:STD, label_flip.
    #[arg(long)]
    attack: Option<String>,
    /// Fine-tune heads on each client and evaluate on its own held-out data.
    #[arg(long)]
    personalized: bool,
    /// Seed of everything random.
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads (0 = one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// The run folder (made if missing; refused if it holds a run
    /// already). Default: runs/<experiment name>-<YYYYMMDD-HHMMSS>/, with
    /// -2, -3, ... when two runs start in one second.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Checkpoint into OUTPUT/checkpoint/ every N rounds (0 = never;
    /// default 10). Sync runs of one shared federation only; the two
    /// newest checkpoints are kept.
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<u64>,
    /// Continue the run in FOLDER (a former --output) from its newest good
    /// checkpoint, with FOLDER/experiment.toml: it ends bit-identical to an
    /// uninterrupted run (weights.safetensors, metrics except wall times).
    /// Run it from the same working directory (data set paths are relative
    /// to it). Flags that change the experiment are refused; --threads,
    /// --quiet and --checkpoint-every apply. FedBuff (async) and
    /// --sharing separate/local runs cannot be resumed.
    #[arg(long, value_name = "FOLDER", conflicts_with_all = ["config", "output", "no_save", "seeds", "repeat", "compare"])]
    resume: Option<PathBuf>,
    /// Keep nothing on disk: print the rounds and the summary only.
    #[arg(long, conflicts_with = "output")]
    no_save: bool,
    /// Run the experiment once per seed (e.g. 1,2,3), each into its own
    /// seed-<N>/ folder; the run folder's summary.txt and summary.json
    /// give mean and sample standard deviation of the final and best
    /// central accuracy per task, its plots the mean with a min-max band.
    #[arg(long, value_delimiter = ',', value_name = "SEED,..", conflicts_with_all = ["seed", "repeat", "no_save"])]
    seeds: Vec<u64>,
    /// Like --seeds with N seeds from --seed (or the file's seed) up.
    #[arg(long, value_name = "N", conflicts_with = "no_save")]
    repeat: Option<u64>,
    /// Compare finished run folders instead of running: print a table of
    /// the final and best accuracy per task and run, and write it
    /// (compare.txt, compare.json) with one chart per metric, a line per
    /// run, into --output or runs/compare-<YYYYMMDD-HHMMSS>/.
    #[arg(long, num_args = 2.., value_name = "RUN")]
    compare: Vec<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Log lines on stderr: text (coloured only on a terminal without
    /// NO_COLOR) or json (one object per line: timestamp, level, target,
    /// fields.message, spans). RUST_LOG filters them (default: errors only).
    #[arg(long, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Differential privacy: central (noise at the aggregator), client
    /// (each node adds its share) or off. Any other --dp-* flag implies
    /// central unless the file or this flag says otherwise.
    #[arg(long)]
    dp_mode: Option<String>,
    /// Differential privacy: solve the noise multiplier so that the
    /// planned rounds spend this epsilon.
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
    /// Differential privacy: adaptive clipping to this quantile of the
    /// update norms (e.g. 0.5).
    #[arg(long)]
    dp_adaptive_quantile: Option<f64>,
    /// Differential privacy: stop before a round that would spend more.
    #[arg(long)]
    dp_budget: Option<f64>,
}

fn parse_kv(s: &str) -> Result<(&str, &str)> {
    s.split_once('=')
        .with_context(|| format!("`{s}` is not KEY=VALUE"))
}

fn apply(cli: &Cli, cfg: &mut ExperimentConfig) -> Result<()> {
    if let Some(v) = cli.clients {
        cfg.clients.count = v;
        cfg.clients.per_round = cfg.clients.per_round.min(v);
    }
    if let Some(v) = cli.per_round {
        cfg.clients.per_round = v;
    }
    if let Some(v) = cli.rounds {
        cfg.rounds = v;
    }
    if !cli.tasks.is_empty() {
        cfg.tasks = cli
            .tasks
            .iter()
            .map(|t| {
                parse_kv(t).map(|(n, d)| TaskConfig {
                    name: n.into(),
                    dataset: d.into(),
                    holders: 1.0,
                })
            })
            .collect::<Result<_>>()?;
    }
    if let Some(b) = &cli.backbone {
        cfg.backbone = b.clone();
    }
    if let Some(b) = cli.backend {
        cfg.backend = b;
    }
    if let Some(p) = &cli.partition {
        let parts: Vec<&str> = p.split(':').collect();
        let num = |i: usize| -> Result<f64> {
            parts
                .get(i)
                .with_context(|| format!("--partition {p}: missing a number"))?
                .parse::<f64>()
                .with_context(|| format!("--partition {p}"))
        };
        cfg.clients.data = match parts[0] {
            "iid" => ClientData::Partition { partitioner: Partitioner::Iid },
            "natural" => ClientData::Partition { partitioner: Partitioner::Natural },
            "dirichlet" => ClientData::Partition { partitioner: Partitioner::Dirichlet { alpha: num(1)? } },
            "shards" => ClientData::Partition { partitioner: Partitioner::Shards { shards_per_client: num(1)? as usize } },
            "quantity" => ClientData::Partition { partitioner: Partitioner::QuantitySkew { sigma: num(1)? } },
            "sampled" => ClientData::Sampled { samples: num(1)? as usize, alpha: num(2)? },
            other => bail!("--partition: unknown partitioner `{other}` (iid, natural, dirichlet:A, shards:K, quantity:S, sampled:N:A)"),
        };
    }
    if cli.strategy.is_some() || !cli.strategy_params.is_empty() {
        let name = cli.strategy.clone().unwrap_or_else(|| {
            toml::to_string(&cfg.strategy)
                .ok()
                .and_then(|t| {
                    t.lines().find_map(|l| {
                        l.strip_prefix("name = ")
                            .map(|n| n.trim_matches('"').to_string())
                    })
                })
                .unwrap_or_else(|| "fedavg".into())
        });
        let mut text = format!("name = {name:?}\n");
        for kv in &cli.strategy_params {
            let (k, v) = parse_kv(kv)?;
            text.push_str(&format!("{k} = {v}\n"));
        }
        let clip = cfg.strategy.clip_norm;
        cfg.strategy = toml::from_str::<StrategyConfig>(&text)
            .with_context(|| format!("--strategy {name}: bad name or parameters"))?;
        cfg.strategy.clip_norm = clip;
    }
    if cli.clip_norm.is_some() {
        cfg.strategy.clip_norm = cli.clip_norm;
    }
    if let Some(b) = cli.bits {
        cfg.engine.codec.bits = b;
    }
    if let Some(k) = &cli.top_k {
        cfg.engine.codec.top_k = Some(if k.contains('.') {
            TopK::Fraction(k.parse().with_context(|| format!("--top-k {k}"))?)
        } else {
            TopK::Count(k.parse().with_context(|| format!("--top-k {k}"))?)
        });
    }
    match cli.mode.as_deref() {
        None => {}
        Some("sync") => cfg.engine.mode = Mode::Sync,
        Some("async") if matches!(cfg.engine.mode, Mode::Async(_)) => {}
        Some("async") => cfg.engine.mode = Mode::Async(FedBuffConfig::default()),
        Some(m) => bail!("--mode: `{m}` is neither sync nor async"),
    }
    if let Some(k) = cli.buffer_k {
        match &mut cfg.engine.mode {
            Mode::Async(f) => f.buffer_k = k,
            Mode::Sync => bail!("--buffer-k needs --mode async"),
        }
    }
    if let Some(v) = cli.epochs {
        cfg.engine.train.epochs = v;
    }
    if let Some(v) = cli.batch {
        cfg.engine.train.batch_size = v;
    }
    if let Some(v) = cli.lr {
        cfg.engine.train.lr = v;
    }
    match cli.heads.as_deref() {
        None => {}
        Some("global") => cfg.heads = HeadPolicy::Global,
        Some("local") => cfg.heads = HeadPolicy::Local,
        Some(h) => bail!("--heads: `{h}` is neither global nor local"),
    }
    match cli.sharing.as_deref() {
        None => {}
        Some("shared") => cfg.sharing = Sharing::SharedBackbone,
        Some("separate") => cfg.sharing = Sharing::Separate,
        Some("local") => cfg.sharing = Sharing::LocalOnly,
        Some(s) => bail!("--sharing: `{s}` is not shared, separate or local"),
    }
    if let Some(v) = cli.dropout {
        cfg.faults.dropout = v;
    }
    if let Some(v) = cli.latency_ms {
        cfg.faults.latency_mean_ms = v;
    }
    if let Some(v) = cli.deadline_ms {
        cfg.engine.deadline_ms = v;
    }
    if let Some(v) = cli.byzantine {
        cfg.faults.byzantine = v;
    }
    if let Some(a) = &cli.attack {
        let (kind, arg) = a
            .split_once(':')
            .map_or((a.as_str(), None), |(k, v)| (k, Some(v)));
        let num = |d: f32| -> Result<f32> {
            arg.map_or(Ok(d), |v| {
                v.parse().with_context(|| format!("--attack {a}"))
            })
        };
        cfg.faults.attack = match kind {
            "sign_flip" => Attack::SignFlip { scale: num(4.0)? },
            "scale" => Attack::Scale { factor: num(10.0)? },
            "noise" => Attack::Noise { std: num(0.1)? },
            "label_flip" => Attack::LabelFlip,
            other => bail!("--attack: unknown attack `{other}`"),
        };
    }
    if cli.personalized {
        cfg.eval.personalized = true;
    }
    if let Some(v) = cli.seed {
        cfg.seed = v;
    }
    if let Some(v) = cli.threads {
        cfg.threads = v;
    }
    if let Some(o) = &cli.output {
        cfg.output = Some(o.clone());
    }
    if let Some(n) = cli.checkpoint_every {
        cfg.checkpoint.every = n;
    }
    apply_privacy(cli, &mut cfg.privacy)
}

fn apply_privacy(cli: &Cli, p: &mut cohort_aggregator::PrivacyConfig) -> Result<()> {
    p.apply(&cohort_aggregator::PrivacyOverrides {
        mode: cli.dp_mode.clone(),
        target_epsilon: cli.dp_epsilon,
        noise_multiplier: cli.dp_noise_multiplier,
        clip: cli.dp_clip,
        delta: cli.dp_delta,
        adaptive_quantile: cli.dp_adaptive_quantile,
        budget_epsilon: cli.dp_budget,
    })?;
    Ok(())
}

fn describe(m: &RoundMetrics) -> String {
    let mut s = format!("round {:>3}", m.round);
    for t in &m.central {
        s.push_str(&format!("  {} {:6.2}%", t.task, 100.0 * t.accuracy));
    }
    s.push_str(&format!(
        "  | {}/{} accepted{}{}  {:.0} ms",
        m.accepted,
        m.sampled,
        if m.dropped > 0 {
            format!(", {} dropped", m.dropped)
        } else {
            String::new()
        },
        if m.late + m.refused > 0 {
            format!(", {} late/refused", m.late + m.refused)
        } else {
            String::new()
        },
        m.wall_ms
    ));
    if let Some(p) = &m.privacy {
        s.push_str(&format!("  eps {:.3} (clip {:.3})", p.epsilon, p.clip));
    }
    s
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format, "error");
    if !cli.compare.is_empty() {
        return compare_runs(&cli);
    }
    let mut cfg = match (&cli.resume, &cli.config) {
        (Some(dir), _) => resume_config(dir)?,
        (None, Some(path)) => ExperimentConfig::from_file(path)?,
        (None, None) => ExperimentConfig::default(),
    };
    if cli.list_models {
        println!("{}", ModelRegistry::default().describe());
        return Ok(());
    }
    let resumed = match &cli.resume {
        Some(_) => Some(experiment_hash(&cfg)?),
        None => None,
    };
    apply(&cli, &mut cfg)?;
    if resumed.is_some() && resumed != Some(experiment_hash(&cfg)?) {
        bail!(
            "--resume continues the experiment of {}/experiment.toml: flags that change it are \
             refused (only --threads, --quiet and --checkpoint-every apply)",
            cli.resume
                .as_deref()
                .unwrap_or_else(|| std::path::Path::new("?"))
                .display()
        );
    }
    cfg.validate()?;
    if cli.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let seeds = seeds(&cli, &cfg);
    print_header(&cfg, &seeds);
    if !seeds.is_empty() {
        return repeat(&cli, cfg, &seeds);
    }
    let dir = run_folder(&cli, &cfg)?;
    cfg.output = dir.as_ref().map(|d| d.path().to_path_buf());
    let bar = progress_bar(&cli, cfg.rounds);
    let on_round = |m: &RoundMetrics| {
        bar.inc(1);
        bar.println(describe(m));
        if bar.is_hidden() && !cli.quiet {
            println!("{}", describe(m));
        }
    };
    let result = match &cli.resume {
        Some(dir) => {
            println!("resuming {}", dir.display());
            resume_experiment(&cfg, &ModelRegistry::default(), on_round)?
        }
        None => run_experiment(&cfg, on_round)?,
    };
    bar.finish_and_clear();
    print_result(&result);
    if let Some(d) = dir {
        println!("results in {}", d.path().display());
    }
    Ok(())
}

/// The folder of this run: the one `--resume` continues, `--output`, a new
/// one under `runs/`, or none with `--no-save`.
fn run_folder(cli: &Cli, cfg: &ExperimentConfig) -> Result<Option<RunDir>> {
    if let Some(dir) = &cli.resume {
        return Ok(Some(RunDir::open(dir)?));
    }
    Ok(match (&cfg.output, cli.no_save) {
        (_, true) => None,
        (Some(o), false) => Some(RunDir::fresh(o)?),
        (None, false) => Some(RunDir::create(Path::new(DEFAULT_BASE), &cfg.name)?),
    })
}

/// `--seeds`, or `--repeat N` seeds from the experiment's.
fn seeds(cli: &Cli, cfg: &ExperimentConfig) -> Vec<u64> {
    match cli.repeat {
        Some(n) => (0..n).map(|i| cfg.seed.wrapping_add(i)).collect(),
        None => cli.seeds.clone(),
    }
}

fn repeat(cli: &Cli, mut cfg: ExperimentConfig, seeds: &[u64]) -> Result<()> {
    let dir = match cfg.output.take() {
        Some(o) => RunDir::fresh(&o)?,
        None => RunDir::create(Path::new(DEFAULT_BASE), &cfg.name)?,
    };
    let bar = progress_bar(cli, cfg.rounds * seeds.len() as u64);
    let summary = run_repeats(&cfg, &ModelRegistry::default(), seeds, &dir, |seed, m| {
        bar.inc(1);
        let line = format!("seed {seed}  {}", describe(m));
        bar.println(&line);
        if bar.is_hidden() && !cli.quiet {
            println!("{line}");
        }
    })?;
    bar.finish_and_clear();
    println!("\n{}", summary.table());
    println!("results in {}", dir.path().display());
    Ok(())
}

fn compare_runs(cli: &Cli) -> Result<()> {
    if cli.no_save {
        let runs = cli
            .compare
            .iter()
            .map(|d| Run::load(d))
            .collect::<Result<Vec<_>, _>>()?;
        print!("{}", Comparison::of(&runs).table());
        return Ok(());
    }
    let out = match &cli.output {
        Some(o) => o.clone(),
        None => RunDir::create(Path::new(DEFAULT_BASE), "compare")?
            .path()
            .to_path_buf(),
    };
    let cmp = compare(&cli.compare, &out)?;
    print!("{}", cmp.table());
    println!("comparison in {}", out.display());
    Ok(())
}

fn print_header(cfg: &ExperimentConfig, seeds: &[u64]) {
    let seed = match seeds {
        [] => format!(" {}", cfg.seed),
        s => format!(
            "s {}",
            s.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
        ),
    };
    let tasks: Vec<String> = cfg
        .tasks
        .iter()
        .map(|t| format!("{} ({})", t.name, t.dataset))
        .collect();
    println!(
        "cohort-sim `{}`: {} clients, {} per round, {} rounds, tasks {}, backbone {} on {}, strategy {}, {}-bit deltas, seed{}",
        cfg.name,
        cfg.clients.count,
        cfg.clients.per_round,
        cfg.rounds,
        tasks.join(", "),
        cfg.backbone,
        cfg.backend,
        toml::to_string(&cfg.strategy).unwrap_or_default().lines().next().unwrap_or_default(),
        cfg.engine.codec.bits,
        seed
    );
}

fn progress_bar(cli: &Cli, len: u64) -> ProgressBar {
    if cli.quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rounds {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

fn print_result(result: &ExperimentResult) {
    println!("\n{}", summary_table(&result.rounds));
    if !result.local_only.is_empty() {
        println!("local-only training:");
        for p in &result.local_only {
            println!(
                "  {:<12} {} clients: own held-out data {:6.2}%, central test set {:6.2}%",
                p.task,
                p.clients,
                100.0 * p.before,
                100.0 * p.after
            );
        }
    }
    if !result.personalized.is_empty() {
        println!("personalized evaluation (own held-out data):");
        for p in &result.personalized {
            println!(
                "  {:<12} {} clients: global model {:6.2}%  after fine-tuning heads {:6.2}%",
                p.task,
                p.clients,
                100.0 * p.before,
                100.0 * p.after
            );
        }
    }
    for s in &result.final_central {
        println!("final {} accuracy: {:.2}%", s.task, 100.0 * s.accuracy);
    }
}
