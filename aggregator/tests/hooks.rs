//! The strategy hooks a strategy outside this crate relies on: per-client
//! results and failures in `aggregate`, `update_weight`, federated
//! evaluation, initial parameters, and the default sampling's numbers.

mod common;

use std::sync::{Arc, Mutex};

use cohort_aggregator::{
    strategy_from_config, weighted_eval_metrics, AggError, AggregateInput, ClientResult, Engine,
    FailureReason, Sampling, Strategy, StrategyConfig, StrategyState,
};
use cohort_protocol::messages::{EvalMetrics, EvalReport, NodeId, TrainConfig};
use cohort_protocol::{head_group, Layout, ParamGroups, BACKBONE};
use common::{config, initial, layout, node, plan_of, update};
use rand::seq::index::sample;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a recording strategy saw in `aggregate`.
#[derive(Debug, Default)]
struct Seen {
    results: Vec<ClientResult>,
    failures: Vec<(NodeId, FailureReason)>,
    combined: Vec<(String, Vec<f32>)>,
}

/// FedAvg (lr 1) that records its inputs, optionally weighs every update
/// by `1 / steps` and proposes its own initial parameters.
#[derive(Debug)]
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    per_step: bool,
    /// Gives this node the weight 0 (which the engine must refuse).
    zero_for: Option<String>,
    initial: Option<ParamGroups>,
}

impl Recorder {
    fn new() -> (Self, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        (
            Recorder {
                seen: Arc::clone(&seen),
                per_step: false,
                zero_for: None,
                initial: None,
            },
            seen,
        )
    }
}

impl Strategy for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn initial_parameters(&mut self, _: &Layout, _: &ParamGroups) -> Option<ParamGroups> {
        self.initial.clone()
    }
    fn update_weight(&self, _group: &str, r: &ClientResult, weight: f64) -> f64 {
        if self.zero_for.as_deref() == Some(r.node.as_str()) {
            return 0.0;
        }
        match (self.per_step, r.steps) {
            (true, Some(s)) => weight / s as f64,
            _ => weight,
        }
    }
    fn aggregate(
        &mut self,
        input: &AggregateInput<'_>,
        global: &mut ParamGroups,
    ) -> Result<(), AggError> {
        let mut seen = self.seen.lock().expect("lock");
        seen.results = input.results.to_vec();
        seen.failures = input.failures.to_vec();
        seen.combined = input
            .combined
            .iter()
            .map(|(g, d)| (g.clone(), d.clone()))
            .collect();
        for (g, d) in input.combined {
            if let Some(w) = global.get_mut(g) {
                w.iter_mut().zip(d).for_each(|(w, d)| *w += d);
            }
        }
        Ok(())
    }
    fn state(&self) -> StrategyState {
        StrategyState {
            name: "recorder".into(),
            ..StrategyState::default()
        }
    }
    fn restore(&mut self, _: StrategyState, _: &Layout) -> Result<(), AggError> {
        Ok(())
    }
}

fn engine_with(strategy: Recorder) -> Engine {
    let mut e = Engine::new(config(), layout(), initial(), Box::new(strategy)).expect("engine");
    e.register(node("n1", &[("a", 10)])).expect("n1");
    e.register(node("n2", &[("a", 30)])).expect("n2");
    e.register(node("n3", &[("b", 5)])).expect("n3");
    e
}

