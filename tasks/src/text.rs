//! Text data: documents of a CSV file (an id column and a text column,
//! e.g. one speaking role of a play per row) as next-character samples.
//!
//! - **Vocabulary** ([`Vocab`]): id 0 is the unknown symbol; ids 1.. are the
//!   characters of the *training* text, most frequent first (ties by code
//!   point), at most `max_vocab - 1` of them, so the same file and settings
//!   always give the same ids. Or an explicit list of characters (what nodes
//!   holding one document each must agree on).
//! - **Split by position** (LEAF's rule): the first `train_fraction` of each
//!   document's lines train, the rest test, so that no test line is seen in
//!   training.
//! - **Samples** are windows of `context` tokens with the next token (or the
//!   document's class, for a label column such as a play's genre) as the
//!   label. A window is a view: its start in one token buffer per split
//!   ([`TokenWindows`]), never a copy, so 3.9 M characters cost 2 bytes
//!   each plus 12 bytes a window (start, document, label), not 80 floats.
//! - The model sees a window as `context` features, each a token id as an
//!   `f32` ([`crate::Dataset::copy_row`]); the text models embed them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::data::{resolve_column, Column, CsvTable, Dataset, Split};
use crate::dataset_spec::ClassesSpec;
use crate::error::FileProblem;
use crate::{TasksError, MAX_CLASSES};

/// Most symbols of a vocabulary (token ids are `u16`).
pub const MAX_VOCAB: usize = 1 << 16;
/// Longest window.
pub const MAX_CONTEXT: usize = 4096;
/// The unknown symbol's id.
pub const UNKNOWN: u16 = 0;

/// Windows of a token buffer: sample `i` is
/// `tokens[starts[i] .. starts[i] + context]`, from document `keys[i]`.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenWindows {
    tokens: Arc<[u16]>,
    starts: Vec<u32>,
    keys: Vec<u32>,
    context: usize,
}

impl fmt::Debug for TokenWindows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenWindows")
            .field("tokens", &self.tokens.len())
            .field("windows", &self.starts.len())
            .field("context", &self.context)
            .finish()
    }
}

impl TokenWindows {
    /// Checks that every window lies inside the buffer and that every
    /// window has a document.
    pub fn new(
        tokens: Arc<[u16]>,
        starts: Vec<u32>,
        keys: Vec<u32>,
        context: usize,
    ) -> Result<Self, TasksError> {
        let bad = |m: String| Err(TasksError::DataMismatch(format!("token windows: {m}")));
        if keys.len() != starts.len() {
            return bad(format!("{} windows but {} keys", starts.len(), keys.len()));
        }
        if context == 0 || context > MAX_CONTEXT {
            return bad(format!("context {context} (allowed 1..={MAX_CONTEXT})"));
        }
        if let Some(s) = starts
            .iter()
            .find(|&&s| s as usize + context > tokens.len())
        {
            return bad(format!(
                "window at {s} of {context} tokens ends past the buffer of {}",
                tokens.len()
            ));
        }
        Ok(TokenWindows {
            tokens,
            starts,
            keys,
            context,
        })
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Tokens per window.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The document of each window.
    pub fn keys(&self) -> &[u32] {
        &self.keys
    }

    /// The tokens of window `i`. Panics if `i >= len()`.
    pub fn window(&self, i: usize) -> &[u16] {
        let s = self.starts[i] as usize;
        &self.tokens[s..s + self.context]
    }

    /// The windows `idx`, sharing this buffer. Panics on an index out of
    /// range (indices come from our own partitioners and splits).
    pub fn subset(&self, idx: &[usize]) -> TokenWindows {
        TokenWindows {
            tokens: Arc::clone(&self.tokens),
            starts: idx.iter().map(|&i| self.starts[i]).collect(),
            keys: idx.iter().map(|&i| self.keys[i]).collect(),
            context: self.context,
        }
    }

    /// Bytes held by the windows (the buffer counted once, shared or not).
    pub fn heap_bytes(&self) -> usize {
        self.tokens.len() * 2 + self.starts.len() * 4 + self.keys.len() * 4
    }
}

/// Characters to token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    /// `symbols[id - 1]` is the character of `id`.
    symbols: Vec<char>,
    ids: BTreeMap<char, u16>,
}

