//! Federations on real data reach held-out accuracy (issue: simulator).
//! Each test runs real local training, the real codec and sealing, and the
//! real aggregator engine, in one process.

use cohort_aggregator::{FedBuffConfig, Mode, StrategyConfig, StrategyKind, TrimParams};
use cohort_protocol::codec::TopK;
use cohort_simulator::config::Attack;
use cohort_simulator::{run_experiment, ExperimentConfig, ExperimentResult};
use cohort_tasks::Partitioner;
use cohort_tests::{digits, pct};

fn run(cfg: &ExperimentConfig) -> ExperimentResult {
    run_experiment(cfg, |_| {}).expect("experiment runs")
}

#[test]
fn fedavg_digits_iid_reaches_95() {
    let r = run(&digits(20, Partitioner::Iid, 20));
    let acc = pct(&r, "digits");
    println!("digits, 20 clients IID, FedAvg: {acc:.2}%");
    assert!(acc >= 95.0, "IID digits reached only {acc:.2}%");
}

#[test]
fn fedavg_digits_dirichlet_reaches_90() {
    let r = run(&digits(20, Partitioner::Dirichlet { alpha: 0.3 }, 20));
    let acc = pct(&r, "digits");
    println!("digits, 20 clients Dirichlet(0.3), FedAvg: {acc:.2}%");
    assert!(acc >= 90.0, "Dirichlet(0.3) digits reached only {acc:.2}%");
}

#[test]
fn quantized_deltas_stay_close_to_raw() {
    let base = digits(20, Partitioner::Dirichlet { alpha: 0.5 }, 15);
    let raw = pct(&run(&base), "digits");
    let mut b8 = base.clone();
    b8.engine.codec.bits = 8;
    let q8 = pct(&run(&b8), "digits");
    let mut b4 = base.clone();
    b4.engine.codec.bits = 4;
    let q4 = pct(&run(&b4), "digits");
    let mut topk = base.clone();
    topk.engine.codec.bits = 8;
    topk.engine.codec.top_k = Some(TopK::Fraction(0.1));
    let tk = pct(&run(&topk), "digits");
    println!("digits Dirichlet(0.5): 32-bit {raw:.2}%, 8-bit {q8:.2}%, 4-bit+EF {q4:.2}%, top-10% 8-bit+EF {tk:.2}%");
    assert!(q8 >= raw - 1.0, "8-bit {q8:.2}% vs 32-bit {raw:.2}%");
    assert!(q4 >= raw - 2.0, "4-bit {q4:.2}% vs 32-bit {raw:.2}%");
    assert!(tk >= raw - 2.0, "top-k {tk:.2}% vs 32-bit {raw:.2}%");
}

#[test]
fn robust_strategies_resist_sign_flip() {
    let base = digits(20, Partitioner::Iid, 12);
    let clean = pct(&run(&base), "digits");
    let mut attacked = base.clone();
    attacked.faults.byzantine = 0.2;
    attacked.faults.attack = Attack::SignFlip { scale: 4.0 };
    let fedavg = pct(&run(&attacked), "digits");
    let mut median = attacked.clone();
    median.strategy = StrategyConfig {
        kind: StrategyKind::Median,
        clip_norm: None,
    };
    let med = pct(&run(&median), "digits");
    let mut trimmed = attacked.clone();
    trimmed.strategy = StrategyConfig {
        kind: StrategyKind::TrimmedMean(TrimParams { beta: 0.25 }),
        clip_norm: None,
    };
    let trim = pct(&run(&trimmed), "digits");
    println!("20% sign-flip x4: clean {clean:.2}%, FedAvg {fedavg:.2}%, median {med:.2}%, trimmed mean {trim:.2}%");
    assert!(
        fedavg < clean - 10.0,
        "FedAvg should degrade visibly: {fedavg:.2}% vs clean {clean:.2}%"
    );
    assert!(med >= clean - 3.0, "median {med:.2}% vs clean {clean:.2}%");
    assert!(
        trim >= clean - 3.0,
        "trimmed mean {trim:.2}% vs clean {clean:.2}%"
    );
}

#[test]
fn converges_with_30_percent_dropout() {
    let mut cfg = digits(20, Partitioner::Iid, 20);
    cfg.faults.dropout = 0.3;
    cfg.engine.quorum = 0.3;
    let r = run(&cfg);
    let dropped: usize = r.rounds.iter().map(|m| m.dropped).sum();
    let acc = pct(&r, "digits");
    println!(
        "30% dropout: {dropped} dropouts over {} rounds, {acc:.2}%",
        r.rounds.len()
    );
    assert!(dropped > 0, "dropout injection did nothing");
    assert!(acc >= 93.0, "with dropout reached only {acc:.2}%");
}

#[test]
fn async_fedbuff_with_stragglers_converges() {
    let mut cfg = digits(20, Partitioner::Iid, 30);
    cfg.clients.per_round = 8;
    cfg.engine.mode = Mode::Async(FedBuffConfig {
        buffer_k: 5,
        max_staleness: 10,
        ..FedBuffConfig::default()
    });
    cfg.faults.latency_mean_ms = 500.0;
    cfg.engine.deadline_ms = 1_000;
    let r = run(&cfg);
    let acc = pct(&r, "digits");
    let late: usize = r.rounds.iter().map(|m| m.late).sum();
    println!(
        "FedBuff K=5, 8 in flight, exp(500 ms) latencies: {acc:.2}% after {} steps, {late} late",
        r.rounds.len()
    );
    assert_eq!(r.rounds.len(), 30);
    assert!(late > 0, "the deadline should cut some stragglers");
    assert!(acc >= 93.0, "async reached only {acc:.2}%");
}
