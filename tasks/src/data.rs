//! Data sets: IDX and CSV loaders, the embedded real data sets, and
//! deterministic train/test splits.
//!
//! Every file is hostile: sizes are bounded before allocation (and gzip
//! output is capped, against decompression bombs), and every problem is a
//! [`TasksError::BadFile`] naming the file.
//!
//! **Missing values (CSV).** A cell equal to one of `CsvSpec::na_values`
//! (default `""`, `NA`, `NaN`, `nan`) is missing. A row with a missing
//! *feature* is dropped for every task; a row with a missing *label* is
//! dropped for that label's task only (with `CsvSpec::keep_missing` a
//! missing feature is kept as `NaN` instead, for the caller to impute). Any
//! other cell that does not parse as a finite number is an error naming the
//! file, line and column.
//!
//! Experiment and node files name their data with a
//! [`DatasetSpec`](crate::DatasetSpec) (module [`crate::dataset_spec`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::FileProblem;
use crate::text::TokenWindows;
use crate::TasksError;

/// Features as `f32` row-major (`n x dim`), already scaled (e.g. pixels /
/// 255), labels as `u32` class ids. Text data sets hold no feature rows:
/// their samples are views into a token buffer (`windows`; see
/// [`crate::text`]), `dim` tokens each; read any sample with
/// [`Dataset::copy_row`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub name: String,
    pub dim: usize,
    pub classes: usize,
    /// Dense rows; empty when `windows` holds the samples.
    pub features: Vec<f32>,
    pub labels: Vec<u32>,
    /// Text samples: windows of a shared token buffer (not serialized).
    #[serde(skip)]
    pub windows: Option<Arc<TokenWindows>>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The features of sample `i` of a dense data set. Panics if
    /// `i >= len()` or on a text data set (use [`Dataset::copy_row`]).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// Writes the `dim` features of sample `i` to `out` (a text sample's
    /// token ids as `f32`). Panics if `i >= len()` or `out.len() != dim`.
    pub fn copy_row(&self, i: usize, out: &mut [f32]) {
        match &self.windows {
            None => out.copy_from_slice(self.row(i)),
            Some(w) => {
                for (o, &t) in out.iter_mut().zip(w.window(i)) {
                    *o = f32::from(t);
                }
            }
        }
    }

    /// The document of each sample of a text data set (the natural
    /// partition's keys).
    pub fn keys(&self) -> Option<&[u32]> {
        self.windows.as_deref().map(TokenWindows::keys)
    }

    /// The samples `idx` (in that order): copies of dense rows, or windows
    /// of the same token buffer. Panics on an index out of range (indices
    /// come from our own partitioners and splits).
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let labels = idx.iter().map(|&i| self.labels[i]).collect();
        let (features, windows) = match &self.windows {
            Some(w) => (Vec::new(), Some(Arc::new(w.subset(idx)))),
            None => {
                let mut f = Vec::with_capacity(idx.len() * self.dim);
                for &i in idx {
                    f.extend_from_slice(self.row(i));
                }
                (f, None)
            }
        };
        Dataset {
            name: self.name.clone(),
            dim: self.dim,
            classes: self.classes,
            features,
            labels,
            windows,
        }
    }

    /// Whether the sample storage agrees with `len()` and `dim`.
    pub(crate) fn shape_error(&self) -> Option<String> {
        match &self.windows {
            Some(w) if w.len() != self.labels.len() || w.context() != self.dim => Some(format!(
                "{} windows of {} tokens for {} samples of {} features",
                w.len(),
                w.context(),
                self.labels.len(),
                self.dim
            )),
            Some(_) if !self.features.is_empty() => {
                Some("both feature rows and token windows".into())
            }
            Some(_) => None,
            None if Some(self.features.len()) != self.labels.len().checked_mul(self.dim) => {
                Some(format!(
                    "{} feature values for {} samples of {} features",
                    self.features.len(),
                    self.labels.len(),
                    self.dim
                ))
            }
            None => None,
        }
    }

    /// Checks what a data set built in code may get wrong and training
    /// relies on: `features.len() == len() * dim` (or one window of `dim`
    /// tokens per sample), `dim >= 1`,
    /// `1 <= classes <= MAX_CLASSES`, every label `< classes`, every feature
    /// finite. The error names the data set.
    pub fn validate(&self) -> Result<(), TasksError> {
        let bad = |m: String| {
            Err(TasksError::DataMismatch(format!(
                "data set `{}`: {m}",
                self.name
            )))
        };
        if self.dim == 0 {
            return bad("0 features per sample".into());
        }
        if self.classes == 0 || self.classes > crate::MAX_CLASSES {
            return bad(format!(
                "{} classes (1..={} allowed)",
                self.classes,
                crate::MAX_CLASSES
            ));
        }
        if let Some(m) = self.shape_error() {
            return bad(m);
        }
        if let Some(i) = self.labels.iter().position(|&y| y as usize >= self.classes) {
            return bad(format!(
                "sample {i} has label {} (classes: {})",
                self.labels[i], self.classes
            ));
        }
        if let Some(i) = self.features.iter().position(|v| !v.is_finite()) {
            return bad(format!(
                "sample {} has a non-finite feature ({})",
                i / self.dim,
                self.features[i]
            ));
        }
        Ok(())
    }

    /// Number of samples of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes];
        for &y in &self.labels {
            if let Some(v) = c.get_mut(y as usize) {
                *v += 1;
            }
        }
        c
    }
}

