//! Aggregation throughput: 20 updates of 1M parameters, 8-bit deltas,
//! through the whole engine (checks, decode, accumulate or retain, close),
//! for streaming FedAvg, coordinate-wise median and trimmed mean.
//!
//! `cargo bench -p cohort-aggregator --bench aggregate`
//! An argument (e.g. `-- fedavg`) runs only the rows whose name contains it.
//! Prints updates/s and GB/s of f32 equivalent (4 bytes per parameter per
//! update, decimal GB), best and median of the timed rounds, and the load
//! average at start and end.

use std::time::{Duration, Instant};

use cohort_aggregator::strategy::TrimParams;
use cohort_aggregator::{
    strategy_from_config, Engine, EngineConfig, NodeInfo, StrategyConfig, StrategyKind,
};
use cohort_protocol::codec::{encode, CodecConfig};
use cohort_protocol::messages::{TaskMetrics, UpdateHeader};
use cohort_protocol::{head_group, GroupLayout, Layout, ParamGroups, TensorSpec, BACKBONE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PARAMS: u64 = 1_000_000;
const UPDATES: usize = 20;
const ROUNDS: usize = 7;

fn layout() -> Layout {
    Layout {
        groups: vec![
            GroupLayout {
                name: BACKBONE.into(),
                tensors: vec![TensorSpec {
                    name: "backbone.0.weight".into(),
                    shape: vec![1000, 1000],
                    offset: 0,
                }],
            },
            GroupLayout {
                name: head_group("t"),
                tensors: vec![TensorSpec {
                    name: "head.t.weight".into(),
                    shape: vec![1],
                    offset: 0,
                }],
            },
        ],
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// One table row from a round's timings: updates/s and GB/s of f32 at the
/// median, best and median round in ms.
fn print_row(name: &str, times: &mut [Duration]) {
    times.sort();
    let med = times[times.len() / 2].as_secs_f64();
    println!(
        "| {name} | {:.1} | {:.2} | {:.1} | {:.1} |",
        UPDATES as f64 / med,
        UPDATES as f64 * PARAMS as f64 * 4.0 / med / 1e9,
        times[0].as_secs_f64() * 1e3,
        med * 1e3
    );
}

/// The rows to run: those whose name contains the first argument that is
/// not a flag (cargo passes `--bench`), all when there is none.
fn selected(name: &str) -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .is_none_or(|f| name.contains(f.as_str()))
}

fn main() {
    println!("load average at start: {}", load_average());
    let codec = CodecConfig {
        bits: 8,
        ..Default::default()
    };
    let l = layout();
    let fp = l.fingerprint();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Normal-ish deltas (sum of uniforms), scale 1e-3.
    let deltas: Vec<Vec<u8>> = (0..UPDATES)
        .map(|i| {
            let d: Vec<f32> = (0..PARAMS)
                .map(|_| (rng.gen::<f32>() + rng.gen::<f32>() + rng.gen::<f32>() - 1.5) * 1e-3)
                .collect();
            encode(&d, &codec, i as u64).expect("encode")
        })
        .collect();
    let enc_bytes = deltas[0].len();
    println!(
        "aggregate bench: {UPDATES} updates x {PARAMS} params, codec {} bits -> {enc_bytes} bytes/update ({:.3} bytes/param)",
        codec.bits,
        enc_bytes as f64 / PARAMS as f64
    );
    println!("| strategy | updates/s | GB/s f32-equiv | round (ms, best) | round (ms, median) |");
    println!("|---|---|---|---|---|");
    // Baseline: the codec alone, decode_accumulate of every update into one
    // accumulator (no checks, no engine).
    if selected("decode_accumulate only (baseline)") {
        let mut acc = vec![0.0f32; PARAMS as usize];
        let mut times = Vec::new();
        for _ in 0..ROUNDS {
            let t0 = Instant::now();
            for d in &deltas {
                cohort_protocol::codec::decode_accumulate(d, 0.05, &mut acc).expect("decode");
            }
            times.push(t0.elapsed());
            std::hint::black_box(&acc);
        }
        print_row("decode_accumulate only (baseline)", &mut times);
    }
    // The engine's per-update check and add, outside the engine, before
    // and after fusing the checks into the decode (same bits either way):
    // unfused = zero the scratch, decode into it, a pass of sum of squares,
    // then the weighted add into the sum; fused = decode into the scratch
    // with the sum of squares on the fly, then the add.
    {
        use cohort_protocol::codec::{decode_accumulate, decode_into_sum_squares, sum_squares};
        type Check = fn(&[u8], &mut [f32]) -> f64;
        let rows: [(&str, Check); 2] = [
            ("check + add, unfused (before)", |d, scratch| {
                scratch.fill(0.0);
                decode_accumulate(d, 1.0, scratch).expect("decode");
                sum_squares(scratch)
            }),
            ("check + add, fused decode (after)", |d, scratch| {
                decode_into_sum_squares(d, scratch).expect("decode")
            }),
        ];
        let mut scratch = vec![0.0f32; PARAMS as usize];
        let mut sum = vec![0.0f32; PARAMS as usize];
        for (name, check) in rows.into_iter().filter(|(n, _)| selected(n)) {
            let mut times = Vec::new();
            for _ in 0..ROUNDS {
                let t0 = Instant::now();
                for d in &deltas {
                    let sq = check(d, &mut scratch);
                    assert!(sq.is_finite());
                    for (a, x) in sum.iter_mut().zip(&scratch) {
                        *a += 0.05 * x;
                    }
                }
                times.push(t0.elapsed());
                std::hint::black_box(&sum);
            }
            print_row(name, &mut times);
        }
    }
    // The engine's check and add since: one read of the encoding for the
    // sum of squares, no decoded copy, then a decode straight into the sum.
    if selected("check + add, no copy (codec::check)") {
        let mut sum = vec![0.0f32; PARAMS as usize];
        let mut times = Vec::new();
        for _ in 0..ROUNDS {
            let t0 = Instant::now();
            for d in &deltas {
                let c = cohort_protocol::codec::check(d, PARAMS as usize).expect("check");
                assert!(c.sum_squares().is_finite());
                c.add_scaled_to(0.05, 1.0, &mut sum);
            }
            times.push(t0.elapsed());
            std::hint::black_box(&sum);
        }
        print_row("check + add, no copy (codec::check)", &mut times);
    }
    // The robust combiners alone, on decoded deltas (what the engine
    // retains), to separate their cost from the engine's checks and copies.
    {
        let decoded: Vec<Vec<f32>> = deltas
            .iter()
            .map(|d| cohort_protocol::codec::decode(d, PARAMS as usize).expect("decode"))
            .collect();
        type Combine = fn(&[Vec<f32>]) -> Vec<f32>;
        let rows: [(&str, Combine); 2] = [
            ("median combine only", |d| {
                cohort_aggregator::strategy::median(d).expect("median")
            }),
            ("trimmed_mean combine only", |d| {
                cohort_aggregator::strategy::trimmed_mean(d, 0.1).expect("trimmed")
            }),
        ];
        for (name, f) in rows.into_iter().filter(|(n, _)| selected(n)) {
            let mut times = Vec::new();
            for _ in 0..ROUNDS {
                let t0 = Instant::now();
                std::hint::black_box(f(&decoded));
                times.push(t0.elapsed());
            }
            print_row(name, &mut times);
        }
    }
    for (name, kind) in [
        ("fedavg (streaming)", StrategyKind::FedAvg),
        ("median", StrategyKind::Median),
        (
            "trimmed_mean beta=0.1",
            StrategyKind::TrimmedMean(TrimParams { beta: 0.1 }),
        ),
    ]
    .into_iter()
    .filter(|(n, _)| selected(n))
    {
        let cfg = EngineConfig {
            federation: "bench".into(),
            codec: codec.clone(),
            deadline_ms: 1_000_000,
            quorum: 1.0,
            ..Default::default()
        };
        let mut init = ParamGroups::new();
        init.insert(BACKBONE, vec![0.0; PARAMS as usize]);
        init.insert(head_group("t"), vec![0.0]);
        let mut e = Engine::new(
            cfg,
            l.clone(),
            init,
            strategy_from_config(&StrategyConfig {
                kind,
                clip_norm: None,
            }),
        )
        .expect("engine");
        for i in 0..UPDATES {
            e.register(NodeInfo {
                id: format!("n{i:02}"),
                tasks: vec![("t".into(), 100)],
                fingerprint: fp,
            })
            .expect("register");
        }
        let (mut times, mut closes) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let now = round as u64 * 10;
            let plans = e.start_round(now).expect("start");
            // Headers are made outside the timing; payloads are borrowed,
            // as the service's are from the opened frame.
            let headers: Vec<UpdateHeader> = plans
                .iter()
                .map(|(id, p)| UpdateHeader {
                    federation: p.federation.clone(),
                    round: p.round,
                    base_version: p.base_version,
                    node: id.clone(),
                    groups: vec![BACKBONE.into()],
                    metrics: vec![TaskMetrics {
                        task: "t".into(),
                        loss: 0.0,
                        samples: 100,
                        steps: 1,
                    }],
                    num_examples: 100,
                })
                .collect();
            let t0 = Instant::now();
            for (h, d) in headers.iter().zip(&deltas) {
                e.submit_groups(h, &[d.as_slice()], now + 1)
                    .expect("accepted");
            }
            let t1 = Instant::now();
            let report = e.poll(now + 2).expect("closed");
            let dt = t0.elapsed();
            assert!(report.stepped);
            std::hint::black_box(e.global());
            if round > 0 {
                times.push(dt); // round 0 warms up allocations
                closes.push(t1.elapsed());
            }
        }
        print_row(name, &mut times);
        closes.sort();
        println!(
            "|   of it the round's close (`poll`), median | | | | {:.1} |",
            closes[closes.len() / 2].as_secs_f64() * 1e3
        );
    }
    println!("load average at end: {}", load_average());
}
