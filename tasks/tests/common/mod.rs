#![allow(dead_code)]
//! Helpers shared by the integration tests.

use cohort_tasks::*;

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

/// Trains `backbone` + one head `task` centrally on a built-in split and
/// returns the held-out accuracy.
pub fn central(backbone: BackboneKind, name: &str, cfg: &TrainConfig) -> f32 {
    let split = builtin(name).expect("builtin");
    let spec = ModelSpec::new(backbone, vec![TaskSpec::new("t", split.train.classes)]);
    let start = spec.init(1);
    let idx = all(&split.train);
    let out = train(
        &spec,
        &start,
        &[TaskData {
            task: "t",
            data: &split.train,
            indices: &idx,
        }],
        cfg,
    )
    .expect("train");
    let m = evaluate(&spec, &out.params, "t", &split.test, None).expect("eval");
    eprintln!(
        "{backbone} on {name}: accuracy {:.4}, loss {:.4}, train loss {:.4}",
        m.accuracy, m.loss, out.metrics[0].loss
    );
    m.accuracy
}
