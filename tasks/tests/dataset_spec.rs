//! `DatasetSpec`: the TOML forms, loading the real penguins CSV (two label
//! columns as two tasks, missing values, scaling from the train split only),
//! IDX files with given names and another class count (a real subset of
//! Fashion-MNIST relabelled to 5 classes), and typed errors for bad input.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use cohort_tasks::*;
use serde::{Deserialize, Serialize};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data");
const FEATURES: [&str; 4] = [
    "bill_length_mm",
    "bill_depth_mm",
    "flipper_length_mm",
    "body_mass_g",
];

#[derive(Debug, Deserialize, Serialize)]
struct Holder {
    dataset: DatasetSpec,
}

fn parse(toml_text: &str) -> Result<DatasetSpec, String> {
    toml::from_str::<Holder>(toml_text)
        .map(|h| h.dataset)
        .map_err(|e| e.to_string())
}

fn penguins_path() -> PathBuf {
    Path::new(DATA).join("penguins.csv.gz")
}

/// The penguins file with `label` and the four measurements.
fn penguins(label: &str) -> CsvSource {
    let mut c = CsvSource::new(penguins_path());
    c.label = Some(Column::Name(label.into()));
    c.features = Some(
        FEATURES
            .iter()
            .map(|f| Column::Name(f.to_string()))
            .collect(),
    );
    c
}

