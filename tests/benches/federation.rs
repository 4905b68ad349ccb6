//! A round of 10 `cohort-node` processes and a `cohort-aggregator` process
//! on loopback against the same round in the simulator: the overhead of
//! processes, libp2p and the round protocol.
//!
//! Needs the release binaries: `cargo build --release -p cohort-node -p
//! cohort-aggregator`, then `cargo bench -p cohort-tests --bench federation
//! [-- digits|mnist] [full]` (`full`: no delta downloads). Environment:
//! `COHORT_BENCH_BINS=dirA,dirB` alternates two sets of binaries (e.g. a
//! "before" copy) in one run, `COHORT_BENCH_REPS=n` repeats the simulator
//! and each federation `n` times, `COHORT_BENCH_KEEP=dir` keeps every
//! federation's logs and metrics there, `COHORT_BENCH_ROUNDS=n` runs `n`
//! rounds instead of 12.
//!
//! Method: the same experiment file runs in `cohort-sim`'s engine in this
//! process and in the real federation. Per-round time is the mean interval
//! between round closes over rounds 2..=N (round 1 includes the start-up);
//! in the simulator, the mean wall time of rounds 2..=N. Both include the
//! central evaluation and, in the federation, the checkpoint of every round.
//! CPU per round is the user + system time of the simulator (or of all the
//! federation's processes) over the whole run, start-up included, divided by
//! the rounds: the difference of two run lengths gives a round's own CPU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cohort_simulator::{run_experiment, ExperimentConfig};
use cohort_tests::net::{node_config_for, Aggregator, Proc};

const NODES: usize = 10;
/// Rounds of each run, unless `COHORT_BENCH_ROUNDS` says otherwise.
const ROUNDS: u64 = 12;

