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
