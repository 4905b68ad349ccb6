//! Where a task's data comes from, as experiment and node files write it:
//! [`DatasetSpec`], its one loading function [`DatasetSpec::load`], and the
//! check that loaded data fits a model ([`check_input`]).
//!
//! # In TOML
//!
//! A string names an embedded data set or a file with default settings:
//!
//! ```toml
//! dataset = "mnist5k"                  # embedded, see `builtin_names()`
//! dataset = "idx:/data/fashion-mnist"  # the four MNIST-named gzipped IDX files, 10 classes
//! dataset = "csv:data/penguins.csv"    # header, label = last column, every
//!                                      # other column a feature, defaults below
//! ```
//!
//! A table says more. A CSV file (`csv` = its path; every other key optional):
//!
//! ```toml
//! [tasks.dataset]
//! csv = "data/penguins.csv"   # plain or gzipped
//! header = true               # default true; without a header, name columns by 0-based index
//! label = "species"           # column name or 0-based index; default: the last column
//! features = ["bill_length_mm", "bill_depth_mm", 4, "body_mass_g"]
//!                             # default: every column but the label
//! classes = "auto"            # default: the sorted distinct label values (numeric order
//!                             # if all are numbers), at most MAX_AUTO_CLASSES;
//!                             # or ["Adelie", "Chinstrap", "Gentoo"] (class id = position);
//!                             # or 3 (cells are integers 0..3)
//! scale = "standard"          # default; "minmax", "none", or a factor such as 0.00392
//! na = ["", "NA", "NaN", "nan"]   # the cells that mean "missing" (this is the default)
//! missing = "drop_row"        # default; or "mean": a missing feature becomes
//!                             # the training split's mean of its column
//! test = { fraction = 0.2, seed = 1592639710 }   # default: stratified 80/20, seed SPLIT_SEED
//! # test_file = "data/penguins-test.csv"         # or: a test file read the same way
//! ```
//!
//! IDX files (`idx` = the folder the file names are relative to):
//!
//! ```toml
//! dataset = { idx = "data/fashion", train_images = "train-x.gz", train_labels = "train-y.gz",
//!             test_images = "test-x.gz", test_labels = "test-y.gz", classes = 5 }
//! ```
//!
//! A text file (`text` = a CSV of documents with a header; see
//! [`crate::text`]): every window of `context` characters is a sample.
//!
//! ```toml
//! [tasks.dataset]
//! text = "data/shakespeare.csv.gz"
//! id = "role_id"          # default; the document id, the natural partition's key
//! column = "text"         # default; the text column
//! label = "next_char"     # default: the character after the window; or a column
//!                         # holding one class per document, e.g. "genre"
//! # classes = "auto"      # of a label column, as for `csv`
//! context = 80            # characters per window (LEAF: 80)
//! train_fraction = 0.8    # the first 80% of each document's lines train, the rest test
//! max_vocab = 128         # vocabulary: the training text's characters, most frequent
//!                         # first, at most 127 of them, plus the unknown symbol (id 0)
//! # vocab = "etoa ..."    # or exactly these characters (ids 1..)
//! # documents = 40        # keep 40 documents evenly spread over the file
//! test_stride = 1         # keep every n-th test window
//! ```
//!
//! Unnamed IDX files default to the MNIST names (`train-images-idx3-ubyte.gz`,
//! `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
//! `t10k-labels-idx1-ubyte.gz`), `classes` to 10; a label `>= classes` is an
//! error naming the file and the sample. Pixels are scaled to `[0, 1]`.
//!
//! # Semantics
//!
//! - **One label column = one task.** Several tasks may read the same file
//!   with different `label`s (e.g. `species` and `island` of the penguins).
//! - **Missing values.** A row whose label is missing is dropped (for that
//!   task). A row with a missing feature is dropped (`missing = "drop_row"`)
//!   or gets the training split's column mean (`missing = "mean"`). Any other
//!   cell that is not a finite number is an error naming file, line and
//!   column.
//! - **No test leakage.** The split is made first (stratified by class,
//!   seeded, fixed whatever the experiment's seed; or the `test_file`);
//!   imputation means and scaling statistics (mean and standard deviation
//!   for `standard`, minimum and maximum for `minmax`) come from the
//!   training split only and are then applied to both splits.
//! - **Relative paths** are relative to `base_dir` of [`DatasetSpec::load`]:
//!   the experiment (or node) file's folder when the file was read with a
//!   path (`ExperimentConfig::from_file` in the simulator), else the working
//!   directory.
//! - **Hostile files.** Everything read is bounded before allocation (see
//!   [`crate::data::MAX_FILE_BYTES`], [`crate::data::MAX_CSV_VALUES`]); every
//!   problem is a [`TasksError`] naming the file, nothing panics.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::data::{
    builtin, builtin_names, load_idx_classes, parse_csv, read_file, resolve_column, standardize,
    stratified_split_fraction, Column, CsvSpec, CsvTable, Dataset, LabelClasses, LabelColumn,
    Split, SPLIT_SEED, TEST_FRACTION,
};
use crate::error::FileProblem;
use crate::model::{Model, MAX_CLASSES};
use crate::text::{load_text, TextLabel, TextSource};
use crate::TasksError;

