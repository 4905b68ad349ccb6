//! One allowed node cannot brick the model (issue 13, item 7): the default
//! norm bound, rollback of a server step that goes non-finite, the
//! operator's cap on sample counts and the cap on one node's weight share.

mod common;

use cohort_aggregator::strategy::{AdaptiveParams, MomentumParams};
use cohort_aggregator::{
    default_max_update_norm, Engine, EngineConfig, RefusalCode, RoundReport, StrategyConfig,
    StrategyKind,
};
use cohort_protocol::codec::encode;
use cohort_protocol::BACKBONE;
use common::*;

fn fedavg() -> StrategyConfig {
    StrategyConfig::default()
}

fn fedyogi() -> StrategyConfig {
    StrategyConfig {
        kind: StrategyKind::FedYogi(AdaptiveParams::default()),
        clip_norm: None,
    }
}

/// FedAvgM with a large server learning rate: a 1e37 mean delta overflows
/// the f32 weights in one step.
fn fedavgm_lr100() -> StrategyConfig {
    StrategyConfig {
        kind: StrategyKind::FedAvgM(MomentumParams {
            server_lr: 100.0,
            momentum: 0.0,
        }),
        clip_norm: None,
    }
}

fn all_finite(e: &Engine) -> bool {
    e.global()
        .iter()
        .all(|(_, v)| v.iter().all(|x| x.is_finite()))
        && e.strategy()
            .state()
            .tensors
            .values()
            .all(|t| t.iter().all(|x| x.is_finite()))
}

/// One round: n1 sends `evil` on the backbone, n2 sends 0.01 everywhere;
/// both registered with 10 samples of task a. Returns the report and the
/// refusal codes.
fn round(e: &mut Engine, start: u64, evil: Vec<f32>) -> (RoundReport, Vec<RefusalCode>) {
    let plans = e.start_round(start).expect("start");
    let mut refused = Vec::new();
    for (id, p) in &plans {
        let d = if id == "n1" {
            evil.clone()
        } else {
            vec![0.01; 6]
        };
        if let Err(r) = e.submit(update(id, p, &[(BACKBONE, d)], 10, &[("a", 10)]), start + 1) {
            refused.push(r.code);
        }
    }
    (e.poll(start + 2_000).expect("closed"), refused)
}

fn two_nodes(cfg: EngineConfig, s: &StrategyConfig) -> Engine {
    let mut e = engine(cfg, s);
    e.register(node("n1", &[("a", 10)])).expect("reg");
    e.register(node("n2", &[("a", 10)])).expect("reg");
    e
}

#[test]
fn default_norm_bound_is_derived_from_the_model() {
    // 10 parameters: sqrt(10).
    assert_eq!(default_max_update_norm(&layout()), 10f32.sqrt());
    let e = engine(defended(), &fedavg());
    assert_eq!(e.max_update_norm(), 10f32.sqrt());
    // An explicit bound wins.
    let mut cfg = defended();
    cfg.max_update_norm = Some(42.0);
    assert_eq!(engine(cfg, &fedavg()).max_update_norm(), 42.0);
}

/// Before: no default bound, the 1e37 update was accepted (FedAvg: a model
/// of 5e36; FedYogi: an infinite second moment).
#[test]
fn a_1e37_update_is_refused_by_default_under_fedavg_and_fedyogi() {
    for s in [fedavg(), fedyogi()] {
        let mut e = two_nodes(defended(), &s);
        let before = e.global().clone();
        let (r, refused) = round(&mut e, 0, vec![1.0e37; 6]);
        assert_eq!(refused, vec![RefusalCode::NormTooLarge], "{s:?}");
        assert!(r.stepped, "the honest update still counts");
        assert_eq!(r.accepted, vec!["n2".to_string()]);
        assert!(all_finite(&e), "{s:?}");
        let bb = e.global().get(BACKBONE).expect("bb");
        let old = before.get(BACKBONE).expect("bb");
        for (w, o) in bb.iter().zip(old) {
            assert!((w - o).abs() < 1.0, "{s:?}: {w} vs {o}");
        }
    }
}

