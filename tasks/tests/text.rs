//! Text data and the next-character models on real text: Shakespeare's
//! roles (`tasks/data/shakespeare.csv.gz`, see `tasks/data/README.md`).

use std::path::PathBuf;

use cohort_tasks::{
    Backend, DatasetSpec, ModelRegistry, Optimizer, Split, TaskData, TaskSpec, TextLabel,
    TextSource, TrainConfig,
};

fn shakespeare() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare.csv.gz")
}

fn load(src: TextSource) -> Split {
    DatasetSpec::Text(src).load(None).expect("loads")
}

#[test]
fn all_roles_load_as_views_of_one_buffer() {
    let split = load(TextSource::new(shakespeare()));
    let (tr, te) = (&split.train, &split.test);
    // 457 roles, 3,895,347 characters (the shared data's stats); 80 fewer
    // windows than characters per role and split.
    let keys = tr.keys().expect("text keys");
    assert_eq!(keys.iter().max().copied(), Some(456));
    assert_eq!(tr.classes, 66, "65 symbols and the unknown one");
    let w = tr.windows.as_ref().expect("windows");
    assert!(
        tr.len() > 3_000_000 && te.len() > 600_000,
        "{} / {}",
        tr.len(),
        te.len()
    );
    assert!(tr.features.is_empty(), "no feature rows");
    // 2 bytes a character and 8 a window (start, document), not 80 floats.
    let per_window = w.heap_bytes() as f64 / tr.len() as f64;
    assert!(per_window < 11.0, "{per_window} bytes per window");
    tr.validate().expect("valid");
    te.validate().expect("valid");
}

#[test]
fn test_lines_follow_the_training_lines_of_each_role() {
    let split = load(TextSource {
        documents: Some(5),
        ..TextSource::new(shakespeare())
    });
    let (tr, te) = (&split.train, &split.test);
    let (trk, tek) = (tr.keys().expect("keys"), te.keys().expect("keys"));
    let mut row = vec![0.0f32; 80];
    for d in 0..5u32 {
        let n_tr = trk.iter().filter(|&&k| k == d).count();
        let n_te = tek.iter().filter(|&&k| k == d).count();
        // About 80/20 of the role's characters (by lines).
        let share = n_te as f64 / (n_tr + n_te) as f64;
        assert!(share > 0.08 && share < 0.35, "role {d}: test share {share}");
    }
    // No test window occurs in the training windows of its role (whole
    // lines of 80 characters repeated in a play would break this, and
    // Shakespeare does not repeat himself that much).
    let mut train_windows = std::collections::HashSet::new();
    for (i, &k) in trk.iter().enumerate() {
        tr.copy_row(i, &mut row);
        train_windows.insert((k, row.iter().map(|&v| v as u16).collect::<Vec<_>>()));
    }
    let mut seen = 0;
    for (i, &k) in tek.iter().enumerate() {
        te.copy_row(i, &mut row);
        let w: Vec<u16> = row.iter().map(|&v| v as u16).collect();
        seen += usize::from(train_windows.contains(&(k, w)));
    }
    assert!(
        seen * 100 < te.len(),
        "{seen} of {} test windows seen",
        te.len()
    );
}

#[test]
fn the_genre_label_is_the_plays_for_every_window() {
    let split = load(TextSource {
        label: TextLabel::Column(cohort_tasks::Column::Name("genre".into())),
        documents: Some(38),
        ..TextSource::new(shakespeare())
    });
    let tr = &split.train;
    assert_eq!(
        tr.classes, 6,
        "comedies, histories, problems, roman, romances, tragedies"
    );
    let keys = tr.keys().expect("keys");
    let mut genre_of = std::collections::BTreeMap::new();
    for (k, y) in keys.iter().zip(&tr.labels) {
        assert_eq!(*genre_of.entry(*k).or_insert(*y), *y, "one genre per role");
    }
    assert!(
        genre_of
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 5
    );
}