/// Most classes `classes = "auto"` infers from a label column; more distinct
/// values is an error (list the classes to go beyond).
pub const MAX_AUTO_CLASSES: usize = 1000;

/// The MNIST file names, the defaults of an [`IdxSource`].
pub const MNIST_IDX_FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

/// Where a task's data comes from (see the [module docs](self) for the TOML
/// forms). Deserializes from a string or a table; serializes a string as a
/// string and a file as a table with every setting explicit.
#[derive(Clone, Debug, PartialEq)]
pub enum DatasetSpec {
    /// An embedded data set, by name (see [`builtin_names`]).
    Builtin(String),
    /// A CSV file.
    Csv(CsvSource),
    /// A pair of IDX files for each split.
    Idx(IdxSource),
    /// A CSV file of documents read as text windows ([`crate::text`]).
    Text(TextSource),
}

/// A CSV file and how to read it; one label column.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvSource {
    /// The file (plain or gzipped).
    pub path: PathBuf,
    /// Whether the first line names the columns.
    pub header: bool,
    /// Feature columns, in order; `None` = every column but the label.
    pub features: Option<Vec<Column>>,
    /// The label column; `None` = the last column.
    pub label: Option<Column>,
    /// How label cells map to class ids.
    pub classes: ClassesSpec,
    /// How features are scaled.
    pub scale: Scaling,
    /// Cells that mean "missing".
    pub na: Vec<String>,
    /// What happens to a row with a missing feature.
    pub missing: Missing,
    /// Where the test split comes from.
    pub test: TestSplit,
}

/// IDX image and label files (MNIST format, gzipped or plain).
#[derive(Clone, Debug, PartialEq)]
pub struct IdxSource {
    /// The folder the file names are relative to.
    pub folder: PathBuf,
    /// Training images (relative to `folder`, or absolute).
    pub train_images: PathBuf,
    /// Training labels.
    pub train_labels: PathBuf,
    /// Test images.
    pub test_images: PathBuf,
    /// Test labels.
    pub test_labels: PathBuf,
    /// Number of classes; a label `>= classes` is an error.
    pub classes: usize,
}

/// The classes of a CSV label column.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ClassesSpec {
    /// The sorted distinct values of the column (numerically if all are
    /// numbers, else as strings) in the training and test files, at most
    /// [`MAX_AUTO_CLASSES`]. TOML: `"auto"`.
    #[default]
    Auto,
    /// Cells are integers `0..n`. TOML: `n`.
    Count(usize),
    /// Cells are these names; the class id is the position. TOML: a list.
    Names(Vec<String>),
}

/// How CSV features are scaled (statistics from the training split only).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Scaling {
    /// Minus the training mean, divided by the training standard deviation
    /// (a constant column is only centred). TOML: `"standard"`.
    #[default]
    Standard,
    /// Minus the training minimum, divided by the training range (test
    /// values may fall outside `[0, 1]`). TOML: `"minmax"`.
    MinMax,
    /// As read. TOML: `"none"`.
    None,
    /// Multiplied by this factor (e.g. `1/255` for pixels). TOML: a number.
    Factor(f32),
}

/// What happens to a CSV row with a missing feature (a row with a missing
/// label is always dropped for that task).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// The row is dropped.
    #[default]
    DropRow,
    /// The cell becomes the mean of its column over the training split.
    Mean,
}

/// Where the test split of a CSV data set comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum TestSplit {
    /// A stratified, seeded share of the file: `round(fraction * n)` samples
    /// of each class with `n` samples. TOML: `test = { fraction, seed }`.
    Fraction {
        /// In `(0, 1)`.
        fraction: f64,
        /// Seed of the shuffle (independent of the experiment's seed).
        seed: u64,
    },
    /// A second file, read with the same settings. TOML: `test_file`.
    File(PathBuf),
}

impl Default for TestSplit {
    fn default() -> Self {
        TestSplit::Fraction {
            fraction: TEST_FRACTION,
            seed: SPLIT_SEED,
        }
    }
}

