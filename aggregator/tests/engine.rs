//! The round engine: weighting, multi-task groups, local heads, every
//! refusal, rounds that lose nodes, sampling, FedBuff.

mod common;

use cohort_aggregator::strategy::{KrumParams, TrimParams};
use cohort_aggregator::{
    AggError, Discount, FailureReason, FedBuffConfig, GroupPolicy, Mode, RefusalCode, Sampling,
    StrategyConfig, StrategyKind,
};
use cohort_protocol::codec::encode;
use cohort_protocol::BACKBONE;
use common::*;

fn fedavg() -> StrategyConfig {
    StrategyConfig::default()
}

const HA: &str = "head/a";
const HB: &str = "head/b";

#[test]
fn fedavg_weights_backbone_by_examples() {
    let mut e = engine(config(), &fedavg());
    e.register(node("n1", &[("a", 100)])).expect("reg");
    e.register(node("n2", &[("a", 300)])).expect("reg");
    let plans = e.start_round(0).expect("start");
    assert_eq!(plans.len(), 2);
    let p1 = plan_of(&plans, "n1").clone();
    let p2 = plan_of(&plans, "n2").clone();
    assert_eq!(p1.upload, vec![BACKBONE.to_string(), HA.to_string()]);
    let u1 = update(
        "n1",
        &p1,
        &[(BACKBONE, vec![2.0, -4.0, 0.0, 0.0, 1.0, 1.0])],
        100,
        &[("a", 100)],
    );
    let u2 = update(
        "n2",
        &p2,
        &[(BACKBONE, vec![6.0, 8.0, 4.0, 0.0, 1.0, -3.0])],
        300,
        &[("a", 300)],
    );
    e.submit(u1, 10).expect("accept");
    assert!(
        e.poll(20).is_none(),
        "n2 still to come, deadline not reached"
    );
    e.submit(u2, 30).expect("accept");
    let r = e
        .poll(40)
        .expect("all in: round closes before the deadline");
    assert!(r.stepped && r.quorum_met);
    assert_eq!(r.version, 1);
    assert_eq!(r.accepted, vec!["n1".to_string(), "n2".to_string()]);
    // mean = (1*d1 + 3*d2)/4 = [5, 5, 3, 0, 1, -2]; w = 1..6 + mean.
    assert_eq!(
        e.global().get(BACKBONE).expect("bb"),
        &[6.0, 7.0, 6.0, 4.0, 6.0, 4.0]
    );
    // No head was sent: heads unchanged.
    assert_eq!(e.global().get(HA).expect("ha"), &[10.0, 20.0]);
    assert_eq!(r.contributors.get(BACKBONE), Some(&2));
    assert!(!r.contributors.contains_key(HA));
}

#[test]
fn multitask_heads_get_only_their_own_contributors() {
    let mut e = engine(config(), &fedavg());
    e.register(node("n1", &[("a", 10)])).expect("reg");
    e.register(node("n2", &[("b", 30)])).expect("reg");
    e.register(node("n3", &[("a", 30), ("b", 10)]))
        .expect("reg");
    let plans = e.start_round(0).expect("start");
    assert_eq!(plan_of(&plans, "n1").upload, vec![BACKBONE, HA]);
    assert_eq!(plan_of(&plans, "n2").upload, vec![BACKBONE, HB]);
    assert_eq!(plan_of(&plans, "n3").upload, vec![BACKBONE, HA, HB]);
    let bb = |x: f32| vec![x; 6];
    let u1 = update(
        "n1",
        plan_of(&plans, "n1"),
        &[(BACKBONE, bb(4.0)), (HA, vec![1.0, 2.0])],
        10,
        &[("a", 10)],
    );
    let u2 = update(
        "n2",
        plan_of(&plans, "n2"),
        &[(BACKBONE, bb(8.0)), (HB, vec![4.0, -4.0])],
        30,
        &[("b", 30)],
    );
    let u3 = update(
        "n3",
        plan_of(&plans, "n3"),
        &[
            (BACKBONE, bb(-2.0)),
            (HA, vec![5.0, 6.0]),
            (HB, vec![8.0, 4.0]),
        ],
        40,
        &[("a", 30), ("b", 10)],
    );
    for u in [u1, u2, u3] {
        e.submit(u, 5).expect("accept");
    }
    let r = e.poll(6).expect("closed");
    // backbone over all three, weights 10/30/40: (40 + 240 - 80)/80 = 2.5
    assert_eq!(
        e.global().get(BACKBONE).expect("bb"),
        &[3.5, 4.5, 5.5, 6.5, 7.5, 8.5]
    );
    // head/a over n1 (10) and n3 (30): ([1,2]*10 + [5,6]*30)/40 = [4, 5]
    assert_eq!(e.global().get(HA).expect("ha"), &[14.0, 25.0]);
    // head/b over n2 (30) and n3 (10): ([4,-4]*30 + [8,4]*10)/40 = [5, -2]
    assert_eq!(e.global().get(HB).expect("hb"), &[4.0, -4.0]);
    assert_eq!(r.contributors.get(BACKBONE), Some(&3));
    assert_eq!(r.contributors.get(HA), Some(&2));
    assert_eq!(r.contributors.get(HB), Some(&2));
}

