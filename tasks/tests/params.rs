//! Flat parameter groups: layout, fingerprint, init, exact round trips and
//! typed errors for wrong layouts.

use cohort_tasks::*;

fn tasks2() -> Vec<TaskSpec> {
    vec![TaskSpec::new("fashion", 10), TaskSpec::new("digits", 10)]
}

fn spec2() -> GemmModel {
    GemmModel::new(BackboneKind::Mlp28, tasks2()).expect("valid tasks")
}

#[test]
fn names_parse_display_and_serde() {
    for (k, n) in [
        (BackboneKind::Mlp28, "mlp28"),
        (BackboneKind::Cnn28, "cnn28"),
        (BackboneKind::Mlp8x8, "mlp8x8"),
        (BackboneKind::MlpTab4, "mlp_tab4"),
    ] {
        assert_eq!(k.to_string(), n);
        assert_eq!(n.parse::<BackboneKind>().expect("parse"), k);
        assert_eq!(serde_json::to_string(&k).expect("json"), format!("\"{n}\""));
    }
    assert!(matches!(
        "resnet".parse::<BackboneKind>(),
        Err(TasksError::UnknownModel { .. })
    ));
    for (b, n) in [
        (Backend::Auto, "auto"),
        (Backend::Dfdx, "dfdx"),
        (Backend::Gemm, "gemm"),
    ] {
        assert_eq!(b.to_string(), n);
        assert_eq!(n.parse::<Backend>().expect("parse"), b);
        assert_eq!(serde_json::to_string(&b).expect("json"), format!("\"{n}\""));
    }
    assert!("cuda".parse::<Backend>().is_err());
    // A model travels as its name and tasks: the tasks round-trip through
    // serde and rebuild the same model.
    let spec = spec2();
    let back: Vec<TaskSpec> =
        serde_json::from_str(&serde_json::to_string(spec.tasks()).expect("json")).expect("parse");
    assert_eq!(back, spec.tasks());
    let kind: BackboneKind = spec.name().parse().expect("name");
    assert_eq!(GemmModel::new(kind, back).expect("valid"), spec);
    // The registry knows every built-in on the backends that run it.
    let r = ModelRegistry::default();
    for (name, backends) in [
        ("mlp28", &[Backend::Dfdx, Backend::Gemm][..]),
        ("cnn28", &[Backend::Gemm]),
        ("mlp8x8", &[Backend::Dfdx, Backend::Gemm]),
        ("mlp_tab4", &[Backend::Dfdx, Backend::Gemm]),
        ("resmlp28", &[Backend::Dfdx]),
    ] {
        for b in [Backend::Dfdx, Backend::Gemm] {
            let m = r.build(name, b, tasks2());
            if backends.contains(&b) {
                let m = m.expect("builds");
                assert_eq!((m.name(), m.backend()), (name, b));
            } else {
                assert!(
                    matches!(m, Err(TasksError::BackendUnavailable { .. })),
                    "{name} on {b}"
                );
            }
        }
        // Auto: gemm where it has the architecture.
        let auto = r.build(name, Backend::Auto, tasks2()).expect("auto");
        assert_eq!(auto.backend(), *backends.last().expect("a backend"));
    }
    assert!(matches!(
        r.build("resnet", Backend::Auto, tasks2()),
        Err(TasksError::UnknownModel { .. })
    ));
}

#[test]
fn layout_is_deterministic_and_ordered() {
    let a = spec2();
    let mut reversed = tasks2();
    reversed.reverse();
    let b = GemmModel::new(BackboneKind::Mlp28, reversed).expect("valid");
    assert_eq!(a.layout(), b.layout());
    assert_eq!(a.layout().fingerprint(), b.layout().fingerprint());
    let names: Vec<&str> = a
        .layout()
        .group_names()
        .map(|s| s.to_owned())
        .collect::<Vec<_>>()
        .leak()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(names, ["backbone", "head/digits", "head/fashion"]);
    let head = a.layout().group("head/digits").expect("head").clone();
    assert_eq!(head.tensors[0].name, "head/digits.weight");
    assert_eq!(head.tensors[0].shape, vec![10, 128]);
    assert_eq!(head.tensors[1].offset, 1280);
    // Another backbone or class count changes the fingerprint.
    let c = GemmModel::new(BackboneKind::Cnn28, a.tasks().to_vec()).expect("valid");
    assert_ne!(c.layout().fingerprint(), a.layout().fingerprint());
    let mut nine = a.tasks().to_vec();
    nine[0].classes = 9;
    let d = GemmModel::new(BackboneKind::Mlp28, nine).expect("valid");
    assert_ne!(d.layout().fingerprint(), a.layout().fingerprint());
    // The subset's layout is the protocol's subset of the full layout.
    let s = a.subset(&["digits"]).expect("subset");
    assert_eq!(
        s.layout(),
        a.layout()
            .subset(&["backbone", "head/digits"])
            .expect("layout subset")
    );
    assert!(matches!(
        a.subset(&["cifar"]),
        Err(TasksError::UnknownTask(_))
    ));
}

