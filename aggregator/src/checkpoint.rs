//! Checkpoints: the only module of the crate that touches files.
//!
//! A checkpoint is a folder `round-000012/` (12 = rounds completed, or model
//! steps in async mode) holding
//! - `weights.safetensors`: the global weights, one F32 tensor per layout
//!   tensor, named and shaped as in the layout (PyTorch's `safetensors`
//!   opens it);
//! - `strategy.safetensors`: the strategy's tensors (e.g. `m/backbone`,
//!   `v/backbone` for FedAdam; a user's strategy names its own), bit-exact;
//! - `state.json`: round, version, the strategy's name, steps, scalars and
//!   opaque JSON data, the sampling RNG (seed, stream, word position), the
//!   layout and a SHA-256 of the config;
//! - `checksums.json` (written last): the SHA-256 of each of the three
//!   files above.
//!
//! Integrity: nothing non-finite is saved (a model or optimizer state with a
//! NaN or an infinity is refused at save), and at load every file must
//! match its checksum and every weight and moment must be finite.
//! [`Engine::resume`] tries the checkpoints newest first: a damaged one is
//! skipped with an `ERROR` log line naming it and the reason, and the
//! previous good one is used (the error of the newest is returned when none
//! is good).
//!
//! It is written into a temporary folder and renamed into place, so a crash
//! leaves either the old set of checkpoints or the new one. Not saved: the
//! node registry (nodes register again when they reconnect; sampling after a
//! resume is identical when the same nodes are registered) and, in async
//! mode, plans outstanding and the partly filled buffer.
//!
//! Files are read as hostile input: sizes are bounded before reading, every
//! weight tensor's dtype, shape and length is checked.
//!
//! The strategy's state is checked without knowing the strategy, at save
//! and at load alike ([`check_strategy_state`]): tensor and scalar names of
//! 1..=[`MAX_STATE_NAME_LEN`] bytes of `[A-Za-z0-9_./:-]`, F32 tensors, all
//! values finite, at most [`MAX_STATE_TENSORS_FACTOR`] times the model's
//! parameters in all tensors together (and `strategy.safetensors` is
//! bounded by that before it is read), at most [`MAX_STATE_SCALARS`]
//! scalars. No naming rule is imposed: the strategy's
//! [`Strategy::restore`] gets the checkpoint's layout and checks its
//! tensors' shapes itself (the built-in strategies accept only `m/<group>`
//! and `v/<group>` of their group's length). Any failure is an
//! [`AggError`] and the checkpoint is skipped as damaged.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use cohort_protocol::{Layout, ParamGroups};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::strategy::{
    Strategy, StrategyState, MAX_STATE_NAME_LEN, MAX_STATE_SCALARS, MAX_STATE_TENSORS_FACTOR,
};
use crate::{AggError, Engine, EngineConfig};

pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const STRATEGY_FILE: &str = "strategy.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CHECKSUMS_FILE: &str = "checksums.json";
/// 2: with `checksums.json`. Format 1 (no checksums) is still read, with a
/// warning.
const FORMAT: u32 = 2;
/// Bound on `checksums.json`.
const MAX_CHECKSUMS_BYTES: u64 = 4096;
/// Bound on `state.json` (the layout is the only large part).
const MAX_STATE_BYTES: u64 = 64 << 20;
/// Slack for safetensors headers above the tensor bytes.
const HEADER_SLACK: u64 = 16 << 20;

/// The lock file of a data folder (see [`lock_dir`]).
pub const LOCK_FILE: &str = "aggregator.lock";

/// An exclusive lock on a data folder, held as long as this value lives
/// (and released by the OS if the process dies).
#[derive(Debug)]
pub struct DirLock {
    _file: fs::File,
    path: PathBuf,
}

impl DirLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the exclusive lock of `dir` (creating it and its `aggregator.lock`
/// file), or fails at once with [`AggError::Locked`] if another process (or
/// another `DirLock` of this one) holds it: two aggregators never write the
/// same checkpoints. The lock is advisory (`flock`) and the file records the
/// holder's pid for the operator.
pub fn lock_dir(dir: &Path) -> Result<DirLock, AggError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(AggError::Locked {
                path: dir.to_path_buf(),
            })
        }
        Err(fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    // Best effort: who holds it.
    let _ = file
        .set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()));
    Ok(DirLock { _file: file, path })
}

