//! Exploration: centralized training of a text model on N Shakespeare roles.
//! cargo run --release -p cohort-tasks --example text_probe -- MODEL DOCS EPOCHS LR BATCH
use std::time::Instant;

use cohort_tasks::{DatasetSpec, ModelRegistry, Backend, TaskSpec, TaskData, TrainConfig, Optimizer, TextSource};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = a.get(1).map_or("char_mlp80", |s| s.as_str());
    let docs: usize = a.get(2).map_or(40, |s| s.parse().unwrap());
    let epochs: u32 = a.get(3).map_or(1, |s| s.parse().unwrap());
    let lr: f32 = a.get(4).map_or(0.05, |s| s.parse().unwrap());
    let batch: u32 = a.get(5).map_or(32, |s| s.parse().unwrap());
    let adam = a.get(6).is_some_and(|s| s == "adam");
    let mut src = TextSource::new("tasks/data/shakespeare.csv.gz");
    src.documents = Some(docs);
    src.test_stride = 4;
    let t0 = Instant::now();
    let split = DatasetSpec::Text(src).load(None).unwrap();
    println!("load {:?}: train {} test {} classes {}", t0.elapsed(), split.train.len(), split.test.len(), split.train.classes);
    let counts = split.test.class_counts();
    let top = counts.iter().max().unwrap();
    println!("baseline (most frequent in test) {:.3}", *top as f64 / split.test.len() as f64);
    let m = ModelRegistry::default().build(model, Backend::Dfdx, vec![TaskSpec::new("next", split.train.classes)]).unwrap();
    let mut p = m.init(1);
    let idx: Vec<usize> = (0..split.train.len()).collect();
    for e in 0..epochs {
        let cfg = TrainConfig { epochs: 1, batch_size: batch, lr, seed: e as u64,
            optimizer: if adam { Optimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 } } else { Optimizer::Momentum { momentum: 0.9, nesterov: false } }, ..TrainConfig::default() };
        let t = Instant::now();
        let out = m.train(&p, &[TaskData { task: "next", data: &split.train, indices: &idx }], &cfg).unwrap();
        let dt = t.elapsed().as_secs_f64();
        p = out.params;
        let t = Instant::now();
        let ev = m.evaluate(&p, "next", &split.test, None).unwrap();
        println!("epoch {e}: train {:.1}s ({:.0} samples/s) loss {:.3}; test acc {:.4} loss {:.3} ({:.1}s)", dt, idx.len() as f64 / dt, out.metrics[0].loss, ev.accuracy, ev.loss, t.elapsed().as_secs_f64());
    }
}
