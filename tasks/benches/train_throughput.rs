//! Local training throughput, samples per second on one thread: the MLP
//! (784-256-128 + 10-class head) and the CNN at batch 32 and 64, SGD with
//! momentum 0.9, on the embedded Fashion-MNIST 6k training set, on the gemm
//! executor; side by side, the same workload on the dfdx backend for the
//! MLP (same architecture, same start) and for `resmlp28` (dfdx only), with
//! the dfdx/gemm ratio.
//!
//! `cargo bench -p cohort-tasks --bench train_throughput` (optionally with a
//! filter argument: a model `mlp28`, a backend `dfdx`, a batch `b64`, or
//! several joined by `/` such as `mlp28/dfdx/b64`; or `round`; or `kernel`:
//! the W1 training and evaluation rates in GFLOP/s against the gemm
//! kernel's single-thread peak). Runs inside a 1-thread rayon pool (the gemm kernel is
//! single-threaded anyway; dfdx's matmul uses the calling pool, so this
//! holds it to one thread too), one warm-up epoch, then 9 timed epochs of
//! 6000 samples: best and median. The models compared with each other
//! (gemm and dfdx `mlp28` at one batch size) alternate epoch by epoch, so a
//! neighbour's load hits both alike.

// The peak row calls the gemm crate directly (its API is unsafe).
#![allow(unsafe_code)]

use std::time::Instant;

use cohort_tasks::*;

/// Timed epochs per configuration (the machine is shared: the best epoch
/// is the least disturbed one).
const REPEATS: usize = 9;

/// Best and median epoch times (seconds).
#[derive(Clone, Copy, Debug)]
struct Timing {
    best: f64,
    median: f64,
}

impl Timing {
    fn of(mut times: Vec<f64>) -> Timing {
        times.sort_by(f64::total_cmp);
        Timing {
            best: times[0],
            median: times[times.len() / 2],
        }
    }
}

/// The 1-minute, 5-minute and 15-minute load averages, as the kernel
/// reports them: a figure taken under load says so.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// FLOPs of one sample through the MLP 784-256-128 + 10: the forward
/// products, and for training also the weight gradients and the input
/// gradients of every layer but the first (which the gemm executor skips).
fn mlp28_flops() -> (f64, f64) {
    let layers = [(784.0, 256.0), (256.0, 128.0), (128.0, 10.0)];
    let fwd: f64 = layers.iter().map(|(i, o)| 2.0 * i * o).sum();
    let dx: f64 = layers[1..].iter().map(|(i, o)| 2.0 * i * o).sum();
    (fwd, 2.0 * fwd + dx)
}

