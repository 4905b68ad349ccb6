//! The multi-task workload W0: `digits` (MNIST 5k) and `fashion`
//! (Fashion-MNIST 6k/1k) on one 28x28 MLP backbone, clients holding one or
//! both tasks, Dirichlet(0.5) label skew, 8-bit deltas.

use cohort_protocol::messages::TrainConfig;
use cohort_protocol::{head_group, BACKBONE};
use cohort_simulator::config::Sharing;
use cohort_simulator::{run_experiment, ExperimentConfig, Simulation};
use cohort_tasks::TaskData;
use cohort_tests::pct;

/// Accuracy of a model trained centrally on all of a task's training data.
fn centralized(dataset: &str, task: &str, epochs: u32) -> f32 {
    let split = cohort_tasks::builtin(dataset).expect("built-in data set");
    let spec = cohort_tests::builtin_model("mlp28", &[(task, 10)]);
    let all: Vec<usize> = (0..split.train.len()).collect();
    let cfg = TrainConfig {
        epochs,
        batch_size: 32,
        lr: 0.05,
        seed: 5,
        ..TrainConfig::default()
    };
    let out = spec
        .train(
            &spec.init(5),
            &[TaskData {
                task,
                data: &split.train,
                indices: &all,
            }],
            &cfg,
        )
        .expect("trains");
    100.0
        * spec
            .evaluate(&out.params, task, &split.test, None)
            .expect("evaluates")
            .accuracy
}

#[test]
fn w0_shared_backbone_is_within_3_points_of_centralized() {
    let cfg = ExperimentConfig::default();
    let shared = run_experiment(&cfg, |_| {}).expect("W0 runs");
    let mut sep_cfg = cfg.clone();
    sep_cfg.sharing = Sharing::Separate;
    let separate = run_experiment(&sep_cfg, |_| {}).expect("separate federations run");
    let c_digits = centralized("mnist5k", "digits", 20);
    let c_fashion = centralized("fashion6k", "fashion", 20);
    println!("W0 after {} rounds          digits   fashion", cfg.rounds);
    println!(
        "  shared backbone         {:6.2}%  {:6.2}%",
        pct(&shared, "digits"),
        pct(&shared, "fashion")
    );
    println!(
        "  one federation per task {:6.2}%  {:6.2}%",
        pct(&separate, "digits"),
        pct(&separate, "fashion")
    );
    println!("  centralized (20 epochs) {c_digits:6.2}%  {c_fashion:6.2}%");
    let bytes = |r: &cohort_simulator::ExperimentResult| {
        r.rounds.iter().map(|m| m.bytes_up).sum::<u64>() as f64 / 1e6
    };
    println!(
        "  upload: shared {:.1} MB, separate {:.1} MB",
        bytes(&shared),
        bytes(&separate)
    );
    assert!(
        pct(&shared, "digits") >= c_digits - 3.0,
        "digits: shared {:.2}% vs centralized {c_digits:.2}%",
        pct(&shared, "digits")
    );
    assert!(
        pct(&shared, "fashion") >= c_fashion - 3.0,
        "fashion: shared {:.2}% vs centralized {c_fashion:.2}%",
        pct(&shared, "fashion")
    );
}

#[test]
fn local_heads_never_leave_and_personalization_helps() {
    let mut cfg = ExperimentConfig {
        rounds: 6,
        heads: cohort_simulator::config::HeadPolicy::Local,
        ..ExperimentConfig::default()
    };
    cfg.eval.personalized = true;
    cfg.eval.personalize_clients = 20;
    let mut sim = Simulation::new(cfg).expect("builds");
    let initial = sim.engine.global().clone();
    sim.run(|_| {}).expect("runs");
    // The aggregator never received a head: its copies are the initial ones,
    // while the backbone moved.
    for task in ["digits", "fashion"] {
        let g = head_group(task);
        assert_eq!(
            sim.engine.global().get(&g),
            initial.get(&g),
            "{g} reached the aggregator"
        );
    }
    assert_ne!(sim.engine.global().get(BACKBONE), initial.get(BACKBONE));
    let personal = sim.personalized_eval().expect("personalized evaluation");
    assert_eq!(personal.len(), 2);
    for p in &personal {
        println!(
            "{}: {} clients, own local head {:.2}%, after fine-tuning it {:.2}%",
            p.task,
            p.clients,
            100.0 * p.before,
            100.0 * p.after
        );
        assert!(p.clients > 0);
        assert!(
            p.before > 0.5,
            "local heads of {} did not learn: {:.2}%",
            p.task,
            100.0 * p.before
        );
        assert!(
            p.after >= p.before - 0.02,
            "fine-tuning the head made {} worse",
            p.task
        );
    }
}