impl CsvSource {
    /// A CSV file with the defaults (header, last column the label, every
    /// other column a feature, classes `auto`, `standard` scaling, rows with
    /// a missing feature dropped, stratified 80/20 split).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CsvSource {
            path: path.into(),
            header: true,
            features: None,
            label: None,
            classes: ClassesSpec::Auto,
            scale: Scaling::Standard,
            na: CsvSpec::default().na_values,
            missing: Missing::DropRow,
            test: TestSplit::default(),
        }
    }
}

impl IdxSource {
    /// The four MNIST-named files in `folder`, 10 classes.
    pub fn mnist(folder: impl Into<PathBuf>) -> Self {
        let [a, b, c, d] = MNIST_IDX_FILES.map(PathBuf::from);
        IdxSource {
            folder: folder.into(),
            train_images: a,
            train_labels: b,
            test_images: c,
            test_labels: d,
            classes: 10,
        }
    }

    fn has_mnist_names(&self) -> bool {
        [
            &self.train_images,
            &self.train_labels,
            &self.test_images,
            &self.test_labels,
        ]
        .iter()
        .zip(MNIST_IDX_FILES)
        .all(|(p, n)| p.as_path() == Path::new(n))
    }
}

fn join(base: Option<&Path>, p: &Path) -> PathBuf {
    match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p.to_path_buf(),
    }
}

impl DatasetSpec {
    /// The spec a string names: `csv:PATH` and `idx:FOLDER` with defaults,
    /// anything else an embedded data set (an unknown name fails in
    /// [`DatasetSpec::load`] and [`DatasetSpec::validate`]).
    pub fn from_name(s: &str) -> DatasetSpec {
        if let Some(p) = s.strip_prefix("csv:") {
            DatasetSpec::Csv(CsvSource::new(p))
        } else if let Some(p) = s.strip_prefix("idx:") {
            DatasetSpec::Idx(IdxSource::mnist(p))
        } else {
            DatasetSpec::Builtin(s.to_string())
        }
    }

    /// The same spec with every relative path made relative to `base_dir`
    /// (so that it no longer depends on the working directory).
    pub fn resolved(&self, base_dir: &Path) -> DatasetSpec {
        let mut s = self.clone();
        match &mut s {
            DatasetSpec::Builtin(_) => {}
            DatasetSpec::Csv(c) => {
                c.path = join(Some(base_dir), &c.path);
                if let TestSplit::File(f) = &mut c.test {
                    *f = join(Some(base_dir), f);
                }
            }
            DatasetSpec::Idx(i) => i.folder = join(Some(base_dir), &i.folder),
            DatasetSpec::Text(t) => t.path = join(Some(base_dir), &t.path),
        }
        s
    }

