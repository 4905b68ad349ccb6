//! Shakespeare in the simulator: one client per speaking role (the natural
//! partition by role id), next-character prediction and the play's genre on
//! one text backbone (`simulator/experiments/shakespeare-small.toml`).

use std::path::{Path, PathBuf};

use cohort_simulator::data::load_tasks;
use cohort_simulator::{run_experiment, ExperimentConfig, Population};
use cohort_tasks::{Backend, ModelRegistry, TaskData};

fn small() -> ExperimentConfig {
    let path: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/shakespeare-small.toml");
    ExperimentConfig::from_file(&path).expect("experiment file")
}

#[test]
fn natural_partition_gives_each_role_its_own_client() {
    let cfg = small();
    let pop = Population::new(&cfg).expect("population");
    let train = &pop.tasks[0].split.train;
    let keys = train.keys().expect("text keys");
    for c in 0..cfg.clients.count {
        let (idx, _) = pop.client_data(c, 0);
        assert!(!idx.is_empty(), "client {c} holds no role");
        let role = keys[idx[0]];
        assert!(
            idx.iter().all(|&i| keys[i] == role),
            "client {c} mixes roles"
        );
        // Both tasks: the same windows of the same role.
        assert_eq!(pop.client_data(c, 1).0, idx);
    }
}

/// FedAvg by role against centralized training of the same model on the
/// same training characters, for as many passes over them (6 rounds of
/// every client's 1 local epoch; 6 epochs, the best held-out accuracy after
/// any of them), next character only.
#[test]
fn federated_by_role_is_within_3_points_of_centralized() {
    let mut cfg = small();
    cfg.tasks.retain(|t| t.name == "next_char");
    cfg.rounds = 6;
    let fl = run_experiment(&cfg, |_| {})
        .expect("runs")
        .accuracy("next_char")
        .expect("evaluated");

    let task = load_tasks(&cfg).expect("data").remove(0);
    let model = ModelRegistry::default()
        .build(&cfg.backbone, Backend::Dfdx, vec![task.spec()])
        .expect("model");
    let idx: Vec<usize> = (0..task.split.train.len()).collect();
    let mut params = model.init(cfg.seed);
    let mut by_epoch = Vec::new();
    for epoch in 0..cfg.rounds {
        let mut train = cfg.engine.train.clone();
        train.seed = epoch;
        let data = [TaskData {
            task: "next_char",
            data: &task.split.train,
            indices: &idx,
        }];
        params = model.train(&params, &data, &train).expect("trains").params;
        let ev = model.evaluate(&params, "next_char", &task.split.test, None);
        by_epoch.push(ev.expect("evaluates").accuracy);
    }
    let central = by_epoch.iter().copied().fold(0.0f32, f32::max);
    println!(
        "next character on the held-out lines of {} roles: federated {fl:.4} after {} rounds, centralized best {central:.4} (by epoch {by_epoch:?})",
        cfg.clients.count, cfg.rounds
    );
    assert!(central > 0.3, "centralized {central}");
    assert!(
        fl >= central - 0.03,
        "federated {fl} vs centralized {central}"
    );
}