/// A train/test pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub train: Dataset,
    pub test: Dataset,
}

/// Largest file read (compressed or not).
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Largest decompressed content of a gzip file.
pub const MAX_DECOMPRESSED_BYTES: u64 = 1 << 30;

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, TasksError> {
    let io = |source| TasksError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(TasksError::bad_file(
            path,
            FileProblem::TooLarge {
                what: format!("file of {len} bytes"),
                limit: MAX_FILE_BYTES,
            },
        ));
    }
    let raw = std::fs::read(path).map_err(io)?;
    maybe_gunzip(path, raw)
}

/// Decompresses `raw` if it starts with the gzip magic, else returns it.
fn maybe_gunzip(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, TasksError> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    let mut dec =
        flate2::read::MultiGzDecoder::new(raw.as_slice()).take(MAX_DECOMPRESSED_BYTES + 1);
    dec.read_to_end(&mut out).map_err(|e| {
        let problem = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FileProblem::Truncated(format!("gzip stream ends early ({e})"))
        } else {
            FileProblem::Malformed(format!("gzip: {e}"))
        };
        TasksError::bad_file(path, problem)
    })?;
    if out.len() as u64 > MAX_DECOMPRESSED_BYTES {
        return Err(TasksError::bad_file(
            path,
            FileProblem::TooLarge {
                what: "decompressed content".into(),
                limit: MAX_DECOMPRESSED_BYTES,
            },
        ));
    }
    Ok(out)
}

const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
const IDX_LABELS_MAGIC: u32 = 0x0000_0801;
/// Largest image (rows x cols) accepted from an IDX header.
pub const MAX_IDX_PIXELS: u64 = 1 << 20;

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Parses IDX content: returns (count, per-item dims product, payload).
/// An IDX file's item count, item size (product of the other dimensions)
/// and payload.
type IdxParts<'a> = (u64, u64, &'a [u8]);

