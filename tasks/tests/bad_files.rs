//! Loaders: real files load; bad files give an error that names the file and
//! the problem.

use std::io::Write;
use std::path::{Path, PathBuf};

use cohort_tasks::*;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data");

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gz");
    e.finish().expect("gz")
}

fn idx_images(n: u32, rows: u32, cols: u32, pixels: usize) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend((0..pixels).map(|i| (i % 256) as u8));
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn expect_file_error(
    r: Result<impl std::fmt::Debug, TasksError>,
    file: &Path,
    what: &str,
) -> FileProblem {
    let e = r.expect_err("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains(&file.display().to_string()),
        "`{msg}` does not name {}",
        file.display()
    );
    assert!(msg.contains(what), "`{msg}` does not say `{what}`");
    e.file_problem().expect("a file problem").clone()
}

#[test]
fn real_idx_files_load_from_disk() {
    let d = load_idx(
        &Path::new(DATA).join("fashion-1k-test-images-idx3-ubyte.gz"),
        &Path::new(DATA).join("fashion-1k-test-labels-idx1-ubyte.gz"),
    )
    .expect("load");
    assert_eq!((d.len(), d.dim, d.classes), (1000, 784, 10));
    assert!(d.features.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(d.class_counts().iter().sum::<usize>(), 1000);
    // Same content as the embedded split.
    assert_eq!(
        d.features,
        builtin("fashion6k").expect("builtin").test.features
    );
}

/// The full Fashion-MNIST from the Debian package, when it is installed.
#[test]
fn debian_fashion_mnist_when_installed() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    let (i, l) = (
        dir.join("t10k-images-idx3-ubyte.gz"),
        dir.join("t10k-labels-idx1-ubyte.gz"),
    );
    if !i.exists() {
        eprintln!("skipped: {} not installed", i.display());
        return;
    }
    let d = load_idx(&i, &l).expect("load");
    assert_eq!((d.len(), d.dim), (10_000, 784));
}

#[test]
fn idx_plain_and_gzip_agree() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = idx_images(2, 2, 3, 12);
    let lab = idx_labels(&[1, 9]);
    let a = load_idx(&write(dir.path(), "i", &img), &write(dir.path(), "l", &lab)).expect("plain");
    let b = load_idx(
        &write(dir.path(), "i.gz", &gz(&img)),
        &write(dir.path(), "l.gz", &gz(&lab)),
    )
    .expect("gz");
    assert_eq!(a.features, b.features);
    assert_eq!(a.labels, vec![1, 9]);
    assert_eq!(a.dim, 6);
    assert_eq!(a.features[11], 11.0 / 255.0);
}

#[test]
fn idx_truncated() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = write(dir.path(), "trunc.idx", &idx_images(3, 28, 28, 2 * 784 + 5));
    let lab = write(dir.path(), "l", &idx_labels(&[0, 1, 2]));
    let p = expect_file_error(load_idx(&img, &lab), &img, "truncated");
    assert!(matches!(p, FileProblem::Truncated(_)));
    // A truncated gzip stream too.
    let full = gz(&idx_images(3, 28, 28, 3 * 784));
    let img = write(dir.path(), "trunc.gz", &full[..full.len() / 2]);
    expect_file_error(load_idx(&img, &lab), &img, "truncated");
    // And a header cut short.
    let img = write(dir.path(), "short", &[0, 0, 8, 3, 0, 0]);
    expect_file_error(load_idx(&img, &lab), &img, "truncated");
}

#[test]
fn idx_wrong_magic() {
    let dir = tempfile::tempdir().expect("tmp");
    // A labels file given as images.
    let lab = write(dir.path(), "labels", &idx_labels(&[0, 1]));
    let p = expect_file_error(load_idx(&lab, &lab), &lab, "magic");
    assert_eq!(
        p,
        FileProblem::BadMagic {
            expected: 0x803,
            got: 0x801
        }
    );
}

#[test]
fn idx_wrong_dimensions() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = write(dir.path(), "img", &idx_images(3, 2, 2, 12));
    let lab = write(dir.path(), "two-labels", &idx_labels(&[0, 1]));
    let p = expect_file_error(load_idx(&img, &lab), &lab, "dimensions");
    assert!(matches!(p, FileProblem::Dimensions(_)));
    let zero = write(dir.path(), "zero-rows", &idx_images(3, 0, 2, 0));
    expect_file_error(load_idx(&zero, &lab), &zero, "dimensions");
    let huge = write(dir.path(), "huge", &idx_images(1, 1 << 16, 1 << 16, 0));
    expect_file_error(load_idx(&huge, &lab), &huge, "dimensions");
    let trailing = write(dir.path(), "trailing", &idx_images(2, 2, 2, 9));
    let p = expect_file_error(load_idx(&trailing, &lab), &trailing, "after the end");
    assert_eq!(p, FileProblem::TrailingData(1));
}

#[test]
fn idx_labels_out_of_range() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = write(dir.path(), "img", &idx_images(2, 2, 2, 8));
    let lab = write(dir.path(), "bad-labels", &idx_labels(&[3, 10]));
    let p = expect_file_error(load_idx(&img, &lab), &lab, "out of range");
    assert!(
        matches!(p, FileProblem::LabelOutOfRange { ref label, classes: 10, .. } if label == "10")
    );
    // With 4 classes a 3 is fine but 10 is not; with 11 both are.
    assert!(load_idx_classes(&img, &lab, 11).is_ok());
}

