//! Checkpoints and resume: a simulation stopped after a checkpoint and
//! resumed from it ends bit-identical to an uninterrupted run (weights,
//! client state, metrics but wall times), in the library and as a real
//! `cohort-sim` process killed mid-run; damaged checkpoints are refused
//! with typed errors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cohort_aggregator::{strategy_from_config, AggError, Strategy};
use cohort_simulator::checkpoint::{dir_of, sim_file};
use cohort_simulator::{
    build_model, ExperimentConfig, Population, RoundMetrics, SimError, Simulation,
};
use cohort_tasks::ModelRegistry;

/// 8x8 digits on the small MLP: 16 clients, 8 a round, 8-bit stochastic
/// deltas with error feedback (the default codec), dropouts and
/// stragglers, `strategy` on the server.
fn digits(strategy: &str, rounds: u64, extra: &str) -> ExperimentConfig {
    let text = format!(
        r#"
name = "resume-test"
seed = 11
rounds = {rounds}
threads = 2
backbone = "mlp8x8"

[[tasks]]
name = "digits"
dataset = "digits8x8"
holders = 1.0

[clients]
count = 16
per_round = 8

[strategy]
name = "{strategy}"

[engine]
federation = "resume-test"
deadline_ms = 400

[engine.train]
epochs = 1
batch_size = 16
lr = 0.2

[faults]
dropout = 0.2
latency_mean_ms = 150.0

{extra}
"#
    );
    ExperimentConfig::from_toml(&text).expect("experiment")
}

/// Rows as JSON with the wall times zeroed (the only fields two runs may
/// differ in; NaN losses become `null` on both sides).
fn comparable(rows: &[RoundMetrics]) -> Vec<String> {
    rows.iter()
        .map(|r| {
            let mut r = r.clone();
            r.wall_ms = 0.0;
            r.eval_ms = 0.0;
            serde_json::to_string(&r).expect("json")
        })
        .collect()
}