fn parse_idx<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    ndims: usize,
) -> Result<IdxParts<'a>, TasksError> {
    let bad = |p| TasksError::bad_file(path, p);
    let got =
        be_u32(bytes, 0).ok_or_else(|| bad(FileProblem::Truncated("no IDX header".into())))?;
    if got != magic {
        return Err(bad(FileProblem::BadMagic {
            expected: magic,
            got,
        }));
    }
    let header = 4 + 4 * ndims;
    let mut dims = Vec::with_capacity(ndims);
    for d in 0..ndims {
        let v = be_u32(bytes, 4 + 4 * d)
            .ok_or_else(|| bad(FileProblem::Truncated("IDX header cut short".into())))?;
        dims.push(u64::from(v));
    }
    let count = dims[0];
    let item: u64 = dims[1..].iter().product();
    if dims[1..].contains(&0) || item > MAX_IDX_PIXELS {
        return Err(bad(FileProblem::Dimensions(format!(
            "item dimensions {:?} (each 1.., product at most {MAX_IDX_PIXELS})",
            &dims[1..]
        ))));
    }
    let need = count * item; // both < 2^32 · 2^20: no overflow
    let have = (bytes.len() - header) as u64;
    if have < need {
        return Err(bad(FileProblem::Truncated(format!(
            "header announces {count} items of {item} bytes ({need} bytes), the file holds {have}"
        ))));
    }
    if have > need {
        return Err(bad(FileProblem::TrailingData(have - need)));
    }
    Ok((count, item, &bytes[header..]))
}

/// Loads an IDX image file and label file (MNIST / Fashion-MNIST format,
/// gzipped or plain) as a 10-class data set, pixels scaled to [0, 1].
pub fn load_idx(images: &Path, labels: &Path) -> Result<Dataset, TasksError> {
    load_idx_classes(images, labels, 10)
}

/// [`load_idx`] with `classes` classes: a label `>= classes` is an error.
pub fn load_idx_classes(
    images: &Path,
    labels: &Path,
    classes: usize,
) -> Result<Dataset, TasksError> {
    let img = read_file(images)?;
    let lab = read_file(labels)?;
    idx_from_bytes(images, &img, labels, &lab, classes)
}

fn idx_from_bytes(
    images: &Path,
    img: &[u8],
    labels: &Path,
    lab: &[u8],
    classes: usize,
) -> Result<Dataset, TasksError> {
    let (n, item, pixels) = parse_idx(images, img, IDX_IMAGES_MAGIC, 3)?;
    let (nl, _, ys) = parse_idx(labels, lab, IDX_LABELS_MAGIC, 1)?;
    if n != nl {
        return Err(TasksError::bad_file(
            labels,
            FileProblem::Dimensions(format!(
                "{nl} labels for {n} images in {}",
                images.display()
            )),
        ));
    }
    let mut out_labels = Vec::with_capacity(ys.len());
    for (i, &y) in ys.iter().enumerate() {
        if usize::from(y) >= classes {
            return Err(TasksError::bad_file(
                labels,
                FileProblem::LabelOutOfRange {
                    at: format!("sample {i}"),
                    label: y.to_string(),
                    classes,
                },
            ));
        }
        out_labels.push(u32::from(y));
    }
    let name = images
        .file_name()
        .map_or_else(|| "idx".to_string(), |s| s.to_string_lossy().into_owned());
    Ok(Dataset {
        name,
        dim: item as usize,
        classes,
        features: pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
        labels: out_labels,
        windows: None,
    })
}

/// A CSV column, by 0-based index or by header name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Column {
    Index(usize),
    Name(String),
}

/// How a label column's cells map to class ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelClasses {
    /// Cells are integers `0..classes`.
    Integer(usize),
    /// Cells are these names; the class id is the position in the list.
    Named(Vec<String>),
}

impl LabelClasses {
    fn count(&self) -> usize {
        match self {
            LabelClasses::Integer(c) => *c,
            LabelClasses::Named(v) => v.len(),
        }
    }
}

/// One label column = one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelColumn {
    pub column: Column,
    /// Name of the task (and of its data set).
    pub task: String,
    pub classes: LabelClasses,
}

/// How to read a CSV file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CsvSpec {
    pub has_header: bool,
    /// Feature columns, in order; `None` = every column that is not a label.
    pub features: Option<Vec<Column>>,
    pub labels: Vec<LabelColumn>,
    /// Every feature is multiplied by this (e.g. `1/255` for pixels).
    pub scale: f32,
    /// Cells that mean "missing".
    pub na_values: Vec<String>,
    /// Most data rows read; more is an error.
    pub max_rows: usize,
    /// Keep a row with a missing feature, that feature as `NaN` (the caller
    /// imputes it), instead of dropping the row. Default `false`.
    pub keep_missing: bool,
}