impl Vocab {
    /// The given characters, in this order (ids 1..), after the unknown
    /// symbol. Duplicates are an error.
    pub fn from_symbols(symbols: &str) -> Result<Self, TasksError> {
        let mut ids = BTreeMap::new();
        let mut v = Vec::new();
        for c in symbols.chars() {
            if v.len() + 1 >= MAX_VOCAB {
                return Err(TasksError::InvalidSpec(format!(
                    "a vocabulary holds at most {} symbols",
                    MAX_VOCAB - 1
                )));
            }
            if ids.insert(c, (v.len() + 1) as u16).is_some() {
                return Err(TasksError::InvalidSpec(format!(
                    "symbol {c:?} is listed twice in the vocabulary"
                )));
            }
            v.push(c);
        }
        Ok(Vocab { symbols: v, ids })
    }

    /// The characters of `texts`, most frequent first (ties by code point),
    /// at most `max_vocab - 1` of them (the rarest are left to the unknown
    /// symbol).
    pub fn from_texts<'a>(texts: impl IntoIterator<Item = &'a str>, max_vocab: usize) -> Self {
        let mut counts: BTreeMap<char, u64> = BTreeMap::new();
        for t in texts {
            for c in t.chars() {
                *counts.entry(c).or_default() += 1;
            }
        }
        let mut by_count: Vec<(char, u64)> = counts.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        by_count.truncate(max_vocab.clamp(1, MAX_VOCAB) - 1);
        let symbols: Vec<char> = by_count.into_iter().map(|(c, _)| c).collect();
        let ids = symbols
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, (i + 1) as u16))
            .collect();
        Vocab { symbols, ids }
    }

    /// Symbols including the unknown one (the next-character task's
    /// classes).
    pub fn len(&self) -> usize {
        self.symbols.len() + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn id(&self, c: char) -> u16 {
        self.ids.get(&c).copied().unwrap_or(UNKNOWN)
    }

    /// The character of `id` (`None` for the unknown symbol or an id out of
    /// range).
    pub fn symbol(&self, id: u16) -> Option<char> {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| self.symbols.get(i))
            .copied()
    }

    /// The known characters in id order.
    pub fn symbols(&self) -> String {
        self.symbols.iter().collect()
    }

    fn encode_into(&self, text: &str, out: &mut Vec<u16>) {
        out.extend(text.chars().map(|c| self.id(c)));
    }
}

/// What a text sample's label is.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum TextLabel {
    /// The token after the window (classes: the vocabulary).
    #[default]
    NextChar,
    /// The document's value in this column (e.g. a play's genre), the same
    /// for all its windows.
    Column(Column),
}

/// A CSV file of documents read as text samples; see the [module
/// docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct TextSource {
    /// The file (plain or gzipped, with a header).
    pub path: std::path::PathBuf,
    /// The document id column (the natural partition's key). Default
    /// `role_id`.
    pub id: Column,
    /// The text column. Default `text`.
    pub column: Column,
    pub label: TextLabel,
    /// Classes of a label column (`"auto"`: sorted distinct values).
    pub classes: ClassesSpec,
    /// Tokens per window (LEAF: 80).
    pub context: usize,
    /// Fraction of each document's lines that train (LEAF: 0.8).
    pub train_fraction: f64,
    /// Most symbols of a vocabulary built from the text, the unknown one
    /// included.
    pub max_vocab: usize,
    /// An explicit vocabulary (its characters in id order), instead of the
    /// training text's.
    pub vocab: Option<String>,
    /// Keep only this many documents, evenly spread over the file (every
    /// `total / n`-th), for small experiments. `None`: all.
    pub documents: Option<usize>,
    /// Keep every `test_stride`-th test window (all: 1), to bound the cost
    /// of a central evaluation; an even thinning, not a choice of lines.
    pub test_stride: usize,
}

