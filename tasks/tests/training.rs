//! Local training semantics: determinism across thread pools, frozen
//! groups, FedProx, metrics, step limits, errors, personalized evaluation.
//! Each holds on both backends (the gemm executor and dfdx), which share
//! the `TrainConfig` semantics; `GemmNet::logits` and the CNN are gemm only.

mod common;
use cohort_tasks::*;
use common::*;

fn bits(p: &ParamGroups) -> Vec<(String, Vec<u32>)> {
    p.iter()
        .map(|(n, v)| (n.to_string(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// The digits split and `mlp8x8` with one head `digits` on `backend`.
fn digits_setup(backend: Backend) -> (Split, SharedModel) {
    let s = builtin("digits8x8").expect("digits");
    let spec = build("mlp8x8", backend, vec![TaskSpec::new("digits", 10)]);
    (s, spec)
}

#[test]
fn same_seed_same_weights_in_pools_of_one_and_two_threads() {
    let mnist = builtin("mnist5k").expect("mnist");
    let fashion = builtin("fashion6k").expect("fashion");
    // dfdx's matmul runs on the calling rayon pool (split over output
    // tiles), so the dfdx models are the ones this really exercises.
    for (name, backend) in [
        ("mlp28", Backend::Gemm),
        ("cnn28", Backend::Gemm),
        ("mlp28", Backend::Dfdx),
        ("resmlp28", Backend::Dfdx),
    ] {
        let kind = format!("{name} ({backend})");
        let spec = build(
            name,
            backend,
            vec![TaskSpec::new("digits", 10), TaskSpec::new("fashion", 10)],
        );
        let start = spec.init(3);
        let (mi, fi): (Vec<usize>, Vec<usize>) = ((0..300).collect(), (0..200).collect());
        let data = [
            TaskData {
                task: "digits",
                data: &mnist.train,
                indices: &mi,
            },
            TaskData {
                task: "fashion",
                data: &fashion.train,
                indices: &fi,
            },
        ];
        let cfg = TrainConfig {
            optimizer: Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            lr: 1e-3,
            seed: 11,
            ..momentum(1, 0.0, 11)
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| spec.train(&start, &data, &cfg).expect("train"))
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(bits(&a.params), bits(&b.params), "{kind}");
        assert_eq!(a.metrics, b.metrics, "{kind}");
        assert_ne!(
            bits(&a.params),
            bits(&start),
            "{kind}: training changed nothing"
        );
        // Many trainings in parallel in one pool give the same result too.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let many: Vec<TrainOutcome> = pool.install(|| {
            use rayon::prelude::*;
            (0..4)
                .into_par_iter()
                .map(|_| spec.train(&start, &data, &cfg).expect("train"))
                .collect()
        });
        for m in &many {
            assert_eq!(bits(&m.params), bits(&a.params), "{kind}");
        }
        // Another seed, another batch order, other weights.
        let other = spec
            .train(
                &start,
                &data,
                &TrainConfig {
                    seed: 12,
                    ..cfg.clone()
                },
            )
            .expect("train");
        assert_ne!(bits(&other.params), bits(&a.params), "{kind}");
    }
}

#[test]
fn frozen_groups_stay_bit_identical() {
    let s = builtin("digits8x8").expect("digits");
    let (ia, ib): (Vec<usize>, Vec<usize>) = ((0..400).collect(), (400..800).collect());
    let data = [
        TaskData {
            task: "a",
            data: &s.train,
            indices: &ia,
        },
        TaskData {
            task: "b",
            data: &s.train,
            indices: &ib,
        },
    ];
    for backend in BACKENDS {
        let spec = build(
            "mlp8x8",
            backend,
            vec![TaskSpec::new("a", 10), TaskSpec::new("b", 10)],
        );
        let start = spec.init(5);
        for frozen in [
            vec![BACKBONE.to_string()],
            vec!["head/a".to_string()],
            vec![
                BACKBONE.to_string(),
                "head/b".to_string(),
                "head/zzz".to_string(),
            ],
        ] {
            for opt in [
                Optimizer::Sgd,
                Optimizer::Momentum {
                    momentum: 0.9,
                    nesterov: true,
                },
                Optimizer::Adam {
                    beta1: 0.9,
                    beta2: 0.99,
                    eps: 1e-8,
                },
            ] {
                let cfg = TrainConfig {
                    epochs: 2,
                    lr: 0.01,
                    optimizer: opt,
                    weight_decay: 1e-3,
                    prox_mu: 0.1,
                    frozen: frozen.clone(),
                    ..TrainConfig::default()
                };
                let out = spec.train(&start, &data, &cfg).expect("train");
                assert_eq!(
                    out.params.names().collect::<Vec<_>>(),
                    start.names().collect::<Vec<_>>(),
                    "{backend}: every group comes back"
                );
                for (name, v) in out.params.iter() {
                    let s0 = start.get(name).expect("group");
                    let same = v.iter().zip(s0).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert_eq!(
                        same,
                        frozen.iter().any(|f| f == name),
                        "{backend}: group {name}, frozen {frozen:?}, {opt:?}"
                    );
                }
            }
        }
    }
}

fn dist2(a: &ParamGroups, b: &ParamGroups) -> f64 {
    a.iter()
        .map(|(n, v)| {
            v.iter()
                .zip(b.get(n).expect("g"))
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn fedprox_keeps_weights_near_the_start() {
    for backend in BACKENDS {
        let (s, spec) = digits_setup(backend);
        let start = spec.init(1);
        let idx = all(&s.train);
        let data = [TaskData {
            task: "digits",
            data: &s.train,
            indices: &idx,
        }];
        let base = momentum(2, 0.02, 4);
        let free = spec.train(&start, &data, &base).expect("mu=0");
        let prox = spec
            .train(
                &start,
                &data,
                &TrainConfig {
                    prox_mu: 1.0,
                    ..base.clone()
                },
            )
            .expect("mu=1");
        let tight = spec
            .train(
                &start,
                &data,
                &TrainConfig {
                    prox_mu: 20.0,
                    ..base.clone()
                },
            )
            .expect("mu=20");
        let (d0, d1, d2) = (
            dist2(&free.params, &start),
            dist2(&prox.params, &start),
            dist2(&tight.params, &start),
        );
        eprintln!("{backend}: ||w - w0||^2: mu=0 {d0:.4}, mu=1 {d1:.4}, mu=20 {d2:.4}");
        assert!(d1 < d0 && d2 < d1 * 0.5, "{backend}: {d0} {d1} {d2}");
    }
}

#[test]
fn plain_sgd_step_worked_by_hand() {
    // One sample, one SGD step on the tabular MLP with all-zero weights:
    // features are 0, logits equal the head bias (0), softmax is uniform
    // (1/3 each), so the head bias gradient is (1/3 - onehot) and only the
    // head bias moves: b = -lr * (p - y).
    for backend in BACKENDS {
        let spec = build("mlp_tab4", backend, vec![TaskSpec::new("t", 3)]);
        let start = spec.layout().zeros();
        let d = Dataset {
            name: "one".into(),
            dim: 4,
            classes: 3,
            features: vec![1.0, -2.0, 0.5, 3.0],
            labels: vec![2],
            windows: None,
        };
        let cfg = TrainConfig {
            epochs: 1,
            batch_size: 8,
            lr: 0.3,
            ..TrainConfig::default()
        };
        let out = spec
            .train(
                &start,
                &[TaskData {
                    task: "t",
                    data: &d,
                    indices: &[0],
                }],
                &cfg,
            )
            .expect("train");
        let head = out.params.get("head/t").expect("head");
        let bias = &head[3 * 32..];
        let third = 1.0f32 / 3.0;
        let want = [-0.3 * third, -0.3 * third, -0.3 * (third - 1.0)];
        assert!(
            bias.iter().zip(want).all(|(b, w)| (b - w).abs() < 1e-6),
            "{backend}: {bias:?} vs {want:?}"
        );
        assert!(head[..3 * 32].iter().all(|v| *v == 0.0), "{backend}");
        assert!(
            out.params
                .get(BACKBONE)
                .expect("bb")
                .iter()
                .all(|v| *v == 0.0),
            "{backend}"
        );
        let m = &out.metrics[0];
        assert_eq!(
            (m.task.as_str(), m.samples, m.steps),
            ("t", 1, 1),
            "{backend}"
        );
        assert!((m.loss - 3.0f32.ln()).abs() < 1e-6, "{backend}: {m:?}");
    }
}

#[test]
fn metrics_steps_and_max_steps() {
    for backend in BACKENDS {
        let (s, spec) = digits_setup(backend);
        let idx: Vec<usize> = (0..100).collect();
        let data = [TaskData {
            task: "digits",
            data: &s.train,
            indices: &idx,
        }];
        let cfg = TrainConfig {
            epochs: 3,
            batch_size: 32,
            ..TrainConfig::default()
        };
        let out = spec.train(&spec.init(0), &data, &cfg).expect("train");
        assert_eq!(out.metrics[0].steps, 3 * 4, "{backend}");
        assert_eq!(out.metrics[0].samples, 100, "{backend}");
        assert!(
            out.metrics[0].loss > 0.0 && out.metrics[0].loss.is_finite(),
            "{backend}"
        );
        let capped = spec
            .train(
                &spec.init(0),
                &data,
                &TrainConfig {
                    max_steps: Some(5),
                    ..cfg
                },
            )
            .expect("train");
        assert_eq!(capped.metrics[0].steps, 5, "{backend}");
        // No data: nothing changes.
        let none = spec
            .train(
                &spec.init(0),
                &[TaskData {
                    task: "digits",
                    data: &s.train,
                    indices: &[],
                }],
                &TrainConfig::default(),
            )
            .expect("empty");
        assert_eq!(none.params, spec.init(0), "{backend}");
        assert_eq!(none.metrics[0].steps, 0, "{backend}");
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mnist = builtin("mnist5k").expect("mnist");
    for backend in BACKENDS {
        let (s, spec) = digits_setup(backend);
        let start = spec.init(0);
        let idx = vec![0, 1, 2];
        let ok = TrainConfig::default();
        let run = |data: &[TaskData<'_>], cfg: &TrainConfig| spec.train(&start, data, cfg);
        let td = |task, indices| TaskData {
            task,
            data: &s.train,
            indices,
        };
        assert!(
            matches!(
                run(&[td("cifar", &idx)], &ok),
                Err(TasksError::UnknownTask(_))
            ),
            "{backend}"
        );
        assert!(
            matches!(
                run(&[td("digits", &[0, 99_999])], &ok),
                Err(TasksError::DataMismatch(_))
            ),
            "{backend}"
        );
        assert!(
            matches!(
                run(&[td("digits", &idx), td("digits", &idx)], &ok),
                Err(TasksError::DataMismatch(_))
            ),
            "{backend}"
        );
        assert!(
            matches!(
                run(
                    &[td("digits", &idx)],
                    &TrainConfig {
                        batch_size: 0,
                        ..ok.clone()
                    }
                ),
                Err(TasksError::InvalidConfig(_))
            ),
            "{backend}"
        );
        assert!(
            matches!(
                run(
                    &[td("digits", &idx)],
                    &TrainConfig {
                        lr: f32::NAN,
                        ..ok.clone()
                    }
                ),
                Err(TasksError::InvalidConfig(_))
            ),
            "{backend}"
        );
        let wrong_dim = TaskData {
            task: "digits",
            data: &mnist.train,
            indices: &idx,
        };
        assert!(
            matches!(run(&[wrong_dim], &ok), Err(TasksError::DataMismatch(_))),
            "{backend}"
        );
        // Labels beyond the head: a 3-class head fed 10-class digits.
        let small = spec
            .with_tasks(vec![TaskSpec::new("digits", 3)])
            .expect("valid");
        assert_eq!(small.backend(), backend);
        let r = small.train(
            &small.init(0),
            &[td("digits", &(0..50).collect::<Vec<_>>())],
            &ok,
        );
        assert!(matches!(r, Err(TasksError::DataMismatch(_))), "{backend}");
        assert!(
            matches!(
                small.evaluate(&small.init(0), "digits", &s.test, None),
                Err(TasksError::DataMismatch(_))
            ),
            "{backend}"
        );
    }
}

#[test]
fn evaluation_with_personalized_heads() {
    // Two tasks share a backbone; a node evaluates the shared backbone with
    // its own head by passing just those groups.
    let s = builtin("digits8x8").expect("digits");
    for backend in BACKENDS {
        let spec = build(
            "mlp8x8",
            backend,
            vec![TaskSpec::new("digits", 10), TaskSpec::new("other", 10)],
        );
        let idx = all(&s.train);
        let trained = spec
            .train(
                &spec.init(2),
                &[TaskData {
                    task: "digits",
                    data: &s.train,
                    indices: &idx,
                }],
                &momentum(10, 0.05, 1),
            )
            .expect("train");
        let good = spec
            .evaluate(&trained.params, "digits", &s.test, None)
            .expect("eval");
        assert!(good.accuracy > 0.9, "{backend}: {good:?}");
        assert_eq!(good.samples, s.test.len() as u64);
        // The untrained head on the trained backbone is far worse.
        let untrained = spec
            .evaluate(&trained.params, "other", &s.test, None)
            .expect("eval");
        assert!(untrained.accuracy < 0.5, "{backend}: {untrained:?}");
        // Personalized: backbone from `trained`, head `digits` from a fresh init.
        let mut personal = ParamGroups::new();
        personal.insert(BACKBONE, trained.params.get(BACKBONE).expect("bb").to_vec());
        personal.insert(
            "head/digits",
            spec.init(99).get("head/digits").expect("head").to_vec(),
        );
        let p = spec
            .evaluate(&personal, "digits", &s.test, None)
            .expect("eval");
        assert!(p.accuracy < good.accuracy, "{backend}: {p:?} vs {good:?}");
        // A subset of indices
        let first: Vec<usize> = (0..10).collect();
        let sub = spec
            .evaluate(&trained.params, "digits", &s.test, Some(&first))
            .expect("eval");
        assert_eq!(sub.samples, 10, "{backend}");
        // Missing group: typed error.
        let mut missing = trained.params.clone();
        missing.remove("head/digits");
        assert!(
            matches!(
                spec.evaluate(&missing, "digits", &s.test, None),
                Err(TasksError::Layout(_))
            ),
            "{backend}"
        );
        if backend != Backend::Gemm {
            continue;
        }
        // GemmNet::logits agrees with evaluate's argmax accuracy.
        let gemm = GemmModel::new(BackboneKind::Mlp8x8, spec.tasks().to_vec()).expect("valid");
        let m = GemmNet::from_groups(&gemm, &trained.params).expect("model");
        let logits = m.logits("digits", &s.test.features).expect("logits");
        let correct = logits
            .chunks(10)
            .zip(&s.test.labels)
            .filter(|(row, &y)| {
                let arg = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                    )
                    .0;
                arg == y as usize
            })
            .count();
        assert_eq!(correct as f32 / s.test.len() as f32, good.accuracy);
    }
}