impl Default for CsvSpec {
    fn default() -> Self {
        CsvSpec {
            has_header: false,
            features: None,
            labels: Vec::new(),
            scale: 1.0,
            na_values: vec![String::new(), "NA".into(), "NaN".into(), "nan".into()],
            max_rows: 1_000_000,
            keep_missing: false,
        }
    }
}

/// Most feature values one CSV load may produce.
pub const MAX_CSV_VALUES: usize = 1 << 28;

/// Loads a CSV file (gzipped or plain): one data set per label column (see
/// the module docs for missing values).
pub fn load_csv(path: &Path, spec: &CsvSpec) -> Result<Vec<Dataset>, TasksError> {
    let bytes = read_file(path)?;
    Ok(parse_csv(path, &bytes, spec)?
        .into_iter()
        .map(|(d, _)| d)
        .collect())
}

/// Parses CSV content; each data set comes with the 0-based record number
/// of each of its samples.
/// A CSV file opened for reading: its header (cells trimmed) if it has
/// one, its records, and its column count (the header's, or the first
/// record's).
pub(crate) struct CsvTable<'a> {
    pub(crate) header: Option<Vec<String>>,
    pub(crate) records: std::iter::Peekable<csv::StringRecordsIntoIter<&'a [u8]>>,
    pub(crate) width: usize,
}

impl<'a> CsvTable<'a> {
    pub(crate) fn open(path: &Path, bytes: &'a [u8], has_header: bool) -> Result<Self, TasksError> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(has_header)
            .flexible(false)
            .from_reader(bytes);
        let header: Option<Vec<String>> = if has_header {
            let h = rdr.headers().map_err(|e| {
                TasksError::bad_file(path, FileProblem::Malformed(format!("header: {e}")))
            })?;
            Some(h.iter().map(|s| s.trim().to_string()).collect())
        } else {
            None
        };
        let mut records = rdr.into_records().peekable();
        let width = match (&header, records.peek()) {
            (Some(h), _) => h.len(),
            (None, Some(Ok(r))) => r.len(),
            (None, _) => 0,
        };
        Ok(CsvTable {
            header,
            records,
            width,
        })
    }
}

/// The 0-based index of a column of a file with `width` columns.
pub(crate) fn resolve_column(
    path: &Path,
    header: Option<&[String]>,
    width: usize,
    c: &Column,
) -> Result<usize, TasksError> {
    let bad = |p| TasksError::bad_file(path, p);
    match c {
        Column::Index(i) if *i < width => Ok(*i),
        Column::Index(i) => Err(bad(FileProblem::UnknownColumn(format!(
            "#{i} (the file has {width} columns)"
        )))),
        Column::Name(n) => header
            .and_then(|h| h.iter().position(|x| x == n))
            .ok_or_else(|| bad(FileProblem::UnknownColumn(n.clone()))),
    }
}

