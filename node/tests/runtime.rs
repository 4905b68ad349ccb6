//! The node runtime on real data: what it sends can be opened by the
//! aggregator's key only, carries exactly the planned groups, and keeps
//! local heads at home.

use cohort_node::{NodeError, NodeRuntime};
use cohort_protocol::codec::{self, CodecConfig};
use cohort_protocol::messages::{unpack_groups, RoundPlan, TrainConfig};
use cohort_protocol::seal::{SealContext, SealKeyPair};
use cohort_protocol::{head_group, BACKBONE, PROTOCOL_VERSION};
use cohort_tasks::{Backend, ModelRegistry, SharedModel, TaskData, TaskSpec};

fn plan(upload: Vec<String>, bits: u8) -> RoundPlan {
    RoundPlan {
        federation: "fed".into(),
        round: 3,
        base_version: 2,
        upload,
        train: TrainConfig {
            epochs: 1,
            batch_size: 16,
            lr: 0.1,
            seed: 9,
            ..TrainConfig::default()
        },
        codec: CodecConfig {
            bits,
            ..CodecConfig::default()
        },
        deadline_ms: 1000,
        privacy: None,
    }
}

fn setup() -> (SharedModel, cohort_tasks::Split, SealKeyPair) {
    let spec = ModelRegistry::default()
        .build("mlp8x8", Backend::Auto, vec![TaskSpec::new("digits", 10)])
        .expect("model");
    (
        spec,
        cohort_tasks::builtin("digits8x8").expect("data"),
        SealKeyPair::generate().expect("key"),
    )
}

#[test]
fn update_opens_with_the_aggregator_key_and_decodes_to_the_trained_delta() {
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let idx: Vec<usize> = (0..200).collect();
    let data = [TaskData {
        task: "digits",
        data: &split.train,
        indices: &idx,
    }];
    let mut node = NodeRuntime::new("node-1", "fed", spec.clone(), keys.public());
    let groups = vec![BACKBONE.to_string(), head_group("digits")];
    let out = node
        .run_round(&plan(groups.clone(), 32), &global, &data)
        .expect("round");
    let h = &out.update.header;
    assert_eq!(
        (h.round, h.base_version, h.node.as_str(), &h.groups),
        (3, 2, "node-1", &groups)
    );
    assert_eq!(h.num_examples, 200);
    let ctx = SealContext {
        version: PROTOCOL_VERSION,
        federation: "fed".into(),
        round: 3,
        sender: "node-1".into(),
        groups: groups.clone(),
    };
    let plain = keys.open(&ctx, &out.update.sealed).expect("opens");
    let other = SealKeyPair::generate().expect("key");
    assert!(
        other.open(&ctx, &out.update.sealed).is_err(),
        "another key must not open it"
    );
    let parts = unpack_groups(&plain, 2).expect("two groups");
    for (g, bytes) in groups.iter().zip(parts) {
        let start = global.get(g).expect("start");
        let decoded = codec::decode(bytes, start.len()).expect("decodes");
        let trained = out.trained.get(g).expect("trained");
        // 32-bit: the decoded delta is exactly trained - start.
        for ((d, t), s) in decoded.iter().zip(trained).zip(start) {
            assert_eq!(*d, t - s);
        }
        assert!(decoded.iter().any(|d| *d != 0.0), "{g} did not train");
    }
}

#[test]
fn local_heads_stay_home_and_residuals_are_kept() {
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let idx: Vec<usize> = (0..100).collect();
    let data = [TaskData {
        task: "digits",
        data: &split.train,
        indices: &idx,
    }];
    let mut node = NodeRuntime::new("node-2", "fed", spec, keys.public());
    let out = node
        .run_round(&plan(vec![BACKBONE.to_string()], 8), &global, &data)
        .expect("round");
    assert_eq!(out.update.header.groups, vec![BACKBONE.to_string()]);
    let head = head_group("digits");
    assert_eq!(
        node.state.local.get(&head),
        out.trained.get(&head),
        "the trained head is kept locally"
    );
    assert_ne!(node.state.local.get(&head), global.get(&head));
    assert!(
        node.state.residuals.contains_key(BACKBONE),
        "8-bit encoding keeps an error-feedback residual"
    );
    assert!(!node.state.residuals.contains_key(&head));
    // Next round starts from the local head, not the aggregator's copy.
    let start = node
        .start_weights(&plan(vec![BACKBONE.to_string()], 8), &global)
        .expect("start");
    assert_eq!(start.get(&head), node.state.local.get(&head));
}