#[test]
fn local_heads_never_appear_in_what_a_node_sends() {
    let mut cfg = config();
    cfg.group_policy.insert(HA.into(), GroupPolicy::Local);
    let mut e = engine(cfg, &fedavg());
    e.register(node("n1", &[("a", 10), ("b", 10)]))
        .expect("reg");
    e.register(node("n2", &[("a", 10)])).expect("reg");
    assert_eq!(
        e.upload_groups("n1").expect("n1"),
        &[BACKBONE.to_string(), HB.to_string()]
    );
    let plans = e.start_round(0).expect("start");
    for (_, p) in &plans {
        assert!(
            !p.upload.iter().any(|g| g == HA),
            "local head in plan {:?}",
            p.upload
        );
    }
    assert_eq!(plan_of(&plans, "n2").upload, vec![BACKBONE]);
    // A node that sends it anyway is refused, and nothing moves.
    let before = e.global().clone();
    let bad = update(
        "n1",
        plan_of(&plans, "n1"),
        &[(BACKBONE, vec![1.0; 6]), (HA, vec![9.0, 9.0])],
        10,
        &[("a", 10), ("b", 10)],
    );
    let r = e.submit(bad, 1).expect_err("local head refused");
    assert_eq!(r.code, RefusalCode::GroupNotAllowed);
    assert!(r.message.contains("local"), "{}", r.message);
    assert_eq!(e.global(), &before);
    // Rounds go on without it; the local head never changes on the aggregator.
    let good = update(
        "n1",
        plan_of(&plans, "n1"),
        &[(BACKBONE, vec![1.0; 6]), (HB, vec![1.0, 1.0])],
        10,
        &[("b", 10)],
    );
    e.submit(good, 2).expect("accept");
    let good2 = update(
        "n2",
        plan_of(&plans, "n2"),
        &[(BACKBONE, vec![3.0; 6])],
        10,
        &[("a", 10)],
    );
    e.submit(good2, 2).expect("accept");
    let rep = e.poll(3).expect("closed");
    assert!(rep.stepped);
    assert!(!rep.contributors.contains_key(HA));
    assert_eq!(e.global().get(HA).expect("ha"), &[10.0, 20.0]);
    assert_eq!(
        e.global().get(BACKBONE).expect("bb"),
        &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    );
    assert_eq!(e.global().get(HB).expect("hb"), &[0.0, -1.0]);
}

#[test]
fn registration_checks_the_sub_layout_fingerprint() {
    let mut e = engine(config(), &fedavg());
    let mut n = node("n1", &[("a", 10)]);
    n.fingerprint = node("x", &[("b", 10)]).fingerprint;
    assert!(matches!(e.register(n), Err(AggError::Registration { .. })));
    let mut unknown = node("n1", &[("a", 10)]);
    unknown.tasks = vec![("zzz".into(), 10)];
    assert!(matches!(
        e.register(unknown),
        Err(AggError::Registration { .. })
    ));
    assert!(matches!(
        e.register(node("", &[("a", 10)])),
        Err(AggError::Registration { .. })
    ));
    assert_eq!(e.num_nodes(), 0);
    e.register(node("n1", &[("a", 10)]))
        .expect("good fingerprint");
    assert_eq!(e.num_nodes(), 1);
}

