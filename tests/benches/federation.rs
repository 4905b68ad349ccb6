//! A round of 10 `cohort-node` processes and a `cohort-aggregator` process
//! on loopback against the same round in the simulator: the overhead of
//! processes, libp2p and the round protocol.
//!
//! Needs the release binaries: `cargo build --release -p cohort-node -p
//! cohort-aggregator`, then `cargo bench -p cohort-tests --bench federation
//! [-- digits|mnist] [full]` (`full`: no delta downloads).
//!
//! Method: the same experiment file runs in `cohort-sim`'s engine in this
//! process and in the real federation. Per-round time is the mean interval
//! between round closes over rounds 2..=N (round 1 includes the start-up);
//! in the simulator, the mean wall time of rounds 2..=N. Both include the
//! central evaluation and, in the federation, the checkpoint of every round.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cohort_simulator::{run_experiment, ExperimentConfig};
use cohort_tests::net::{node_config_for, Aggregator, Proc};

const NODES: usize = 10;
const ROUNDS: u64 = 12;

fn experiment(workload: &str) -> (String, &'static str, &'static str) {
    let (backbone, dataset, epochs, batch, lr) = match workload {
        "mnist" => ("mlp28", "mnist5k", 1, 32, 0.1),
        _ => ("mlp8x8", "digits8x8", 3, 8, 0.2),
    };
    let text = format!(
        r#"name = "bench-{workload}"
seed = 3
rounds = {ROUNDS}
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

fn release_bin(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("release").join(name)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let workload = std::env::args()
        .skip(1)
        .find(|a| a == "digits" || a == "mnist")
        .unwrap_or_else(|| "digits".into());
    // `full`: every download is the full weights (no deltas).
    let full_only = std::env::args().any(|a| a == "full");
    let (text, backbone, dataset) = experiment(&workload);
    for b in ["cohort-node", "cohort-aggregator"] {
        assert!(
            release_bin(b).is_file(),
            "{} missing: cargo build --release -p cohort-node -p cohort-aggregator",
            release_bin(b).display()
        );
    }

    // The simulator.
    let cfg = ExperimentConfig::from_toml(&text).expect("experiment");
    let sim = run_experiment(&cfg, |_| {}).expect("simulation");
    let mut sim_rounds: Vec<f64> = sim.rounds.iter().skip(1).map(|r| r.wall_ms).collect();
    let sim_mean = sim_rounds.iter().sum::<f64>() / sim_rounds.len() as f64;
    let sim_median = median(&mut sim_rounds);
    let sim_acc = sim.accuracy("digits").unwrap_or(f32::NAN);

    // The federation: real processes on loopback.
    let root = tempfile::tempdir().expect("tempdir");
    let exp = root.path().join("experiment.toml");
    std::fs::write(&exp, &text).expect("experiment file");
    let mut agg = Aggregator::start_with_bin(
        &release_bin("cohort-aggregator"),
        &exp,
        &root.path().join("agg"),
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
            let dir = root.path().join(format!("node{i}"));
            node_config_for(&dir, i, NODES, "", backbone, dataset);
            let mut cmd = Command::new(release_bin("cohort-node"));
            cmd.arg("--config")
                .arg(dir.join("node.toml"))
                .arg("--connect")
                .arg(agg.connect_file());
            Proc::spawn(&format!("node{i}"), cmd, &dir)
        })
        .collect();
    let status = agg.proc.expect_exit(Duration::from_secs(600));
    assert!(status.success(), "aggregator failed:\n{}", agg.proc.err());
    for n in &mut nodes {
        n.expect_exit(Duration::from_secs(60));
    }
    let rounds = agg.rounds();
    let closes: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r["closed_at_ms"].as_f64())
        .collect();
    let mut net_rounds: Vec<f64> = closes.windows(2).map(|w| w[1] - w[0]).collect();
    let net_mean = net_rounds.iter().sum::<f64>() / net_rounds.len() as f64;
    let net_median = median(&mut net_rounds);
    let net_acc = agg.accuracy("digits");
    let sum = |key: &str| -> u64 { rounds.iter().filter_map(|r| r[key].as_u64()).sum() };
    let bytes = sum("bytes_received");
    let (full, delta) = (sum("bytes_sent_full"), sum("bytes_sent_delta"));

    println!("workload {workload}: {NODES} nodes, all of them every round, {ROUNDS} rounds ({backbone} on {dataset}, 8-bit)");
    println!(
        "simulator (in process):        mean {sim_mean:7.1} ms/round, median {sim_median:7.1}, final accuracy {:.1}%",
        100.0 * sim_acc
    );
    println!(
        "federation (11 processes, TCP): mean {net_mean:7.1} ms/round, median {net_median:7.1}, final accuracy {:.1}%",
        100.0 * net_acc
    );
    println!(
        "overhead ratio federation / simulator: {:.2} (mean), {:.2} (median); updates received: {:.2} MB",
        net_mean / sim_mean,
        net_median / sim_median,
        bytes as f64 / 1e6
    );
    // Round 1: every node downloads the full weights; later rounds: the
    // delta from the version it trained on.
    let per_full = full as f64 / NODES as f64;
    let per_delta = delta as f64 / (NODES as f64 * (ROUNDS - 1) as f64);
    if full_only {
        println!(
            "model downloads: {:.2} MB, all as full weights",
            full as f64 / 1e6
        );
        return;
    }
    println!(
        "model downloads: {:.2} MB as full weights ({:.0} KB each), {:.2} MB as lossless deltas ({:.0} KB each, {:.0}% of the full weights)",
        full as f64 / 1e6,
        per_full / 1e3,
        delta as f64 / 1e6,
        per_delta / 1e3,
        100.0 * per_delta / per_full
    );
}