#[test]
fn aggregate_sees_per_client_results_and_failures() {
    let (s, seen) = Recorder::new();
    let mut e = engine_with(s);
    let plans = e.start_round(0).expect("start");
    let p1 = plan_of(&plans, "n1").clone();
    let p2 = plan_of(&plans, "n2").clone();
    // n1: norm 5 (3-4-0 backbone), n2: a head too.
    let mut u1 = update(
        "n1",
        &p1,
        &[(BACKBONE, vec![3.0, 4.0, 0.0, 0.0, 0.0, 0.0])],
        10,
        &[("a", 10)],
    );
    u1.header.metrics[0].steps = 2;
    u1.header.metrics[0].loss = 0.25;
    e.submit(u1, 1).expect("n1 accepted");
    let u2 = update(
        "n2",
        &p2,
        &[(BACKBONE, vec![1.0; 6]), (&head_group("a"), vec![2.0, 2.0])],
        30,
        &[("a", 30)],
    );
    e.submit(u2, 2).expect("n2 accepted");
    e.fail("n3", FailureReason::Dropout);
    let report = e.poll(3).expect("closed");
    assert!(report.stepped);
    let seen = seen.lock().expect("lock");
    assert_eq!(
        seen.failures,
        vec![("n3".to_string(), FailureReason::Dropout)]
    );
    assert_eq!(seen.results.len(), 2);
    let r1 = &seen.results[0];
    assert_eq!(r1.node, "n1");
    assert_eq!(r1.round, 1);
    assert_eq!(r1.num_examples, 10);
    assert_eq!(r1.weight(BACKBONE), Some(10.0));
    assert_eq!(r1.steps, Some(2));
    assert_eq!(r1.metrics[0].loss, 0.25);
    assert!((r1.norm - 5.0).abs() < 1e-9, "{}", r1.norm);
    assert_eq!((r1.clip_scale, r1.staleness, r1.discount), (1.0, 0, 1.0));
    let r2 = &seen.results[1];
    assert_eq!(r2.node, "n2");
    assert_eq!(r2.weight(BACKBONE), Some(30.0));
    assert_eq!(r2.weight(&head_group("a")), Some(30.0));
    assert_eq!(r2.steps, Some(1));
    // The combined backbone is the example-weighted mean.
    let bb = &seen
        .combined
        .iter()
        .find(|(g, _)| g == BACKBONE)
        .expect("bb")
        .1;
    common::assert_close(bb, &[1.5, 1.75, 0.75, 0.75, 0.75, 0.75], 1e-6);
}

#[test]
fn update_weight_changes_the_mean_and_is_reported() {
    let (mut s, seen) = Recorder::new();
    s.per_step = true;
    let mut e = engine_with(s);
    let plans = e.start_round(0).expect("start");
    let mut u1 = update(
        "n1",
        plan_of(&plans, "n1"),
        &[(BACKBONE, vec![4.0; 6])],
        10,
        &[("a", 10)],
    );
    u1.header.metrics[0].steps = 10; // weight 10 / 10 = 1
    let mut u2 = update(
        "n2",
        plan_of(&plans, "n2"),
        &[(BACKBONE, vec![0.0; 6])],
        30,
        &[("a", 30)],
    );
    u2.header.metrics[0].steps = 10; // weight 30 / 10 = 3
    e.submit(u1, 1).expect("n1");
    e.submit(u2, 1).expect("n2");
    e.fail("n3", FailureReason::Timeout);
    e.poll(2).expect("closed");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.results[0].weight(BACKBONE), Some(1.0));
    assert_eq!(seen.results[1].weight(BACKBONE), Some(3.0));
    let bb = &seen
        .combined
        .iter()
        .find(|(g, _)| g == BACKBONE)
        .expect("bb")
        .1;
    common::assert_close(bb, &[1.0; 6], 1e-6);
}

#[test]
fn the_share_cap_shows_in_the_reported_weights() {
    let (s, seen) = Recorder::new();
    let mut cfg = config();
    cfg.max_weight_share = 0.5;
    let mut e = Engine::new(cfg, layout(), initial(), Box::new(s)).expect("engine");
    for (n, k) in [("n1", 10), ("n2", 10), ("n3", 100)] {
        e.register(node(n, &[("a", k)])).expect("register");
    }
    let plans = e.start_round(0).expect("start");
    for (n, k) in [("n1", 10), ("n2", 10), ("n3", 100)] {
        let u = update(
            n,
            plan_of(&plans, n),
            &[(BACKBONE, vec![1.0; 6])],
            k,
            &[("a", k)],
        );
        e.submit(u, 1).expect("accepted");
    }
    e.poll(2).expect("closed");
    let seen = seen.lock().expect("lock");
    let w: Vec<f64> = seen
        .results
        .iter()
        .filter_map(|r| r.weight(BACKBONE))
        .collect();
    // n3 may weigh at most half: 20 = 0.5 * (10 + 10 + 20).
    assert_eq!(w, vec![10.0, 10.0, 20.0]);
}