#[test]
fn invalid_specs_are_refused() {
    let r = ModelRegistry::default();
    for tasks in [
        vec![TaskSpec::new("a", 10), TaskSpec::new("a", 3)],
        vec![TaskSpec::new("a", 1)],
        vec![TaskSpec::new("a/b", 3)],
        vec![TaskSpec::new("", 3)],
        vec![TaskSpec::new("a", MAX_CLASSES + 1)],
    ] {
        assert!(
            matches!(
                GemmModel::new(BackboneKind::Mlp28, tasks.clone()),
                Err(TasksError::InvalidSpec(_))
            ),
            "{tasks:?}"
        );
        // Every way of building a model refuses them alike.
        for backend in [Backend::Gemm, Backend::Dfdx] {
            assert!(
                matches!(
                    r.build("mlp28", backend, tasks.clone()),
                    Err(TasksError::InvalidSpec(_))
                ),
                "{tasks:?} on {backend}"
            );
        }
        assert!(matches!(
            spec2().with_tasks(tasks.clone()),
            Err(TasksError::InvalidSpec(_))
        ));
    }
}

#[test]
fn init_is_deterministic_and_heads_do_not_depend_on_other_tasks() {
    let a = spec2();
    let p1 = a.init(42);
    let p2 = a.init(42);
    assert_eq!(p1, p2);
    assert_ne!(p1, a.init(43));
    a.layout().check(&p1).expect("init fits the layout");
    let only = a.subset(&["digits"]).expect("subset").init(42);
    assert_eq!(only.get("head/digits"), p1.get("head/digits"));
    assert_eq!(only.get(BACKBONE), p1.get(BACKBONE));
    // He-uniform bound of the first layer: sqrt(6 / 784)
    let bound = (6.0f32 / 784.0).sqrt();
    assert!(p1.get(BACKBONE).expect("backbone")[..784 * 256]
        .iter()
        .all(|v| v.abs() <= bound));
    // The MLPs have the same layout and the same start on both backends,
    // so that a backend switch changes neither.
    for name in ["mlp28", "mlp8x8", "mlp_tab4"] {
        let r = ModelRegistry::default();
        let g = r.build(name, Backend::Gemm, tasks2()).expect("gemm");
        let d = r.build(name, Backend::Dfdx, tasks2()).expect("dfdx");
        assert_eq!(g.layout(), d.layout(), "{name}");
        assert_eq!(g.init(42), d.init(42), "{name}");
    }
}

#[test]
fn flatten_load_round_trip_is_bit_exact() {
    for kind in [
        BackboneKind::Mlp28,
        BackboneKind::Cnn28,
        BackboneKind::Mlp8x8,
        BackboneKind::MlpTab4,
    ] {
        let spec = GemmModel::new(kind, vec![TaskSpec::new("x", 3), TaskSpec::new("y", 7)])
            .expect("valid");
        let mut p = spec.init(9);
        // Awkward values survive too: signed zero, subnormals, NaN payloads.
        let bb = p.get_mut(BACKBONE).expect("backbone");
        bb[0] = -0.0;
        bb[1] = f32::from_bits(1);
        bb[2] = f32::from_bits(0x7fc0_1234);
        let m = GemmNet::from_groups(&spec, &p).expect("load");
        let q = m.to_groups();
        for (name, v) in p.iter() {
            let w = q.get(name).expect("group");
            assert!(
                v.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kind} {name}"
            );
        }
    }
}

#[test]
fn wrong_layouts_are_typed_errors() {
    let spec = spec2();
    let mut p = spec.init(0);
    p.get_mut("head/digits").expect("head").pop();
    assert!(matches!(
        GemmNet::from_groups(&spec, &p),
        Err(TasksError::Layout(_))
    ));
    let mut p = spec.init(0);
    p.remove("head/fashion");
    assert!(matches!(
        GemmNet::from_groups(&spec, &p),
        Err(TasksError::Layout(_))
    ));
    let mut p = spec.init(0);
    p.insert("head/cifar", vec![0.0; 1290]);
    assert!(matches!(
        GemmNet::from_groups(&spec, &p),
        Err(TasksError::Layout(_))
    ));
    // A CNN vector into an MLP: refused, no panic.
    let cnn = GemmModel::new(BackboneKind::Cnn28, spec.tasks().to_vec())
        .expect("valid")
        .init(0);
    assert!(matches!(
        GemmNet::from_groups(&spec, &cnn),
        Err(TasksError::Layout(_))
    ));
    let cfg = TrainConfig::default();
    assert!(matches!(
        spec.train(&cnn, &[], &cfg),
        Err(TasksError::Layout(_))
    ));
    // The dfdx backend of the same architecture refuses it alike.
    let dfdx = ModelRegistry::default()
        .build("mlp28", Backend::Dfdx, spec.tasks().to_vec())
        .expect("dfdx mlp28");
    assert!(matches!(
        dfdx.train(&cnn, &[], &cfg),
        Err(TasksError::Layout(_))
    ));
    // Partial loads: a new backbone keeps the heads; a bad group changes nothing.
    let mut m = GemmNet::from_groups(&spec, &spec.init(1)).expect("init fits");
    let before = m.to_groups();
    let mut bad = ParamGroups::new();
    bad.insert(BACKBONE, vec![1.0; before.get(BACKBONE).expect("bb").len()]);
    bad.insert("head/digits", vec![1.0; 3]);
    assert!(m.load_groups(&bad).is_err());
    assert_eq!(m.to_groups(), before);
}