/// A round with n1's update accepted (so the accumulators hold something),
/// n2 and n3 sampled and still to answer, and n4 registered but... all are
/// sampled here (fraction 1).
fn round_with_one_accepted(
    strategy: &StrategyConfig,
) -> (
    cohort_aggregator::Engine,
    Vec<(String, cohort_protocol::messages::RoundPlan)>,
) {
    let mut cfg = config();
    cfg.max_update_norm = Some(100.0);
    let mut e = engine(cfg, strategy);
    e.register(node("n1", &[("a", 10)])).expect("reg");
    e.register(node("n2", &[("a", 10)])).expect("reg");
    e.register(node("n3", &[("b", 10)])).expect("reg");
    let plans = e.start_round(0).expect("start");
    let u1 = update(
        "n1",
        plan_of(&plans, "n1"),
        &[(BACKBONE, vec![1.0; 6]), (HA, vec![1.0, 1.0])],
        10,
        &[("a", 10)],
    );
    e.submit(u1, 1).expect("accept");
    (e, plans)
}

#[test]
fn every_refusal_changes_nothing() {
    let (mut e, plans) = round_with_one_accepted(&fedavg());
    let p2 = plan_of(&plans, "n2").clone();
    let good = || update("n2", &p2, &[(BACKBONE, vec![0.5; 6])], 10, &[("a", 10)]);
    let weights = e.global().clone();
    let acc = e.accumulator_digest();
    let check = |e: &mut cohort_aggregator::Engine,
                 u: cohort_aggregator::OpenedUpdate,
                 now: u64,
                 code: RefusalCode| {
        let r = e.submit(u, now).expect_err("must be refused");
        assert_eq!(r.code, code, "{r}");
        assert!(!r.message.is_empty());
        assert_eq!(e.global(), &weights);
        assert_eq!(
            e.accumulator_digest(),
            acc,
            "accumulators moved after {code:?}"
        );
    };
    let mut u = good();
    u.header.node = "stranger".into();
    check(&mut e, u, 2, RefusalCode::UnknownNode);
    let mut u = good();
    u.header.federation = "other".into();
    check(&mut e, u, 2, RefusalCode::WrongFederation);
    let mut u = good();
    u.header.round = 2;
    check(&mut e, u, 2, RefusalCode::WrongRound);
    let mut u = good();
    u.header.base_version = 5;
    check(&mut e, u, 2, RefusalCode::StaleBase);
    let u1 = update(
        "n1",
        plan_of(&plans, "n1"),
        &[(BACKBONE, vec![1.0; 6])],
        10,
        &[("a", 10)],
    );
    check(&mut e, u1, 2, RefusalCode::Duplicate);
    // n2 holds only task a.
    let u = update(
        "n2",
        &p2,
        &[(BACKBONE, vec![0.5; 6]), (HB, vec![1.0, 1.0])],
        10,
        &[("a", 10), ("b", 10)],
    );
    check(&mut e, u, 2, RefusalCode::GroupNotAllowed);
    let u = update("n2", &p2, &[("head/zzz", vec![1.0, 1.0])], 10, &[("a", 10)]);
    check(&mut e, u, 2, RefusalCode::GroupNotAllowed);
    // 5 values where the layout says 6.
    let u = update("n2", &p2, &[(BACKBONE, vec![0.5; 5])], 10, &[("a", 10)]);
    check(&mut e, u, 2, RefusalCode::WrongLength);
    // Truncated encoding.
    let mut u = good();
    let n = u.groups[0].len();
    u.groups[0].truncate(n - 3);
    check(&mut e, u, 2, RefusalCode::Malformed);
    let mut u = good();
    u.groups[0] = vec![1, 2];
    check(&mut e, u, 2, RefusalCode::Malformed);
    // Header names a group with no bytes.
    let mut u = good();
    u.groups.clear();
    check(&mut e, u, 2, RefusalCode::Malformed);
    // Norm: sqrt(6 * 50²) > 100.
    let u = update("n2", &p2, &[(BACKBONE, vec![50.0; 6])], 10, &[("a", 10)]);
    check(&mut e, u, 2, RefusalCode::NormTooLarge);
    // Weights: none, zero, more than registered.
    let u = update("n2", &p2, &[(BACKBONE, vec![0.5; 6])], 0, &[("a", 10)]);
    check(&mut e, u, 2, RefusalCode::BadWeight);
    let u = update(
        "n2",
        &p2,
        &[(BACKBONE, vec![0.5; 6])],
        1_000_000,
        &[("a", 10)],
    );
    check(&mut e, u, 2, RefusalCode::BadWeight);
    let u = update(
        "n2",
        &p2,
        &[(BACKBONE, vec![0.5; 6]), (HA, vec![1.0, 1.0])],
        10,
        &[],
    );
    check(&mut e, u, 2, RefusalCode::BadWeight);
    // Non-finite values: a NaN in the raw encoding. If the codec refuses to
    // encode it, patch the bytes of a marker value; a codec that rejects
    // non-finite values at decode answers Malformed, which is also a refusal.
    let marker = 1.234_567_9f32;
    let mut u = update(
        "n2",
        &p2,
        &[(BACKBONE, vec![marker, 0.5, 0.5, 0.5, 0.5, 0.5])],
        10,
        &[("a", 10)],
    );
    match encode(&[f32::NAN, 0.5, 0.5, 0.5, 0.5, 0.5], &raw32(), 1) {
        Ok(bytes) => u.groups[0] = bytes,
        Err(_) => {
            let pat = marker.to_le_bytes();
            let pos = u.groups[0]
                .windows(4)
                .position(|w| w == pat)
                .expect("raw codec keeps the bytes");
            u.groups[0][pos..pos + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    }
    let r = e.submit(u, 2).expect_err("NaN refused");
    assert!(
        matches!(r.code, RefusalCode::NonFinite | RefusalCode::Malformed),
        "{r}"
    );
    assert_eq!(e.global(), &weights);
    assert_eq!(e.accumulator_digest(), acc);
    // After the deadline (1000 ms after the start).
    check(&mut e, good(), 1_001, RefusalCode::LateUpdate);
    // n2 may still send a good update in time after all those refusals.
    e.submit(good(), 999).expect("a good update still counts");
    // After the close: late.
    let r = e.poll(1_000).expect("deadline: closed");
    assert_eq!(r.accepted.len(), 2);
    assert!(
        r.refused.len() >= 15,
        "refusals are reported: {}",
        r.refused.len()
    );
    assert!(
        r.refused.iter().all(|(n, _)| n != "stranger"),
        "unregistered ids stay out of the report"
    );
    let late = update(
        "n3",
        plan_of(&plans, "n3"),
        &[(BACKBONE, vec![0.5; 6])],
        10,
        &[("b", 10)],
    );
    let before = e.global().clone();
    assert_eq!(
        e.submit(late, 1_001).expect_err("closed").code,
        RefusalCode::LateUpdate
    );
    assert_eq!(e.global(), &before);
    // n3 never answered: a timeout.
    assert_eq!(r.failures, vec![("n3".to_string(), FailureReason::Timeout)]);
}

#[test]
fn not_sampled_and_memory_cap_refusals() {
    let mut cfg = config();
    cfg.sampling = Sampling {
        fraction: 0.5,
        min_per_round: 1,
        min_available: 1,
    };
    // Median keeps every delta: cap at one update's backbone + head (8 values).
    cfg.max_retained_bytes = 32;
    let mut e = engine(
        cfg,
        &StrategyConfig {
            kind: StrategyKind::Median,
            clip_norm: None,
        },
    );
    for i in 0..4 {
        e.register(node(&format!("n{i}"), &[("a", 10)]))
            .expect("reg");
    }
    let plans = e.start_round(0).expect("start");
    assert_eq!(plans.len(), 2);
    let sampled: Vec<&str> = plans.iter().map(|(n, _)| n.as_str()).collect();
    let outsider = (0..4)
        .map(|i| format!("n{i}"))
        .find(|n| !sampled.contains(&n.as_str()))
        .expect("one not sampled");
    let mut u = update(
        &outsider,
        &plans[0].1,
        &[(BACKBONE, vec![0.5; 6])],
        10,
        &[("a", 10)],
    );
    u.header.node = outsider.clone();
    assert_eq!(
        e.submit(u, 1).expect_err("not sampled").code,
        RefusalCode::NotSampled
    );
    let (a, b) = (&plans[0], &plans[1]);
    e.submit(
        update(
            &a.0,
            &a.1,
            &[(BACKBONE, vec![0.5; 6]), (HA, vec![1.0, 1.0])],
            10,
            &[("a", 10)],
        ),
        1,
    )
    .expect("first fits");
    assert_eq!(e.retained_bytes(), 32);
    let digest = e.accumulator_digest();
    let r = e
        .submit(
            update(&b.0, &b.1, &[(BACKBONE, vec![0.5; 6])], 10, &[("a", 10)]),
            1,
        )
        .expect_err("cap");
    assert_eq!(r.code, RefusalCode::MemoryCap);
    assert_eq!(e.accumulator_digest(), digest);
    assert_eq!(e.retained_bytes(), 32);
}

#[test]
fn a_round_that_loses_nodes_still_ends() {
    let mut e = engine(config(), &fedavg());
    for i in 0..4 {
        e.register(node(&format!("n{i}"), &[("a", 10)]))
            .expect("reg");
    }
    let plans = e.start_round(100).expect("start");
    assert_eq!(plans.len(), 4);
    e.submit(
        update(
            "n0",
            plan_of(&plans, "n0"),
            &[(BACKBONE, vec![2.0; 6])],
            10,
            &[("a", 10)],
        ),
        110,
    )
    .expect("ok");
    e.submit(
        update(
            "n1",
            plan_of(&plans, "n1"),
            &[(BACKBONE, vec![4.0; 6])],
            10,
            &[("a", 10)],
        ),
        120,
    )
    .expect("ok");
    assert!(e.poll(130).is_none());
    // n2 vanishes (the transport saw it go), n3 reports an error.
    e.unregister("n2");
    assert!(e.poll(140).is_none());
    e.fail("n3", FailureReason::Error("out of memory".into()));
    // Everybody is accounted for: the round closes long before its deadline.
    let r = e
        .poll(150)
        .expect("closed without waiting for the deadline");
    assert!(r.stepped && r.quorum_met);
    assert_eq!(r.sampled, 4);
    assert_eq!(
        r.failures,
        vec![
            ("n2".to_string(), FailureReason::Unregistered),
            (
                "n3".to_string(),
                FailureReason::Error("out of memory".into())
            )
        ]
    );
    assert_eq!(
        e.global().get(BACKBONE).expect("bb"),
        &[4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    );
    // Next round: the three left are sampled; two vanish silently, quorum
    // (2 of 3) is not met at the deadline: the model stays, the round ends.
    let plans = e.start_round(200).expect("start");
    assert_eq!(plans.len(), 3);
    e.submit(
        update(
            "n0",
            plan_of(&plans, "n0"),
            &[(BACKBONE, vec![2.0; 6])],
            10,
            &[("a", 10)],
        ),
        210,
    )
    .expect("ok");
    assert!(e.poll(1_199).is_none(), "before the deadline it waits");
    let r = e.poll(1_200).expect("deadline closes it");
    assert!(!r.stepped && !r.quorum_met);
    assert_eq!(r.version, 1);
    assert_eq!(r.failures.len(), 2);
    assert!(r.failures.iter().all(|(_, f)| *f == FailureReason::Timeout));
    assert_eq!(
        e.global().get(BACKBONE).expect("bb"),
        &[4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    );
    assert_eq!(e.round(), 2);
    assert_eq!(e.version(), 1);
    // And a third round can start.
    e.start_round(1_300).expect("round 3");
}

#[test]
fn sampling_fraction_minimum_and_availability() {
    let mut cfg = config();
    cfg.sampling = Sampling {
        fraction: 0.3,
        min_per_round: 2,
        min_available: 5,
    };
    let mut e = engine(cfg.clone(), &fedavg());
    for i in 0..4 {
        e.register(node(&format!("n{i:02}"), &[("a", 10)]))
            .expect("reg");
    }
    assert!(matches!(
        e.start_round(0),
        Err(AggError::NotEnoughNodes {
            available: 4,
            needed: 5
        })
    ));
    for i in 4..10 {
        e.register(node(&format!("n{i:02}"), &[("a", 10)]))
            .expect("reg");
    }
    // ceil(0.3 * 10) = 3
    let p = e.start_round(0).expect("start");
    assert_eq!(p.len(), 3);
    assert!(matches!(e.start_round(0), Err(AggError::RoundOpen(1))));
    // Same seed, same nodes: same sample, same seeds.
    let mut e2 = engine(cfg.clone(), &fedavg());
    for i in 0..10 {
        e2.register(node(&format!("n{i:02}"), &[("a", 10)]))
            .expect("reg");
    }
    let p2 = e2.start_round(0).expect("start");
    assert_eq!(p, p2);
    // min_per_round wins over a small fraction.
    cfg.sampling.fraction = 0.05;
    let mut e3 = engine(cfg, &fedavg());
    for i in 0..10 {
        e3.register(node(&format!("n{i:02}"), &[("a", 10)]))
            .expect("reg");
    }
    assert_eq!(e3.start_round(0).expect("start").len(), 2);
}

#[test]
fn robust_strategies_through_the_engine() {
    for (kind, want) in [
        // backbone deltas 1, 2, 100 (x6): median 2; trimmed (beta 0.34 of 3 = 1 cut) 2;
        // Krum f=0 (1 neighbour): scores 1, 1, 98² -> first: 1.
        (StrategyKind::Median, 2.0),
        (StrategyKind::TrimmedMean(TrimParams { beta: 0.34 }), 2.0),
        (StrategyKind::Krum(KrumParams { f: 0, m: 1 }), 1.0),
    ] {
        let mut e = engine(
            config(),
            &StrategyConfig {
                kind: kind.clone(),
                clip_norm: None,
            },
        );
        for i in 0..3 {
            e.register(node(&format!("n{i}"), &[("a", 10)]))
                .expect("reg");
        }
        let plans = e.start_round(0).expect("start");
        for (i, d) in [1.0f32, 2.0, 100.0].iter().enumerate() {
            let id = format!("n{i}");
            e.submit(
                update(
                    &id,
                    plan_of(&plans, &id),
                    &[(BACKBONE, vec![*d; 6])],
                    10,
                    &[("a", 10)],
                ),
                1,
            )
            .expect("ok");
        }
        assert!(e.retained_bytes() > 0);
        let r = e.poll(2).expect("closed");
        assert!(r.stepped, "{kind:?}");
        let bb = e.global().get(BACKBONE).expect("bb");
        let expect: Vec<f32> = (1..=6).map(|x| x as f32 + want).collect();
        assert_eq!(bb, expect.as_slice(), "{kind:?}");
        assert_eq!(e.retained_bytes(), 0);
    }
}

#[test]
fn clipping_scales_each_update_before_averaging() {
    let mut e = engine(
        config(),
        &StrategyConfig {
            kind: StrategyKind::FedAvg,
            clip_norm: Some(1.0),
        },
    );
    e.register(node("n1", &[("b", 10)])).expect("reg");
    e.register(node("n2", &[("b", 10)])).expect("reg");
    let plans = e.start_round(0).expect("start");
    // n1: [3, 4] has norm 5 -> [0.6, 0.8]; n2: [0.3, 0.4] (norm 0.5) as is.
    e.submit(
        update(
            "n1",
            plan_of(&plans, "n1"),
            &[(HB, vec![3.0, 4.0])],
            10,
            &[("b", 10)],
        ),
        1,
    )
    .expect("ok");
    e.submit(
        update(
            "n2",
            plan_of(&plans, "n2"),
            &[(HB, vec![0.3, 0.4])],
            10,
            &[("b", 10)],
        ),
        1,
    )
    .expect("ok");
    e.poll(2).expect("closed");
    // mean [0.45, 0.6] added to [-1, -2]
    assert_close(e.global().get(HB).expect("hb"), &[-0.55, -1.4], 1e-6);
}

#[test]
fn evaluator_hook_reports_metrics() {
    let mut e = engine(config(), &fedavg());
    e.set_evaluator(Box::new(|version, w| {
        let mut m = cohort_aggregator::Metrics::new();
        m.insert("version".into(), version as f64);
        m.insert("bb0".into(), f64::from(w.get(BACKBONE)?[0]));
        Some(m)
    }));
    e.register(node("n1", &[("a", 10)])).expect("reg");
    let plans = e.start_round(0).expect("start");
    e.submit(
        update(
            "n1",
            plan_of(&plans, "n1"),
            &[(BACKBONE, vec![1.0; 6])],
            10,
            &[("a", 10)],
        ),
        1,
    )
    .expect("ok");
    let r = e.poll(1).expect("closed");
    let m = r.eval.expect("metrics");
    assert_eq!(m["version"], 1.0);
    assert_eq!(m["bb0"], 2.0);
}

fn async_cfg(k: u32, max_staleness: u64) -> cohort_aggregator::EngineConfig {
    let mut cfg = config();
    cfg.mode = Mode::Async(FedBuffConfig {
        buffer_k: k,
        max_staleness,
        staleness: Discount::Polynomial { exponent: 1.0 },
    });
    cfg
}

#[test]
fn fedbuff_steps_every_k_with_staleness_discount() {
    let mut e = engine(async_cfg(2, 1), &fedavg());
    for i in 1..=4 {
        e.register(node(&format!("n{i}"), &[("b", 10)]))
            .expect("reg");
    }
    assert!(matches!(e.start_round(0), Err(AggError::WrongMode(_))));
    let p1 = e.plan_for("n1", 0).expect("plan");
    let p2 = e.plan_for("n2", 0).expect("plan");
    let p3 = e.plan_for("n3", 0).expect("plan");
    let p4 = e.plan_for("n4", 0).expect("plan");
    assert_eq!(p3.base_version, 0);
    let o = e
        .submit(
            update("n1", &p1, &[(HB, vec![1.0, 1.0])], 10, &[("b", 10)]),
            1,
        )
        .expect("ok");
    assert!(!o.model_stepped);
    assert!(e.poll(1).is_none(), "no barrier, no step before K updates");
    let o = e
        .submit(
            update("n2", &p2, &[(HB, vec![3.0, 3.0])], 10, &[("b", 10)]),
            2,
        )
        .expect("ok");
    assert!(o.model_stepped);
    assert_eq!(e.version(), 1);
    // mean 2 added to [-1, -2]
    assert_eq!(e.global().get(HB).expect("hb"), &[1.0, 0.0]);
    let r = e.poll(2).expect("report of the step");
    assert_eq!(r.accepted.len(), 2);
    assert_eq!(r.mean_staleness, 0.0);
    // n3 answers on version 0 at version 1: staleness 1, its delta is scaled
    // by 1/(1+1), its weight stays 10.
    let o = e
        .submit(
            update("n3", &p3, &[(HB, vec![3.0, 0.0])], 10, &[("b", 10)]),
            3,
        )
        .expect("ok");
    assert_eq!(o.staleness, 1);
    assert_eq!(o.discount, 0.5);
    // Duplicate from n1 for its old plan.
    let dup = update("n1", &p1, &[(HB, vec![1.0, 1.0])], 10, &[("b", 10)]);
    assert_eq!(
        e.submit(dup, 3).expect_err("dup").code,
        RefusalCode::Duplicate
    );
    let p1b = e.plan_for("n1", 3).expect("plan");
    assert_eq!(p1b.base_version, 1);
    let o = e
        .submit(
            update("n1", &p1b, &[(HB, vec![0.0, 1.5])], 10, &[("b", 10)]),
            4,
        )
        .expect("ok");
    assert!(o.model_stepped);
    // (10 * 0.5 * [3,0] + 10 * [0,1.5]) / 20 = [0.75, 0.75]
    assert_eq!(e.global().get(HB).expect("hb"), &[1.75, 0.75]);
    assert_eq!(e.version(), 2);
    let r = e.poll(4).expect("report");
    assert_eq!(r.mean_staleness, 0.5);
    // n4 still on version 0, now 2 stale > max 1: refused, nothing moves.
    let before = e.global().clone();
    let u = update("n4", &p4, &[(HB, vec![9.0, 9.0])], 10, &[("b", 10)]);
    assert_eq!(
        e.submit(u, 5).expect_err("too stale").code,
        RefusalCode::StaleBase
    );
    assert_eq!(e.global(), &before);
    // Its plan expires at its deadline: a timeout in the next report.
    let p2b = e.plan_for("n2", 5).expect("plan");
    assert!(e.poll(1_001).is_none());
    let late = update("n2", &p2b, &[(HB, vec![1.0, 1.0])], 10, &[("b", 10)]);
    assert_eq!(
        e.submit(late, 1_006).expect_err("late").code,
        RefusalCode::LateUpdate
    );
}

#[test]
fn fedbuff_refuses_updates_in_flight_once_its_steps_are_done() {
    let mut cfg = async_cfg(1, 5);
    cfg.rounds = 1;
    let mut e = engine(cfg, &fedavg());
    for i in 1..=2 {
        e.register(node(&format!("n{i}"), &[("b", 10)]))
            .expect("reg");
    }
    let p1 = e.plan_for("n1", 0).expect("plan");
    let p2 = e.plan_for("n2", 0).expect("plan");
    let o = e
        .submit(
            update("n1", &p1, &[(HB, vec![1.0, 1.0])], 10, &[("b", 10)]),
            1,
        )
        .expect("ok");
    assert!(o.model_stepped);
    assert!(e.is_finished());
    let before = e.global().clone();
    let late = update("n2", &p2, &[(HB, vec![5.0, 5.0])], 10, &[("b", 10)]);
    assert_eq!(
        e.submit(late, 2).expect_err("finished").code,
        RefusalCode::Finished
    );
    assert_eq!(e.global(), &before);
    assert_eq!(e.version(), 1);
}

#[test]
fn streaming_memory_does_not_grow_with_contributors() {
    let mut cfg = config();
    cfg.quorum = 1.0;
    let mut e = engine(cfg.clone(), &fedavg());
    let mut m = engine(
        cfg,
        &StrategyConfig {
            kind: StrategyKind::Median,
            clip_norm: None,
        },
    );
    for i in 0..40 {
        e.register(node(&format!("n{i:02}"), &[("a", 10)]))
            .expect("reg");
        m.register(node(&format!("n{i:02}"), &[("a", 10)]))
            .expect("reg");
    }
    let pe = e.start_round(0).expect("start");
    let pm = m.start_round(0).expect("start");
    for (i, ((id, p), (_, q))) in pe.iter().zip(&pm).enumerate() {
        let deltas = [(BACKBONE, vec![i as f32; 6]), (HA, vec![1.0, -1.0])];
        e.submit(update(id, p, &deltas, 10, &[("a", 10)]), 1)
            .expect("ok");
        m.submit(update(id, q, &deltas, 10, &[("a", 10)]), 1)
            .expect("ok");
        // Streaming: one sum per group (6 + 2 values), from the first update on.
        assert_eq!(e.accumulator_bytes(), 4 * 8);
        // Retaining: one copy per update, and it says so.
        assert_eq!(m.accumulator_bytes(), 4 * 8 * (i as u64 + 1));
        assert_eq!(m.retained_bytes(), m.accumulator_bytes());
    }
    let r = e.poll(2).expect("closed");
    assert_eq!(r.contributors.get(BACKBONE), Some(&40));
    // mean of 0..40 = 19.5
    assert_eq!(e.global().get(BACKBONE).expect("bb")[0], 20.5);
    assert_eq!(e.accumulator_bytes(), 0);
}

#[test]
fn packed_payloads_and_refused_nodes_at_the_deadline() {
    use cohort_protocol::messages::pack_groups;
    let mut e = engine(config(), &fedavg());
    e.register(node("n1", &[("a", 10)])).expect("reg");
    e.register(node("n2", &[("a", 10)])).expect("reg");
    let plans = e.start_round(0).expect("start");
    let u1 = update(
        "n1",
        plan_of(&plans, "n1"),
        &[(BACKBONE, vec![2.0; 6]), (HA, vec![1.0, 1.0])],
        10,
        &[("a", 10)],
    );
    e.submit_packed(&u1.header, &pack_groups(&u1.groups), 1)
        .expect("packed update accepted");
    // n2's payload has a trailing byte: malformed, refused, and n2 never
    // sends a good one: at the deadline it is a failure with that reason.
    let u2 = update(
        "n2",
        plan_of(&plans, "n2"),
        &[(BACKBONE, vec![4.0; 6])],
        10,
        &[("a", 10)],
    );
    let mut packed = pack_groups(&u2.groups);
    packed.push(0);
    assert_eq!(
        e.submit_packed(&u2.header, &packed, 2)
            .expect_err("trailing byte")
            .code,
        RefusalCode::Malformed
    );
    assert!(e.poll(999).is_none());
    let r = e.poll(1_000).expect("deadline");
    assert!(r.stepped, "quorum 0.5 of 2 is met by n1");
    assert_eq!(
        r.failures,
        vec![(
            "n2".to_string(),
            FailureReason::Refused(RefusalCode::Malformed)
        )]
    );
    assert_eq!(r.refused.len(), 1);
    assert_eq!(
        e.global().get(BACKBONE).expect("bb"),
        &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    );
    assert_eq!(e.global().get(HA).expect("ha"), &[11.0, 21.0]);
}

#[test]
fn plans_carry_the_scheduled_learning_rate_of_their_round() {
    use cohort_aggregator::LrSchedule;
    let mut cfg = config();
    cfg.rounds = 3;
    cfg.train.lr = 0.4;
    cfg.lr_schedule = LrSchedule::Exponential { gamma: 0.5 };
    let mut e = engine(cfg, &fedavg());
    e.register(node("n1", &[("a", 10)])).expect("reg");
    let mut now = 0;
    for (round, want) in [(1u64, 0.4f32), (2, 0.2), (3, 0.1)] {
        let plans = e.start_round(now).expect("start");
        let p = plan_of(&plans, "n1").clone();
        assert_eq!((p.round, p.train.lr), (round, want));
        let u = update("n1", &p, &[(BACKBONE, vec![0.0; 6])], 10, &[("a", 10)]);
        e.submit(u, now + 1).expect("accept");
        assert!(e.poll(now + 2).expect("closes").stepped);
        now += 10;
    }
}