#[test]
fn a_bad_weight_from_the_strategy_refuses_the_update() {
    let (mut s, seen) = Recorder::new();
    s.zero_for = Some("n1".into());
    let mut cfg = config();
    cfg.quorum = 0.3;
    let mut e = Engine::new(cfg, layout(), initial(), Box::new(s)).expect("engine");
    for (n, t, k) in [("n1", "a", 10), ("n2", "a", 30), ("n3", "b", 5)] {
        e.register(node(n, &[(t, k)])).expect("register");
    }
    let plans = e.start_round(0).expect("start");
    let before = e.accumulator_digest();
    let u = update(
        "n1",
        plan_of(&plans, "n1"),
        &[(BACKBONE, vec![1.0; 6])],
        10,
        &[("a", 10)],
    );
    let r = e.submit(u, 1).expect_err("weight 0 refused");
    assert_eq!(r.code, cohort_aggregator::RefusalCode::BadWeight);
    assert_eq!(before, e.accumulator_digest(), "a refusal changes nothing");
    let u = update(
        "n2",
        plan_of(&plans, "n2"),
        &[(BACKBONE, vec![1.0; 6])],
        30,
        &[("a", 30)],
    );
    e.submit(u, 1).expect("n2");
    e.fail("n3", FailureReason::Dropout);
    assert!(e.poll(2).is_none(), "n1 may still send a good update");
    let report = e.poll(2_000).expect("closed at the deadline");
    assert_eq!(report.accepted, vec!["n2"]);
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.results.len(), 1);
    // n1 was refused until the round closed.
    assert!(seen.failures.iter().any(|(n, r)| n == "n1"
        && *r == FailureReason::Refused(cohort_aggregator::RefusalCode::BadWeight)));
}

#[test]
fn federated_evaluation_defaults() {
    let (s, _) = Recorder::new();
    let mut e = engine_with(s);
    // configure_evaluate: every registered node, in order, and the same
    // for the same round (a stream of its own: training sampling unmoved).
    assert_eq!(e.configure_evaluate(1), vec!["n1", "n2", "n3"]);
    let plans_a = {
        let (s, _) = Recorder::new();
        let mut f = engine_with(s);
        f.start_round(0).expect("start")
    };
    let _ = e.configure_evaluate(2);
    let plans_b = e.start_round(0).expect("start");
    assert_eq!(plans_a, plans_b, "evaluation did not move the sampling");

    let report = |node: &str, task: &str, acc: f32, loss: f32, n: u64| EvalReport {
        node: node.into(),
        round: 1,
        version: 1,
        metrics: vec![EvalMetrics {
            task: task.into(),
            accuracy: acc,
            loss,
            samples: n,
        }],
    };
    let reports = vec![
        report("n1", "a", 0.5, 1.0, 10),
        report("n2", "a", 1.0, 0.0, 30),
        report("n3", "b", 0.25, 2.0, 4),
    ];
    let mut all = reports.clone();
    // Ignored: a NaN entry, an accuracy out of range, a second report of
    // n1, a node that is not registered.
    let nan = |task: &str, accuracy: f32| EvalMetrics {
        task: task.into(),
        accuracy,
        loss: 0.0,
        samples: 1000,
    };
    all[1].metrics.push(nan("b", f32::NAN));
    all[2].metrics.push(nan("a", 7.0));
    all.push(report("n1", "a", 0.0, 9.0, 1000));
    all.push(report("nobody", "a", 0.0, 9.0, 1000));
    let failures = vec![("n4".to_string(), FailureReason::Timeout)];
    let m = e.aggregate_evaluate(1, &all, &failures).expect("metrics");
    assert_eq!(m["accuracy/a"], (0.5 * 10.0 + 30.0) / 40.0);
    assert_eq!(m["loss/a"], 10.0 / 40.0);
    assert_eq!(m["samples/a"], 40.0);
    assert_eq!(m["accuracy/b"], 0.25);
    assert_eq!(m["nodes"], 3.0);
    assert_eq!(m["failures"], 1.0);
    // The library function alone, and nothing usable gives None.
    let direct = weighted_eval_metrics(&reports[..3], &failures).expect("metrics");
    assert_eq!(direct["accuracy/a"], m["accuracy/a"]);
    assert!(weighted_eval_metrics(&[], &failures).is_none());
}