fn bits(sim: &Simulation) -> Vec<(String, Vec<u32>)> {
    sim.engine
        .global()
        .iter()
        .map(|(g, v)| (g.to_string(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

fn resume(cfg: &ExperimentConfig, dir: &Path) -> Result<Simulation, SimError> {
    let pop = Population::new(cfg)?;
    let model = build_model(cfg, &pop, &ModelRegistry::default())?;
    let s = cfg.strategy.clone();
    let make = move || -> Box<dyn Strategy> { strategy_from_config(&s) };
    Simulation::resume(cfg.clone(), pop, model, &make, dir)
}

/// Runs `stop` rounds, checkpoints, runs `lost` more (lost to the "crash"),
/// drops the simulation; returns the rows up to the checkpoint.
fn run_then_crash(cfg: &ExperimentConfig, dir: &Path, stop: u64, lost: u64) -> Vec<RoundMetrics> {
    let mut sim = Simulation::new(cfg.clone()).expect("simulation");
    let mut rows = Vec::new();
    for _ in 0..stop {
        rows.push(sim.sync_round().expect("round"));
    }
    sim.save_checkpoint(dir, &rows).expect("checkpoint");
    for _ in 0..lost {
        sim.sync_round().expect("round");
    }
    rows
}

fn uninterrupted(cfg: &ExperimentConfig) -> (Simulation, Vec<RoundMetrics>) {
    let mut sim = Simulation::new(cfg.clone()).expect("simulation");
    let rows = sim.run(|_| {}).expect("runs");
    (sim, rows)
}

/// The resumed run against the uninterrupted one: every weight's bits,
/// the clients' state, every metrics row.
fn assert_resumes_identically(cfg: &ExperimentConfig, stop: u64) {
    let (full, full_rows) = uninterrupted(cfg);
    let tmp = tempfile::tempdir().expect("tempdir");
    run_then_crash(cfg, tmp.path(), stop, 2);
    let mut again = resume(cfg, tmp.path()).expect("resumes");
    assert_eq!(again.engine.round(), stop);
    let mut seen = 0;
    let rows = again.run(|_| seen += 1).expect("runs on");
    assert_eq!(
        seen as u64,
        cfg.rounds - stop,
        "rounds run after the resume"
    );
    assert_eq!(comparable(&rows), comparable(&full_rows));
    assert_eq!(bits(&again), bits(&full), "final weights differ");
    assert_eq!(again.state_bytes(), full.state_bytes());
    assert_eq!(again.clients_with_state(), full.clients_with_state());
    assert_eq!(again.clock_ms(), full.clock_ms());
}

#[test]
fn fedavgm_with_8bit_error_feedback_resumes_bit_identical() {
    let cfg = digits("fedavgm", 7, "");
    assert!(cfg.engine.codec.bits == 8);
    assert_resumes_identically(&cfg, 3);
}

#[test]
fn fedadam_with_local_heads_resumes_bit_identical() {
    let mut cfg = digits("fedadam", 6, "");
    cfg.heads = cohort_simulator::config::HeadPolicy::Local;
    assert_resumes_identically(&cfg, 4);
}

/// DP-FedAvg (Poisson sampling, noise, the accountant) with FedAdam's
/// server step: the accountant's state comes back, epsilon goes on.
#[test]
fn differentially_private_run_resumes_bit_identical() {
    let mut cfg = digits(
        "fedadam",
        6,
        "[privacy]\nmode = \"central\"\nnoise_multiplier = 0.8\nclip = 1.0\ndelta = 1e-5\n",
    );
    cfg.faults.dropout = 0.0;
    let (_, rows) = uninterrupted(&cfg);
    assert!(rows.iter().all(|r| r.privacy.is_some()), "privacy is on");
    assert_resumes_identically(&cfg, 3);
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let cfg = digits("fedavgm", 6, "");
    let (full, _) = uninterrupted(&cfg);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut sim = Simulation::new(cfg.clone()).expect("simulation");
    let mut rows = Vec::new();
    for r in 1..=4u64 {
        rows.push(sim.sync_round().expect("round"));
        if r % 2 == 0 {
            sim.save_checkpoint(tmp.path(), &rows).expect("checkpoint");
        }
    }
    drop(sim);
    let newest = sim_file(tmp.path(), 4);
    let mut bytes = std::fs::read(&newest).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&newest, bytes).expect("write");
    let mut again = resume(&cfg, tmp.path()).expect("resumes from round 2");
    assert_eq!(again.engine.round(), 2);
    again.run(|_| {}).expect("runs on");
    assert_eq!(bits(&again), bits(&full));
}

/// One checkpoint of round 2 in a fresh folder, and its two files.
fn one_checkpoint(cfg: &ExperimentConfig) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    run_then_crash(cfg, tmp.path(), 2, 0);
    let sim = sim_file(tmp.path(), 2);
    let engine = tmp.path().join("round-000002");
    assert!(sim.is_file() && engine.is_dir());
    (tmp, sim, engine)
}

fn checkpoint_error(cfg: &ExperimentConfig, dir: &Path) -> SimError {
    resume(cfg, dir).expect_err("refused")
}

#[test]
fn truncated_or_altered_simulator_files_are_refused_with_typed_errors() {
    let cfg = digits("fedavgm", 4, "");
    let (tmp, sim, _) = one_checkpoint(&cfg);
    let good = std::fs::read(&sim).expect("read");
    for (what, bytes) in [
        ("truncated", good[..good.len() - 7].to_vec()),
        ("only the header", good[..20].to_vec()),
        ("empty", Vec::new()),
        ("a flipped bit", {
            let mut b = good.clone();
            let i = b.len() - 100;
            b[i] ^= 1;
            b
        }),
    ] {
        std::fs::write(&sim, &bytes).expect("write");
        match checkpoint_error(&cfg, tmp.path()) {
            SimError::Checkpoint { path, reason } => {
                assert_eq!(path, sim, "{what}");
                println!("{what}: {reason}");
            }
            e => panic!("{what}: {e}"),
        }
    }
    std::fs::remove_file(&sim).expect("remove");
    assert!(matches!(
        checkpoint_error(&cfg, tmp.path()),
        SimError::Checkpoint { .. }
    ));
}

#[test]
fn a_truncated_engine_checkpoint_is_refused() {
    let cfg = digits("fedavgm", 4, "");
    let (tmp, _, engine) = one_checkpoint(&cfg);
    let weights = engine.join("weights.safetensors");
    let bytes = std::fs::read(&weights).expect("read");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("write");
    match checkpoint_error(&cfg, tmp.path()) {
        SimError::Aggregator(AggError::Checkpoint(m)) => println!("{m}"),
        e => panic!("{e}"),
    }
}

#[test]
fn a_checkpoint_of_another_experiment_is_refused() {
    let cfg = digits("fedavgm", 4, "");
    let (tmp, _, _) = one_checkpoint(&cfg);
    let mut other = cfg.clone();
    other.faults.dropout = 0.3;
    match checkpoint_error(&other, tmp.path()) {
        SimError::Checkpoint { reason, .. } => {
            assert!(reason.contains("another experiment"), "{reason}")
        }
        e => panic!("{e}"),
    }
    // Settings that do not change the numbers may differ.
    let mut threads = cfg.clone();
    threads.threads = 1;
    threads.checkpoint.every = 3;
    resume(&threads, tmp.path()).expect("same experiment");
}

#[test]
fn fedbuff_and_an_empty_folder_are_refused() {
    let cfg = digits("fedavg", 4, "");
    let tmp = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        checkpoint_error(&cfg, tmp.path()),
        SimError::Checkpoint { .. }
    ));
    let mut fedbuff = cfg.clone();
    fedbuff.engine.mode = cohort_aggregator::Mode::Async(Default::default());
    match checkpoint_error(&fedbuff, tmp.path()) {
        SimError::Config(m) => assert!(m.contains("FedBuff"), "{m}"),
        e => panic!("{e}"),
    }
}