pub(crate) fn parse_csv(
    path: &Path,
    bytes: &[u8],
    spec: &CsvSpec,
) -> Result<Vec<(Dataset, Vec<usize>)>, TasksError> {
    let bad = |p| TasksError::bad_file(path, p);
    if spec.labels.is_empty() {
        return Err(bad(FileProblem::Malformed(
            "the CSV spec names no label column".into(),
        )));
    }
    let CsvTable {
        header,
        records,
        width,
    } = CsvTable::open(path, bytes, spec.has_header)?;
    let resolve = |c: &Column| resolve_column(path, header.as_deref(), width, c);
    let label_cols: Vec<usize> = spec
        .labels
        .iter()
        .map(|l| resolve(&l.column))
        .collect::<Result<_, _>>()?;
    let feat_cols: Vec<usize> = match &spec.features {
        Some(f) => f.iter().map(resolve).collect::<Result<_, _>>()?,
        None => (0..width).filter(|c| !label_cols.contains(c)).collect(),
    };
    if feat_cols.is_empty() {
        return Err(bad(FileProblem::Dimensions("no feature column".into())));
    }
    let col_name = |c: usize| {
        header
            .as_ref()
            .and_then(|h| h.get(c).cloned())
            .unwrap_or_else(|| format!("#{c}"))
    };
    let dim = feat_cols.len();
    let mut out: Vec<(Dataset, Vec<usize>)> = spec
        .labels
        .iter()
        .map(|l| {
            (
                Dataset {
                    name: l.task.clone(),
                    dim,
                    classes: l.classes.count(),
                    features: Vec::new(),
                    labels: Vec::new(),
                    windows: None,
                },
                Vec::new(),
            )
        })
        .collect();
    let is_na = |s: &str| spec.na_values.iter().any(|na| na == s);
    let mut row = vec![0.0f32; dim];
    let mut values = 0usize;
    for (rec_no, rec) in records.enumerate() {
        let rec = rec.map_err(|e| bad(FileProblem::Malformed(e.to_string())))?;
        let line = rec.position().map_or(rec_no as u64 + 1, |p| p.line());
        if rec_no >= spec.max_rows {
            return Err(bad(FileProblem::TooLarge {
                what: "number of rows".into(),
                limit: spec.max_rows as u64,
            }));
        }
        let mut missing = false;
        for (k, &c) in feat_cols.iter().enumerate() {
            let cell = rec.get(c).unwrap_or("").trim();
            if is_na(cell) {
                if spec.keep_missing {
                    row[k] = f32::NAN;
                } else {
                    missing = true;
                }
                continue;
            }
            match cell.parse::<f32>() {
                Ok(v) if v.is_finite() => row[k] = v * spec.scale,
                _ => {
                    return Err(bad(FileProblem::NotNumeric {
                        line,
                        column: col_name(c),
                        value: cell.chars().take(40).collect(),
                    }))
                }
            }
        }
        // Labels are checked even on rows dropped for a missing feature, so
        // that a bad file is refused whatever its NA pattern.
        for (t, (lc, &c)) in spec.labels.iter().zip(&label_cols).enumerate() {
            let cell = rec.get(c).unwrap_or("").trim();
            if is_na(cell) {
                continue;
            }
            let y = match &lc.classes {
                LabelClasses::Integer(k) => match cell.parse::<u64>() {
                    Ok(y) if y < *k as u64 => y as u32,
                    Ok(_) => {
                        return Err(bad(FileProblem::LabelOutOfRange {
                            at: format!("line {line}"),
                            label: cell.to_string(),
                            classes: *k,
                        }))
                    }
                    Err(_) => {
                        return Err(bad(FileProblem::NotNumeric {
                            line,
                            column: col_name(c),
                            value: cell.chars().take(40).collect(),
                        }))
                    }
                },
                LabelClasses::Named(names) => match names.iter().position(|n| n == cell) {
                    Some(y) => y as u32,
                    None => {
                        return Err(bad(FileProblem::LabelOutOfRange {
                            at: format!("line {line}"),
                            label: cell.chars().take(40).collect(),
                            classes: names.len(),
                        }))
                    }
                },
            };
            if !missing {
                values += dim;
                if values > MAX_CSV_VALUES {
                    return Err(bad(FileProblem::TooLarge {
                        what: "number of feature values".into(),
                        limit: MAX_CSV_VALUES as u64,
                    }));
                }
                let (d, recs) = &mut out[t];
                d.features.extend_from_slice(&row);
                d.labels.push(y);
                recs.push(rec_no);
            }
        }
    }
    Ok(out)
}

/// Names accepted by [`builtin`].
pub fn builtin_names() -> &'static [&'static str] {
    &[
        "mnist5k",
        "fashion6k",
        "digits8x8",
        "penguins/species",
        "penguins/island",
        "penguins/sex",
    ]
}