    /// Checks what does not need the files: a known embedded name, class
    /// counts and lists (1..=[`MAX_CLASSES`] classes, no duplicate names),
    /// a finite non-zero scale factor, a test fraction in `(0, 1)`.
    pub fn validate(&self) -> Result<(), TasksError> {
        let bad = |m: String| Err(TasksError::InvalidSpec(format!("data set `{self}`: {m}")));
        match self {
            DatasetSpec::Builtin(n) => {
                if !builtin_names().contains(&n.as_str()) {
                    return Err(TasksError::UnknownDataset(format!(
                        "{n} (built-in: {}; or csv:PATH, idx:FOLDER, or a table)",
                        builtin_names().join(", ")
                    )));
                }
            }
            DatasetSpec::Idx(i) => {
                if i.classes == 0 || i.classes > MAX_CLASSES {
                    return bad(format!(
                        "classes must be in 1..={MAX_CLASSES}, got {}",
                        i.classes
                    ));
                }
            }
            DatasetSpec::Text(t) => {
                t.validate()
                    .map_err(|m| TasksError::InvalidSpec(format!("data set `{self}`: {m}")))?;
            }
            DatasetSpec::Csv(c) => {
                match &c.classes {
                    ClassesSpec::Auto => {}
                    ClassesSpec::Count(k) => {
                        if *k == 0 || *k > MAX_CLASSES {
                            return bad(format!("classes must be in 1..={MAX_CLASSES}, got {k}"));
                        }
                    }
                    ClassesSpec::Names(v) => {
                        if v.is_empty() || v.len() > MAX_CLASSES {
                            return bad(format!(
                                "the class list must hold 1..={MAX_CLASSES} names, it holds {}",
                                v.len()
                            ));
                        }
                        let mut seen = BTreeSet::new();
                        if let Some(d) = v.iter().find(|n| !seen.insert(n.as_str())) {
                            return bad(format!("class `{d}` is listed twice"));
                        }
                    }
                }
                if let Scaling::Factor(f) = c.scale {
                    if !f.is_finite() || f == 0.0 {
                        return bad(format!("scale must be finite and non-zero, got {f}"));
                    }
                }
                if let TestSplit::Fraction { fraction, .. } = c.test {
                    if !(fraction > 0.0 && fraction < 1.0) {
                        return bad(format!("test.fraction must be in (0, 1), got {fraction}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Loads the train and test splits; relative paths are relative to
    /// `base_dir` (`None`: the working directory). Both datasets are named
    /// after this spec (its [`Display`](fmt::Display)). Deterministic: the
    /// same files and spec give the same splits.
    pub fn load(&self, base_dir: Option<&Path>) -> Result<Split, TasksError> {
        self.validate()?;
        let name = self.to_string();
        let mut split = match self {
            DatasetSpec::Builtin(n) => builtin(n)?,
            DatasetSpec::Idx(i) => {
                let dir = join(base_dir, &i.folder);
                let f = |p: &PathBuf| dir.join(p);
                Split {
                    train: load_idx_classes(&f(&i.train_images), &f(&i.train_labels), i.classes)?,
                    test: load_idx_classes(&f(&i.test_images), &f(&i.test_labels), i.classes)?,
                }
            }
            DatasetSpec::Csv(c) => load_csv_source(c, base_dir, &name)?,
            DatasetSpec::Text(t) => {
                let path = join(base_dir, &t.path);
                load_text(&path, &read_file(&path)?, t)?.split
            }
        };
        split.train.name.clone_from(&name);
        split.test.name = name;
        Ok(split)
    }
}

/// Resolves the label column of a CSV file and, if `collect`, gathers the
/// distinct non-missing label cells (at most [`MAX_AUTO_CLASSES`]).
fn scan_labels(
    path: &Path,
    bytes: &[u8],
    c: &CsvSource,
    collect: bool,
    values: &mut BTreeSet<String>,
) -> Result<usize, TasksError> {
    let bad = |p| TasksError::bad_file(path, p);
    let CsvTable {
        header,
        records,
        width,
    } = CsvTable::open(path, bytes, c.header)?;
    let col = match &c.label {
        None if width > 0 => width - 1,
        None => return Err(bad(FileProblem::Dimensions("no column".into()))),
        Some(column) => resolve_column(path, header.as_deref(), width, column)?,
    };
    if !collect {
        return Ok(col);
    }
    let col_name = header
        .as_ref()
        .and_then(|h| h.get(col).cloned())
        .unwrap_or_else(|| format!("#{col}"));
    for rec in records {
        let rec = rec.map_err(|e| bad(FileProblem::Malformed(e.to_string())))?;
        let cell = rec.get(col).unwrap_or("").trim();
        if c.na.iter().any(|na| na == cell) || values.contains(cell) {
            continue;
        }
        if values.len() >= MAX_AUTO_CLASSES {
            return Err(bad(FileProblem::TooLarge {
                what: format!("number of distinct labels in column `{col_name}` (classes = \"auto\"; list the classes to allow more)"),
                limit: MAX_AUTO_CLASSES as u64,
            }));
        }
        values.insert(cell.to_string());
    }
    Ok(col)
}

/// Sorted distinct label values: numerically if all are numbers, else as
/// strings.
fn sort_classes(values: BTreeSet<String>) -> Vec<String> {
    let nums: Option<Vec<f64>> = values.iter().map(|v| v.parse::<f64>().ok()).collect();
    let mut v: Vec<String> = values.into_iter().collect();
    if let Some(nums) = nums {
        if nums.iter().all(|x| x.is_finite()) {
            let mut pairs: Vec<(f64, String)> = nums.into_iter().zip(v).collect();
            pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
            v = pairs.into_iter().map(|(_, s)| s).collect();
        }
    }
    v
}

fn load_csv_source(c: &CsvSource, base: Option<&Path>, name: &str) -> Result<Split, TasksError> {
    let path = join(base, &c.path);
    let bytes = read_file(&path)?;
    let test_file = match &c.test {
        TestSplit::File(f) => {
            let p = join(base, f);
            let b = read_file(&p)?;
            Some((p, b))
        }
        TestSplit::Fraction { .. } => None,
    };
    let auto = c.classes == ClassesSpec::Auto;
    let mut values = BTreeSet::new();
    let col = scan_labels(&path, &bytes, c, auto, &mut values)?;
    if let Some((p, b)) = &test_file {
        scan_labels(p, b, c, auto, &mut values)?;
    }
    let classes = match &c.classes {
        ClassesSpec::Auto => {
            if values.is_empty() {
                return Err(TasksError::bad_file(
                    &path,
                    FileProblem::Dimensions("no label value (classes = \"auto\")".into()),
                ));
            }
            LabelClasses::Named(sort_classes(values))
        }
        ClassesSpec::Count(k) => LabelClasses::Integer(*k),
        ClassesSpec::Names(v) => LabelClasses::Named(v.clone()),
    };
    let spec = CsvSpec {
        has_header: c.header,
        features: c.features.clone(),
        labels: vec![LabelColumn {
            // A named label is resolved in each file by its own header.
            column: c.label.clone().unwrap_or(Column::Index(col)),
            task: name.to_string(),
            classes,
        }],
        scale: match c.scale {
            Scaling::Factor(f) => f,
            _ => 1.0,
        },
        na_values: c.na.clone(),
        keep_missing: c.missing == Missing::Mean,
        ..CsvSpec::default()
    };
    let one = |p: &Path, b: &[u8]| -> Result<Dataset, TasksError> {
        parse_csv(p, b, &spec)?
            .pop()
            .map(|(d, _)| d)
            .ok_or_else(|| TasksError::bad_file(p, FileProblem::Malformed("no data set".into())))
    };
    let all = one(&path, &bytes)?;
    let mut split = match &test_file {
        Some((p, b)) => Split {
            train: all,
            test: one(p, b)?,
        },
        None => {
            let (fraction, seed) = match c.test {
                TestSplit::Fraction { fraction, seed } => (fraction, seed),
                TestSplit::File(_) => (TEST_FRACTION, SPLIT_SEED),
            };
            let (tr, te) = stratified_split_fraction(&all.labels, all.classes, fraction, seed);
            Split {
                train: all.subset(&tr),
                test: all.subset(&te),
            }
        }
    };
    if c.missing == Missing::Mean {
        impute_mean(&mut split, &path)?;
    }
    match c.scale {
        Scaling::Standard => standardize(&mut split),
        Scaling::MinMax => min_max(&mut split),
        Scaling::None | Scaling::Factor(_) => {}
    }
    Ok(split)
}

/// Replaces each `NaN` feature by its column's mean over the training split.
fn impute_mean(s: &mut Split, path: &Path) -> Result<(), TasksError> {
    let dim = s.train.dim;
    for j in 0..dim {
        let (mut sum, mut n) = (0.0f64, 0usize);
        for &v in s.train.features.iter().skip(j).step_by(dim) {
            if !v.is_nan() {
                sum += f64::from(v);
                n += 1;
            }
        }
        let has_nan = s
            .train
            .features
            .iter()
            .chain(&s.test.features)
            .skip(j)
            .step_by(dim)
            .any(|v| v.is_nan());
        if !has_nan {
            continue;
        }
        if n == 0 {
            return Err(TasksError::bad_file(
                path,
                FileProblem::Dimensions(format!(
                    "feature {j} has no value in the training split to impute from"
                )),
            ));
        }
        let mean = (sum / n as f64) as f32;
        for d in [&mut s.train, &mut s.test] {
            for v in d.features.iter_mut().skip(j).step_by(dim) {
                if v.is_nan() {
                    *v = mean;
                }
            }
        }
    }
    Ok(())
}

/// Min-max scaling with the training split's minimum and range (a constant
/// column is only shifted).
fn min_max(s: &mut Split) {
    let dim = s.train.dim;
    for j in 0..dim {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in s.train.features.iter().skip(j).step_by(dim) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            continue;
        }
        let range = if hi > lo {
            f64::from(hi) - f64::from(lo)
        } else {
            1.0
        };
        for d in [&mut s.train, &mut s.test] {
            for v in d.features.iter_mut().skip(j).step_by(dim) {
                *v = ((f64::from(*v) - f64::from(lo)) / range) as f32;
            }
        }
    }
}

impl fmt::Display for DatasetSpec {
    /// `mnist5k`, `csv:<path>[<label>]`, `idx:<folder>` (or
    /// `idx:<folder>/<train images>` for other file names).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSpec::Builtin(n) => f.write_str(n),
            DatasetSpec::Csv(c) => {
                write!(f, "csv:{}", c.path.display())?;
                match &c.label {
                    Some(Column::Name(n)) => write!(f, "[{n}]"),
                    Some(Column::Index(i)) => write!(f, "[#{i}]"),
                    None => Ok(()),
                }
            }
            DatasetSpec::Text(t) => {
                write!(f, "text:{}", t.path.display())?;
                match &t.label {
                    TextLabel::NextChar => Ok(()),
                    TextLabel::Column(Column::Name(n)) => write!(f, "[{n}]"),
                    TextLabel::Column(Column::Index(i)) => write!(f, "[#{i}]"),
                }
            }
            DatasetSpec::Idx(i) if i.has_mnist_names() => write!(f, "idx:{}", i.folder.display()),
            DatasetSpec::Idx(i) => write!(f, "idx:{}", i.folder.join(&i.train_images).display()),
        }
    }
}

impl From<&str> for DatasetSpec {
    /// [`DatasetSpec::from_name`].
    fn from(s: &str) -> Self {
        DatasetSpec::from_name(s)
    }
}

impl From<String> for DatasetSpec {
    /// [`DatasetSpec::from_name`].
    fn from(s: String) -> Self {
        DatasetSpec::from_name(&s)
    }
}

impl std::str::FromStr for DatasetSpec {
    type Err = TasksError;

    /// [`DatasetSpec::from_name`], then [`DatasetSpec::validate`].
    fn from_str(s: &str) -> Result<Self, TasksError> {
        let d = DatasetSpec::from_name(s);
        d.validate()?;
        Ok(d)
    }
}

/// The table form, flat: `csv` or `idx` says which, the other keys are
/// settings of that kind.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    #[serde(skip_serializing_if = "Option::is_none")]
    csv: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idx: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Column>,
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<Column>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    train_fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_vocab: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vocab: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    documents: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    test_stride: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<Column>,
    #[serde(skip_serializing_if = "Option::is_none")]
    features: Option<Vec<Column>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    classes: Option<ClassesSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<Scaling>,
    #[serde(skip_serializing_if = "Option::is_none")]
    na: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    missing: Option<Missing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    test: Option<TestTable>,
    #[serde(skip_serializing_if = "Option::is_none")]
    test_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    train_images: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    train_labels: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    test_images: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    test_labels: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestTable {
    #[serde(default = "default_fraction")]
    fraction: f64,
    #[serde(default = "default_seed")]
    seed: u64,
}

fn default_fraction() -> f64 {
    TEST_FRACTION
}

fn default_seed() -> u64 {
    SPLIT_SEED
}

/// The names of the keys that are set, quoted.
fn given(names: &[(&str, bool)]) -> Vec<String> {
    names
        .iter()
        .filter(|(_, g)| *g)
        .map(|(n, _)| format!("`{n}`"))
        .collect()
}

impl Table {
    fn into_spec(self) -> Result<DatasetSpec, String> {
        if self.text.is_some() {
            return self.into_text_spec();
        }
        let text_keys = self.text_keys();
        if !text_keys.is_empty() {
            return Err(format!("{} belong to `text`", text_keys.join(", ")));
        }
        match (self.csv, self.idx) {
            (Some(_), Some(_)) => Err("a data set table has `csv` or `idx`, not both".into()),
            (None, None) => Err(
                "a data set table needs `csv = \"PATH\"`, `idx = \"FOLDER\"` or `text = \"PATH\"` (or write a name: `dataset = \"mnist5k\"`)"
                    .into(),
            ),
            (Some(path), None) => {
                let wrong = given(&[
                    ("train_images", self.train_images.is_some()),
                    ("train_labels", self.train_labels.is_some()),
                    ("test_images", self.test_images.is_some()),
                    ("test_labels", self.test_labels.is_some()),
                ]);
                if !wrong.is_empty() {
                    return Err(format!("{} belong to `idx`, not `csv`", wrong.join(", ")));
                }
                let mut c = CsvSource::new(path);
                c.header = self.header.unwrap_or(true);
                c.features = self.features;
                c.label = self.label;
                c.classes = self.classes.unwrap_or_default();
                c.scale = self.scale.unwrap_or_default();
                if let Some(na) = self.na {
                    c.na = na;
                }
                c.missing = self.missing.unwrap_or_default();
                c.test = match (self.test, self.test_file) {
                    (Some(_), Some(_)) => {
                        return Err("give `test = { fraction, seed }` or `test_file`, not both".into())
                    }
                    (Some(t), None) => TestSplit::Fraction {
                        fraction: t.fraction,
                        seed: t.seed,
                    },
                    (None, Some(f)) => TestSplit::File(f),
                    (None, None) => TestSplit::default(),
                };
                Ok(DatasetSpec::Csv(c))
            }
            (None, Some(folder)) => {
                let wrong = given(&[
                    ("header", self.header.is_some()),
                    ("label", self.label.is_some()),
                    ("features", self.features.is_some()),
                    ("scale", self.scale.is_some()),
                    ("na", self.na.is_some()),
                    ("missing", self.missing.is_some()),
                    ("test", self.test.is_some()),
                    ("test_file", self.test_file.is_some()),
                ]);
                if !wrong.is_empty() {
                    return Err(format!("{} belong to `csv`, not `idx`", wrong.join(", ")));
                }
                let mut i = IdxSource::mnist(folder);
                let set = |slot: &mut PathBuf, v: Option<PathBuf>| {
                    if let Some(v) = v {
                        *slot = v;
                    }
                };
                set(&mut i.train_images, self.train_images);
                set(&mut i.train_labels, self.train_labels);
                set(&mut i.test_images, self.test_images);
                set(&mut i.test_labels, self.test_labels);
                i.classes = match self.classes {
                    None => 10,
                    Some(ClassesSpec::Count(k)) => k,
                    Some(_) => {
                        return Err("`classes` of `idx` is a number (labels are 0..classes)".into())
                    }
                };
                Ok(DatasetSpec::Idx(i))
            }
        }
    }

    /// The settings of the `text` form that are set, quoted.
    fn text_keys(&self) -> Vec<String> {
        given(&[
            ("id", self.id.is_some()),
            ("column", self.column.is_some()),
            ("context", self.context.is_some()),
            ("train_fraction", self.train_fraction.is_some()),
            ("max_vocab", self.max_vocab.is_some()),
            ("vocab", self.vocab.is_some()),
            ("documents", self.documents.is_some()),
            ("test_stride", self.test_stride.is_some()),
        ])
    }

    /// The `text` form: `label = "next_char"` (the default) or a column;
    /// unset settings keep [`TextSource::new`]'s defaults.
    fn into_text_spec(self) -> Result<DatasetSpec, String> {
        let wrong = given(&[
            ("csv", self.csv.is_some()),
            ("idx", self.idx.is_some()),
            ("header", self.header.is_some()),
            ("features", self.features.is_some()),
            ("scale", self.scale.is_some()),
            ("na", self.na.is_some()),
            ("missing", self.missing.is_some()),
            ("test", self.test.is_some()),
            ("test_file", self.test_file.is_some()),
            ("train_images", self.train_images.is_some()),
            ("train_labels", self.train_labels.is_some()),
            ("test_images", self.test_images.is_some()),
            ("test_labels", self.test_labels.is_some()),
        ]);
        if !wrong.is_empty() {
            return Err(format!("{} do not belong to `text`", wrong.join(", ")));
        }
        let mut t = TextSource::new(self.text.unwrap_or_default());
        t.label = match self.label {
            None => TextLabel::NextChar,
            Some(Column::Name(n)) if n == "next_char" => TextLabel::NextChar,
            Some(c) => TextLabel::Column(c),
        };
        match (&t.label, self.classes) {
            (TextLabel::NextChar, Some(_)) => return Err(
                "`classes` of a next-character task is its vocabulary: set `max_vocab` or `vocab`"
                    .into(),
            ),
            (_, Some(c)) => t.classes = c,
            (_, None) => {}
        }
        t.id = self.id.unwrap_or(t.id);
        t.column = self.column.unwrap_or(t.column);
        t.context = self.context.unwrap_or(t.context);
        t.train_fraction = self.train_fraction.unwrap_or(t.train_fraction);
        t.max_vocab = self.max_vocab.unwrap_or(t.max_vocab);
        t.vocab = self.vocab;
        t.documents = self.documents;
        t.test_stride = self.test_stride.unwrap_or(t.test_stride);
        Ok(DatasetSpec::Text(t))
    }

    fn from_spec(spec: &DatasetSpec) -> Option<Table> {
        match spec {
            DatasetSpec::Builtin(_) => None,
            DatasetSpec::Text(t) => Some(Table {
                text: Some(t.path.clone()),
                id: Some(t.id.clone()),
                column: Some(t.column.clone()),
                label: Some(match &t.label {
                    TextLabel::NextChar => Column::Name("next_char".into()),
                    TextLabel::Column(c) => c.clone(),
                }),
                classes: match t.label {
                    TextLabel::NextChar => None,
                    TextLabel::Column(_) => Some(t.classes.clone()),
                },
                context: Some(t.context),
                train_fraction: Some(t.train_fraction),
                max_vocab: Some(t.max_vocab),
                vocab: t.vocab.clone(),
                documents: t.documents,
                test_stride: Some(t.test_stride),
                ..Table::default()
            }),
            DatasetSpec::Csv(c) => {
                let (test, test_file) = match &c.test {
                    TestSplit::Fraction { fraction, seed } => (
                        Some(TestTable {
                            fraction: *fraction,
                            seed: *seed,
                        }),
                        None,
                    ),
                    TestSplit::File(f) => (None, Some(f.clone())),
                };
                Some(Table {
                    csv: Some(c.path.clone()),
                    header: Some(c.header),
                    label: c.label.clone(),
                    features: c.features.clone(),
                    classes: Some(c.classes.clone()),
                    scale: Some(c.scale),
                    na: Some(c.na.clone()),
                    missing: Some(c.missing),
                    test,
                    test_file,
                    ..Table::default()
                })
            }
            DatasetSpec::Idx(i) => Some(Table {
                idx: Some(i.folder.clone()),
                train_images: Some(i.train_images.clone()),
                train_labels: Some(i.train_labels.clone()),
                test_images: Some(i.test_images.clone()),
                test_labels: Some(i.test_labels.clone()),
                classes: Some(ClassesSpec::Count(i.classes)),
                ..Table::default()
            }),
        }
    }
}

impl Serialize for DatasetSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self, Table::from_spec(self)) {
            (DatasetSpec::Builtin(n), _) => s.serialize_str(n),
            (_, Some(t)) => t.serialize(s),
            (_, None) => Err(serde::ser::Error::custom("data set without a table form")),
        }
    }
}

impl<'de> Deserialize<'de> for DatasetSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DatasetSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a data set name (`mnist5k`, `csv:PATH`, `idx:FOLDER`) or a table with `csv` or `idx`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DatasetSpec, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DatasetSpec, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let spec = t.into_spec().map_err(de::Error::custom)?;
                spec.validate().map_err(de::Error::custom)?;
                Ok(spec)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ClassesSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ClassesSpec::Auto => s.serialize_str("auto"),
            ClassesSpec::Count(k) => s.serialize_u64(*k as u64),
            ClassesSpec::Names(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ClassesSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ClassesSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"auto\", a class count or a list of class names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ClassesSpec, E> {
                if v == "auto" {
                    Ok(ClassesSpec::Auto)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ClassesSpec, E> {
                usize::try_from(v)
                    .map(ClassesSpec::Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ClassesSpec, E> {
                usize::try_from(v)
                    .map(ClassesSpec::Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ClassesSpec, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    if v.len() >= MAX_CLASSES {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_CLASSES} class names"
                        )));
                    }
                    v.push(s);
                }
                Ok(ClassesSpec::Names(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Scaling {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scaling::Standard => s.serialize_str("standard"),
            Scaling::MinMax => s.serialize_str("minmax"),
            Scaling::None => s.serialize_str("none"),
            Scaling::Factor(f) => s.serialize_f32(*f),
        }
    }
}

impl<'de> Deserialize<'de> for Scaling {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scaling;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"standard\", \"minmax\", \"none\" or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scaling, E> {
                match v {
                    "standard" => Ok(Scaling::Standard),
                    "minmax" => Ok(Scaling::MinMax),
                    "none" => Ok(Scaling::None),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scaling, E> {
                Ok(Scaling::Factor(v as f32))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scaling, E> {
                Ok(Scaling::Factor(v as f32))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scaling, E> {
                Ok(Scaling::Factor(v as f32))
            }
        }
        d.deserialize_any(V)
    }
}

/// Checks that `data` (task `task`'s samples) fits `model`: as many features
/// per sample as the model's input, and, if the model has a head for
/// `task`, as many classes. The error names the task, the data set
/// (`data.name`), both feature counts and the model, e.g. "task `species`:
/// data set `csv:penguins.csv[species]` has 4 features per sample, model
/// `mlp28` takes 784".
pub fn check_dataset(model: &dyn Model, task: &str, data: &Dataset) -> Result<(), TasksError> {
    if data.dim != model.input_dim() {
        return Err(TasksError::InputMismatch {
            task: task.to_string(),
            dataset: data.name.clone(),
            features: data.dim,
            model: model.name().to_string(),
            input: model.input_dim(),
        });
    }
    if let Some(t) = model.task(task) {
        if t.classes != data.classes {
            return Err(TasksError::DataMismatch(format!(
                "task `{task}`: data set `{}` has {} classes, the model's head has {}",
                data.name, data.classes, t.classes
            )));
        }
    }
    Ok(())
}

/// [`check_dataset`] on both splits (the train split first).
pub fn check_input(model: &dyn Model, task: &str, split: &Split) -> Result<(), TasksError> {
    check_dataset(model, task, &split.train)?;
    check_dataset(model, task, &split.test)
}
