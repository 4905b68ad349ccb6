//! Differential privacy: the accountant against `dp-accounting`'s numbers,
//! the noise's standard deviation, clipping of every contribution, Poisson
//! sampling, the budget, refusals of strategies without a sum, and the
//! accountant's state across a checkpoint.

mod common;

use cohort_aggregator::privacy::accountant::{self, RdpAccountant};
use cohort_aggregator::{
    AdaptiveClip, AggError, Engine, EngineConfig, NodeInfo, OpenedUpdate, PrivacyConfig,
    PrivacyMode, StrategyConfig, StrategyKind,
};
use cohort_protocol::codec::encode;
use cohort_protocol::messages::{RoundPlan, TaskMetrics, UpdateHeader};
use cohort_protocol::{head_group, GroupLayout, Layout, ParamGroups, TensorSpec, BACKBONE};

#[derive(serde::Deserialize)]
struct Fixture {
    command: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    q: f64,
    noise_multiplier: f64,
    rounds: u64,
    delta: f64,
    epsilon: f64,
}

#[test]
fn accountant_matches_dp_accounting_within_one_percent() {
    let text = include_str!("fixtures/dp_accounting.json");
    let f: Fixture = serde_json::from_str(text).expect("fixture");
    assert!(
        f.command.contains("make_fixtures"),
        "the fixture records its command"
    );
    assert!(f.cases.len() >= 6);
    for c in &f.cases {
        let eps = accountant::epsilon(c.q, c.noise_multiplier, c.rounds, c.delta);
        let rel = (eps - c.epsilon).abs() / c.epsilon;
        println!(
            "q {} z {} T {} delta {}: ours {eps:.6}, dp-accounting {:.6} (rel {rel:.2e})",
            c.q, c.noise_multiplier, c.rounds, c.delta, c.epsilon
        );
        assert!(
            rel < 0.01,
            "q {} z {} T {} delta {}: {eps} vs {}",
            c.q,
            c.noise_multiplier,
            c.rounds,
            c.delta,
            c.epsilon
        );
    }
}

#[test]
fn solved_noise_multiplier_spends_the_target() {
    for (eps, q, t) in [(8.0, 0.05, 40), (1.0, 0.01, 1000), (3.0, 0.1, 100)] {
        let z = accountant::noise_for_epsilon(eps, q, t, 1e-5).expect("solvable");
        let got = accountant::epsilon(q, z, t, 1e-5);
        assert!(
            got <= eps && got > 0.99 * eps,
            "eps {eps}: z {z} spends {got}"
        );
    }
}

/// One backbone of `n` values and a head of 2.
fn big_layout(n: u64) -> Layout {
    Layout {
        groups: vec![
            GroupLayout {
                name: BACKBONE.into(),
                tensors: vec![TensorSpec {
                    name: "backbone.0.weight".into(),
                    shape: vec![n],
                    offset: 0,
                }],
            },
            GroupLayout {
                name: head_group("a"),
                tensors: vec![TensorSpec {
                    name: "head.a.weight".into(),
                    shape: vec![2],
                    offset: 0,
                }],
            },
        ],
    }
}

fn zeros(l: &Layout) -> ParamGroups {
    let mut p = ParamGroups::new();
    for g in &l.groups {
        p.insert(&g.name, vec![0.0; g.len() as usize]);
    }
    p
}

fn node(l: &Layout, id: &str) -> NodeInfo {
    let groups = vec![BACKBONE.to_string(), head_group("a")];
    NodeInfo {
        id: id.into(),
        tasks: vec![("a".into(), 10)],
        fingerprint: l.subset(&groups).expect("subset").fingerprint(),
    }
}

fn update(id: &str, plan: &RoundPlan, deltas: &[(&str, Vec<f32>)]) -> OpenedUpdate {
    let header = UpdateHeader {
        federation: plan.federation.clone(),
        round: plan.round,
        base_version: plan.base_version,
        node: id.into(),
        groups: deltas.iter().map(|(g, _)| g.to_string()).collect(),
        metrics: vec![TaskMetrics {
            task: "a".into(),
            loss: 0.5,
            samples: 10,
            steps: 1,
        }],
        num_examples: 10,
    };
    let groups = deltas
        .iter()
        .map(|(_, d)| encode(d, &plan.codec, 1).expect("encode"))
        .collect();
    OpenedUpdate { header, groups }
}

fn dp_config(q: f64, z: f64, clip: f64) -> EngineConfig {
    let mut cfg = common::config();
    cfg.quorum = 0.0;
    cfg.rounds = 100;
    cfg.sampling.fraction = q;
    cfg.privacy = PrivacyConfig {
        mode: PrivacyMode::Central,
        noise_multiplier: Some(z),
        clip,
        ..PrivacyConfig::default()
    };
    cfg
}

