//! The model seam across the binaries: `cohort-sim` and `cohort-aggregator`
//! derive the initial weights from an experiment file in one place, and an
//! aggregator restarted with another model than its checkpoint's refuses to
//! start, naming both layouts.

use std::process::Command;

use cohort_aggregator::checkpoint::weights_from_safetensors;
use cohort_aggregator::{strategy_from_config, Engine};
use cohort_simulator::{engine_config, ExperimentConfig, Simulation};
use cohort_tests::net::{bin, TestDir};

fn experiment(backbone: &str, backend: &str) -> String {
    format!(
        r#"
name = "seam"
seed = 11
rounds = 3
backbone = "{backbone}"
backend = "{backend}"

[[tasks]]
name = "digits"
dataset = "mnist5k"

[clients]
count = 6
per_round = 3

[engine]
federation = "seam"
"#
    )
}

/// The aggregator's initial weights (exported by the real binary) are the
/// simulator's, bit for bit, on both backends.
#[test]
fn simulator_and_aggregator_start_from_the_same_weights() {
    let dir = TestDir::new();
    for (backbone, backend) in [("mlp28", "auto"), ("resmlp28", "dfdx")] {
        let text = experiment(backbone, backend);
        let file = dir.path().join(format!("{backbone}.toml"));
        std::fs::write(&file, &text).expect("experiment file");
        let out = dir.path().join(format!("{backbone}.safetensors"));
        let status = Command::new(bin("cohort-aggregator"))
            .arg("--experiment")
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.path().join("unused"))
            .arg("--export-initial")
            .arg(&out)
            .status()
            .expect("cohort-aggregator runs");
        assert!(status.success(), "{backbone}: export failed");

        let cfg = ExperimentConfig::from_toml(&text).expect("experiment");
        let sim = Simulation::new(cfg).expect("simulation");
        let layout = sim.engine.layout().clone();
        let exported =
            weights_from_safetensors(&layout, &std::fs::read(&out).expect("exported file"))
                .expect("exported weights have the simulator's layout");
        for (name, v) in sim.engine.global().iter() {
            let e = exported.get(name).expect("group exported");
            assert!(
                v.iter().zip(e).all(|(a, b)| a.to_bits() == b.to_bits()) && v.len() == e.len(),
                "{backbone}: group {name} differs between cohort-sim and cohort-aggregator"
            );
        }
        eprintln!(
            "{backbone} on {backend}: {} groups, {} values, bit-identical",
            layout.groups.len(),
            sim.engine.global().num_values()
        );
    }
}

/// Checkpoints of one model, then an aggregator started with another
/// backbone on the same data folder: it exits with an error that names
/// both layouts, instead of resuming the old model and refusing every node.
#[test]
fn restart_with_another_model_is_refused_with_both_layouts() {
    let dir = TestDir::new();
    let data = dir.path().join("agg");
    // A checkpoint of the mlp28 experiment, written by the engine library
    // with the settings the aggregator derives from the same file.
    let first = ExperimentConfig::from_toml(&experiment("mlp28", "auto")).expect("experiment");
    let sim = Simulation::new(first.clone()).expect("simulation");
    let engine = Engine::new(
        engine_config(&first),
        sim.engine.layout().clone(),
        sim.engine.global().clone(),
        strategy_from_config(&first.strategy),
    )
    .expect("engine");
    engine
        .save_checkpoint(&data.join("checkpoints"))
        .expect("checkpoint");

    let other = dir.path().join("other.toml");
    std::fs::write(&other, experiment("resmlp28", "dfdx")).expect("experiment file");
    let out = Command::new(bin("cohort-aggregator"))
        .arg("--experiment")
        .arg(&other)
        .arg("--data-dir")
        .arg(&data)
        .arg("--open")
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .output()
        .expect("cohort-aggregator runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(!out.status.success(), "it resumed another model");
    assert!(
        stderr.contains("another model"),
        "the error says what is wrong: {stderr}"
    );
    // Both layouts are named: mlp28's second layer (256 -> 128) and
    // resmlp28's LayerNorm.
    assert!(stderr.contains("backbone.2.weight 128x256"), "{stderr}");
    assert!(stderr.contains("gamma"), "{stderr}");
}
