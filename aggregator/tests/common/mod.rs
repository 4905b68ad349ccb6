//! Shared helpers of the aggregator's tests: a small three-group layout,
//! nodes with matching fingerprints, updates encoded with the real codec.
#![allow(dead_code)]

use cohort_aggregator::{
    strategy_from_config, Engine, EngineConfig, NodeInfo, OpenedUpdate, StrategyConfig,
};
use cohort_protocol::codec::{encode, CodecConfig};
use cohort_protocol::messages::{RoundPlan, TaskMetrics, UpdateHeader};
use cohort_protocol::{head_group, GroupLayout, Layout, ParamGroups, TensorSpec, BACKBONE};

/// backbone: w [2,2] + b [2] = 6 values; head/a: 2 values; head/b: 2 values.
pub fn layout() -> Layout {
    Layout {
        groups: vec![
            GroupLayout {
                name: BACKBONE.into(),
                tensors: vec![
                    TensorSpec {
                        name: "backbone.0.weight".into(),
                        shape: vec![2, 2],
                        offset: 0,
                    },
                    TensorSpec {
                        name: "backbone.0.bias".into(),
                        shape: vec![2],
                        offset: 4,
                    },
                ],
            },
            GroupLayout {
                name: head_group("a"),
                tensors: vec![TensorSpec {
                    name: "head.a.weight".into(),
                    shape: vec![2],
                    offset: 0,
                }],
            },
            GroupLayout {
                name: head_group("b"),
                tensors: vec![TensorSpec {
                    name: "head.b.weight".into(),
                    shape: vec![1, 2],
                    offset: 0,
                }],
            },
        ],
    }
}

/// Initial weights: backbone 1..=6, head/a [10, 20], head/b [-1, -2].
pub fn initial() -> ParamGroups {
    let mut p = ParamGroups::new();
    p.insert(BACKBONE, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    p.insert(head_group("a"), vec![10.0, 20.0]);
    p.insert(head_group("b"), vec![-1.0, -2.0]);
    p
}

pub fn raw32() -> CodecConfig {
    CodecConfig {
        bits: 32,
        ..Default::default()
    }
}

/// The plain arithmetic of the engine: the defences that change it (the
/// default norm bound of this 10-parameter layout is sqrt(10), and the
/// weight share cap) are opted out of; `tests/integrity.rs` tests them with
/// the defaults of [`defended`].
pub fn config() -> EngineConfig {
    EngineConfig {
        max_update_norm: Some(1.0e6),
        max_weight_share: 1.0,
        ..defended()
    }
}

/// The test federation with the engine's default defences.
pub fn defended() -> EngineConfig {
    EngineConfig {
        federation: "test".into(),
        seed: 7,
        deadline_ms: 1_000,
        quorum: 0.5,
        codec: raw32(),
        ..Default::default()
    }
}

pub fn engine(cfg: EngineConfig, strategy: &StrategyConfig) -> Engine {
    Engine::new(cfg, layout(), initial(), strategy_from_config(strategy)).expect("engine")
}

/// A node holding `tasks` (task, samples) with the right fingerprint.
pub fn node(id: &str, tasks: &[(&str, u64)]) -> NodeInfo {
    let l = layout();
    let mut groups = vec![BACKBONE.to_string()];
    groups.extend(tasks.iter().map(|(t, _)| head_group(t)));
    NodeInfo {
        id: id.into(),
        tasks: tasks.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
        fingerprint: l.subset(&groups).expect("subset").fingerprint(),
    }
}

/// An update answering `plan`, with `deltas` (group, values) encoded raw,
/// `num_examples` for the backbone and per-task samples in the metrics.
pub fn update(
    node: &str,
    plan: &RoundPlan,
    deltas: &[(&str, Vec<f32>)],
    num_examples: u64,
    tasks: &[(&str, u64)],
) -> OpenedUpdate {
    let header = UpdateHeader {
        federation: plan.federation.clone(),
        round: plan.round,
        base_version: plan.base_version,
        node: node.into(),
        groups: deltas.iter().map(|(g, _)| g.to_string()).collect(),
        metrics: tasks
            .iter()
            .map(|(t, n)| TaskMetrics {
                task: t.to_string(),
                loss: 0.5,
                samples: *n,
                steps: 1,
            })
            .collect(),
        num_examples,
    };
    let groups = deltas
        .iter()
        .map(|(_, d)| encode(d, &plan.codec, 1).expect("encode"))
        .collect();
    OpenedUpdate { header, groups }
}

pub fn plan_of<'a>(plans: &'a [(String, RoundPlan)], node: &str) -> &'a RoundPlan {
    &plans
        .iter()
        .find(|(n, _)| n == node)
        .expect("node sampled")
        .1
}

pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "lengths: {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "[{i}]: got {g}, want {w} (all: {got:?} vs {want:?})"
        );
    }
}