const DIGITS_CSV: &[u8] = include_bytes!("../data/digits.csv.gz");
const MNIST5K_CSV: &[u8] = include_bytes!("../data/mnist_5k.csv.gz");
const FASHION_TRAIN_IMAGES: &[u8] = include_bytes!("../data/fashion-6k-train-images-idx3-ubyte.gz");
const FASHION_TRAIN_LABELS: &[u8] = include_bytes!("../data/fashion-6k-train-labels-idx1-ubyte.gz");
const FASHION_TEST_IMAGES: &[u8] = include_bytes!("../data/fashion-1k-test-images-idx3-ubyte.gz");
const FASHION_TEST_LABELS: &[u8] = include_bytes!("../data/fashion-1k-test-labels-idx1-ubyte.gz");
const PENGUINS_CSV: &[u8] = include_bytes!("../data/penguins.csv.gz");

/// Fraction of samples held out by the splits of the CSV data sets.
pub const TEST_FRACTION: f64 = 0.2;
/// Seed of the splits of the embedded CSV data sets (and the default of a
/// `DatasetSpec`'s `test.seed`).
pub const SPLIT_SEED: u64 = 0x5eed_c0de;

fn embedded(name: &str) -> PathBuf {
    PathBuf::from(format!("<embedded {name}>"))
}

fn embedded_csv(
    file: &str,
    bytes: &[u8],
    spec: &CsvSpec,
) -> Result<Vec<(Dataset, Vec<usize>)>, TasksError> {
    let path = embedded(file);
    let raw = maybe_gunzip(&path, bytes.to_vec())?;
    parse_csv(&path, &raw, spec)
}

/// Stratified split: for each class, a seeded shuffle of its samples, the
/// first `round(TEST_FRACTION * n_class)` go to test. Both index lists
/// come back sorted (original order).
pub fn stratified_split(labels: &[u32], classes: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    stratified_split_fraction(labels, classes, TEST_FRACTION, seed)
}

