//! The two backends side by side: every architecture that both run trains
//! from the same start to the same weights (within 1e-5 relative), under
//! each optimizer; the dfdx backend is bit-identical whatever the thread
//! count; dfdx modules flatten and load bit-exactly, and a wrong layout is
//! a typed error.

use std::sync::Arc;

use cohort_tasks::dfdx::prelude::{Cpu, DeviceBuildExt};
use cohort_tasks::dfdx_backend::builtin::ResMlp28;
use cohort_tasks::*;

fn registry_model(name: &str, backend: Backend, classes: usize) -> SharedModel {
    ModelRegistry::default()
        .build(name, backend, vec![TaskSpec::new("t", classes)])
        .expect("built-in model")
}

/// `||a - b|| / ||a||` over all groups.
fn relative_diff(a: &ParamGroups, b: &ParamGroups) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (name, x) in a.iter() {
        let y = b.get(name).expect("same groups");
        assert_eq!(x.len(), y.len(), "{name}");
        for (p, q) in x.iter().zip(y) {
            num += f64::from(p - q).powi(2);
            den += f64::from(*p).powi(2);
        }
    }
    (num / den.max(1e-30)).sqrt()
}

fn optimizers() -> Vec<(&'static str, TrainConfig)> {
    let base = TrainConfig {
        epochs: 2,
        batch_size: 32,
        lr: 0.05,
        seed: 9,
        ..TrainConfig::default()
    };
    vec![
        ("sgd", base.clone()),
        (
            "momentum+wd",
            TrainConfig {
                optimizer: Optimizer::Momentum {
                    momentum: 0.9,
                    nesterov: false,
                },
                lr: 0.01,
                weight_decay: 1e-3,
                ..base.clone()
            },
        ),
        (
            "nesterov+prox",
            TrainConfig {
                optimizer: Optimizer::Momentum {
                    momentum: 0.9,
                    nesterov: true,
                },
                lr: 0.01,
                prox_mu: 0.1,
                ..base.clone()
            },
        ),
        (
            "adam",
            TrainConfig {
                optimizer: Optimizer::Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
                lr: 1e-3,
                ..base
            },
        ),
    ]
}

#[test]
fn both_backends_train_to_the_same_weights() {
    for (name, dataset, subset) in [
        ("mlp28", "mnist5k", 1000),
        ("mlp8x8", "digits8x8", usize::MAX),
        ("mlp_tab4", "penguins/species", usize::MAX),
    ] {
        let split = builtin(dataset).expect("data");
        let classes = split.train.classes;
        let gemm = registry_model(name, Backend::Gemm, classes);
        let dfdx = registry_model(name, Backend::Dfdx, classes);
        assert_eq!(gemm.backend(), Backend::Gemm);
        assert_eq!(dfdx.backend(), Backend::Dfdx);
        assert_eq!(gemm.layout(), dfdx.layout(), "{name}: layouts differ");
        let start = gemm.init(4);
        assert_eq!(
            start,
            dfdx.init(4),
            "{name}: the start depends on the backend"
        );
        let idx: Vec<usize> = (0..split.train.len().min(subset)).collect();
        let data = [TaskData {
            task: "t",
            data: &split.train,
            indices: &idx,
        }];
        for (opt, cfg) in optimizers() {
            let a = gemm.train(&start, &data, &cfg).expect("gemm trains");
            let b = dfdx.train(&start, &data, &cfg).expect("dfdx trains");
            let moved = relative_diff(&a.params, &start);
            let rel = relative_diff(&a.params, &b.params);
            eprintln!(
                "{name} {opt}: {} steps, weights moved {moved:.3e}, gemm vs dfdx {rel:.3e}, loss {:.4} vs {:.4}",
                a.metrics[0].steps, a.metrics[0].loss, b.metrics[0].loss
            );
            assert!(
                moved > 1e-3,
                "{name} {opt}: training did not move the weights"
            );
            assert!(rel < 1e-5, "{name} {opt}: gemm and dfdx differ by {rel:e}");
            assert_eq!(a.metrics[0].steps, b.metrics[0].steps);
            let (ea, eb) = (
                gemm.evaluate(&a.params, "t", &split.test, None)
                    .expect("eval"),
                dfdx.evaluate(&b.params, "t", &split.test, None)
                    .expect("eval"),
            );
            assert!((ea.accuracy - eb.accuracy).abs() <= 2.0 / ea.samples as f32);
        }
    }
}