// ---- a real cohort-sim process, killed mid-run ----

const ROUNDS: u64 = 60;

fn cohort_sim(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cohort-sim"));
    c.args(args).env("RUST_LOG", "error");
    c
}

fn experiment_args(out: &Path) -> Vec<String> {
    [
        "--task",
        "digits=digits8x8",
        "--backbone",
        "mlp8x8",
        "--clients",
        "20",
        "--per-round",
        "10",
        "--epochs",
        "4",
        "--batch",
        "8",
        "--lr",
        "0.1",
        "--strategy",
        "fedadam",
        "--heads",
        "local",
        "--dropout",
        "0.1",
        "--latency-ms",
        "100",
        "--threads",
        "2",
        "--checkpoint-every",
        "5",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--rounds".into(),
        ROUNDS.to_string(),
        "--output".into(),
        out.display().to_string(),
    ])
    .collect()
}

fn run_to_end(mut c: Command) {
    let out = c.output().expect("cohort-sim runs");
    assert!(
        out.status.success(),
        "cohort-sim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CSV without its wall-time columns.
fn csv_rows(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| header[i] != "wall_ms" && header[i] != "eval_ms")
        .collect();
    std::iter::once(header.join(","))
        .chain(lines.map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| f[i]).collect::<Vec<_>>().join(",")
        }))
        .collect()
}

/// The JSON lines without their wall times.
fn jsonl_rows(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json line");
            let o = v.as_object_mut().expect("object");
            o.remove("wall_ms");
            o.remove("eval_ms");
            v
        })
        .collect()
}

fn data_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
}

#[test]
fn a_killed_cohort_sim_resumes_bit_identical() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (killed, whole) = (tmp.path().join("killed"), tmp.path().join("whole"));

    // Kill it with SIGKILL once its first checkpoint is complete.
    let mut child = cohort_sim(&[])
        .args(experiment_args(&killed))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn cohort-sim");
    let engine_done = dir_of(&killed).join("round-000005").join("checksums.json");
    while !engine_done.is_file() {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("cohort-sim ended ({status}) before its first checkpoint");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        child.try_wait().expect("wait").is_none(),
        "cohort-sim finished before it could be killed"
    );
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reaped");
    assert!(!status.success(), "killed, not finished: {status}");
    let rows_at_kill = data_rows(&killed);
    assert!(
        (rows_at_kill as u64) < ROUNDS,
        "killed mid-run ({rows_at_kill} rows)"
    );
    assert!(!killed.join("weights.safetensors").exists());
    println!("killed after {rows_at_kill} of {ROUNDS} rounds");

    // Flags that change the experiment are refused on a resume.
    let refused = cohort_sim(&["--resume", killed.to_str().expect("utf-8"), "--lr", "0.5"])
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused"));

    run_to_end(cohort_sim(&[
        "--resume",
        killed.to_str().expect("utf-8"),
        "--quiet",
        // The same as the killed run's: central evaluation's sums still
        // depend on the thread count (in the last digit of a loss).
        "--threads",
        "2",
    ]));
    run_to_end({
        let mut c = cohort_sim(&[]);
        c.args(experiment_args(&whole));
        c
    });

    let weights = |d: &Path| std::fs::read(d.join("weights.safetensors")).expect("weights");
    assert_eq!(weights(&killed), weights(&whole), "final weights differ");
    let (a, b) = (csv_rows(&killed), csv_rows(&whole));
    assert_eq!(
        a.len() as u64,
        ROUNDS + 1,
        "one row per round, no duplicates"
    );
    assert_eq!(a, b, "metrics.csv differs");
    assert_eq!(
        jsonl_rows(&killed),
        jsonl_rows(&whole),
        "metrics.jsonl differs"
    );
    let table = |d: &Path| {
        let s = std::fs::read_to_string(d.join("summary.txt")).expect("summary");
        s.lines()
            .take_while(|l| !l.starts_with("rounds "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(table(&killed), table(&whole));
    assert!(table(&whole).contains("digits"));
}
