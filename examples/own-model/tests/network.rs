//! A user's own dfdx model over the network: one aggregator and three node
//! processes of this crate's binary on 127.0.0.1 (real libp2p, sealed
//! updates), on `experiment.toml`; the held-out accuracy the aggregator
//! measures after the last round must be in the band of the same experiment
//! simulated in this process. The aggregator aggregates with the user's own
//! strategy (`ScheduledMomentum`, defined in this crate), in both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cohort_simulator::ExperimentConfig;
use cohort_tests::net::{node_config_for, Aggregator, Proc, TestDir};

const BIN: &str = env!("CARGO_BIN_EXE_cohort-example-own-model");

fn experiment() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiment.toml")
}

fn start_node(name: &str, dir: &Path, connect: &Path) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.arg("node")
        .arg("--config")
        .arg(dir.join("node.toml"))
        .arg("--connect")
        .arg(connect);
    Proc::spawn(name, cmd, dir)
}

/// The user's model, and the user's strategy
/// (`cohort_example_own_model::strategy::ScheduledMomentum`, defined
/// outside the aggregator crate) in the aggregator service.
#[test]
fn own_model_and_strategy_federate_over_the_network_like_in_the_simulator() {
    let cfg = ExperimentConfig::from_file(&experiment()).expect("experiment");
    let sim = cohort_example_own_model::simulate_with_our_strategy(&cfg).expect("simulation");
    let sim_acc = f64::from(sim.accuracy("digits").expect("simulated accuracy"));

    let dir = TestDir::new();
    let mut cmd = Command::new(BIN);
    cmd.arg("aggregator");
    let mut agg = Aggregator::start_command(
        cmd,
        &experiment(),
        &dir.path().join("aggregator"),
        "/ip4/127.0.0.1/tcp/0",
        &["--open", "--our-strategy"],
    );
    let connect = agg.connect_file();
    let mut nodes: Vec<Proc> = (0..3)
        .map(|i| {
            let nd = dir.path().join(format!("node-{i}"));
            node_config_for(&nd, i, 3, "", "my_resmlp", "mnist5k");
            start_node(&format!("node-{i}"), &nd, &connect)
        })
        .collect();
    let status = agg.proc.expect_exit(Duration::from_secs(600));
    assert!(status.success(), "aggregator: {status}\n{}", agg.proc.err());
    for n in &mut nodes {
        let s = n.expect_exit(Duration::from_secs(60));
        assert!(s.success(), "node: {s}\n{}", n.err());
    }
    let rounds = agg.rounds();
    assert_eq!(rounds.len(), 8, "every round has its line");
    assert!(
        rounds.iter().all(|r| r["accepted"] == 3),
        "all three nodes contribute to every round: {rounds:?}"
    );
    // The strategy's own federated evaluation summary after the last round.
    let summaries = agg.metrics("federated_summary");
    assert!(
        summaries
            .iter()
            .any(|s| s["round"] == 8 && s["reports"] == 3),
        "federated evaluation of the last round by all three nodes: {summaries:?}"
    );
    let net_acc = agg.accuracy("digits");
    println!("held-out digits accuracy: network {net_acc:.3}, simulator {sim_acc:.3}");
    assert!(net_acc >= 0.85, "network accuracy {net_acc}");
    assert!(
        (net_acc - sim_acc).abs() <= 0.03,
        "network {net_acc:.3} outside the simulator's band {sim_acc:.3} +- 0.03"
    );
}