fn dp_engine(cfg: EngineConfig, l: &Layout, nodes: usize) -> Engine {
    let mut e = Engine::new(
        cfg,
        l.clone(),
        zeros(l),
        cohort_aggregator::strategy_from_config(&StrategyConfig::default()),
    )
    .expect("engine");
    for i in 0..nodes {
        e.register(node(l, &format!("n{i:04}"))).expect("register");
    }
    e
}

/// Runs one round where each sampled node sends `delta(i)` (backbone,
/// head), and returns the model's move times the fixed denominator
/// (`q * nodes`): the noised sum.
fn round_sum(
    e: &mut Engine,
    delta: impl Fn(usize) -> (Vec<f32>, Vec<f32>),
    den: f64,
) -> (Vec<f64>, Vec<f64>, usize) {
    let before = e.global().clone();
    let plans = e.start_round(0).expect("round");
    let sampled = plans.len();
    for (i, (id, plan)) in plans.iter().enumerate() {
        let (b, h) = delta(i);
        e.submit(update(id, plan, &[(BACKBONE, b), ("head/a", h)]), 1)
            .expect("accepted");
    }
    let report = e.poll(1).expect("closed");
    assert!(report.privacy.is_some());
    let moved = |g: &str| -> Vec<f64> {
        let (a, b) = (before.get(g).expect("g"), e.global().get(g).expect("g"));
        a.iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*y) - f64::from(*x)) * den)
            .collect()
    };
    (moved(BACKBONE), moved("head/a"), sampled)
}

