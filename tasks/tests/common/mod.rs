#![allow(dead_code)]
//! Helpers shared by the integration tests.

use cohort_tasks::*;

/// Both concrete backends, for tests of training semantics that must hold
/// whichever code trains the model.
pub const BACKENDS: [Backend; 2] = [Backend::Gemm, Backend::Dfdx];

/// Built-in model `name` on `backend` (never `Auto`) with `tasks`, from the
/// default registry.
pub fn build(name: &str, backend: Backend, tasks: Vec<TaskSpec>) -> SharedModel {
    let m = ModelRegistry::default()
        .build(name, backend, tasks)
        .unwrap_or_else(|e| panic!("build {name} on {backend}: {e}"));
    assert_eq!(m.backend(), backend, "{name}");
    m
}

pub fn momentum(epochs: u32, lr: f32, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        lr,
        optimizer: Optimizer::Momentum {
            momentum: 0.9,
            nesterov: false,
        },
        seed,
        ..TrainConfig::default()
    }
}

pub fn all(d: &Dataset) -> Vec<usize> {
    (0..d.len()).collect()
}

/// Trains built-in model `name` on the gemm executor + one head `task`
/// centrally on a built-in split and returns the held-out accuracy.
pub fn central(backbone: BackboneKind, name: &str, cfg: &TrainConfig) -> f32 {
    central_on(backbone.name(), Backend::Gemm, name, cfg)
}

/// [`central`] for registry model `model` on `backend`.
pub fn central_on(model: &str, backend: Backend, name: &str, cfg: &TrainConfig) -> f32 {
    let split = builtin(name).expect("builtin");
    let spec = build(
        model,
        backend,
        vec![TaskSpec::new("t", split.train.classes)],
    );
    let start = spec.init(1);
    let idx = all(&split.train);
    let out = spec
        .train(
            &start,
            &[TaskData {
                task: "t",
                data: &split.train,
                indices: &idx,
            }],
            cfg,
        )
        .expect("train");
    let m = spec
        .evaluate(&out.params, "t", &split.test, None)
        .expect("eval");
    eprintln!(
        "{model} ({backend}) on {name}: accuracy {:.4}, loss {:.4}, train loss {:.4}",
        m.accuracy, m.loss, out.metrics[0].loss
    );
    m.accuracy
}
