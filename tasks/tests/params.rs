//! Flat parameter groups: layout, fingerprint, init, exact round trips and
//! typed errors for wrong layouts.

use cohort_tasks::*;

fn spec2() -> ModelSpec {
    ModelSpec::new(
        BackboneKind::Mlp28,
        vec![TaskSpec::new("fashion", 10), TaskSpec::new("digits", 10)],
    )
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
        Err(TasksError::UnknownBackbone(_))
    ));
    let spec = spec2();
    let back: ModelSpec =
        serde_json::from_str(&serde_json::to_string(&spec).expect("json")).expect("parse");
    assert_eq!(back, spec);
}

#[test]
fn layout_is_deterministic_and_ordered() {
    let a = spec2();
    let mut b = a.clone();
    b.tasks.reverse();
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
    let c = ModelSpec::new(BackboneKind::Cnn28, a.tasks.clone());
    assert_ne!(c.layout().fingerprint(), a.layout().fingerprint());
    let mut d = a.clone();
    d.tasks[0].classes = 9;
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
    let dup = ModelSpec::new(
        BackboneKind::Mlp28,
        vec![TaskSpec::new("a", 10), TaskSpec::new("a", 3)],
    );
    assert!(matches!(dup.try_layout(), Err(TasksError::InvalidSpec(_))));
    let one = ModelSpec::new(BackboneKind::Mlp28, vec![TaskSpec::new("a", 1)]);
    assert!(one.validate().is_err());
    let slash = ModelSpec::new(BackboneKind::Mlp28, vec![TaskSpec::new("a/b", 3)]);
    assert!(slash.validate().is_err());
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
}

#[test]
fn flatten_load_round_trip_is_bit_exact() {
    for kind in [
        BackboneKind::Mlp28,
        BackboneKind::Cnn28,
        BackboneKind::Mlp8x8,
        BackboneKind::MlpTab4,
    ] {
        let spec = ModelSpec::new(kind, vec![TaskSpec::new("x", 3), TaskSpec::new("y", 7)]);
        let mut p = spec.init(9);
        // Awkward values survive too: signed zero, subnormals, NaN payloads.
        let bb = p.get_mut(BACKBONE).expect("backbone");
        bb[0] = -0.0;
        bb[1] = f32::from_bits(1);
        bb[2] = f32::from_bits(0x7fc0_1234);
        let m = Model::from_groups(&spec, &p).expect("load");
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
        Model::from_groups(&spec, &p),
        Err(TasksError::Layout(_))
    ));
    let mut p = spec.init(0);
    p.remove("head/fashion");
    assert!(matches!(
        Model::from_groups(&spec, &p),
        Err(TasksError::Layout(_))
    ));
    let mut p = spec.init(0);
    p.insert("head/cifar", vec![0.0; 1290]);
    assert!(matches!(
        Model::from_groups(&spec, &p),
        Err(TasksError::Layout(_))
    ));
    // A CNN vector into an MLP: refused, no panic.
    let cnn = ModelSpec::new(BackboneKind::Cnn28, spec.tasks.clone()).init(0);
    assert!(matches!(
        Model::from_groups(&spec, &cnn),
        Err(TasksError::Layout(_))
    ));
    let cfg = TrainConfig::default();
    assert!(matches!(
        train(&spec, &cnn, &[], &cfg),
        Err(TasksError::Layout(_))
    ));
    // Partial loads: a new backbone keeps the heads; a bad group changes nothing.
    let mut m = Model::init(&spec, 1);
    let before = m.to_groups();
    let mut bad = ParamGroups::new();
    bad.insert(BACKBONE, vec![1.0; before.get(BACKBONE).expect("bb").len()]);
    bad.insert("head/digits", vec![1.0; 3]);
    assert!(m.load_groups(&bad).is_err());
    assert_eq!(m.to_groups(), before);
}
