//! Local training throughput, samples per second on one thread: the MLP
//! (784-256-128 + 10-class head) and the CNN at batch 32 and 64, SGD with
//! momentum 0.9, on the embedded Fashion-MNIST 6k training set.
//!
//! `cargo bench -p cohort-tasks --bench train_throughput` (optionally with a
//! filter argument, e.g. `mlp28`). Runs inside a 1-thread rayon pool (the
//! kernel is single-threaded anyway), one warm-up epoch, then the best of 3
//! timed epochs.

use std::time::Instant;

use cohort_tasks::*;

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let split = builtin("fashion6k").expect("fashion6k");
    let idx: Vec<usize> = (0..split.train.len()).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    println!(
        "{:<8} {:>6} {:>14} {:>10}",
        "model", "batch", "samples/s", "epoch s"
    );
    for kind in [BackboneKind::Mlp28, BackboneKind::Cnn28] {
        for batch in [32u32, 64] {
            let label = format!("{kind}/b{batch}");
            if filter.as_ref().is_some_and(|f| !label.contains(f.as_str())) {
                continue;
            }
            let spec = ModelSpec::new(kind, vec![TaskSpec::new("fashion", 10)]);
            let start = spec.init(0);
            let cfg = TrainConfig {
                epochs: 1,
                batch_size: batch,
                lr: 0.01,
                optimizer: Optimizer::Momentum {
                    momentum: 0.9,
                    nesterov: false,
                },
                ..TrainConfig::default()
            };
            let data = [TaskData {
                task: "fashion",
                data: &split.train,
                indices: &idx,
            }];
            let best = pool.install(|| {
                train(&spec, &start, &data, &cfg).expect("warm-up");
                (0..3)
                    .map(|_| {
                        let t = Instant::now();
                        let out = train(&spec, &start, &data, &cfg).expect("train");
                        std::hint::black_box(&out);
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min)
            });
            println!(
                "{:<8} {:>6} {:>14.0} {:>10.3}",
                kind.name(),
                batch,
                idx.len() as f64 / best,
                best
            );
        }
    }
}