#[test]
fn refuses_plans_it_cannot_follow() {
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let idx: Vec<usize> = (0..10).collect();
    let data = [TaskData {
        task: "digits",
        data: &split.train,
        indices: &idx,
    }];
    let mut node = NodeRuntime::new("node-3", "other-fed", spec, keys.public());
    let err = node
        .run_round(&plan(vec![BACKBONE.to_string()], 8), &global, &data)
        .expect_err("wrong federation");
    assert!(matches!(err, NodeError::WrongFederation { .. }));
    node.federation = "fed".into();
    let err = node
        .run_round(&plan(vec![head_group("fashion")], 8), &global, &data)
        .expect_err("unknown group");
    assert!(matches!(err, NodeError::UnknownGroup(_)));
    let empty = [TaskData {
        task: "digits",
        data: &split.train,
        indices: &[],
    }];
    let err = node
        .run_round(&plan(vec![BACKBONE.to_string()], 8), &global, &empty)
        .expect_err("no data");
    assert!(matches!(err, NodeError::NoData));
    let mut partial = global.clone();
    partial.remove(BACKBONE);
    let err = node
        .run_round(&plan(vec![BACKBONE.to_string()], 8), &partial, &data)
        .expect_err("missing weights");
    assert!(matches!(err, NodeError::MissingWeights(_)));
}

/// The node's own limits (issue 13, item 6). Before: there were none; a
/// plan was trained as sent, and every error was fatal to the agent.
fn digits_data(split: &cohort_tasks::Split, n: usize) -> (Vec<usize>, &cohort_tasks::Dataset) {
    ((0..n).collect(), &split.train)
}

#[test]
fn plans_outside_the_node_limits_are_refusals() {
    use cohort_node::NodeLimits;
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let (idx, ds) = digits_data(&split, 64);
    let data = [TaskData {
        task: "digits",
        data: ds,
        indices: &idx,
    }];
    let limits = NodeLimits {
        min_batch_size: 8,
        ..NodeLimits::default()
    };
    let mut node = NodeRuntime::new("node-4", "fed", spec, keys.public()).with_limits(limits);
    let up = vec![BACKBONE.to_string()];
    let refused = |node: &mut NodeRuntime, p: RoundPlan, field: &str| {
        let before = node.state.bytes();
        let err = node.run_round(&p, &global, &data).expect_err(field);
        assert!(matches!(err, NodeError::BadPlan(_)), "{field}: {err}");
        assert!(err.to_string().contains(field), "{field}: {err}");
        assert!(err.is_refusal(), "{field}: a refusal, not fatal");
        assert_eq!(node.state.bytes(), before, "{field}: state unchanged");
    };
    let mut p = plan(up.clone(), 8);
    p.train.batch_size = 4; // below this node's minimum of 8
    refused(&mut node, p, "train.batch_size");
    let mut p = plan(up.clone(), 8);
    p.train.batch_size = 0;
    refused(&mut node, p, "train.batch_size");
    let mut p = plan(up.clone(), 8);
    p.train.lr = 1.0e30; // huge but finite
    refused(&mut node, p, "train.lr");
    let mut p = plan(up.clone(), 8);
    p.train.epochs = 1_000_000_000;
    refused(&mut node, p, "train.epochs");
    let mut p = plan(up.clone(), 3);
    p.codec.bits = 3;
    refused(&mut node, p, "codec");
    let p = plan(vec![BACKBONE.to_string(), BACKBONE.to_string()], 8);
    refused(&mut node, p, "twice");
    // Within the limits: trains.
    node.run_round(&plan(up, 8), &global, &data)
        .expect("good plan");
}

