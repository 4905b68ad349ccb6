//! The example experiment files in `simulator/experiments/` parse, and the
//! small ones run.

use std::path::PathBuf;

use cohort_simulator::{run_experiment, ExperimentConfig, Simulation};

fn experiments() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../simulator/experiments")
}

fn load(name: &str) -> ExperimentConfig {
    let path = experiments().join(name);
    let text = std::fs::read_to_string(&path).expect("experiment file");
    ExperimentConfig::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_experiment_file_parses() {
    let mut n = 0;
    for e in std::fs::read_dir(experiments()).expect("experiments folder") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            ExperimentConfig::from_toml(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} experiment files");
}

#[test]
fn digits_iid_file_runs_and_writes_outputs() {
    let mut cfg = load("digits-iid.toml");
    let dir = std::env::temp_dir().join(format!("cohort-exp-{}", std::process::id()));
    cfg.output = Some(dir.clone());
    let r = run_experiment(&cfg, |_| {}).expect("runs");
    assert!(r.accuracy("digits").expect("evaluated") >= 0.95);
    for f in [
        "metrics.csv",
        "metrics.jsonl",
        "plots/accuracy.svg",
        "plots/accuracy.png",
        "summary.txt",
        "summary.json",
        "result.json",
        "experiment.toml",
        "weights.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).expect("csv");
    assert_eq!(
        csv.lines().count() as u64,
        cfg.rounds + 1,
        "a header and a row per round"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn from_file(name: &str) -> ExperimentConfig {
    ExperimentConfig::from_file(&experiments().join(name)).expect("experiment file")
}

/// Both text tasks learn on one backbone: next character well above the
/// most frequent character (about 16%), genre at least the most frequent
/// genre of the held-out lines.
#[test]
fn shakespeare_small_file_trains_next_char_and_genre() {
    let cfg = from_file("shakespeare-small.toml");
    let r = run_experiment(&cfg, |_| {}).expect("runs");
    let (next, genre) = (
        r.accuracy("next_char").expect("next_char"),
        r.accuracy("genre").expect("genre"),
    );
    let pop = cohort_simulator::Population::new(&cfg).expect("data");
    let counts = pop.tasks[1].split.test.class_counts();
    let majority =
        *counts.iter().max().expect("classes") as f32 / pop.tasks[1].split.test.len() as f32;
    println!("shakespeare-small: next_char {next:.4}, genre {genre:.4} (most frequent genre {majority:.4})");
    assert!(next > 0.28, "next_char {next}");
    assert!(genre >= majority - 0.02, "genre {genre} vs {majority}");
}

/// The benchmark file (W2) runs: one round over all 457 roles.
#[test]
fn shakespeare_benchmark_file_runs_a_round() {
    let mut cfg = from_file("shakespeare.toml");
    cfg.rounds = 1;
    let r = run_experiment(&cfg, |_| {}).expect("runs");
    assert_eq!(r.rounds.len(), 1);
    assert_eq!(r.rounds[0].accepted, cfg.clients.per_round);
    assert!(r.accuracy("next_char").expect("evaluated") > 0.16);
}

#[test]
fn scale_file_holds_no_state_for_idle_clients() {
    let mut cfg = load("scale.toml");
    cfg.rounds = 2;
    let mut sim = Simulation::new(cfg).expect("builds");
    let rounds = sim.run(|_| {}).expect("runs");
    assert_eq!(rounds.len(), 2);
    assert!(rounds
        .iter()
        .all(|m| m.sampled == 1000 && m.accepted == 1000));
    // Only clients that trained keep state (8-bit residuals): at most 2000.
    assert!(
        sim.clients_with_state() <= 2000,
        "{} clients with state",
        sim.clients_with_state()
    );
    println!(
        "state: {} clients, {} bytes",
        sim.clients_with_state(),
        sim.state_bytes()
    );
}

#[test]
fn scale_10k_file_keeps_no_residuals() {
    let mut cfg = load("scale-10k.toml");
    assert_eq!(cfg.clients.count, 1_000_000);
    assert!(!cfg.clients.keep_residuals);
    // The same settings on a smaller population and round.
    cfg.clients.count = 5000;
    cfg.clients.per_round = 500;
    cfg.rounds = 1;
    let mut sim = Simulation::new(cfg).expect("builds");
    let rounds = sim.run(|_| {}).expect("runs");
    assert_eq!(rounds[0].accepted, 500);
    // No local heads and no residuals: no client keeps state.
    assert_eq!(sim.clients_with_state(), 0);
}