/// Before: the step went through. FedYogi's second moment became +inf (the
/// weights then never move again); FedAvgM overflowed the weights to inf.
/// After: the step is undone, the round fails, the next honest round steps.
#[test]
fn a_step_that_goes_non_finite_is_rolled_back() {
    for s in [fedyogi(), fedavgm_lr100()] {
        let mut cfg = defended();
        // The operator disabled the norm bound (as far as it goes).
        cfg.max_update_norm = Some(f32::MAX);
        let mut e = two_nodes(cfg, &s);
        let before = e.global().clone();
        let state_before = e.strategy().state();
        let (r, refused) = round(&mut e, 0, vec![1.0e37; 6]);
        assert!(refused.is_empty(), "{s:?}: both accepted");
        assert!(r.rolled_back, "{s:?}: rolled back");
        assert!(!r.stepped, "{s:?}");
        assert_eq!(r.version, 0);
        assert_eq!(e.version(), 0);
        assert_eq!(e.global(), &before, "{s:?}: model unchanged");
        assert_eq!(
            e.strategy().state(),
            state_before,
            "{s:?}: moments unchanged"
        );
        assert_eq!(e.strategy().state().steps, 0);
        assert!(all_finite(&e));
        // The next honest round moves the model (a Yogi with v = inf would
        // not move it at all).
        let (r, _) = round(&mut e, 10_000, vec![0.01; 6]);
        assert!(r.stepped && !r.rolled_back, "{s:?}");
        assert_eq!(e.version(), 1);
        assert!(all_finite(&e));
        let bb = e.global().get(BACKBONE).expect("bb");
        let old = before.get(BACKBONE).expect("bb");
        assert!(
            bb.iter().zip(old).all(|(w, o)| w > o),
            "{s:?}: honest round moved the model: {bb:?} vs {old:?}"
        );
    }
}