#[test]
fn dfdx_training_does_not_depend_on_the_thread_count() {
    let split = builtin("mnist5k").expect("data");
    let model = registry_model("resmlp28", Backend::Dfdx, 10);
    let start = model.init(2);
    let idx: Vec<usize> = (0..640).collect();
    let data = [TaskData {
        task: "t",
        data: &split.train,
        indices: &idx,
    }];
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 64,
        lr: 0.05,
        seed: 1,
        ..TrainConfig::default()
    };
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool")
            .install(|| model.train(&start, &data, &cfg).expect("train"))
    };
    let one = run(1);
    assert_eq!(one.params, run(2).params, "1 vs 2 threads");
    assert_eq!(one.params, run(1).params, "the same seed twice");
    assert_ne!(one.params, start);
}

#[test]
fn resmlp28_learns_mnist_on_dfdx() {
    let split = builtin("mnist5k").expect("data");
    let model = registry_model("resmlp28", Backend::Dfdx, 10);
    let idx: Vec<usize> = (0..split.train.len()).collect();
    let cfg = TrainConfig {
        epochs: 3,
        batch_size: 32,
        lr: 0.05,
        optimizer: Optimizer::Momentum {
            momentum: 0.9,
            nesterov: false,
        },
        seed: 3,
        ..TrainConfig::default()
    };
    let out = model
        .train(
            &model.init(1),
            &[TaskData {
                task: "t",
                data: &split.train,
                indices: &idx,
            }],
            &cfg,
        )
        .expect("train");
    let m = model
        .evaluate(&out.params, "t", &split.test, None)
        .expect("eval");
    eprintln!("resmlp28 on mnist5k: held-out accuracy {:.4}", m.accuracy);
    assert!(m.accuracy > 0.9, "{}", m.accuracy);
}

#[test]
fn dfdx_modules_flatten_and_load_bit_exactly() {
    type Res = DfdxModel<ResMlp28, 784, 128>;
    let model = Res::new("resmlp28", vec![TaskSpec::new("t", 10)]).expect("model");
    let names: Vec<String> = Res::backbone_tensors()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names[0], "backbone.0.weight");
    assert!(names.iter().any(|n| n.ends_with("gamma")), "{names:?}");
    let dev = Cpu::seed_from_u64(5);
    let m = dev.build_module::<ResMlp28, f32>();
    let flat = Res::flatten_backbone(&m);
    assert_eq!(flat.len() as u64, model.layout().groups[0].len());
    let loaded = model.load_backbone(&dev, &flat).expect("load");
    let again = Res::flatten_backbone(&loaded);
    assert!(flat
        .iter()
        .zip(&again)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // A vector of another length is a typed error, not a partial load.
    assert!(matches!(
        model.load_backbone(&dev, &flat[1..]),
        Err(TasksError::Layout(_))
    ));
    // Weights of another model: the layout check refuses them.
    let other = registry_model("mlp28", Backend::Dfdx, 10);
    let mut wrong = other.init(0);
    let data = builtin("mnist5k").expect("data");
    let idx = [0usize, 1, 2];
    let td = [TaskData {
        task: "t",
        data: &data.train,
        indices: &idx,
    }];
    assert!(matches!(
        model.train(&wrong, &td, &TrainConfig::default()),
        Err(TasksError::Layout(_))
    ));
    wrong.insert(BACKBONE, vec![0.0; 3]);
    assert!(model.evaluate(&wrong, "t", &data.test, None).is_err());
}

#[test]
fn the_registry_names_models_and_backends() {
    let r = ModelRegistry::default();
    let cnn = r.build("cnn28", Backend::Dfdx, vec![TaskSpec::new("t", 10)]);
    assert!(
        matches!(&cnn, Err(TasksError::BackendUnavailable { available, .. }) if available == "gemm"),
        "{cnn:?}"
    );
    let res = r.build("resmlp28", Backend::Gemm, vec![TaskSpec::new("t", 10)]);
    assert!(matches!(res, Err(TasksError::BackendUnavailable { .. })));
    assert_eq!(
        r.build("resmlp28", Backend::Auto, vec![TaskSpec::new("t", 10)])
            .expect("auto")
            .backend(),
        Backend::Dfdx
    );
    assert_eq!(
        r.build("mlp28", Backend::Auto, vec![TaskSpec::new("t", 10)])
            .expect("auto")
            .backend(),
        Backend::Gemm
    );
    match r.build("resnet50", Backend::Auto, vec![]) {
        Err(TasksError::UnknownModel { known, .. }) => assert!(known.contains("resmlp28")),
        other => panic!("{other:?}"),
    }
    // A program's own name, on a model type of its own.
    let mut mine = ModelRegistry::default();
    mine.register_dfdx::<ResMlp28, 784, 128>("my_res", "mine");
    let m = mine
        .build("my_res", Backend::Auto, vec![TaskSpec::new("t", 3)])
        .expect("registered");
    assert_eq!(m.name(), "my_res");
    let sub: SharedModel = m
        .with_tasks(vec![TaskSpec::new("u", 4)])
        .expect("other tasks");
    assert_eq!(sub.tasks()[0].classes, 4);
    let _: Arc<dyn Model> = sub;
}