#[test]
fn local_steps_are_capped_by_the_node() {
    use cohort_node::NodeLimits;
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let (idx, ds) = digits_data(&split, 64);
    let data = [TaskData {
        task: "digits",
        data: ds,
        indices: &idx,
    }];
    let limits = NodeLimits {
        max_steps: 5,
        ..NodeLimits::default()
    };
    let mut node = NodeRuntime::new("node-5", "fed", spec, keys.public()).with_limits(limits);
    // 500 epochs of 4 batches = 2000 steps asked; 5 done.
    let mut p = plan(vec![BACKBONE.to_string()], 8);
    p.train.epochs = 500;
    let out = node.run_round(&p, &global, &data).expect("round");
    let steps: u64 = out.update.header.metrics.iter().map(|m| m.steps).sum();
    assert_eq!(steps, 5);
    // Time budget: a budget of 0 ms leaves the one step every round takes.
    node.limits.max_train_ms = Some(0);
    let out = node.run_round(&p, &global, &data).expect("round");
    let steps: u64 = out.update.header.metrics.iter().map(|m| m.steps).sum();
    assert_eq!(steps, 1);
}

/// Before: the time budget was a step cap from the rate of earlier rounds,
/// so a node's first round (or a plan far longer than the last one) trained
/// to the end whatever the budget. Now training stops mid-round when the
/// budget is spent, in the first round too.
#[test]
fn the_time_budget_stops_training_mid_round_in_the_first_round() {
    use cohort_node::NodeLimits;
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let (idx, ds) = digits_data(&split, 64);
    let data = [TaskData {
        task: "digits",
        data: ds,
        indices: &idx,
    }];
    let limits = NodeLimits {
        max_train_ms: Some(1),
        ..NodeLimits::default()
    };
    let mut node = NodeRuntime::new("node-7", "fed", spec, keys.public()).with_limits(limits);
    // 1,000 epochs of 8 batches: 8,000 steps asked, far beyond 1 ms on
    // any machine.
    let mut p = plan(vec![BACKBONE.to_string()], 8);
    p.train.epochs = 1_000;
    let out = node.run_round(&p, &global, &data).expect("round");
    let steps: u64 = out.update.header.metrics.iter().map(|m| m.steps).sum();
    assert!((1..8_000).contains(&steps), "{steps} steps");
}

#[test]
fn local_groups_are_never_uploaded_whatever_the_plan_says() {
    use cohort_node::NodeLimits;
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let (idx, ds) = digits_data(&split, 64);
    let data = [TaskData {
        task: "digits",
        data: ds,
        indices: &idx,
    }];
    let head = head_group("digits");
    let limits = NodeLimits {
        local_groups: [head.clone()].into_iter().collect(),
        ..NodeLimits::default()
    };
    let mut node = NodeRuntime::new("node-6", "fed", spec, keys.public()).with_limits(limits);
    let out = node
        .run_round(
            &plan(vec![BACKBONE.to_string(), head.clone()], 32),
            &global,
            &data,
        )
        .expect("round");
    assert_eq!(out.update.header.groups, vec![BACKBONE.to_string()]);
    let plain = keys
        .open(
            &SealContext::of_update(&out.update.header),
            &out.update.sealed,
        )
        .expect("opens");
    assert_eq!(unpack_groups(&plain, 1).expect("one group").len(), 1);
    assert_eq!(node.state.local.get(&head), out.trained.get(&head));
    // Next round: the head starts from the node's copy, not the global one.
    let start = node
        .start_weights(&plan(vec![BACKBONE.to_string(), head.clone()], 32), &global)
        .expect("start");
    assert_eq!(start.get(&head), node.state.local.get(&head));
    // A plan asking only for the local group: nothing to upload, refused.
    let err = node
        .run_round(&plan(vec![head], 32), &global, &data)
        .expect_err("nothing to upload");
    assert!(
        matches!(err, NodeError::BadPlan(_)) && err.is_refusal(),
        "{err}"
    );
}

#[test]
fn bad_weights_and_divergence_are_refusals_that_change_nothing() {
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let (idx, ds) = digits_data(&split, 64);
    let data = [TaskData {
        task: "digits",
        data: ds,
        indices: &idx,
    }];
    let mut node = NodeRuntime::new("node-7", "fed", spec, keys.public());
    // One 8-bit round so that a residual exists.
    let up = vec![BACKBONE.to_string()];
    node.run_round(&plan(up.clone(), 8), &global, &data)
        .expect("round");
    let residuals = node.state.residuals.clone();
    let local = node.state.local.clone();
    let mut nan = global.clone();
    nan.get_mut(BACKBONE).expect("bb")[0] = f32::NAN;
    let err = node
        .run_round(&plan(up.clone(), 8), &nan, &data)
        .expect_err("NaN weights");
    assert!(
        matches!(err, NodeError::BadWeights(_)) && err.is_refusal(),
        "{err}"
    );
    let mut short = global.clone();
    short.get_mut(BACKBONE).expect("bb").pop();
    let err = node
        .run_round(&plan(up.clone(), 8), &short, &data)
        .expect_err("short weights");
    assert!(matches!(err, NodeError::BadWeights(_)), "{err}");
    // Finite but huge weights: training overflows.
    let mut huge = global.clone();
    for v in huge.get_mut(BACKBONE).expect("bb").iter_mut() {
        *v = 3.0e37;
    }
    let mut p = plan(up, 8);
    p.train.lr = 10.0;
    let err = node.run_round(&p, &huge, &data).expect_err("diverges");
    assert!(err.is_refusal(), "{err}");
    assert!(matches!(err, NodeError::Diverged(_)), "not sent: {err}");
    assert_eq!(node.state.residuals, residuals, "residuals unchanged");
    assert_eq!(node.state.local, local, "local groups unchanged");
}