#[test]
fn central_noise_has_std_z_times_clip() {
    // Zero updates: the model moves by the noise over the denominator.
    let l = big_layout(40_000);
    let (q, z, clip) = (0.5, 1.3, 0.7);
    let mut e = dp_engine(dp_config(q, z, clip), &l, 20);
    let den = q * 20.0;
    let (b, _, sampled) = round_sum(&mut e, |_| (vec![0.0; 40_000], vec![0.0; 2]), den);
    assert!(sampled > 0);
    let n = b.len() as f64;
    let mean = b.iter().sum::<f64>() / n;
    let std = (b.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let want = z * clip;
    // The sample std of 40k normals is within 1.5% of the truth with
    // probability far above 1 - 1e-9; the seed is fixed anyway.
    println!("noise std {std:.5}, want {want:.5}, mean {mean:.2e}");
    assert!((std - want).abs() / want < 0.015, "std {std} want {want}");
    assert!(mean.abs() < 5.0 * want / n.sqrt(), "mean {mean}");
}

#[test]
fn clipping_bounds_every_contribution() {
    // Almost no noise; every node sends a huge update along the same
    // direction over both groups: the sum is exactly (sampled * C) long.
    let l = big_layout(100);
    let (q, clip) = (0.5, 0.25);
    let mut e = dp_engine(dp_config(q, 1e-9, clip), &l, 40);
    let den = q * 40.0;
    let (b, h, sampled) = round_sum(
        &mut e,
        |i| (vec![3.0 + i as f32; 100], vec![-50.0 * (1.0 + i as f32); 2]),
        den,
    );
    assert!(sampled > 5);
    let norm = b.iter().chain(&h).map(|x| x * x).sum::<f64>().sqrt();
    // Each contribution has norm C exactly (they are not parallel, so the
    // sum is at most sampled * C, and every part is bounded).
    assert!(norm <= sampled as f64 * clip * (1.0 + 1e-4), "{norm}");
    // One node alone: its contribution is exactly C.
    let mut e = dp_engine(dp_config(1.0, 1e-9, clip), &l, 1);
    let (b, h, _) = round_sum(&mut e, |_| (vec![1e3; 100], vec![1e3; 2]), 1.0);
    let one = b.iter().chain(&h).map(|x| x * x).sum::<f64>().sqrt();
    assert!((one - clip).abs() < 1e-4 * clip, "{one}");
    // An update under the bound is left as it is.
    let mut e = dp_engine(dp_config(1.0, 1e-9, clip), &l, 1);
    let small = 0.01f32;
    let (b, _, _) = round_sum(&mut e, |_| (vec![small; 100], vec![0.0; 2]), 1.0);
    assert!(b.iter().all(|x| (x - f64::from(small)).abs() < 1e-6));
}

#[test]
fn sampling_is_poisson_at_rate_q() {
    let l = big_layout(4);
    let mut e = dp_engine(dp_config(0.3, 1.0, 1.0), &l, 1000);
    let mut counts = Vec::new();
    for _ in 0..5 {
        let plans = e.start_round(0).expect("round");
        counts.push(plans.len());
        e.poll(10_000).expect("closed at the deadline");
    }
    // Binomial(1000, 0.3): mean 300, std 14.5. Not a fixed size.
    assert!(
        counts.iter().all(|&c| (240..=360).contains(&c)),
        "{counts:?}"
    );
    assert!(counts.windows(2).any(|w| w[0] != w[1]), "{counts:?}");
}

#[test]
fn epsilon_grows_per_round_as_the_accountant_says_and_the_budget_stops() {
    let l = big_layout(4);
    let (q, z) = (0.2, 0.8);
    let mut cfg = dp_config(q, z, 1.0);
    cfg.privacy.budget_epsilon = Some(3.0);
    let mut e = dp_engine(cfg, &l, 50);
    let mut last = 0.0;
    let mut rounds = 0;
    while !e.is_finished() {
        let plans = e.start_round(0).expect("round");
        for (id, plan) in &plans {
            e.submit(update(id, plan, &[(BACKBONE, vec![0.1; 4])]), 1)
                .expect("accepted");
        }
        let r = e.poll(1).expect("closed");
        let p = r.privacy.expect("privacy report");
        rounds += 1;
        let want = accountant::epsilon(q, z, rounds, 1e-5);
        assert!((p.epsilon - want).abs() < 1e-9 * want.max(1.0));
        assert!(p.epsilon > last && p.epsilon <= 3.0, "{}", p.epsilon);
        last = p.epsilon;
        assert!(rounds < 100);
    }
    assert!(accountant::epsilon(q, z, rounds + 1, 1e-5) > 3.0);
    assert!(matches!(e.start_round(0), Err(AggError::Finished(_))));
    assert_eq!(e.epsilon(), Some(last));
}

#[test]
fn target_epsilon_solves_the_noise_for_the_planned_rounds() {
    let l = big_layout(4);
    let mut cfg = dp_config(0.1, 1.0, 1.0);
    cfg.privacy.noise_multiplier = None;
    cfg.privacy.target_epsilon = Some(4.0);
    cfg.rounds = 30;
    let e = dp_engine(cfg, &l, 10);
    let z = e.noise_multiplier().expect("dp");
    let spent = accountant::epsilon(0.1, z, 30, 1e-5);
    assert!(spent <= 4.0 && spent > 3.96, "{z}: {spent}");
}

#[test]
fn strategies_without_a_weighted_sum_are_refused() {
    let l = big_layout(4);
    for kind in [
        StrategyKind::Median,
        StrategyKind::TrimmedMean(Default::default()),
        StrategyKind::Krum(Default::default()),
    ] {
        let s = StrategyConfig {
            kind,
            clip_norm: None,
        };
        let err = Engine::new(
            dp_config(0.5, 1.0, 1.0),
            l.clone(),
            zeros(&l),
            cohort_aggregator::strategy_from_config(&s),
        )
        .expect_err("refused");
        let msg = err.to_string();
        assert!(matches!(err, AggError::Config(_)), "{msg}");
        assert!(
            msg.contains("weighted sum") && msg.contains("fedavg"),
            "{msg}"
        );
    }
    // Async is refused as well.
    let mut cfg = dp_config(0.5, 1.0, 1.0);
    cfg.mode = cohort_aggregator::Mode::Async(Default::default());
    assert!(cfg.validate().is_err());
    // Two ways of fixing the noise at once.
    let mut cfg = dp_config(0.5, 1.0, 1.0);
    cfg.privacy.target_epsilon = Some(2.0);
    assert!(cfg.validate().is_err());
    // A budget in client mode (its spending depends on arrivals), and
    // adaptive clipping in client mode (the aggregator sees no raw norm).
    let mut cfg = dp_config(0.5, 1.0, 1.0);
    cfg.codec.bits = 32;
    cfg.privacy.mode = PrivacyMode::Client;
    assert!(cfg.validate().is_ok());
    cfg.privacy.budget_epsilon = Some(5.0);
    assert!(cfg.validate().is_err());
    cfg.privacy.budget_epsilon = None;
    cfg.privacy.adaptive = Some(AdaptiveClip::default());
    assert!(cfg.validate().is_err());
}

#[test]
fn adaptive_clip_moves_toward_the_quantile() {
    // Every norm is 10 with C = 1: the fraction under C is ~0, so C grows
    // geometrically (exp(eta * gamma) per round, with noise on the count).
    let l = big_layout(4);
    let mut cfg = dp_config(1.0, 1.0, 1.0);
    cfg.privacy.adaptive = Some(AdaptiveClip {
        count_stddev: Some(1.0),
        ..AdaptiveClip::default()
    });
    let mut e = dp_engine(cfg, &l, 100);
    let c0 = e.clip_norm().expect("dp");
    for _ in 0..5 {
        let plans = e.start_round(0).expect("round");
        for (id, plan) in &plans {
            e.submit(update(id, plan, &[(BACKBONE, vec![5.0; 4])]), 1)
                .expect("accepted");
        }
        let r = e.poll(1).expect("closed");
        let under = r.privacy.and_then(|p| p.under_clip).expect("adaptive");
        assert!(under < 0.1, "{under}");
    }
    let c5 = e.clip_norm().expect("dp");
    let want = c0 * (5.0f64 * 0.2 * 0.5).exp();
    assert!((c5 / want - 1.0).abs() < 0.1, "{c5} vs {want}");
    // Too little noise on the count for the noise multiplier: refused at
    // the round's start with a clear error.
    let mut cfg = dp_config(1.0, 3.0, 1.0);
    cfg.privacy.adaptive = Some(AdaptiveClip {
        count_stddev: Some(1.0),
        ..AdaptiveClip::default()
    });
    let mut e = dp_engine(cfg, &l, 10);
    assert!(matches!(e.start_round(0), Err(AggError::Config(_))));
}

#[test]
fn accountant_state_survives_a_checkpoint() {
    let l = big_layout(4);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dp_config(0.5, 1.0, 1.0);
    let mut e = dp_engine(cfg.clone(), &l, 10);
    for _ in 0..3 {
        let plans = e.start_round(0).expect("round");
        for (id, plan) in &plans {
            e.submit(update(id, plan, &[(BACKBONE, vec![0.1; 4])]), 1)
                .expect("accepted");
        }
        e.poll(1).expect("closed");
    }
    e.save_checkpoint(dir.path()).expect("save");
    let r = Engine::resume(
        dir.path(),
        cfg,
        cohort_aggregator::strategy_from_config(&StrategyConfig::default()),
    )
    .expect("resume")
    .expect("a checkpoint");
    assert_eq!(r.epsilon(), e.epsilon());
    let mut a = RdpAccountant::default();
    a.compose(0.5, 1.0, 3);
    assert_eq!(r.epsilon(), Some(a.epsilon(1e-5)));
}

#[test]
fn client_mode_plans_carry_the_noise_share_and_account_what_arrived() {
    let l = big_layout(4);
    let mut cfg = dp_config(1.0, 1.2, 0.5);
    cfg.privacy.mode = PrivacyMode::Client;
    // A lossy codec would keep an error-feedback residual: refused.
    let mut lossy = cfg.clone();
    lossy.codec.bits = 8;
    assert!(lossy.validate().is_err());
    let mut e = dp_engine(cfg, &l, 4);
    let plans = e.start_round(0).expect("round");
    assert_eq!(plans.len(), 4);
    for (_, p) in &plans {
        let noise = p.privacy.expect("client noise in the plan");
        assert_eq!(noise.clip, 0.5);
        // 4 expected shares of std z C / 2 add up to std z C.
        assert!((f64::from(noise.noise_std) - 1.2 * 0.5 / 2.0).abs() < 1e-6);
    }
    // Two of the four answer: the sum holds half the noise variance.
    for (id, plan) in plans.iter().take(2) {
        e.submit(update(id, plan, &[(BACKBONE, vec![0.1; 4])]), 1)
            .expect("accepted");
    }
    for (id, _) in plans.iter().skip(2) {
        e.fail(id, cohort_aggregator::FailureReason::Dropout);
    }
    let p = e.poll(1).expect("closed").privacy.expect("privacy");
    let z = 1.2 * (2.0f64 / 4.0).sqrt();
    assert!(
        (p.noise_multiplier - z).abs() < 1e-12,
        "{}",
        p.noise_multiplier
    );
    let want = accountant::epsilon(1.0, z, 1, 1e-5);
    assert!((p.epsilon - want).abs() < 1e-9 * want);
    // The aggregator adds no noise in client mode: two updates of 0.1
    // over the denominator 4 move the backbone by exactly 0.05.
    for w in e.global().get(BACKBONE).expect("backbone") {
        assert!((w - 0.05).abs() < 1e-6, "{w}");
    }
}

#[test]
fn command_line_overrides_turn_privacy_on_and_replace_the_noise_setting() {
    use cohort_aggregator::PrivacyOverrides;
    let mut p = PrivacyConfig::default();
    p.apply(&PrivacyOverrides {
        target_epsilon: Some(8.0),
        ..Default::default()
    })
    .expect("apply");
    assert_eq!(p.mode, PrivacyMode::Central);
    assert_eq!(p.target_epsilon, Some(8.0));
    p.apply(&PrivacyOverrides {
        noise_multiplier: Some(1.1),
        mode: Some("client".into()),
        ..Default::default()
    })
    .expect("apply");
    assert_eq!(
        (p.mode, p.noise_multiplier, p.target_epsilon),
        (PrivacyMode::Client, Some(1.1), None)
    );
    assert!(p.validate().is_ok());
    assert!(p
        .apply(&PrivacyOverrides {
            mode: Some("loud".into()),
            ..Default::default()
        })
        .is_err());
}