/// Single-thread GFLOP/s of the gemm kernel on a square product that
/// suits it (n = 512, one core): the reachable peak the training and
/// evaluation rates are set against.
fn gemm_peak() -> f64 {
    let n = 512;
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::MAX;
    for _ in 0..REPEATS {
        let t = Instant::now();
        // SAFETY: all three matrices are n x n row-major and distinct.
        unsafe {
            ::gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            );
        }
        std::hint::black_box(&c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// The W1 kernels on one thread: training (plain SGD lr 0.05, batch 32, as
/// W1 trains) and evaluation of the MLP on the embedded 6k set, in samples/s
/// and GFLOP/s against [`gemm_peak`].
fn kernel_rates(split: &Split, idx: &[usize], pool: &rayon::ThreadPool) {
    let tasks = vec![TaskSpec::new("fashion", 10)];
    let spec = GemmModel::new(BackboneKind::Mlp28, tasks).expect("valid");
    let start = spec.init(0);
    let data = [TaskData {
        task: "fashion",
        data: &split.train,
        indices: idx,
    }];
    let cfg = TrainConfig::default();
    let n = idx.len() as f64;
    let (fwd, train) = mlp28_flops();
    let (mut tr, mut ev) = (Vec::new(), Vec::new());
    let peak = pool.install(|| {
        spec.train(&start, &data, &cfg).expect("warm-up");
        for _ in 0..REPEATS {
            let t = Instant::now();
            std::hint::black_box(spec.train(&start, &data, &cfg).expect("train"));
            tr.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let m = spec.evaluate(&start, "fashion", &split.train, Some(idx));
            std::hint::black_box(m.expect("evaluate"));
            ev.push(t.elapsed().as_secs_f64());
        }
        gemm_peak()
    });
    let (tr, ev) = (Timing::of(tr), Timing::of(ev));
    println!("kernel peak (gemm, 512^3, one thread): {peak:.1} GFLOP/s");
    for (what, t, flops) in [("train sgd b32", tr, train), ("evaluate b256", ev, fwd)] {
        let g = |secs: f64| n * flops / secs / 1e9;
        println!(
            "mlp28 gemm {what}: best {:.0} samples/s = {:.1} GFLOP/s ({:.0}% of peak), median {:.0} samples/s = {:.1} GFLOP/s",
            n / t.best,
            g(t.best),
            100.0 * g(t.best) / peak,
            n / t.median,
            g(t.median)
        );
    }
}

fn main() {
    println!("load average at start: {}", load_average());
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let split = builtin("fashion6k").expect("fashion6k");
    let idx: Vec<usize> = (0..split.train.len()).collect();
    let n = idx.len() as f64;
    let registry = ModelRegistry::default();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let data = [TaskData {
        task: "fashion",
        data: &split.train,
        indices: &idx,
    }];
    let tasks = vec![TaskSpec::new("fashion", 10)];
    if filter.as_deref() == Some("kernel") {
        kernel_rates(&split, &idx, &pool);
        println!("load average at end: {}", load_average());
        return;
    }
    println!(
        "{:<9} {:<7} {:>6} {:>16} {:>18} {:>17} {:>19}",
        "model",
        "backend",
        "batch",
        "best samples/s",
        "median samples/s",
        "best dfdx/gemm",
        "median dfdx/gemm"
    );
    // Each group is timed together, epochs interleaved; a dfdx row is
    // compared with the gemm row of the same architecture and batch.
    let groups: [&[(&str, Backend)]; 3] = [
        &[("mlp28", Backend::Gemm), ("mlp28", Backend::Dfdx)],
        &[("cnn28", Backend::Gemm)],
        &[("resmlp28", Backend::Dfdx)],
    ];
    for group in groups {
        for batch in [32u32, 64] {
            let chosen: Vec<(&str, Backend)> = group
                .iter()
                .copied()
                .filter(|(name, backend)| {
                    // Every `/`-part of the filter names the model, the
                    // backend or the batch (`mlp28/b64`, `dfdx`, ...).
                    let parts = [name.to_string(), backend.to_string(), format!("b{batch}")];
                    filter
                        .as_ref()
                        .is_none_or(|f| f.split('/').all(|p| parts.iter().any(|q| q == p)))
                })
                .collect();
            if chosen.is_empty() {
                continue;
            }
            let models: Vec<SharedModel> = chosen
                .iter()
                .map(|(name, backend)| {
                    registry
                        .build(name, *backend, tasks.clone())
                        .expect("build")
                })
                .collect();
            let starts: Vec<ParamGroups> = models.iter().map(|m| m.init(0)).collect();
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
            let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(REPEATS); models.len()];
            pool.install(|| {
                for (m, s) in models.iter().zip(&starts) {
                    m.train(s, &data, &cfg).expect("warm-up");
                }
                for _ in 0..REPEATS {
                    for ((m, s), t) in models.iter().zip(&starts).zip(times.iter_mut()) {
                        let t0 = Instant::now();
                        let out = m.train(s, &data, &cfg).expect("train");
                        std::hint::black_box(&out);
                        t.push(t0.elapsed().as_secs_f64());
                    }
                }
            });
            let timings: Vec<Timing> = times.into_iter().map(Timing::of).collect();
            let gemm = chosen
                .iter()
                .zip(&timings)
                .find(|((_, b), _)| *b == Backend::Gemm)
                .map(|(_, t)| *t);
            for ((name, backend), t) in chosen.iter().zip(&timings) {
                let ratio = match (backend, gemm) {
                    (Backend::Dfdx, Some(g)) => (
                        format!("{:.2}", g.best / t.best),
                        format!("{:.2}", g.median / t.median),
                    ),
                    _ => ("-".to_string(), "-".to_string()),
                };
                println!(
                    "{:<9} {:<7} {:>6} {:>16.0} {:>18.0} {:>17} {:>19}",
                    name,
                    backend.to_string(),
                    batch,
                    n / t.best,
                    n / t.median,
                    ratio.0,
                    ratio.1
                );
            }
        }
    }
    // A W1-like round: 10 clients x 600 Fashion samples, MLP, plain SGD lr
    // 0.05, batch 32, one epoch, one client per worker of a 2-thread pool.
    if filter.as_ref().is_none_or(|f| "round".contains(f.as_str())) {
        use rayon::prelude::*;
        let spec = GemmModel::new(BackboneKind::Mlp28, tasks.clone()).expect("valid");
        let start = spec.init(0);
        let parts: Vec<Vec<usize>> = (0..10)
            .map(|c| (c * 600..(c + 1) * 600).collect())
            .collect();
        let pool2 = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let times: Vec<f64> = (0..=REPEATS)
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
                            spec.train(&start, &data, &cfg).expect("train")
                        })
                        .collect()
                });
                std::hint::black_box(&outs);
                t.elapsed().as_secs_f64()
            })
            .skip(1)
            .collect();
        let t = Timing::of(times);
        println!(
            "round of 10 clients x 600 samples (mlp28, gemm, sgd, batch 32, 2 threads): best {:.3} s, median {:.3} s",
            t.best, t.median
        );
    }
    println!("load average at end: {}", load_average());
}