#[test]
fn missing_file_names_the_file() {
    let p = Path::new("/nonexistent/cohort/images.gz");
    let e = load_idx(p, p).expect_err("missing");
    assert!(matches!(e, TasksError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/cohort/images.gz"));
}

fn penguin_like_spec() -> CsvSpec {
    CsvSpec {
        has_header: true,
        features: Some(vec![Column::Name("a".into()), Column::Name("b".into())]),
        labels: vec![
            LabelColumn {
                column: Column::Name("kind".into()),
                task: "kind".into(),
                classes: LabelClasses::Named(vec!["x".into(), "y".into()]),
            },
            LabelColumn {
                column: Column::Index(3),
                task: "num".into(),
                classes: LabelClasses::Integer(3),
            },
        ],
        ..CsvSpec::default()
    }
}

#[test]
fn csv_several_labels_and_missing_values() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(
        dir.path(),
        "ok.csv",
        b"a,kind,b,num\n1,x,2,0\n3,NA,4,1\nNA,y,5,2\n6,y,7,\n",
    );
    let ds = load_csv(&f, &penguin_like_spec()).expect("load");
    assert_eq!(ds.len(), 2);
    // row 3 has a missing feature: dropped for both tasks; row 2 has no
    // `kind`: dropped for `kind` only; row 4 has no `num`: dropped for `num`.
    assert_eq!(ds[0].name, "kind");
    assert_eq!(ds[0].features, vec![1.0, 2.0, 6.0, 7.0]);
    assert_eq!(ds[0].labels, vec![0, 1]);
    assert_eq!(ds[1].features, vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(ds[1].labels, vec![0, 1]);
    assert_eq!((ds[0].dim, ds[0].classes, ds[1].classes), (2, 2, 3));
    // gzip works the same
    let g = write(
        dir.path(),
        "ok.csv.gz",
        &gz(&std::fs::read(&f).expect("read")),
    );
    assert_eq!(load_csv(&g, &penguin_like_spec()).expect("gz"), ds);
}

#[test]
fn csv_non_numeric_cell() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(dir.path(), "bad.csv", b"a,kind,b,num\n1,x,2,0\n3,y,abc,1\n");
    let p = expect_file_error(load_csv(&f, &penguin_like_spec()), &f, "not a number");
    assert_eq!(
        p,
        FileProblem::NotNumeric {
            line: 3,
            column: "b".into(),
            value: "abc".into()
        }
    );
    let f = write(dir.path(), "inf.csv", b"a,kind,b,num\n1,x,inf,0\n");
    expect_file_error(load_csv(&f, &penguin_like_spec()), &f, "not a number");
    let f = write(dir.path(), "label.csv", b"a,kind,b,num\n1,x,2,one\n");
    expect_file_error(load_csv(&f, &penguin_like_spec()), &f, "not a number");
}

#[test]
fn csv_labels_out_of_range_and_bad_shape() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(dir.path(), "range.csv", b"a,kind,b,num\n1,x,2,3\n");
    let p = expect_file_error(load_csv(&f, &penguin_like_spec()), &f, "out of range");
    assert!(matches!(p, FileProblem::LabelOutOfRange { classes: 3, .. }));
    let f = write(dir.path(), "cat.csv", b"a,kind,b,num\n1,z,2,1\n");
    expect_file_error(load_csv(&f, &penguin_like_spec()), &f, "out of range");
    let f = write(dir.path(), "ragged.csv", b"a,kind,b,num\n1,x,2,1\n1,x\n");
    expect_file_error(load_csv(&f, &penguin_like_spec()), &f, "malformed");
    let f = write(dir.path(), "cols.csv", b"a,kind,c,num\n1,x,2,1\n");
    let p = expect_file_error(load_csv(&f, &penguin_like_spec()), &f, "unknown column");
    assert_eq!(p, FileProblem::UnknownColumn("b".into()));
}

#[test]
fn builtins_have_the_documented_sizes() {
    let expect = [
        ("mnist5k", 4000, 1000, 784, 10),
        ("fashion6k", 6000, 1000, 784, 10),
        ("digits8x8", 1438, 359, 64, 10),
    ];
    for (name, tr, te, dim, classes) in expect {
        let s = builtin(name).expect(name);
        assert_eq!(
            (s.train.len(), s.test.len(), s.train.dim, s.train.classes),
            (tr, te, dim, classes),
            "{name}"
        );
        assert!(
            s.train.features.iter().all(|v| (0.0..=1.0).contains(v)),
            "{name} scaled"
        );
        assert_eq!(builtin(name).expect(name), s, "{name} is deterministic");
    }
    // 344 penguins; 2 lack measurements, 9 more lack `sex`.
    let sp = builtin("penguins/species").expect("species");
    assert_eq!(sp.train.len() + sp.test.len(), 342);
    let sex = builtin("penguins/sex").expect("sex");
    assert_eq!(sex.train.len() + sex.test.len(), 333);
    assert_eq!(sex.train.classes, 2);
    // Standardized with the train statistics: train mean 0, sd 1.
    let n = sp.train.len() as f64;
    for j in 0..4 {
        let col: Vec<f64> = sp
            .train
            .features
            .iter()
            .skip(j)
            .step_by(4)
            .map(|&v| f64::from(v))
            .collect();
        let mean = col.iter().sum::<f64>() / n;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
            "feature {j}: mean {mean} var {var}"
        );
    }
    let keys = builtin_keys("penguins/species", "island").expect("keys");
    assert_eq!(keys.train.len(), sp.train.len());
    assert_eq!(keys.names, vec!["Biscoe", "Dream", "Torgersen"]);
    assert!(matches!(
        builtin("cifar10"),
        Err(TasksError::UnknownDataset(_))
    ));
    for name in builtin_names() {
        builtin(name).expect(name);
    }
}