/// NaN in an update is refused before it counts, under both strategies
/// (this held before the change too; kept as a regression test of item 7).
#[test]
fn a_nan_update_changes_nothing_under_fedavg_and_fedyogi() {
    for s in [fedavg(), fedyogi()] {
        let mut e = two_nodes(defended(), &s);
        let before = e.global().clone();
        let plans = e.start_round(0).expect("start");
        let p1 = plan_of(&plans, "n1").clone();
        let marker = 1.234_567_9f32;
        let mut u = update(
            "n1",
            &p1,
            &[(BACKBONE, vec![marker, 0.0, 0.0, 0.0, 0.0, 0.0])],
            10,
            &[("a", 10)],
        );
        match encode(&[f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0], &raw32(), 1) {
            Ok(b) => u.groups[0] = b,
            Err(_) => {
                let pat = marker.to_le_bytes();
                let pos = u.groups[0]
                    .windows(4)
                    .position(|w| w == pat)
                    .expect("raw bytes");
                u.groups[0][pos..pos + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
        let digest = e.accumulator_digest();
        let r = e.submit(u, 1).expect_err("NaN refused");
        assert!(
            matches!(r.code, RefusalCode::NonFinite | RefusalCode::Malformed),
            "{r}"
        );
        assert_eq!(e.accumulator_digest(), digest);
        assert_eq!(e.global(), &before);
        let r = e.poll(5_000).expect("closed at the deadline");
        assert!(!r.stepped, "nothing accepted");
        assert!(all_finite(&e));
    }
}

/// Three honest nodes (100 samples, delta +0.1) and one whose hello claims
/// 10^12 samples (delta -0.1). Before: the mean was -0.1 + 3e-10, the
/// attacker's alone. After: its weight is capped at max_samples_per_node,
/// then at half the group's weight: the mean is 0.
#[test]
fn a_hello_claiming_10_to_the_12_samples_cannot_outweigh_the_rest() {
    const BIG: u64 = 1_000_000_000_000;
    let run = |cfg: EngineConfig| -> f32 {
        let mut e = engine(cfg, &fedavg());
        for i in 0..3 {
            e.register(node(&format!("h{i}"), &[("a", 100)]))
                .expect("reg");
        }
        e.register(node("liar", &[("a", BIG)]))
            .expect("registered (its weight is capped, not refused)");
        let plans = e.start_round(0).expect("start");
        for (id, p) in &plans {
            let (d, n) = if id == "liar" {
                (-0.1, BIG)
            } else {
                (0.1, 100)
            };
            e.submit(update(id, p, &[(BACKBONE, vec![d; 6])], n, &[("a", n)]), 1)
                .expect("accepted");
        }
        let r = e.poll(2).expect("closed");
        assert!(r.stepped);
        e.global().get(BACKBONE).expect("bb")[0] - 1.0
    };
    // Defaults: cap 10^6, then share 1/2 -> 300 vs 300.
    let mean = run(defended());
    assert!(mean.abs() < 1e-6, "mean {mean}");
    // The operator's cap alone (share cap off): 100 x 3 vs 100.
    let mut cfg = defended();
    cfg.max_weight_share = 1.0;
    cfg.max_samples_per_node = 100;
    let mean = run(cfg);
    assert!((mean - 0.05).abs() < 1e-6, "mean {mean}");
    // The share cap alone (a cap that lets 10^12 through): still 0.
    let mut cfg = defended();
    cfg.max_samples_per_node = u64::MAX;
    let mean = run(cfg);
    assert!(mean.abs() < 1e-6, "mean {mean}");
}

/// The share cap against a brute-force water-filling, with more
/// contributors than held slots (share 1/4: 4 held, the rest streamed), in
/// a changing submission order.
#[test]
fn share_cap_matches_water_filling() {
    let weights: [u64; 8] = [1000, 5, 7, 900, 3, 4, 600, 8];
    let deltas: [f32; 8] = [0.3, -0.1, 0.2, -0.25, 0.05, 0.15, 0.1, -0.05];
    // Brute force: find c with c = share * sum(min(w, c)) by bisection.
    let share = 0.25f64;
    let f = |c: f64| c - share * weights.iter().map(|&w| (w as f64).min(c)).sum::<f64>();
    let (mut lo, mut hi) = (0.0f64, 1000.0f64);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if f(mid) > 0.0 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let c = hi;
    let capped: Vec<f64> = weights.iter().map(|&w| (w as f64).min(c)).collect();
    let total: f64 = capped.iter().sum();
    let want: f64 = capped
        .iter()
        .zip(deltas)
        .map(|(w, d)| w * f64::from(d))
        .sum::<f64>()
        / total;
    for rotate in 0..8 {
        let mut cfg = defended();
        cfg.max_weight_share = share;
        cfg.quorum = 1.0;
        let mut e = engine(cfg, &fedavg());
        for (i, &w) in weights.iter().enumerate() {
            e.register(node(&format!("n{i}"), &[("a", w)]))
                .expect("reg");
        }
        let plans = e.start_round(0).expect("start");
        assert_eq!(plans.len(), 8);
        for k in 0..8 {
            let i = (k + rotate) % 8;
            let id = format!("n{i}");
            let p = plan_of(&plans, &id);
            let w = weights[i];
            e.submit(
                update(&id, p, &[(BACKBONE, vec![deltas[i]; 6])], w, &[("a", w)]),
                1,
            )
            .expect("accepted");
            // Memory: the sum plus at most 4 held copies, whatever the count.
            assert!(e.accumulator_bytes() <= 4 * 6 * 5);
        }
        let r = e.poll(2).expect("closed");
        assert_eq!(r.contributors.get(BACKBONE), Some(&8));
        let got = e.global().get(BACKBONE).expect("bb")[0] - 1.0;
        assert!(
            (f64::from(got) - want).abs() < 1e-6,
            "rotation {rotate}: got {got}, want {want}"
        );
    }
}

/// Before: `validate` never looked at the train or codec settings.
#[test]
fn validate_names_the_bad_train_or_codec_field() {
    let check = |f: &dyn Fn(&mut EngineConfig), field: &str| {
        let mut c = defended();
        f(&mut c);
        let err = c.validate().expect_err(field).to_string();
        assert!(err.contains(field), "{field}: {err}");
        let err = Engine::new(
            c,
            layout(),
            initial(),
            cohort_aggregator::strategy_from_config(&fedavg()),
        )
        .expect_err(field)
        .to_string();
        assert!(err.contains(field), "{field}: {err}");
    };
    check(&|c| c.train.batch_size = 0, "train.batch_size");
    check(&|c| c.train.batch_size = 1 << 20, "train.batch_size");
    check(&|c| c.codec.bits = 3, "codec.bits");
    check(&|c| c.codec.chunk = 7, "chunk");
    check(&|c| c.train.lr = 1.0e30, "train.lr");
    check(&|c| c.train.lr = f32::NAN, "train.lr");
    check(&|c| c.train.epochs = 0, "train.epochs");
    check(&|c| c.train.epochs = u32::MAX, "train.epochs");
    check(&|c| c.train.max_steps = Some(0), "train.max_steps");
    check(&|c| c.train.prox_mu = -1.0, "train.prox_mu");
    check(
        &|c| c.train.weight_decay = f32::INFINITY,
        "train.weight_decay",
    );
    check(
        &|c| {
            c.train.optimizer = cohort_protocol::messages::Optimizer::Momentum {
                momentum: 1.5,
                nesterov: false,
            }
        },
        "train.optimizer.momentum",
    );
    let mut c = defended();
    c.train.frozen = vec!["nope".into()];
    let err = Engine::new(
        c,
        layout(),
        initial(),
        cohort_aggregator::strategy_from_config(&fedavg()),
    )
    .expect_err("unknown frozen group")
    .to_string();
    assert!(err.contains("train.frozen"), "{err}");
    check(&|c| c.max_weight_share = 0.0, "max_weight_share");
    check(&|c| c.max_samples_per_node = 0, "max_samples_per_node");
    check(&|c| c.deadline_ms = 0, "deadline_ms");
    defended().validate().expect("the defaults are valid");
}