/// [`stratified_split`] holding out `fraction` (in `[0, 1]`) of each class
/// instead of [`TEST_FRACTION`].
pub fn stratified_split_fraction(
    labels: &[u32],
    classes: usize,
    fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        TEST_FRACTION
    };
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &y) in labels.iter().enumerate() {
        if let Some(v) = by_class.get_mut(y as usize) {
            v.push(i);
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for mut v in by_class {
        v.shuffle(&mut rng);
        let k = ((v.len() as f64 * fraction).round() as usize).min(v.len());
        test.extend_from_slice(&v[..k]);
        train.extend_from_slice(&v[k..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

fn split_of(d: &Dataset, name: &str) -> (Split, Vec<usize>, Vec<usize>) {
    let (tr, te) = stratified_split(&d.labels, d.classes, SPLIT_SEED);
    let mut train = d.subset(&tr);
    let mut test = d.subset(&te);
    train.name = name.to_string();
    test.name = name.to_string();
    (Split { train, test }, tr, te)
}

const PENGUIN_FEATURES: [&str; 4] = [
    "bill_length_mm",
    "bill_depth_mm",
    "flipper_length_mm",
    "body_mass_g",
];

fn penguin_label(task: &str) -> Option<LabelColumn> {
    let names: &[&str] = match task {
        "species" => &["Adelie", "Chinstrap", "Gentoo"],
        "island" => &["Biscoe", "Dream", "Torgersen"],
        "sex" => &["female", "male"],
        _ => return None,
    };
    Some(LabelColumn {
        column: Column::Name(task.into()),
        task: task.into(),
        classes: LabelClasses::Named(names.iter().map(|s| s.to_string()).collect()),
    })
}

/// Penguins with label `task`: the split and, for each train/test sample,
/// its record number in the file.
fn penguins(task: &str) -> Result<(Split, Vec<usize>, Vec<usize>), TasksError> {
    let label = penguin_label(task)
        .ok_or_else(|| TasksError::UnknownDataset(format!("penguins/{task}")))?;
    let spec = CsvSpec {
        has_header: true,
        features: Some(
            PENGUIN_FEATURES
                .iter()
                .map(|s| Column::Name(s.to_string()))
                .collect(),
        ),
        labels: vec![label],
        ..CsvSpec::default()
    };
    let mut parsed = embedded_csv("penguins.csv.gz", PENGUINS_CSV, &spec)?;
    let (d, recs) = parsed
        .pop()
        .ok_or_else(|| TasksError::UnknownDataset(task.into()))?;
    let (mut split, tr, te) = split_of(&d, &format!("penguins/{task}"));
    standardize(&mut split);
    Ok((
        split,
        tr.iter().map(|&i| recs[i]).collect(),
        te.iter().map(|&i| recs[i]).collect(),
    ))
}

/// Standardizes every feature with the train split's mean and standard
/// deviation (a constant feature is only centred).
pub(crate) fn standardize(s: &mut Split) {
    let dim = s.train.dim;
    let n = s.train.len().max(1) as f64;
    for j in 0..dim {
        let mean = s
            .train
            .features
            .iter()
            .skip(j)
            .step_by(dim)
            .map(|&v| f64::from(v))
            .sum::<f64>()
            / n;
        let var = s
            .train
            .features
            .iter()
            .skip(j)
            .step_by(dim)
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let sd = if var > 0.0 { var.sqrt() } else { 1.0 };
        for d in [&mut s.train, &mut s.test] {
            for v in d.features.iter_mut().skip(j).step_by(dim) {
                *v = ((f64::from(*v) - mean) / sd) as f32;
            }
        }
    }
}

fn load_builtin(name: &str) -> Result<Split, TasksError> {
    match name {
        "digits8x8" => {
            let spec = CsvSpec {
                labels: vec![LabelColumn {
                    column: Column::Index(64),
                    task: "digits8x8".into(),
                    classes: LabelClasses::Integer(10),
                }],
                scale: 1.0 / 16.0,
                ..CsvSpec::default()
            };
            let d = embedded_csv("digits.csv.gz", DIGITS_CSV, &spec)?
                .remove(0)
                .0;
            Ok(split_of(&d, name).0)
        }
        "mnist5k" => {
            let spec = CsvSpec {
                labels: vec![LabelColumn {
                    column: Column::Index(784),
                    task: "mnist5k".into(),
                    classes: LabelClasses::Integer(10),
                }],
                scale: 1.0 / 255.0,
                ..CsvSpec::default()
            };
            let d = embedded_csv("mnist_5k.csv.gz", MNIST5K_CSV, &spec)?
                .remove(0)
                .0;
            Ok(split_of(&d, name).0)
        }
        "fashion6k" => {
            let un = |f: &str, b: &[u8]| maybe_gunzip(&embedded(f), b.to_vec());
            let (ti, tl) = (
                "fashion-6k-train-images-idx3-ubyte.gz",
                "fashion-6k-train-labels-idx1-ubyte.gz",
            );
            let (vi, vl) = (
                "fashion-1k-test-images-idx3-ubyte.gz",
                "fashion-1k-test-labels-idx1-ubyte.gz",
            );
            let mut train = idx_from_bytes(
                &embedded(ti),
                &un(ti, FASHION_TRAIN_IMAGES)?,
                &embedded(tl),
                &un(tl, FASHION_TRAIN_LABELS)?,
                10,
            )?;
            let mut test = idx_from_bytes(
                &embedded(vi),
                &un(vi, FASHION_TEST_IMAGES)?,
                &embedded(vl),
                &un(vl, FASHION_TEST_LABELS)?,
                10,
            )?;
            train.name = name.into();
            test.name = name.into();
            Ok(Split { train, test })
        }
        _ => match name.strip_prefix("penguins/") {
            Some(task) => Ok(penguins(task)?.0),
            None => Err(TasksError::UnknownDataset(name.to_string())),
        },
    }
}

/// Loads a data set by name: a built-in one (`mnist5k`, `fashion6k`,
/// `digits8x8`, `penguins/species`, ...) or `idx:<folder>` for a folder
/// holding the four gzipped IDX files of MNIST / Fashion-MNIST
/// (`train-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`, ...).
pub fn load_dataset(name: &str) -> Result<Split, TasksError> {
    if let Some(dir) = name.strip_prefix("idx:") {
        let dir = Path::new(dir);
        let train = load_idx(
            &dir.join("train-images-idx3-ubyte.gz"),
            &dir.join("train-labels-idx1-ubyte.gz"),
        )?;
        let test = load_idx(
            &dir.join("t10k-images-idx3-ubyte.gz"),
            &dir.join("t10k-labels-idx1-ubyte.gz"),
        )?;
        return Ok(Split { train, test });
    }
    builtin(name)
}

/// An embedded real data set, by name (see [`builtin_names`] and
/// `tasks/data/README.md`), with its deterministic train/test split:
///
/// - `mnist5k`: 5000 MNIST digits (CSV), stratified 4000/1000, pixels / 255.
/// - `fashion6k`: the first 6000 Fashion-MNIST training images / first 1000
///   test images (IDX files), pixels / 255.
/// - `digits8x8`: the 1797 UCI 8x8 digits, stratified 80/20, pixels / 16.
/// - `penguins/species`, `penguins/island`, `penguins/sex`: the 4 body
///   measurements, standardized with the train split's statistics; rows with
///   a missing measurement are dropped, rows with a missing label are dropped
///   for that task only (so `penguins/sex` has fewer rows); stratified 80/20.
///
/// Parsed once per process, then cloned.
pub fn builtin(name: &str) -> Result<Split, TasksError> {
    static CACHE: OnceLock<Mutex<BTreeMap<String, Split>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(BTreeMap::new()));
    if let Some(s) = cache.lock().ok().and_then(|c| c.get(name).cloned()) {
        return Ok(s);
    }
    let s = load_builtin(name)?;
    if let Ok(mut c) = cache.lock() {
        c.insert(name.to_string(), s.clone());
    }
    Ok(s)
}

/// Per-sample keys of a built-in split, for [`crate::Partitioner::Natural`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitKeys {
    pub train: Vec<u32>,
    pub test: Vec<u32>,
    /// Name of each key id.
    pub names: Vec<String>,
}

/// The value of column `key` (`species`, `island` or `sex`) for each sample
/// of `builtin(name)`, for a penguins data set: e.g. the island of each
/// penguin of `penguins/species`, to partition by island. A sample whose key
/// is missing gets the extra key id `names.len() - 1` (`NA`).
pub fn builtin_keys(name: &str, key: &str) -> Result<SplitKeys, TasksError> {
    let task = name.strip_prefix("penguins/").ok_or_else(|| {
        TasksError::UnknownDataset(format!("{name} (keys exist for penguins only)"))
    })?;
    let (_, tr, te) = penguins(task)?;
    let label = penguin_label(key).ok_or_else(|| TasksError::UnknownTask(key.into()))?;
    let LabelClasses::Named(mut names) = label.classes.clone() else {
        return Err(TasksError::UnknownTask(key.into()));
    };
    let spec = CsvSpec {
        has_header: true,
        features: Some(vec![Column::Name("year".into())]),
        labels: vec![label],
        ..CsvSpec::default()
    };
    let (d, recs) = embedded_csv("penguins.csv.gz", PENGUINS_CSV, &spec)?.remove(0);
    let na = names.len() as u32;
    let mut by_rec = BTreeMap::new();
    for (y, r) in d.labels.iter().zip(recs) {
        by_rec.insert(r, *y);
    }
    let map = |recs: &[usize]| {
        recs.iter()
            .map(|r| by_rec.get(r).copied().unwrap_or(na))
            .collect::<Vec<u32>>()
    };
    let (train, test) = (map(&tr), map(&te));
    if train.iter().chain(&test).any(|&k| k == na) {
        names.push("NA".into());
    }
    Ok(SplitKeys { train, test, names })
}