/// Client-side DP: the uploaded delta is the trained delta clipped to the
/// plan's norm over all groups, plus Gaussian noise of the plan's std;
/// a lossy codec is refused, and no residual is kept.
#[test]
fn client_side_dp_clips_over_all_groups_and_adds_the_noise_share() {
    use cohort_protocol::messages::ClientNoise;
    let (spec, split, keys) = setup();
    let global = spec.init(1);
    let idx: Vec<usize> = (0..200).collect();
    let data = [TaskData {
        task: "digits",
        data: &split.train,
        indices: &idx,
    }];
    let groups = vec![BACKBONE.to_string(), head_group("digits")];
    let decoded = |node: &mut NodeRuntime, p: &RoundPlan| -> (Vec<f32>, Vec<f32>) {
        let out = node.run_round(p, &global, &data).expect("round");
        let ctx = SealContext::of_update(&out.update.header);
        let plain = keys.open(&ctx, &out.update.sealed).expect("opens");
        let parts = unpack_groups(&plain, 2).expect("two groups");
        let mut sent = Vec::new();
        let mut trained = Vec::new();
        for (g, bytes) in groups.iter().zip(parts) {
            let start = global.get(g).expect("start");
            sent.extend(codec::decode(bytes, start.len()).expect("decodes"));
            let t = out.trained.get(g).expect("trained");
            trained.extend(t.iter().zip(start).map(|(a, b)| a - b));
        }
        (sent, trained)
    };
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    // No noise: exactly the clipped delta.
    let mut p = plan(groups.clone(), 32);
    let mut node = NodeRuntime::new("node-dp", "fed", spec.clone(), keys.public());
    let (_, raw) = decoded(&mut node, &p);
    let clip = (0.25 * norm(&raw)) as f32;
    p.privacy = Some(ClientNoise {
        clip,
        noise_std: 0.0,
    });
    let mut node = NodeRuntime::new("node-dp", "fed", spec.clone(), keys.public());
    let (sent, trained) = decoded(&mut node, &p);
    assert!((norm(&sent) - f64::from(clip)).abs() < 1e-4 * f64::from(clip));
    let s = clip / norm(&trained) as f32;
    for (a, b) in sent.iter().zip(&trained) {
        assert!((a - b * s).abs() < 1e-6, "{a} vs {}", b * s);
    }
    assert!(node.state.residuals.is_empty(), "no residual is kept");
    // With noise (seeded): the difference has the plan's std.
    let std = 0.05f32;
    p.privacy = Some(ClientNoise {
        clip,
        noise_std: std,
    });
    let mut node = NodeRuntime::new("node-dp", "fed", spec.clone(), keys.public());
    node.noise_seed = Some(11);
    let (sent, trained) = decoded(&mut node, &p);
    let diff: Vec<f64> = sent
        .iter()
        .zip(&trained)
        .map(|(a, b)| f64::from(a - b * s))
        .collect();
    let n = diff.len() as f64;
    let got = (diff.iter().map(|d| d * d).sum::<f64>() / n).sqrt();
    assert!((got / f64::from(std) - 1.0).abs() < 0.03, "noise std {got}");
    // A lossy codec with client noise is refused.
    let mut lossy = plan(groups.clone(), 8);
    lossy.privacy = p.privacy;
    let mut node = NodeRuntime::new("node-dp", "fed", spec, keys.public());
    assert!(node.run_round(&lossy, &global, &data).is_err());
}