fn column(d: &Dataset, j: usize) -> Vec<f64> {
    d.features
        .iter()
        .skip(j)
        .step_by(d.dim)
        .map(|&v| f64::from(v))
        .collect()
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

#[test]
fn string_forms_parse() {
    assert_eq!(
        parse(r#"dataset = "mnist5k""#).expect("builtin"),
        DatasetSpec::Builtin("mnist5k".into())
    );
    assert_eq!(
        parse(r#"dataset = "idx:/data/fashion""#).expect("idx"),
        DatasetSpec::Idx(IdxSource::mnist("/data/fashion"))
    );
    assert_eq!(
        parse(r#"dataset = "csv:data/p.csv""#).expect("csv"),
        DatasetSpec::Csv(CsvSource::new("data/p.csv"))
    );
    let e = parse(r#"dataset = "mnist6k""#).expect_err("unknown name");
    assert!(e.contains("mnist6k") && e.contains("mnist5k"), "{e}");
    assert_eq!(
        "penguins/island"
            .parse::<DatasetSpec>()
            .expect("parse")
            .to_string(),
        "penguins/island"
    );
}

#[test]
fn table_forms_parse_and_round_trip() {
    let csv = parse(
        r#"
[dataset]
csv = "data/penguins.csv"
header = true
label = "species"
features = ["bill_length_mm", 3, "body_mass_g"]
classes = ["Adelie", "Chinstrap", "Gentoo"]
scale = "minmax"
na = ["NA"]
missing = "mean"
test = { fraction = 0.25, seed = 9 }
"#,
    )
    .expect("csv table");
    let DatasetSpec::Csv(c) = &csv else {
        panic!("{csv:?}")
    };
    assert_eq!(c.path, PathBuf::from("data/penguins.csv"));
    assert_eq!(c.label, Some(Column::Name("species".into())));
    assert_eq!(
        c.features,
        Some(vec![
            Column::Name("bill_length_mm".into()),
            Column::Index(3),
            Column::Name("body_mass_g".into())
        ])
    );
    assert_eq!(
        c.classes,
        ClassesSpec::Names(vec!["Adelie".into(), "Chinstrap".into(), "Gentoo".into()])
    );
    assert_eq!(c.scale, Scaling::MinMax);
    assert_eq!(c.na, vec!["NA".to_string()]);
    assert_eq!(c.missing, Missing::Mean);
    assert_eq!(
        c.test,
        TestSplit::Fraction {
            fraction: 0.25,
            seed: 9
        }
    );
    assert_eq!(csv.to_string(), "csv:data/penguins.csv[species]");

    // Defaults, a scale factor, integer classes, a test file, inline form.
    let d = parse(
        r#"dataset = { csv = "a.csv", label = 2, classes = 7, scale = 0.5, test_file = "b.csv" }"#,
    )
    .expect("inline");
    let DatasetSpec::Csv(c) = &d else {
        panic!("{d:?}")
    };
    assert!(c.header && c.features.is_none());
    assert_eq!(
        (c.classes.clone(), c.scale, c.test.clone()),
        (
            ClassesSpec::Count(7),
            Scaling::Factor(0.5),
            TestSplit::File("b.csv".into())
        )
    );
    assert_eq!(
        parse(r#"dataset = { csv = "a.csv", classes = "auto" }"#).expect("auto"),
        DatasetSpec::Csv(CsvSource::new("a.csv"))
    );

    let idx = parse(
        r#"dataset = { idx = "fashion", train_images = "tx.gz", train_labels = "ty.gz", test_images = "vx.gz", test_labels = "vy.gz", classes = 5 }"#,
    )
    .expect("idx table");
    let DatasetSpec::Idx(i) = &idx else {
        panic!("{idx:?}")
    };
    assert_eq!(
        (i.classes, i.train_images.as_path()),
        (5, Path::new("tx.gz"))
    );
    assert_eq!(idx.to_string(), "idx:fashion/tx.gz");

    // Every form survives TOML serialization.
    for spec in [csv, d, idx, DatasetSpec::Builtin("digits8x8".into())] {
        let text = toml::to_string(&Holder {
            dataset: spec.clone(),
        })
        .expect("serialize");
        assert_eq!(parse(&text).expect("parse back"), spec, "{text}");
    }
}

#[test]
fn bad_tables_are_refused_with_the_reason() {
    for (text, says) in [
        (r#"dataset = { csv = "a.csv", lable = "x" }"#, "lable"),
        (r#"dataset = { csv = "a.csv", idx = "d" }"#, "not both"),
        (r#"dataset = { header = true }"#, "needs `csv"),
        (
            r#"dataset = { csv = "a.csv", train_images = "x" }"#,
            "train_images",
        ),
        (r#"dataset = { idx = "d", label = "x" }"#, "label"),
        (
            r#"dataset = { idx = "d", classes = ["a", "b"] }"#,
            "a number",
        ),
        (
            r#"dataset = { idx = "d", classes = 0 }"#,
            "classes must be in",
        ),
        (r#"dataset = { csv = "a.csv", classes = "some" }"#, "auto"),
        (
            r#"dataset = { csv = "a.csv", classes = ["a", "a"] }"#,
            "twice",
        ),
        (r#"dataset = { csv = "a.csv", scale = "zscore" }"#, "minmax"),
        (r#"dataset = { csv = "a.csv", scale = 0 }"#, "non-zero"),
        (
            r#"dataset = { csv = "a.csv", missing = "zero" }"#,
            "drop_row",
        ),
        (
            r#"dataset = { csv = "a.csv", test = { fraction = 1.5 } }"#,
            "fraction",
        ),
        (
            r#"dataset = { csv = "a.csv", test = { fraction = 0.2 }, test_file = "b" }"#,
            "not both",
        ),
        (r#"dataset = 3"#, "data set name"),
    ] {
        let e = parse(text).expect_err(text);
        assert!(e.contains(says), "{text}: `{e}` does not say `{says}`");
    }
}

#[test]
fn penguins_two_label_columns_as_two_tasks() {
    // One load of the raw file with two label columns: rows with a missing
    // measurement (2) are dropped for both, a missing `sex` (9 more) only
    // for `sex`.
    let spec = CsvSpec {
        has_header: true,
        features: Some(
            FEATURES
                .iter()
                .map(|f| Column::Name(f.to_string()))
                .collect(),
        ),
        labels: vec![
            LabelColumn {
                column: Column::Name("species".into()),
                task: "species".into(),
                classes: LabelClasses::Named(vec![
                    "Adelie".into(),
                    "Chinstrap".into(),
                    "Gentoo".into(),
                ]),
            },
            LabelColumn {
                column: Column::Name("sex".into()),
                task: "sex".into(),
                classes: LabelClasses::Named(vec!["female".into(), "male".into()]),
            },
        ],
        ..CsvSpec::default()
    };
    let d = load_csv(&penguins_path(), &spec).expect("load");
    assert_eq!(d.len(), 2);
    assert_eq!(
        (d[0].name.as_str(), d[0].len(), d[0].dim),
        ("species", 342, 4)
    );
    assert_eq!(d[0].class_counts(), vec![151, 68, 123]);
    assert_eq!((d[1].name.as_str(), d[1].len()), ("sex", 333));
    assert_eq!(d[1].class_counts(), vec![165, 168]);

    // The same through two specs of the same file, as two tasks of an
    // experiment write it: stratified 80/20 of each.
    let species = DatasetSpec::Csv(penguins("species"))
        .load(None)
        .expect("species");
    assert_eq!((species.train.len(), species.test.len()), (273, 69));
    assert_eq!(species.test.class_counts(), vec![30, 14, 25]);
    assert_eq!(species.train.classes, 3);
    let island = DatasetSpec::Csv(penguins("island"))
        .load(None)
        .expect("island");
    // classes = "auto": sorted distinct values Biscoe, Dream, Torgersen.
    assert_eq!(island.train.classes, 3);
    let all: Vec<usize> = island
        .train
        .class_counts()
        .iter()
        .zip(island.test.class_counts())
        .map(|(a, b)| a + b)
        .collect();
    assert_eq!(all, vec![167, 124, 51]);
    assert_eq!(
        island.train.name,
        format!("csv:{}[island]", penguins_path().display())
    );
    // The built-in penguins/species is this very spec with the fixed seed.
    let builtin = builtin("penguins/species").expect("builtin");
    assert_eq!(builtin.train.features, species.train.features);
    assert_eq!(builtin.test.labels, species.test.labels);

    // missing = "mean": the 2 rows without measurements stay, imputed with
    // the training split's mean (0 after standardization).
    let mut c = penguins("species");
    c.missing = Missing::Mean;
    let imputed = DatasetSpec::Csv(c).load(None).expect("mean");
    assert_eq!(imputed.train.len() + imputed.test.len(), 344);
    assert!(imputed
        .train
        .features
        .iter()
        .chain(&imputed.test.features)
        .all(|v| v.is_finite()));
    let zero_rows = (0..imputed.train.len())
        .chain((0..imputed.test.len()).map(|i| i + imputed.train.len()))
        .filter(|&i| {
            let row = if i < imputed.train.len() {
                imputed.train.row(i)
            } else {
                imputed.test.row(i - imputed.train.len())
            };
            row.iter().all(|v| v.abs() < 1e-5)
        })
        .count();
    assert_eq!(zero_rows, 2);
}

#[test]
fn scaling_uses_train_statistics_only() {
    let mut raw = penguins("species");
    raw.scale = Scaling::None;
    let raw = DatasetSpec::Csv(raw).load(None).expect("raw");
    let std = DatasetSpec::Csv(penguins("species"))
        .load(None)
        .expect("standard");
    let mut mm = penguins("species");
    mm.scale = Scaling::MinMax;
    let mm = DatasetSpec::Csv(mm).load(None).expect("minmax");
    assert_eq!(raw.train.labels, std.train.labels);
    for j in 0..4 {
        let (m, sd) = mean_sd(&column(&raw.train, j));
        let (ms, sds) = mean_sd(&column(&std.train, j));
        assert!(
            ms.abs() < 1e-4 && (sds - 1.0).abs() < 1e-4,
            "train column {j}: {ms} {sds}"
        );
        // The test split is mapped with the train mean and sd, not its own.
        for (r, s) in column(&raw.test, j).iter().zip(column(&std.test, j)) {
            assert!(((r - m) / sd - s).abs() < 1e-4, "test column {j}");
        }
        let (mt, _) = mean_sd(&column(&std.test, j));
        assert!(mt.abs() > 1e-4, "test column {j} is centred on itself");
        let train = column(&raw.train, j);
        let lo = train.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = train.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mmc = column(&mm.train, j);
        assert!(mmc.iter().cloned().fold(f64::INFINITY, f64::min).abs() < 1e-6);
        assert!((mmc.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - 1.0).abs() < 1e-6);
        for (r, s) in column(&raw.test, j).iter().zip(column(&mm.test, j)) {
            assert!(
                ((r - lo) / (hi - lo) - s).abs() < 1e-5,
                "minmax test column {j}"
            );
        }
    }
    // A factor multiplies every feature.
    let mut f = penguins("species");
    f.scale = Scaling::Factor(0.5);
    let half = DatasetSpec::Csv(f).load(None).expect("factor");
    for (a, b) in half.train.features.iter().zip(&raw.train.features) {
        assert_eq!(*a, b * 0.5);
    }
}

#[test]
fn relative_paths_resolve_against_the_base_folder() {
    let spec = parse(r#"dataset = { csv = "penguins.csv.gz", label = "species", features = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"] }"#)
        .expect("parse");
    let e = spec
        .load(Some(Path::new("/nonexistent")))
        .expect_err("not there");
    assert!(matches!(e, TasksError::Io { .. }), "{e}");
    assert!(
        e.to_string().contains("/nonexistent/penguins.csv.gz"),
        "{e}"
    );
    let a = spec.load(Some(Path::new(DATA))).expect("base");
    let b = spec.resolved(Path::new(DATA)).load(None).expect("resolved");
    assert_eq!(
        (&a.train.features, &a.test.labels),
        (&b.train.features, &b.test.labels)
    );
    assert_eq!(a.train.name, "csv:penguins.csv.gz[species]");
    assert_eq!(
        b.train.name,
        format!("csv:{}[species]", penguins_path().display())
    );
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn load_spec(text: &str, dir: &Path) -> Result<Split, TasksError> {
    parse(text)
        .map_err(TasksError::InvalidSpec)?
        .load(Some(dir))
}

#[test]
fn bad_csv_inputs_are_typed_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = penguins_path();
    let base = Path::new(DATA);
    // Missing file.
    let e = load_spec(r#"dataset = { csv = "nope.csv" }"#, base).expect_err("missing");
    assert!(
        matches!(e, TasksError::Io { .. }) && e.to_string().contains("nope.csv"),
        "{e}"
    );
    // Unknown column, as label and as feature.
    for text in [
        r#"dataset = { csv = "penguins.csv.gz", label = "spieces" }"#,
        r#"dataset = { csv = "penguins.csv.gz", label = "species", features = ["bill_length_mm", "wing"] }"#,
        r#"dataset = { csv = "penguins.csv.gz", label = 8 }"#,
    ] {
        let e = load_spec(text, base).expect_err(text);
        assert!(
            matches!(e.file_problem(), Some(FileProblem::UnknownColumn(_))),
            "{text}: {e}"
        );
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    }
    // A label outside the listed classes names the line.
    let e = load_spec(
        r#"dataset = { csv = "penguins.csv.gz", label = "species", features = ["bill_length_mm"], classes = ["Adelie", "Gentoo"] }"#,
        base,
    )
    .expect_err("Chinstrap");
    match e.file_problem() {
        Some(FileProblem::LabelOutOfRange { at, label, classes }) => {
            assert_eq!((label.as_str(), *classes), ("Chinstrap", 2));
            assert!(at.starts_with("line "), "{at}");
        }
        other => panic!("{other:?}: {e}"),
    }
    // Integer classes: a larger integer is out of range.
    let e = load_spec(r#"dataset = { csv = "penguins.csv.gz", label = "year", features = ["bill_length_mm"], classes = 3 }"#, base)
        .expect_err("2007 >= 3");
    assert!(
        matches!(e.file_problem(), Some(FileProblem::LabelOutOfRange { .. })),
        "{e}"
    );
    // A non-numeric feature cell names line and column.
    let e = load_spec(r#"dataset = { csv = "penguins.csv.gz", label = "species", features = ["bill_length_mm", "island"] }"#, base)
        .expect_err("island is text");
    assert_eq!(
        e.file_problem(),
        Some(&FileProblem::NotNumeric {
            line: 2,
            column: "island".into(),
            value: "Torgersen".into()
        })
    );
    // Too many classes for "auto".
    let mut text = String::from("x,y\n");
    for i in 0..=MAX_AUTO_CLASSES {
        text.push_str(&format!("{i},c{i}\n"));
    }
    let f = write(dir.path(), "many.csv", text.as_bytes());
    let e = DatasetSpec::Csv(CsvSource::new(&f))
        .load(None)
        .expect_err("1001 classes");
    match e.file_problem() {
        Some(FileProblem::TooLarge { limit, what }) => {
            assert_eq!(*limit, MAX_AUTO_CLASSES as u64);
            assert!(what.contains("`y`"), "{what}");
        }
        other => panic!("{other:?}: {e}"),
    }
    // A test file whose label is not among the classes.
    let train = write(dir.path(), "tr.csv", b"a,k\n1,x\n2,y\n3,x\n");
    let test = write(dir.path(), "te.csv", b"a,k\n1,x\n2,z\n");
    let mut c = CsvSource::new(&train);
    c.classes = ClassesSpec::Names(vec!["x".into(), "y".into()]);
    c.test = TestSplit::File(test.clone());
    let e = DatasetSpec::Csv(c.clone()).load(None).expect_err("z");
    assert!(e.to_string().contains(&test.display().to_string()), "{e}");
    // With "auto", the classes come from both files.
    c.classes = ClassesSpec::Auto;
    let s = DatasetSpec::Csv(c)
        .load(None)
        .expect("auto over both files");
    assert_eq!(
        (
            s.train.classes,
            s.train.labels.clone(),
            s.test.labels.clone()
        ),
        (3, vec![0, 1, 0], vec![0, 2])
    );
    // Numeric labels sort numerically.
    let num = write(dir.path(), "num.csv", b"a,k\n1,10\n2,9\n3,2\n4,10\n5,9\n");
    let mut c = CsvSource::new(&num);
    c.scale = Scaling::None;
    c.test = TestSplit::Fraction {
        fraction: 0.01,
        seed: 1,
    };
    let s = DatasetSpec::Csv(c).load(None).expect("numeric labels");
    assert_eq!(s.train.labels, vec![2, 1, 0, 2, 1]);
}

#[test]
fn feature_count_is_checked_against_the_model() {
    let split = DatasetSpec::Csv(penguins("species"))
        .load(None)
        .expect("load");
    let reg = ModelRegistry::default();
    let mlp28 = reg
        .build("mlp28", Backend::Auto, vec![TaskSpec::new("species", 3)])
        .expect("mlp28");
    let e = check_input(&*mlp28, "species", &split).expect_err("784 != 4");
    assert!(
        matches!(
            e,
            TasksError::InputMismatch {
                features: 4,
                input: 784,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "task `species`: data set `csv:{}[species]` has 4 features per sample, model `mlp28` takes 784",
            penguins_path().display()
        )
    );
    let tab = reg
        .build("mlp_tab4", Backend::Auto, vec![TaskSpec::new("species", 3)])
        .expect("mlp_tab4");
    check_input(&*tab, "species", &split).expect("4 == 4");
    let two = reg
        .build("mlp_tab4", Backend::Auto, vec![TaskSpec::new("species", 2)])
        .expect("mlp_tab4");
    let e = check_input(&*two, "species", &split).expect_err("3 classes, head of 2");
    assert!(
        matches!(e, TasksError::DataMismatch(_)) && e.to_string().contains("3 classes"),
        "{e}"
    );
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open"))
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gz");
    e.finish().expect("gz")
}

/// IDX files of images `from..to` of the real Fashion-MNIST test subset,
/// labels mapped `y -> y / 2` (5 classes: pairs of Fashion-MNIST classes).
fn fashion5(from: usize, to: usize) -> (Vec<u8>, Vec<u8>) {
    let img = gunzip(&Path::new(DATA).join("fashion-1k-test-images-idx3-ubyte.gz"));
    let lab = gunzip(&Path::new(DATA).join("fashion-1k-test-labels-idx1-ubyte.gz"));
    let n = (to - from) as u32;
    let mut i = vec![0, 0, 8, 3];
    for d in [n, 28, 28] {
        i.extend_from_slice(&d.to_be_bytes());
    }
    i.extend_from_slice(&img[16 + from * 784..16 + to * 784]);
    let mut l = vec![0, 0, 8, 1];
    l.extend_from_slice(&n.to_be_bytes());
    l.extend(lab[8 + from..8 + to].iter().map(|y| y / 2));
    (i, l)
}

#[test]
fn idx_with_given_file_names_and_five_classes() {
    let dir = tempfile::tempdir().expect("tmp");
    let (ti, tl) = fashion5(0, 600);
    let (vi, vl) = fashion5(600, 1000);
    write(dir.path(), "f5-train-x.gz", &gz(&ti));
    write(dir.path(), "f5-train-y.gz", &gz(&tl));
    write(dir.path(), "f5-test-x", &vi);
    write(dir.path(), "f5-test-y", &vl);
    let text = r#"dataset = { idx = ".", train_images = "f5-train-x.gz", train_labels = "f5-train-y.gz", test_images = "f5-test-x", test_labels = "f5-test-y", classes = 5 }"#;
    let s = load_spec(text, dir.path()).expect("5 classes");
    assert_eq!(
        (s.train.len(), s.test.len(), s.train.dim, s.train.classes),
        (600, 400, 784, 5)
    );
    assert!(
        s.train.class_counts().iter().all(|&c| c > 60),
        "{:?}",
        s.train.class_counts()
    );
    let full = builtin("fashion6k").expect("builtin").test;
    assert_eq!(s.train.features[..], full.features[..600 * 784]);
    assert_eq!(
        s.train.labels,
        full.labels[..600].iter().map(|y| y / 2).collect::<Vec<_>>()
    );

    // Learns: mlp28 on the 600 training images reaches well above chance
    // (20%) on the 400 held-out ones.
    let model = ModelRegistry::default()
        .build("mlp28", Backend::Auto, vec![TaskSpec::new("f5", 5)])
        .expect("model");
    check_input(&*model, "f5", &s).expect("fits");
    let cfg = TrainConfig {
        epochs: 5,
        batch_size: 32,
        lr: 0.1,
        seed: 1,
        ..TrainConfig::default()
    };
    let out = model
        .train(
            &model.init(1),
            &[TaskData {
                task: "f5",
                data: &s.train,
                indices: &(0..600).collect::<Vec<_>>(),
            }],
            &cfg,
        )
        .expect("train");
    let acc = model
        .evaluate(&out.params, "f5", &s.test, None)
        .expect("eval")
        .accuracy;
    println!("fashion/5 mlp28, 600 train images, 5 epochs: held-out accuracy {acc:.3}");
    assert!(acc > 0.55, "accuracy {acc}"); // measured 0.645

    // Four classes refuse label 4, naming the file and the sample.
    let e =
        load_spec(&text.replace("classes = 5", "classes = 4"), dir.path()).expect_err("label 4");
    assert!(e.to_string().contains("f5-train-y.gz"), "{e}");
    assert!(
        matches!(
            e.file_problem(),
            Some(FileProblem::LabelOutOfRange { classes: 4, .. })
        ),
        "{e}"
    );
    // The string form with custom folder: MNIST names, not there.
    let e = format!("idx:{}", dir.path().display())
        .parse::<DatasetSpec>()
        .expect("parse")
        .load(None)
        .expect_err("no MNIST-named files");
    assert!(e.to_string().contains("train-images-idx3-ubyte.gz"), "{e}");
}
