//! Local training throughput, samples per second on one thread: the MLP
//! (784-256-128 + 10-class head) and the CNN at batch 32 and 64, SGD with
//! momentum 0.9, on the embedded Fashion-MNIST 6k training set.
//!
//! `cargo bench -p cohort-tasks --bench train_throughput` (optionally with a
//! filter argument, e.g. `mlp28`). Runs inside a 1-thread rayon pool (the
//! kernel is single-threaded anyway), one warm-up epoch, then 9 timed
//! epochs of 6000 samples: best and median.

use std::time::Instant;

use cohort_tasks::*;

/// Timed epochs per configuration (the machine is shared: the best epoch
/// is the least disturbed one).
const REPEATS: usize = 9;

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let split = builtin("fashion6k").expect("fashion6k");
    let idx: Vec<usize> = (0..split.train.len()).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    println!(
        "{:<8} {:>6} {:>16} {:>18}",
        "model", "batch", "best samples/s", "median samples/s"
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
            let mut times: Vec<f64> = pool.install(|| {
                train(&spec, &start, &data, &cfg).expect("warm-up");
                (0..REPEATS)
                    .map(|_| {
                        let t = Instant::now();
                        let out = train(&spec, &start, &data, &cfg).expect("train");
                        std::hint::black_box(&out);
                        t.elapsed().as_secs_f64()
                    })
                    .collect()
            });
            times.sort_by(f64::total_cmp);
            let (best, median) = (times[0], times[times.len() / 2]);
            let n = idx.len() as f64;
            println!(
                "{:<8} {:>6} {:>16.0} {:>18.0}",
                kind.name(),
                batch,
                n / best,
                n / median
            );
        }
    }
    // A W1-like round: 10 clients x 600 Fashion samples, MLP, plain SGD lr
    // 0.05, batch 32, one epoch, one client per worker of a 2-thread pool.
    if filter.as_ref().is_none_or(|f| "round".contains(f.as_str())) {
        use rayon::prelude::*;
        let spec = ModelSpec::new(BackboneKind::Mlp28, vec![TaskSpec::new("fashion", 10)]);
        let start = spec.init(0);
        let parts: Vec<Vec<usize>> = (0..10)
            .map(|c| (c * 600..(c + 1) * 600).collect())
            .collect();
        let pool2 = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let mut times: Vec<f64> = (0..=REPEATS)
            .map(|r| {
                let t = Instant::now();
                let outs: Vec<TrainOutcome> = pool2.install(|| {
                    parts
                        .par_iter()
                        .enumerate()
                        .map(|(c, idx)| {
                            let cfg = TrainConfig {
                                seed: (r * 10 + c) as u64,
                                ..TrainConfig::default()
                            };
                            let data = [TaskData {
                                task: "fashion",
                                data: &split.train,
                                indices: idx,
                            }];
                            train(&spec, &start, &data, &cfg).expect("train")
                        })
                        .collect()
                });
                std::hint::black_box(&outs);
                t.elapsed().as_secs_f64()
            })
            .skip(1)
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "round of 10 clients x 600 samples (mlp28, sgd, batch 32, 2 threads): best {:.3} s, median {:.3} s",
            times[0],
            times[times.len() / 2]
        );
    }
}
