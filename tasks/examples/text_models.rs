//! The built-in next-character models side by side (BENCHMARKS.md, W2):
//! centralized training on `--docs` Shakespeare roles, held-out accuracy
//! and wall time after every epoch.
//!
//! cargo run --release -p cohort-tasks --example text_models -- [--docs 12] [--epochs 2] [--models char_mlp80,char_gru80]
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cohort_tasks::{
    Backend, DatasetSpec, ModelRegistry, Optimizer, TaskData, TaskSpec, TextSource, TrainConfig,
};

fn main() -> Result<()> {
    let (mut docs, mut epochs, mut models) = (12usize, 2u32, "char_mlp80,char_gru80".to_string());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--docs" => docs = value()?.parse()?,
            "--epochs" => epochs = value()?.parse()?,
            "--models" => models = value()?,
            _ => bail!("unknown argument {a} (--docs N, --epochs N, --models a,b)"),
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare.csv.gz");
    let split = DatasetSpec::Text(TextSource {
        documents: Some(docs),
        test_stride: 2,
        ..TextSource::new(path)
    })
    .load(None)?;
    let top = split.test.class_counts().into_iter().max().unwrap_or(0);
    println!(
        "{docs} roles: {} training windows, {} held-out (every 2nd); most frequent character {:.4}; load average {}",
        split.train.len(),
        split.test.len(),
        top as f64 / split.test.len().max(1) as f64,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    let idx: Vec<usize> = (0..split.train.len()).collect();
    for name in models.split(',') {
        let tasks = vec![TaskSpec::new("next_char", split.train.classes)];
        let model = ModelRegistry::default().build(name, Backend::Dfdx, tasks)?;
        let mut params = model.init(1);
        let mut total = 0.0;
        for e in 0..epochs {
            let cfg = TrainConfig {
                batch_size: 32,
                lr: 0.002,
                optimizer: Optimizer::Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
                seed: u64::from(e),
                ..TrainConfig::default()
            };
            let data = [TaskData {
                task: "next_char",
                data: &split.train,
                indices: &idx,
            }];
            let t = Instant::now();
            params = model.train(&params, &data, &cfg)?.params;
            let dt = t.elapsed().as_secs_f64();
            total += dt;
            let ev = model.evaluate(&params, "next_char", &split.test, None)?;
            println!(
                "{name:<11} epoch {}: {:>6.1} s ({:>6.0} windows/s), {:>7.1} s in all: held-out accuracy {:.4}, loss {:.4}",
                e + 1,
                dt,
                idx.len() as f64 / dt,
                total,
                ev.accuracy,
                ev.loss
            );
        }
    }
    Ok(())
}