/// `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub format: u32,
    pub federation: String,
    pub round: u64,
    pub version: u64,
    pub strategy: StrategyState,
    /// ChaCha8 seed, hex.
    pub rng_seed: String,
    pub rng_stream: u64,
    /// Word position (u128, decimal string: JSON numbers stop at 2^64).
    pub rng_word_pos: String,
    /// SHA-256 of the config (with `rounds` zeroed), hex.
    pub config_hash: String,
    pub layout: Layout,
    /// Differential privacy: the accountant and the clip norm (absent
    /// without privacy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::PrivacyState>,
}

/// Name of the checkpoint folder of `round`.
pub fn round_dir_name(round: u64) -> String {
    format!("round-{round:06}")
}

/// SHA-256 of the canonical JSON of the config, `rounds` excluded (a run
/// may be resumed to go further).
pub fn config_hash(cfg: &EngineConfig) -> Result<String, AggError> {
    let mut c = cfg.clone();
    c.rounds = 0;
    let json = serde_json::to_vec(&c).map_err(|e| AggError::Checkpoint(format!("config: {e}")))?;
    Ok(hex(
        ring::digest::digest(&ring::digest::SHA256, &json).as_ref()
    ))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AggError + '_ {
    move |source| AggError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` and fsyncs it (no rename: see the callers).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AggError> {
    let mut f = fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Reads a whole file, refusing it beyond `limit` bytes before allocating.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, AggError> {
    let f = fs::File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len > limit {
        return Err(AggError::Checkpoint(format!(
            "{} has {len} bytes, over the limit of {limit}",
            path.display()
        )));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(limit + 1).read_to_end(&mut buf).map_err(io(path))?;
    if buf.len() as u64 > limit {
        return Err(AggError::Checkpoint(format!(
            "{} grew over the limit of {limit}",
            path.display()
        )));
    }
    Ok(buf)
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn st_err(e: safetensors::SafeTensorError) -> AggError {
    AggError::Checkpoint(format!("safetensors: {e}"))
}

/// The global weights as safetensors bytes, tensors named by the layout.
pub fn weights_to_safetensors(layout: &Layout, global: &ParamGroups) -> Result<Vec<u8>, AggError> {
    layout.check(global)?;
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for g in &layout.groups {
        let values = global
            .get(&g.name)
            .ok_or_else(|| AggError::Checkpoint(format!("group `{}` missing", g.name)))?;
        for t in &g.tensors {
            let start = t.offset as usize;
            let slice = values
                .get(start..start + t.numel() as usize)
                .ok_or_else(|| {
                    AggError::Checkpoint(format!("tensor `{}` out of its group", t.name))
                })?;
            owned.push((
                t.name.clone(),
                t.shape.iter().map(|&d| d as usize).collect(),
                le_bytes(slice),
            ));
        }
    }
    let views = owned
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.as_str(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(st_err)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "cohort-weights-v1".to_string());
    safetensors::serialize(views, Some(meta)).map_err(st_err)
}

fn f32s(view: &TensorView<'_>, name: &str) -> Result<Vec<f32>, AggError> {
    if view.dtype() != Dtype::F32 {
        return Err(AggError::Checkpoint(format!(
            "tensor `{name}` is {:?}, not F32",
            view.dtype()
        )));
    }
    let data = view.data();
    if data.len() % 4 != 0 {
        return Err(AggError::Checkpoint(format!(
            "tensor `{name}` has a ragged length"
        )));
    }
    Ok(data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads global weights written by [`weights_to_safetensors`], checked
/// against `layout` (names, dtypes, shapes).
pub fn weights_from_safetensors(layout: &Layout, bytes: &[u8]) -> Result<ParamGroups, AggError> {
    let st = SafeTensors::deserialize(bytes).map_err(st_err)?;
    let mut out = ParamGroups::new();
    for g in &layout.groups {
        let mut values = Vec::with_capacity(g.len() as usize);
        for t in &g.tensors {
            let view = st.tensor(&t.name).map_err(st_err)?;
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            if view.shape() != shape.as_slice() {
                return Err(AggError::Checkpoint(format!(
                    "tensor `{}` has shape {:?}, the layout says {shape:?}",
                    t.name,
                    view.shape()
                )));
            }
            values.extend(f32s(&view, &t.name)?);
        }
        out.insert(g.name.clone(), values);
    }
    layout.check(&out)?;
    Ok(out)
}

fn tensors_to_safetensors(tensors: &BTreeMap<String, Vec<f32>>) -> Result<Vec<u8>, AggError> {
    let owned: Vec<(&str, usize, Vec<u8>)> = tensors
        .iter()
        .map(|(n, v)| (n.as_str(), v.len(), le_bytes(v)))
        .collect();
    let views = owned
        .iter()
        .map(|(n, len, b)| TensorView::new(Dtype::F32, vec![*len], b).map(|v| (*n, v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(st_err)?;
    safetensors::serialize(views, None).map_err(st_err)
}

fn tensors_from_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, Vec<f32>>, AggError> {
    let st = SafeTensors::deserialize(bytes).map_err(st_err)?;
    let mut out = BTreeMap::new();
    for name in st.names() {
        let view = st.tensor(name).map_err(st_err)?;
        out.insert(name.to_string(), f32s(&view, name)?);
    }
    Ok(out)
}

/// Number of parameters of a layout read from a file, with every product
/// and sum checked.
fn checked_params(layout: &Layout) -> Result<u64, AggError> {
    let overflow = || AggError::Checkpoint("layout sizes overflow".into());
    let mut total = 0u64;
    for g in &layout.groups {
        for t in &g.tensors {
            let n = t
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(overflow)?;
            total = total.checked_add(n).ok_or_else(overflow)?;
        }
    }
    // Offsets and lengths are used as usize and f32 byte counts.
    if total > (u64::MAX / 8) || usize::try_from(total.saturating_mul(8)).is_err() {
        return Err(overflow());
    }
    Ok(total)
}

/// The newest complete checkpoint folder in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<(u64, PathBuf)>, AggError> {
    Ok(all(dir)?.into_iter().next())
}

/// Every complete checkpoint folder in `dir` (one with a `state.json`),
/// newest first.
pub fn all(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AggError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(AggError::Io {
                path: dir.to_path_buf(),
                source: e,
            })
        }
    };
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(round) = name
            .to_str()
            .and_then(|n| n.strip_prefix("round-"))
            .and_then(|r| r.parse::<u64>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if !path.join(STATE_FILE).is_file() {
            continue;
        }
        found.push((round, path));
    }
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    Ok(found)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Checks `bytes` (the file `name` of a checkpoint) against `sums`.
fn verify(
    sums: Option<&BTreeMap<String, String>>,
    name: &str,
    bytes: &[u8],
) -> Result<(), AggError> {
    let Some(sums) = sums else {
        return Ok(());
    };
    let want = sums
        .get(name)
        .ok_or_else(|| AggError::Checkpoint(format!("{CHECKSUMS_FILE} has no entry for {name}")))?;
    let got = sha256_hex(bytes);
    if &got != want {
        return Err(AggError::Checkpoint(format!(
            "{name} is damaged: SHA-256 {got}, the checkpoint recorded {want}"
        )));
    }
    Ok(())
}

/// The first non-finite value of named tensors, if any.
fn first_non_finite<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [f32])>,
) -> Option<(String, usize)> {
    for (name, t) in tensors {
        if let Some(i) = t.iter().position(|v| !v.is_finite()) {
            return Some((name.to_string(), i));
        }
    }
    None
}

/// Strategy tensors at most, whatever the model (a model of few groups may
/// still carry a strategy of many small tensors).
const MIN_MAX_STATE_TENSORS: usize = 1024;

/// A strategy state that a checkpoint can hold, for a model of `params`
/// parameters in `groups` groups (see the module docs): names, count and
/// total size of the tensors, finite values, scalars.
pub fn check_strategy_state(
    state: &StrategyState,
    params: u64,
    groups: usize,
) -> Result<(), AggError> {
    fn check_name(kind: &str, name: &str) -> Result<(), AggError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_STATE_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_./:-".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(AggError::Checkpoint(format!(
                "strategy {kind} name {:?} is not 1..={MAX_STATE_NAME_LEN} bytes of [A-Za-z0-9_./:-]",
                name.chars().take(MAX_STATE_NAME_LEN + 1).collect::<String>()
            )))
        }
    }
    let max_tensors = MIN_MAX_STATE_TENSORS.max(groups.saturating_mul(4));
    if state.tensors.len() > max_tensors {
        return Err(AggError::Checkpoint(format!(
            "strategy state holds {} tensors, over the limit of {max_tensors}",
            state.tensors.len()
        )));
    }
    let limit = params.saturating_mul(MAX_STATE_TENSORS_FACTOR);
    let mut total = 0u64;
    for (name, t) in &state.tensors {
        check_name("tensor", name)?;
        total = total.saturating_add(t.len() as u64);
        if let Some(i) = t.iter().position(|v| !v.is_finite()) {
            return Err(AggError::Checkpoint(format!(
                "strategy tensor `{name}`[{i}] is not finite"
            )));
        }
    }
    if total > limit {
        return Err(AggError::Checkpoint(format!(
            "strategy tensors hold {total} values, over {MAX_STATE_TENSORS_FACTOR} x the \
             model's {params} parameters"
        )));
    }
    if state.scalars.len() > MAX_STATE_SCALARS {
        return Err(AggError::Checkpoint(format!(
            "strategy state holds {} scalars, over the limit of {MAX_STATE_SCALARS}",
            state.scalars.len()
        )));
    }
    for (name, v) in &state.scalars {
        check_name("scalar", name)?;
        if !v.is_finite() {
            return Err(AggError::Checkpoint(format!(
                "strategy scalar `{name}` is not finite"
            )));
        }
    }
    Ok(())
}

impl Engine {
    /// Writes a checkpoint of the current state into `dir/round-NNNNNN/`
    /// (temp folder + rename) and returns its path. Sync mode: only between
    /// rounds (after `poll` returned the report). The same as
    /// `self.checkpoint()?.write(dir)`.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<PathBuf, AggError> {
        self.checkpoint()?.write(dir)
    }

    /// The checkpoint of the current state, encoded in memory and checked
    /// (finite, a strategy state a resume accepts), ready to be written by
    /// [`Checkpoint::write`] on another thread: the engine need not wait
    /// for the disk.
    pub fn checkpoint(&self) -> Result<Checkpoint, AggError> {
        if self.round_open() {
            return Err(AggError::RoundOpen(self.round));
        }
        let strategy = self.strategy.state();
        // Never save a model or optimizer state that a resume would refuse.
        if let Some((g, i)) = first_non_finite(self.global.iter()) {
            return Err(AggError::Checkpoint(format!(
                "refusing to save a non-finite model: `{g}`[{i}]"
            )));
        }
        if let Some((t, i)) = first_non_finite(
            strategy
                .tensors
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice())),
        ) {
            return Err(AggError::Checkpoint(format!(
                "refusing to save a non-finite strategy state: `{t}`[{i}]"
            )));
        }
        // Never save a strategy state that a resume would refuse.
        check_strategy_state(
            &strategy,
            self.layout.num_params(),
            self.layout.groups.len(),
        )?;
        let weights = weights_to_safetensors(&self.layout, &self.global)?;
        let strat = tensors_to_safetensors(&strategy.tensors)?;
        let state = SavedState {
            format: FORMAT,
            federation: self.cfg.federation.clone(),
            round: self.round,
            version: self.version,
            strategy,
            rng_seed: hex(&self.rng.get_seed()),
            rng_stream: self.rng.get_stream(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
            config_hash: config_hash(&self.cfg)?,
            layout: self.layout.clone(),
            privacy: self.dp.as_ref().map(|d| d.state.clone()),
        };
        let json = serde_json::to_vec_pretty(&state)
            .map_err(|e| AggError::Checkpoint(format!("state: {e}")))?;
        Ok(Checkpoint {
            round: self.round,
            version: self.version,
            weights,
            strategy: strat,
            state: json,
        })
    }
}

/// A checkpoint encoded in memory by [`Engine::checkpoint`]; [`Checkpoint::write`]
/// puts it on disk.
#[derive(Debug)]
pub struct Checkpoint {
    round: u64,
    version: u64,
    weights: Vec<u8>,
    strategy: Vec<u8>,
    state: Vec<u8>,
}

impl Checkpoint {
    /// The round it is the end of.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Writes it into `dir/round-NNNNNN/`: every file fsynced in a
    /// temporary folder with its SHA-256 in `checksums.json`, the folder
    /// renamed into place, the rename fsynced. Returns the folder.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, AggError> {
        let (weights, strat, json) = (&self.weights, &self.strategy, &self.state);
        fs::create_dir_all(dir).map_err(io(dir))?;
        let name = round_dir_name(self.round);
        let tmp = dir.join(format!(".tmp-{name}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        let files = [
            (WEIGHTS_FILE, &weights[..]),
            (STRATEGY_FILE, &strat[..]),
            (STATE_FILE, &json[..]),
        ];
        let sums: BTreeMap<String, String> = files
            .iter()
            .map(|(n, b)| (n.to_string(), sha256_hex(b)))
            .collect();
        let sums = serde_json::to_vec_pretty(&sums)
            .map_err(|e| AggError::Checkpoint(format!("checksums: {e}")))?;
        // The four fsyncs at once: the file system can commit them together
        // (they are the largest fixed cost between two rounds). Nothing is
        // visible before the rename below, so their order does not matter.
        std::thread::scope(|scope| {
            let writes: Vec<_> = files
                .iter()
                .chain([&(CHECKSUMS_FILE, &sums[..])])
                .map(|&(name, bytes)| {
                    let path = tmp.join(name);
                    scope.spawn(move || write_synced(&path, bytes))
                })
                .collect();
            writes.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(AggError::Checkpoint("a writer thread panicked".into()))
                })
            })
        })?;
        // The folder's entries themselves.
        if let Ok(d) = fs::File::open(&tmp) {
            let _ = d.sync_all();
        }
        let dest = dir.join(&name);
        if dest.exists() {
            // Same round saved twice: move the old one aside first (rename
            // cannot replace a non-empty folder).
            let old = dir.join(format!(".old-{name}"));
            if old.exists() {
                fs::remove_dir_all(&old).map_err(io(&old))?;
            }
            fs::rename(&dest, &old).map_err(io(&dest))?;
            fs::rename(&tmp, &dest).map_err(io(&tmp))?;
            fs::remove_dir_all(&old).map_err(io(&old))?;
        } else {
            fs::rename(&tmp, &dest).map_err(io(&tmp))?;
        }
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        info!(round = self.round, version = self.version, path = %dest.display(), "checkpoint written");
        Ok(dest)
    }
}

impl Engine {
    /// Resumes from the newest good checkpoint in `dir` (`None` if there
    /// is none). The config must hash like the one that wrote it (`rounds`
    /// may differ) and `strategy` must be the same kind. Nodes must
    /// register again. A checkpoint that fails its checks (damaged file,
    /// non-finite value, ...) is skipped with an error line, and the
    /// previous one is tried; when none is good, the error of the newest is
    /// returned.
    pub fn resume(
        dir: &Path,
        cfg: EngineConfig,
        strategy: Box<dyn Strategy>,
    ) -> Result<Option<Self>, AggError> {
        let found = all(dir)?;
        let mut strategy = strategy;
        // The state the strategy was handed in with, to undo a partial
        // restore before the next attempt.
        let blank = strategy.state();
        let mut newest_error = None;
        for (round, path) in &found {
            match Self::load_checked(path, &cfg, strategy.as_mut(), &blank) {
                Ok((global, state, rng)) => {
                    if newest_error.is_some() {
                        error!(
                            round,
                            path = %path.display(),
                            "RESUMED FROM AN OLDER CHECKPOINT: the newer ones are damaged (see above)"
                        );
                    }
                    return Self::assemble(path, cfg, strategy, global, state, rng).map(Some);
                }
                Err(e) => {
                    error!(
                        round,
                        path = %path.display(),
                        error = %e,
                        "CHECKPOINT DAMAGED OR UNUSABLE: skipped, trying the previous one"
                    );
                    newest_error.get_or_insert(e);
                }
            }
        }
        match newest_error {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Resumes from one checkpoint folder (no fallback).
    pub fn resume_from(
        path: &Path,
        cfg: EngineConfig,
        mut strategy: Box<dyn Strategy>,
    ) -> Result<Self, AggError> {
        let blank = strategy.state();
        let (global, state, rng) = Self::load_checked(path, &cfg, strategy.as_mut(), &blank)?;
        Self::assemble(path, cfg, strategy, global, state, rng)
    }

    fn assemble(
        path: &Path,
        cfg: EngineConfig,
        strategy: Box<dyn Strategy>,
        global: ParamGroups,
        state: SavedState,
        rng: ChaCha8Rng,
    ) -> Result<Self, AggError> {
        let mut engine = Engine::build(cfg, state.layout, global.clone(), strategy)?;
        engine.restore_parts(global, state.round, state.version, rng);
        match (engine.dp.as_mut(), state.privacy) {
            (Some(dp), Some(p)) => {
                if p.accountant.orders != dp.state.accountant.orders
                    || p.accountant.rdp.len() != p.accountant.orders.len()
                    || !p.accountant.rdp.iter().all(|r| *r >= 0.0)
                    || !(p.clip.is_finite() && p.clip > 0.0)
                {
                    return Err(AggError::Checkpoint(
                        "the privacy accountant's state does not fit".into(),
                    ));
                }
                dp.state = p;
            }
            (Some(_), None) => {
                return Err(AggError::Checkpoint(
                    "privacy is on but the checkpoint has no accountant state".into(),
                ))
            }
            _ => {}
        }
        info!(round = state.round, version = state.version, path = %path.display(), "resumed");
        Ok(engine)
    }

    /// Reads and checks one checkpoint folder, restoring the strategy's
    /// state into `strategy` (last: when its `restore` refuses, `blank` is
    /// restored before the error is returned).
    fn load_checked(
        path: &Path,
        cfg: &EngineConfig,
        strategy: &mut dyn Strategy,
        blank: &StrategyState,
    ) -> Result<(ParamGroups, SavedState, ChaCha8Rng), AggError> {
        let sums: Option<BTreeMap<String, String>> =
            match read_bounded(&path.join(CHECKSUMS_FILE), MAX_CHECKSUMS_BYTES) {
                Ok(b) => Some(
                    serde_json::from_slice(&b)
                        .map_err(|e| AggError::Checkpoint(format!("{CHECKSUMS_FILE}: {e}")))?,
                ),
                Err(AggError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(e) => return Err(e),
            };
        let state_bytes = read_bounded(&path.join(STATE_FILE), MAX_STATE_BYTES)?;
        verify(sums.as_ref(), STATE_FILE, &state_bytes)?;
        let state: SavedState = serde_json::from_slice(&state_bytes)
            .map_err(|e| AggError::Checkpoint(format!("state.json: {e}")))?;
        match (state.format, &sums) {
            (FORMAT, Some(_)) => {}
            (FORMAT, None) => {
                return Err(AggError::Checkpoint(format!("{CHECKSUMS_FILE} is missing")))
            }
            (1, _) => {
                warn!(path = %path.display(), "checkpoint of format 1: no checksums to verify")
            }
            (f, _) => {
                return Err(AggError::Checkpoint(format!(
                    "unknown checkpoint format {f}"
                )))
            }
        }
        if state.config_hash != config_hash(cfg)? {
            return Err(AggError::Checkpoint(
                "the config differs from the one that wrote the checkpoint".into(),
            ));
        }
        // Shapes come from a file: multiply with checks before anything
        // (the layout's own helpers assume sane sizes).
        let params = checked_params(&state.layout)?;
        state.layout.validate()?;
        let weight_bytes = read_bounded(
            &path.join(WEIGHTS_FILE),
            params.saturating_mul(4).saturating_add(HEADER_SLACK),
        )?;
        if params.saturating_mul(4) > weight_bytes.len() as u64 {
            return Err(AggError::Checkpoint(format!(
                "{WEIGHTS_FILE} has {} bytes, too few for {params} parameters",
                weight_bytes.len()
            )));
        }
        verify(sums.as_ref(), WEIGHTS_FILE, &weight_bytes)?;
        let global = weights_from_safetensors(&state.layout, &weight_bytes)?;
        if let Some((g, i)) = first_non_finite(global.iter()) {
            return Err(AggError::Checkpoint(format!(
                "{WEIGHTS_FILE}: `{g}`[{i}] is not finite"
            )));
        }
        let strat_limit = params
            .saturating_mul(4 * MAX_STATE_TENSORS_FACTOR)
            .saturating_add(HEADER_SLACK);
        let strat_bytes = read_bounded(&path.join(STRATEGY_FILE), strat_limit)?;
        verify(sums.as_ref(), STRATEGY_FILE, &strat_bytes)?;
        let mut strat_state = state.strategy.clone();
        strat_state.tensors = tensors_from_safetensors(&strat_bytes)?;
        check_strategy_state(&strat_state, params, state.layout.groups.len())?;
        let seed =
            unhex32(&state.rng_seed).ok_or_else(|| AggError::Checkpoint("bad rng seed".into()))?;
        let word_pos: u128 = state
            .rng_word_pos
            .parse()
            .map_err(|_| AggError::Checkpoint("bad rng word position".into()))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(state.rng_stream);
        rng.set_word_pos(word_pos);
        // Last, so that nothing after it can fail: a strategy whose restore
        // refused is put back in its blank state.
        if let Err(e) = strategy.restore(strat_state, &state.layout) {
            if let Err(again) = strategy.restore(blank.clone(), &state.layout) {
                warn!(error = %again, "the strategy refused its own blank state too");
            }
            return Err(e);
        }
        Ok((global, state, rng))
    }
}