impl TextSource {
    /// The defaults for `path`: Shakespeare's columns, LEAF's window and split.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        TextSource {
            path: path.into(),
            id: Column::Name("role_id".into()),
            column: Column::Name("text".into()),
            label: TextLabel::NextChar,
            classes: ClassesSpec::Auto,
            context: 80,
            train_fraction: 0.8,
            max_vocab: 128,
            vocab: None,
            documents: None,
            test_stride: 1,
        }
    }

    /// Checks the settings that do not need the file.
    pub fn validate(&self) -> Result<(), String> {
        if self.context == 0 || self.context > MAX_CONTEXT {
            return Err(format!(
                "context must be in 1..={MAX_CONTEXT}, got {}",
                self.context
            ));
        }
        if !(self.train_fraction > 0.0 && self.train_fraction < 1.0) {
            return Err(format!(
                "train_fraction must be in (0, 1), got {}",
                self.train_fraction
            ));
        }
        if !(2..=MAX_VOCAB).contains(&self.max_vocab) {
            return Err(format!(
                "max_vocab must be in 2..={MAX_VOCAB}, got {}",
                self.max_vocab
            ));
        }
        if self.documents == Some(0) || self.test_stride == 0 {
            return Err("documents and test_stride must be at least 1".into());
        }
        if let Some(v) = &self.vocab {
            Vocab::from_symbols(v).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// One document's train and test text.
struct Document {
    train: String,
    test: String,
    label: Option<String>,
}

/// The first `fraction` of the lines (at least one, and at least one left
/// for test when there are two or more) train, the rest test.
fn split_lines(text: &str, fraction: f64) -> (String, String) {
    let lines: Vec<&str> = text.split('\n').collect();
    let n = lines.len();
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    (lines[..k].join("\n"), lines[k..].join("\n"))
}

/// Reads the documents of `src` from the file's bytes: ids and
/// documents in file order (after `documents` thinning).
fn read_documents(
    path: &Path,
    bytes: &[u8],
    src: &TextSource,
) -> Result<(Vec<String>, Vec<Document>), TasksError> {
    let bad = |p| TasksError::bad_file(path, p);
    let CsvTable {
        header,
        records,
        width,
    } = CsvTable::open(path, bytes, true)?;
    let h = header.as_deref();
    let id_col = resolve_column(path, h, width, &src.id)?;
    let text_col = resolve_column(path, h, width, &src.column)?;
    let label_col = match &src.label {
        TextLabel::NextChar => None,
        TextLabel::Column(c) => Some(resolve_column(path, h, width, c)?),
    };
    let mut ids = Vec::new();
    let mut docs = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (line, rec) in records.enumerate() {
        let rec = rec.map_err(|e| bad(FileProblem::Malformed(e.to_string())))?;
        let cell = |c: usize| rec.get(c).unwrap_or("");
        let id = cell(id_col).trim().to_string();
        if !seen.insert(id.clone()) {
            return Err(bad(FileProblem::Malformed(format!(
                "record {}: document id `{id}` appears twice",
                line + 1
            ))));
        }
        let (train, test) = split_lines(cell(text_col), src.train_fraction);
        ids.push(id);
        docs.push(Document {
            train,
            test,
            label: label_col.map(|c| cell(c).trim().to_string()),
        });
    }
    if let Some(n) = src.documents {
        let total = docs.len();
        if n < total {
            let keep: Vec<usize> = (0..n).map(|i| i * total / n).collect();
            ids = keep.iter().map(|&i| std::mem::take(&mut ids[i])).collect();
            let mut all: Vec<Option<Document>> = docs.into_iter().map(Some).collect();
            docs = keep.iter().filter_map(|&i| all[i].take()).collect();
        }
    }
    if docs.is_empty() {
        return Err(bad(FileProblem::Dimensions("no documents".into())));
    }
    Ok((ids, docs))
}

/// Class ids of the documents' label cells.
fn document_classes(
    path: &Path,
    docs: &[Document],
    classes: &ClassesSpec,
) -> Result<(Vec<u32>, usize), TasksError> {
    let bad = |m: String| TasksError::bad_file(path, FileProblem::Malformed(m));
    let cells: Vec<&str> = docs
        .iter()
        .map(|d| d.label.as_deref().unwrap_or(""))
        .collect();
    let names: Vec<String> = match classes {
        ClassesSpec::Auto => {
            let set: std::collections::BTreeSet<&str> = cells.iter().copied().collect();
            set.into_iter().map(str::to_string).collect()
        }
        ClassesSpec::Names(v) => v.clone(),
        ClassesSpec::Count(k) => (0..*k).map(|i| i.to_string()).collect(),
    };
    if names.len() < 2 || names.len() > MAX_CLASSES {
        return Err(bad(format!(
            "the label column has {} classes (allowed 2..={MAX_CLASSES})",
            names.len()
        )));
    }
    let ids = cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            names
                .iter()
                .position(|n| n == c)
                .map(|p| p as u32)
                .ok_or_else(|| bad(format!("document {} has label `{c}`, not a class", i + 1)))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Ok((ids, names.len()))
}

/// The windows of one split: every document's text of that split encoded
/// end to end into one buffer, a window at every `stride`-th position
/// whose next token exists.
fn windows_of(
    texts: &[&str],
    vocab: &Vocab,
    context: usize,
    stride: usize,
    doc_label: Option<&[u32]>,
) -> Result<(TokenWindows, Vec<u32>), TasksError> {
    let mut tokens: Vec<u16> = Vec::new();
    let mut starts = Vec::new();
    let mut keys = Vec::new();
    let mut labels = Vec::new();
    for (d, text) in texts.iter().enumerate() {
        let base = tokens.len();
        vocab.encode_into(text, &mut tokens);
        let len = tokens.len() - base;
        if u32::try_from(tokens.len()).is_err() {
            return Err(TasksError::DataMismatch(
                "more than 2^32 tokens in one split".into(),
            ));
        }
        for s in (0..len.saturating_sub(context)).step_by(stride) {
            starts.push((base + s) as u32);
            keys.push(d as u32);
            labels.push(match doc_label {
                Some(l) => l[d],
                None => u32::from(tokens[base + s + context]),
            });
        }
    }
    Ok((
        TokenWindows::new(tokens.into(), starts, keys, context)?,
        labels,
    ))
}

/// A split's data set of windows.
fn text_dataset(name: &str, windows: TokenWindows, labels: Vec<u32>, classes: usize) -> Dataset {
    Dataset {
        name: name.to_string(),
        dim: windows.context(),
        classes,
        features: Vec::new(),
        labels,
        windows: Some(Arc::new(windows)),
    }
}

/// A text file's train and test windows, its vocabulary and document ids.
#[derive(Clone, Debug)]
pub struct TextSplit {
    pub split: Split,
    pub vocab: Vocab,
    /// Document ids by key (the natural partition's keys).
    pub documents: Vec<String>,
}

/// Loads `src` from the file's `bytes` (read and bounded by the caller).
pub(crate) fn load_text(
    path: &Path,
    bytes: &[u8],
    src: &TextSource,
) -> Result<TextSplit, TasksError> {
    src.validate().map_err(TasksError::InvalidSpec)?;
    let (ids, docs) = read_documents(path, bytes, src)?;
    let vocab = match &src.vocab {
        Some(v) => Vocab::from_symbols(v)?,
        None => Vocab::from_texts(docs.iter().map(|d| d.train.as_str()), src.max_vocab),
    };
    let (doc_labels, classes) = match &src.label {
        TextLabel::NextChar => (None, vocab.len()),
        TextLabel::Column(_) => {
            let (l, k) = document_classes(path, &docs, &src.classes)?;
            (Some(l), k)
        }
    };
    let train_texts: Vec<&str> = docs.iter().map(|d| d.train.as_str()).collect();
    let test_texts: Vec<&str> = docs.iter().map(|d| d.test.as_str()).collect();
    let dl = doc_labels.as_deref();
    let (tr, tr_labels) = windows_of(&train_texts, &vocab, src.context, 1, dl)?;
    let (te, te_labels) = windows_of(&test_texts, &vocab, src.context, src.test_stride, dl)?;
    let name = path.display().to_string();
    Ok(TextSplit {
        split: Split {
            train: text_dataset(&name, tr, tr_labels, classes),
            test: text_dataset(&name, te, te_labels, classes),
        },
        vocab,
        documents: ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str =
        "role_id,genre,text\nA,comedy,\"abab\nabab\nabab\nabab\nzz\"\nB,tragedy,\"ccccc\ncc\"\n";

    fn src(label: TextLabel) -> TextSource {
        TextSource {
            context: 3,
            label,
            ..TextSource::new("t.csv")
        }
    }

    #[test]
    fn windows_are_views_with_the_next_token_as_label() {
        let t = load_text(
            Path::new("t.csv"),
            CSV.as_bytes(),
            &src(TextLabel::NextChar),
        )
        .expect("load");
        // Train: A's first 4 of 5 lines, B's first of 2 lines.
        let tr = &t.split.train;
        let w = tr.windows.as_ref().expect("windows");
        let a_train = "abab\nabab\nabab\nabab".chars().count();
        assert_eq!(tr.len(), (a_train - 3) + (5 - 3));
        assert_eq!(w.keys()[0], 0);
        assert_eq!(*w.keys().last().expect("last"), 1);
        let mut row = vec![0.0; 3];
        tr.copy_row(0, &mut row);
        let ids: Vec<u16> = "aba".chars().map(|c| t.vocab.id(c)).collect();
        assert_eq!(row, ids.iter().map(|&i| f32::from(i)).collect::<Vec<_>>());
        assert_eq!(tr.labels[0], u32::from(t.vocab.id('b')));
        // `z` occurs only in test text: unknown.
        assert_eq!(t.vocab.id('z'), UNKNOWN);
        assert_eq!(tr.classes, t.vocab.len());
        tr.validate().expect("valid");
        t.split.test.validate().expect("valid");
    }

    #[test]
    fn a_label_column_labels_every_window_of_a_document() {
        let t = load_text(
            Path::new("t.csv"),
            CSV.as_bytes(),
            &src(TextLabel::Column(Column::Name("genre".into()))),
        )
        .expect("load");
        let tr = &t.split.train;
        assert_eq!(tr.classes, 2);
        let keys = tr.windows.as_ref().expect("windows").keys();
        for (k, y) in keys.iter().zip(&tr.labels) {
            assert_eq!(k, y, "comedy = 0 for A, tragedy = 1 for B");
        }
    }

    #[test]
    fn vocabulary_is_by_frequency_then_code_point() {
        let v = Vocab::from_texts(["bba", "c"], 3);
        assert_eq!(v.symbols(), "ba");
        assert_eq!(v.id('c'), UNKNOWN);
        assert_eq!(v.len(), 3);
        assert!(Vocab::from_symbols("aba").is_err());
    }

    #[test]
    fn bad_files_are_errors() {
        let s = src(TextLabel::NextChar);
        let dup = "role_id,text\nA,abcdef\nA,abcdef\n";
        assert!(load_text(Path::new("t.csv"), dup.as_bytes(), &s).is_err());
        let nocol = "id,body\nA,abcdef\n";
        assert!(load_text(Path::new("t.csv"), nocol.as_bytes(), &s).is_err());
        assert!(load_text(Path::new("t.csv"), b"role_id,text\n", &s).is_err());
        let one_class = src(TextLabel::Column(Column::Name("genre".into())));
        let csv = "role_id,genre,text\nA,x,abcdef\nB,x,abcdef\n";
        assert!(load_text(Path::new("t.csv"), csv.as_bytes(), &one_class).is_err());
    }
}