/// Centralized training of `char_mlp80` on 12 roles: the next-character
/// accuracy on their held-out lines, against always predicting the most
/// frequent character of those lines.
#[test]
fn centralized_char_mlp_beats_the_most_frequent_character() {
    let split = load(TextSource {
        documents: Some(12),
        test_stride: 2,
        ..TextSource::new(shakespeare())
    });
    let counts = split.test.class_counts();
    let top = counts.iter().copied().max().unwrap_or(0);
    let baseline = top as f32 / split.test.len() as f32;
    let model = ModelRegistry::default()
        .build(
            "char_mlp80",
            Backend::Dfdx,
            vec![TaskSpec::new("next_char", split.train.classes)],
        )
        .expect("model");
    let idx: Vec<usize> = (0..split.train.len()).collect();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 32,
        lr: 0.002,
        optimizer: Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        seed: 3,
        ..TrainConfig::default()
    };
    let data = [TaskData {
        task: "next_char",
        data: &split.train,
        indices: &idx,
    }];
    let out = model.train(&model.init(1), &data, &cfg).expect("trains");
    let ev = model
        .evaluate(&out.params, "next_char", &split.test, None)
        .expect("evaluates");
    println!(
        "{} training windows of 12 roles, 1 epoch: held-out accuracy {:.3} (loss {:.3}); most frequent character {:.3}",
        idx.len(),
        ev.accuracy,
        ev.loss,
        baseline
    );
    assert!(baseline > 0.1 && baseline < 0.25, "baseline {baseline}");
    assert!(
        ev.accuracy > baseline + 0.15,
        "accuracy {} vs baseline {baseline}",
        ev.accuracy
    );
}

#[test]
fn text_tables_parse_and_bad_settings_are_refused() {
    let spec: DatasetSpec = toml::from_str::<toml::Value>(
        "d = { text = \"x.csv\", label = \"genre\", context = 40, documents = 3 }",
    )
    .expect("toml")["d"]
        .clone()
        .try_into()
        .expect("spec");
    let DatasetSpec::Text(t) = &spec else {
        panic!("not text: {spec:?}")
    };
    assert_eq!(t.context, 40);
    assert_eq!(spec.to_string(), "text:x.csv[genre]");
    for bad in [
        "d = { text = \"x.csv\", context = 0 }",
        "d = { text = \"x.csv\", train_fraction = 1.0 }",
        "d = { text = \"x.csv\", classes = 3 }",
        "d = { text = \"x.csv\", scale = \"none\" }",
        "d = { csv = \"x.csv\", context = 80 }",
        "d = { text = \"x.csv\", vocab = \"aa\" }",
    ] {
        let v = toml::from_str::<toml::Value>(bad).expect("toml")["d"].clone();
        assert!(v.try_into::<DatasetSpec>().is_err(), "accepted: {bad}");
    }
    let missing = DatasetSpec::Text(TextSource::new("/nonexistent/x.csv")).load(None);
    assert!(missing.is_err());
}

/// The GRU (dfdx tensor ops through 20 steps) learns: 150 steps of 32
/// windows move its held-out accuracy well past the most frequent
/// character, and its layout names every gate.
#[test]
fn char_gru_learns_from_real_text() {
    let split = load(TextSource {
        documents: Some(12),
        test_stride: 8,
        ..TextSource::new(shakespeare())
    });
    let top = split.test.class_counts().into_iter().max().unwrap_or(0);
    let baseline = top as f32 / split.test.len() as f32;
    let model = ModelRegistry::default()
        .build(
            "char_gru80",
            Backend::Dfdx,
            vec![TaskSpec::new("next_char", split.train.classes)],
        )
        .expect("model");
    let names: Vec<String> = model.layout().groups[0]
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .collect();
    for gate in ["xr", "xz", "xn", "hr", "hz", "hn"] {
        assert!(
            names.contains(&format!("backbone.{gate}.weight")),
            "{names:?}"
        );
    }
    let idx: Vec<usize> = (0..split.train.len()).collect();
    let cfg = TrainConfig {
        batch_size: 32,
        lr: 0.005,
        optimizer: Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        max_steps: Some(150),
        seed: 1,
        ..TrainConfig::default()
    };
    let data = [TaskData {
        task: "next_char",
        data: &split.train,
        indices: &idx,
    }];
    let start = model.init(2);
    let before = model
        .evaluate(&start, "next_char", &split.test, None)
        .expect("evaluates");
    let out = model.train(&start, &data, &cfg).expect("trains");
    let after = model
        .evaluate(&out.params, "next_char", &split.test, None)
        .expect("evaluates");
    println!(
        "char_gru80, 150 steps: held-out accuracy {:.3} -> {:.3}, loss {:.3} -> {:.3}; most frequent {baseline:.3}",
        before.accuracy, after.accuracy, before.loss, after.loss
    );
    assert!(
        after.loss < before.loss - 0.5,
        "{} -> {}",
        before.loss,
        after.loss
    );
    assert!(
        after.accuracy > baseline + 0.05,
        "{} vs {baseline}",
        after.accuracy
    );
}