fn rounds() -> u64 {
    std::env::var("COHORT_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS)
        .max(2)
}

fn experiment(workload: &str) -> (String, &'static str, &'static str) {
    let (backbone, dataset, epochs, batch, lr) = match workload {
        "mnist" => ("mlp28", "mnist5k", 1, 32, 0.1),
        _ => ("mlp8x8", "digits8x8", 3, 8, 0.2),
    };
    let rounds = rounds();
    let text = format!(
        r#"name = "bench-{workload}"
seed = 3
rounds = {rounds}
backbone = "{backbone}"
threads = 2

[[tasks]]
name = "digits"
dataset = "{dataset}"

[clients]
count = {NODES}
per_round = {NODES}

[clients.data]
kind = "partition"
partitioner = {{ kind = "iid" }}

[strategy]
name = "fedavg"

[engine]
federation = "bench"
deadline_ms = 60000

[engine.train]
epochs = {epochs}
batch_size = {batch}
lr = {lr}

[engine.codec]
bits = 8
"#
    );
    (text, backbone, dataset)
}

/// The release binaries' folder: `target/release`, or each folder of
/// `COHORT_BENCH_BINS` (comma-separated), run in turn: how a "before" copy
/// of the binaries alternates with the current ones in one run.
fn bin_dirs() -> Vec<PathBuf> {
    if let Ok(dirs) = std::env::var("COHORT_BENCH_BINS") {
        return dirs.split(',').map(PathBuf::from).collect();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    vec![target.join("release")]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// CPU time in ms (user + system) of this process and of its children that
/// have been waited for, from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_ms() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick_ms = 10.0;
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0) * tick_ms;
    // utime, stime, cutime, cstime are fields 14-17 of the whole line.
    (at(11) + at(12), at(13) + at(14))
}

/// Mean and median ms per round of the simulator (rounds 2..=N), and its
/// CPU ms per round over the whole run.
fn simulate(text: &str) -> (f64, f64, f32, f64) {
    let cfg = ExperimentConfig::from_toml(text).expect("experiment");
    let before = cpu_ms().0;
    let sim = run_experiment(&cfg, |_| {}).expect("simulation");
    let cpu = (cpu_ms().0 - before) / rounds() as f64;
    let mut rounds: Vec<f64> = sim.rounds.iter().skip(1).map(|r| r.wall_ms).collect();
    let mean = rounds.iter().sum::<f64>() / rounds.len() as f64;
    (
        mean,
        median(&mut rounds),
        sim.accuracy("digits").unwrap_or(f32::NAN),
        cpu,
    )
}

struct Federation {
    mean: f64,
    median: f64,
    accuracy: f64,
    bytes: u64,
    full: u64,
    delta: u64,
    /// CPU ms per round of all the processes, over their whole run.
    cpu: f64,
}

/// One federation of real processes with the binaries in `bins`; the logs
/// and metrics stay in `keep` when given.
fn federate(
    text: &str,
    backbone: &str,
    dataset: &str,
    bins: &Path,
    full_only: bool,
    keep: Option<PathBuf>,
) -> Federation {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root).expect("run folder");
    let exp = root.join("experiment.toml");
    std::fs::write(&exp, text).expect("experiment file");
    let mut agg = Aggregator::start_with_bin(
        &bins.join("cohort-aggregator"),
        &exp,
        &root.join("agg"),
        "/ip4/127.0.0.1/tcp/0",
        &[
            "--open",
            "--linger-s",
            "1",
            "--delta-versions",
            if full_only { "0" } else { "1" },
        ],
    );
    let mut nodes: Vec<Proc> = (0..NODES)
        .map(|i| {
            let dir = root.join(format!("node{i}"));
            node_config_for(&dir, i, NODES, "", backbone, dataset);
            let mut cmd = Command::new(bins.join("cohort-node"));
            cmd.arg("--config")
                .arg(dir.join("node.toml"))
                .arg("--connect")
                .arg(agg.connect_file());
            Proc::spawn(&format!("node{i}"), cmd, &dir)
        })
        .collect();
    let cpu_before = cpu_ms().1;
    let status = agg.proc.expect_exit(Duration::from_secs(600));
    assert!(status.success(), "aggregator failed:\n{}", agg.proc.err());
    for n in &mut nodes {
        n.expect_exit(Duration::from_secs(60));
    }
    let cpu = (cpu_ms().1 - cpu_before) / rounds() as f64;
    let rounds = agg.rounds();
    let closes: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r["closed_at_ms"].as_f64())
        .collect();
    let mut net_rounds: Vec<f64> = closes.windows(2).map(|w| w[1] - w[0]).collect();
    let sum = |key: &str| -> u64 { rounds.iter().filter_map(|r| r[key].as_u64()).sum() };
    Federation {
        mean: net_rounds.iter().sum::<f64>() / net_rounds.len() as f64,
        median: median(&mut net_rounds),
        accuracy: agg.accuracy("digits"),
        bytes: sum("bytes_received"),
        full: sum("bytes_sent_full"),
        delta: sum("bytes_sent_delta"),
        cpu,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workload = args
        .iter()
        .find(|a| *a == "digits" || *a == "mnist")
        .cloned()
        .unwrap_or_else(|| "digits".into());
    // `full`: every download is the full weights (no deltas).
    let full_only = args.iter().any(|a| a == "full");
    // Repetitions of (simulator, then each set of binaries).
    let reps: usize = std::env::var("COHORT_BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
        .max(1);
    // Logs and metrics of every federation kept under this folder.
    let keep = std::env::var_os("COHORT_BENCH_KEEP").map(PathBuf::from);
    let (text, backbone, dataset) = experiment(&workload);
    let dirs = bin_dirs();
    for d in &dirs {
        for b in ["cohort-node", "cohort-aggregator"] {
            assert!(
                d.join(b).is_file(),
                "{} missing: cargo build --release -p cohort-node -p cohort-aggregator",
                d.join(b).display()
            );
        }
    }

    println!("workload {workload}: {NODES} nodes, all of them every round, {} rounds ({backbone} on {dataset}, 8-bit)", rounds());
    println!("load average at start: {}", loadavg());
    for rep in 0..reps {
        let (sim_mean, sim_median, sim_acc, sim_cpu) = simulate(&text);
        println!(
            "simulator (in process):        mean {sim_mean:7.1} ms/round, median {sim_median:7.1}, final accuracy {:.1}%, CPU {sim_cpu:.1} ms/round",
            100.0 * sim_acc
        );
        for (i, d) in dirs.iter().enumerate() {
            let keep = keep.as_ref().map(|k| k.join(format!("run{rep}-bins{i}")));
            let f = federate(&text, backbone, dataset, d, full_only, keep);
            println!(
                "federation (11 processes, TCP): mean {:7.1} ms/round, median {:7.1}, final accuracy {:.1}%, CPU {:.1} ms/round  [{}]",
                f.mean,
                f.median,
                100.0 * f.accuracy,
                f.cpu,
                d.display()
            );
            println!(
                "overhead ratio federation / simulator: {:.2} (mean), {:.2} (median); updates received: {:.2} MB; load average {}",
                f.mean / sim_mean,
                f.median / sim_median,
                f.bytes as f64 / 1e6,
                loadavg()
            );
            // Round 1: every node downloads the full weights; later rounds:
            // the delta from the version it trained on.
            let per_full = f.full as f64 / NODES as f64;
            let per_delta = f.delta as f64 / (NODES as f64 * (rounds() - 1) as f64);
            if full_only {
                println!(
                    "model downloads: {:.2} MB, all as full weights",
                    f.full as f64 / 1e6
                );
            } else {
                println!(
                    "model downloads: {:.2} MB as full weights ({:.0} KB each), {:.2} MB as lossless deltas ({:.0} KB each, {:.0}% of the full weights)",
                    f.full as f64 / 1e6,
                    per_full / 1e3,
                    f.delta as f64 / 1e6,
                    per_delta / 1e3,
                    100.0 * per_delta / per_full
                );
            }
        }
    }
    println!("load average at end: {}", loadavg());
}
