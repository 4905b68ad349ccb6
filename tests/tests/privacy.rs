//! Differential privacy on real data: digits in the sampled-population
//! setting (`simulator/experiments/digits-dp.toml`: 4,000 clients with 20
//! samples each, Poisson rate 0.05, 40 rounds), private at epsilon 8,
//! delta 1e-5, ends within 5 points of the same run without DP.

use std::path::Path;

use cohort_aggregator::PrivacyMode;
use cohort_simulator::{run_experiment, ExperimentConfig};
use cohort_tests::pct;

fn experiment() -> ExperimentConfig {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../simulator/experiments/digits-dp.toml");
    ExperimentConfig::from_file(&path).expect("experiment file")
}

#[test]
fn dp_fedavg_at_epsilon_8_is_within_5_points_of_no_dp() {
    let cfg = experiment();
    assert_eq!(cfg.privacy.mode, PrivacyMode::Central);
    assert_eq!(cfg.privacy.target_epsilon, Some(8.0));
    let private = run_experiment(&cfg, |_| {}).expect("private run");
    let mut plain = cfg.clone();
    plain.privacy.mode = PrivacyMode::Off;
    let baseline = run_experiment(&plain, |_| {}).expect("plain run");
    let last = private
        .rounds
        .last()
        .and_then(|r| r.privacy.clone())
        .expect("privacy report");
    let (dp, no) = (pct(&private, "digits"), pct(&baseline, "digits"));
    println!(
        "digits, 4000 clients x 20 samples, q 0.05, 40 rounds: no DP {no:.2}%, \
         DP ({:.3}, {:.0e}) with z {:.3}, clip {:.3}: {dp:.2}%",
        last.epsilon, last.delta, last.noise_multiplier, last.clip
    );
    assert_eq!(last.rounds, 40);
    assert!(
        last.epsilon <= 8.0 && last.epsilon > 7.9,
        "{}",
        last.epsilon
    );
    assert!(baseline.rounds.iter().all(|r| r.privacy.is_none()));
    assert!(no >= 80.0, "the run without DP reached only {no:.2}%");
    assert!(dp >= no - 5.0, "DP {dp:.2}% vs {no:.2}% without");
}

#[test]
fn epsilon_is_in_the_csv_the_json_lines_and_the_summary() {
    let mut cfg = experiment();
    cfg.rounds = 3;
    cfg.eval.every = 3;
    let dir = std::env::temp_dir().join(format!("dp-metrics-{}", std::process::id()));
    cfg.output = Some(dir.clone());
    let r = run_experiment(&cfg, |_| {}).expect("runs");
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).expect("csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "epsilon")
        .expect("epsilon column");
    let eps: Vec<f64> = lines
        .map(|l| {
            l.split(',')
                .nth(col)
                .expect("cell")
                .parse()
                .expect("number")
        })
        .collect();
    let want: Vec<f64> = r
        .rounds
        .iter()
        .map(|m| m.privacy.as_ref().expect("privacy").epsilon)
        .collect();
    assert_eq!(eps.len(), 3);
    for (a, b) in eps.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let jsonl = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("jsonl");
    let last: serde_json::Value =
        serde_json::from_str(jsonl.lines().last().expect("a line")).expect("json");
    assert_eq!(last["privacy"]["rounds"], 3);
    let summary = std::fs::read_to_string(dir.join("summary.txt")).expect("summary");
    assert!(
        summary.contains("differential privacy: (") && summary.contains("after 3 rounds"),
        "{summary}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("summary.json")).expect("summary.json"),
    )
    .expect("json");
    assert_eq!(json["privacy"]["rounds"], 3);
    let chart = std::fs::read_to_string(dir.join("plots/privacy.svg")).expect("privacy chart");
    assert!(
        chart.contains("epsilon spent") && chart.contains("<polyline"),
        "epsilon chart"
    );
    assert!(dir.join("plots/privacy.png").is_file());
    let _ = std::fs::remove_dir_all(dir);
}

/// The accuracy-epsilon curve of BENCHMARKS.md: the same file at several
/// epsilons (and without DP), writing `benchmarks/dp/curve.csv`. Not part
/// of the normal test run (a few minutes):
/// `cargo nextest run -p cohort-tests -E 'test(accuracy_epsilon_curve)' --run-ignored only`,
/// then `python3 benchmarks/dp/plot_curve.py`.
#[test]
#[ignore = "benchmark: writes benchmarks/dp/curve.csv"]
fn accuracy_epsilon_curve() {
    use std::fmt::Write as _;
    let cfg = experiment();
    let mut csv = String::from("epsilon,noise_multiplier,accuracy,seed\n");
    for seed in [7u64, 8] {
        let mut plain = cfg.clone();
        plain.seed = seed;
        plain.privacy.mode = PrivacyMode::Off;
        let acc = pct(&run_experiment(&plain, |_| {}).expect("run"), "digits");
        println!("seed {seed} no DP: {acc:.2}%");
        let _ = writeln!(csv, "inf,0,{acc:.4},{seed}");
        for eps in [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0] {
            let mut c = cfg.clone();
            c.seed = seed;
            c.privacy.target_epsilon = Some(eps);
            let r = run_experiment(&c, |_| {}).expect("run");
            let p = r
                .rounds
                .last()
                .and_then(|m| m.privacy.clone())
                .expect("privacy");
            let acc = pct(&r, "digits");
            println!(
                "seed {seed} eps {:.3} (z {:.3}): {acc:.2}%",
                p.epsilon, p.noise_multiplier
            );
            let _ = writeln!(
                csv,
                "{:.4},{:.4},{acc:.4},{seed}",
                p.epsilon, p.noise_multiplier
            );
        }
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benchmarks/dp/curve.csv");
    std::fs::write(&out, csv).expect("write curve.csv");
}