#[test]
fn initial_parameters_replace_the_proposal_and_are_checked() {
    let mut own = initial();
    own.insert(BACKBONE, vec![0.5; 6]);
    let (mut s, _) = Recorder::new();
    s.initial = Some(own.clone());
    let e = Engine::new(config(), layout(), initial(), Box::new(s)).expect("engine");
    assert_eq!(e.global().get(BACKBONE), own.get(BACKBONE));

    // A group of the wrong length, a missing group, a NaN: typed errors.
    let mut short = initial();
    short.insert(BACKBONE, vec![0.5; 5]);
    let mut missing = ParamGroups::new();
    missing.insert(BACKBONE, vec![0.5; 6]);
    let mut nan = initial();
    nan.insert(head_group("a"), vec![f32::NAN, 0.0]);
    for bad in [short, missing, nan] {
        let (mut s, _) = Recorder::new();
        s.initial = Some(bad);
        match Engine::new(config(), layout(), initial(), Box::new(s)) {
            Err(AggError::Strategy { strategy, message }) => {
                assert_eq!(strategy, "recorder");
                assert!(message.contains("initial parameters"), "{message}");
            }
            other => panic!("bad initial parameters accepted: {other:?}"),
        }
    }
}

#[test]
fn resume_does_not_call_initial_parameters() {
    let dir = tempfile::tempdir().expect("tmp");
    let e = Engine::new(
        config(),
        layout(),
        initial(),
        strategy_from_config(&StrategyConfig::default()),
    )
    .expect("engine");
    e.save_checkpoint(dir.path()).expect("save");
    #[derive(Debug)]
    struct Proposes;
    impl Strategy for Proposes {
        fn name(&self) -> &str {
            "fedavg"
        }
        fn initial_parameters(&mut self, l: &Layout, _: &ParamGroups) -> Option<ParamGroups> {
            Some(l.zeros())
        }
        fn aggregate(
            &mut self,
            _: &AggregateInput<'_>,
            _: &mut ParamGroups,
        ) -> Result<(), AggError> {
            Ok(())
        }
        fn state(&self) -> StrategyState {
            StrategyState {
                name: "fedavg".into(),
                ..StrategyState::default()
            }
        }
        fn restore(&mut self, _: StrategyState, _: &Layout) -> Result<(), AggError> {
            Ok(())
        }
    }
    let r = Engine::resume(dir.path(), config(), Box::new(Proposes))
        .expect("resume")
        .expect("found");
    assert_eq!(r.global(), &initial());
}

/// The sampling of the old `configure(.., rng: &mut ChaCha8Rng)`, written
/// against the concrete generator.
fn old_configure(
    available: &[String],
    sampling: &Sampling,
    base: &TrainConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<(String, TrainConfig)> {
    let n = sampling.sample_size(available.len());
    let mut picked: Vec<usize> = sample(rng, available.len(), n).into_vec();
    picked.sort_unstable();
    picked
        .into_iter()
        .map(|i| {
            let mut t = base.clone();
            t.seed = rng.next_u64();
            (available[i].clone(), t)
        })
        .collect()
}

#[test]
fn default_sampling_through_dyn_rngcore_draws_the_same_numbers() {
    let nodes: Vec<String> = (0..50).map(|i| format!("n{i:02}")).collect();
    let sampling = Sampling {
        fraction: 0.3,
        min_per_round: 2,
        min_available: 1,
    };
    let base = TrainConfig::default();
    let mut s = strategy_from_config(&StrategyConfig::default());
    let mut a = ChaCha8Rng::seed_from_u64(99);
    let mut b = ChaCha8Rng::seed_from_u64(99);
    for round in 1..=5 {
        let new = s.configure(round, &nodes, &sampling, &base, &mut a);
        let old = old_configure(&nodes, &sampling, &base, &mut b);
        assert_eq!(new, old, "round {round}");
    }
    assert_eq!(a.get_word_pos(), b.get_word_pos());
}
