//! Checkpoints of a simulation, so that a long run picks up again after a
//! crash and ends bit-identical to an uninterrupted one.
//!
//! `OUTPUT/checkpoint/` holds, for the end of round `R` (every
//! `checkpoint.every` rounds):
//! - `round-RRRRRR/`: the engine's checkpoint ([`cohort_aggregator::checkpoint`]:
//!   global weights, the strategy's state, the sampling RNG, the privacy
//!   accountant; checksummed, written in a temporary folder and renamed);
//! - `sim-RRRRRR.bin`: what the simulator keeps itself: the virtual clock,
//!   every client's state (local heads, the 8-bit packed error-feedback
//!   residuals, exactly as held in memory) and the metrics rows so far.
//!   A magic, the SHA-256 of the rest, then bincode. Written first (temporary
//!   file, fsync, rename), so that a complete engine folder always has its
//!   `sim` file.
//!
//! Nothing else is needed: every other random draw (local training order,
//! stochastic rounding, dropouts, latencies, Byzantine clients, DP noise)
//! is a function of the seed, the round and the client. The two newest
//! checkpoints are kept; resuming tries them newest first.
//!
//! Both files are read as hostile input: sizes bounded before reading, the
//! checksum checked before decoding, the experiment's hash compared with
//! the run folder's `experiment.toml`, every client state checked against
//! the model (known client, its own groups, their lengths, residual
//! encodings of the right length), the rows numbered `1..=R`. Any failure
//! is a [`SimError::Checkpoint`].
//!
//! Not checkpointed (refused by the resume): FedBuff (`mode = "async"`),
//! whose in-flight jobs and partly filled buffer are not saved, and
//! `sharing = "separate"` / `"local"`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use cohort_aggregator::checkpoint::{self as engine_ckpt, read_bounded, Checkpoint};
use cohort_aggregator::PrivacyReport;
use serde::{Deserialize, Serialize};

use crate::config::ExperimentConfig;
use crate::metrics::{RoundMetrics, TaskScore};
use crate::SimError;

/// The checkpoint subfolder of a run folder.
pub const CHECKPOINT_DIR: &str = "checkpoint";
const MAGIC: &[u8; 8] = b"COHSIM\x00\x01";
const HASH_LEN: usize = 32;
/// Checkpoints kept (a damaged newest one falls back to the previous).
const KEEP: usize = 2;

fn bad(path: &Path, reason: impl Into<String>) -> SimError {
    SimError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The checkpoint folder of a run folder.
pub fn dir_of(output: &Path) -> PathBuf {
    output.join(CHECKPOINT_DIR)
}

/// The simulator's file of the checkpoint of `round` in `dir`.
pub fn sim_file(dir: &Path, round: u64) -> PathBuf {
    dir.join(format!("sim-{round:06}.bin"))
}

fn sha256(bytes: &[u8]) -> [u8; HASH_LEN] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 (hex) of the experiment as a file, without the settings that
/// do not change its numbers (`output`, `threads`, `checkpoint`).
pub fn experiment_hash(cfg: &ExperimentConfig) -> Result<String, SimError> {
    let mut c = cfg.clone();
    c.output = None;
    c.threads = 0;
    c.checkpoint = Default::default();
    Ok(sha256(c.to_toml()?.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// One client's state as the simulation holds it between rounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClientState {
    pub client: u64,
    /// Local groups (personalized heads), f32.
    pub local: Vec<(String, Vec<f32>)>,
    /// Error-feedback residuals: group, length, 8-bit encoding.
    pub residuals: Vec<(String, u64, Vec<u8>)>,
}

/// A [`RoundMetrics`] in a form bincode reads back bit for bit (the
/// metrics type skips absent fields, which bincode cannot).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredRound {
    round: u64,
    version: u64,
    central: Vec<(String, f32, f32)>,
    train_loss: Vec<(String, f32, f32)>,
    /// sampled, accepted, dropped, late, refused.
    counts: [u64; 5],
    bytes_up: u64,
    bytes_down: u64,
    wall_ms: f64,
    eval_ms: f64,
    /// epsilon, delta, q, noise multiplier, clip; rounds; under the clip.
    privacy: Option<([f64; 5], u64, Option<f64>)>,
}

fn scores_out(s: &[TaskScore]) -> Vec<(String, f32, f32)> {
    s.iter()
        .map(|t| (t.task.clone(), t.accuracy, t.loss))
        .collect()
}

fn scores_in(s: Vec<(String, f32, f32)>) -> Vec<TaskScore> {
    s.into_iter()
        .map(|(task, accuracy, loss)| TaskScore {
            task,
            accuracy,
            loss,
        })
        .collect()
}

impl From<&RoundMetrics> for StoredRound {
    fn from(m: &RoundMetrics) -> Self {
        StoredRound {
            round: m.round,
            version: m.version,
            central: scores_out(&m.central),
            train_loss: scores_out(&m.train_loss),
            counts: [m.sampled, m.accepted, m.dropped, m.late, m.refused].map(|c| c as u64),
            bytes_up: m.bytes_up,
            bytes_down: m.bytes_down,
            wall_ms: m.wall_ms,
            eval_ms: m.eval_ms,
            privacy: m.privacy.as_ref().map(|p| {
                (
                    [p.epsilon, p.delta, p.q, p.noise_multiplier, p.clip],
                    p.rounds,
                    p.under_clip,
                )
            }),
        }
    }
}

impl StoredRound {
    fn into_metrics(self) -> RoundMetrics {
        let [sampled, accepted, dropped, late, refused] = self
            .counts
            .map(|c| usize::try_from(c).unwrap_or(usize::MAX));
        RoundMetrics {
            round: self.round,
            version: self.version,
            central: scores_in(self.central),
            train_loss: scores_in(self.train_loss),
            sampled,
            accepted,
            dropped,
            late,
            refused,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            wall_ms: self.wall_ms,
            eval_ms: self.eval_ms,
            privacy: self.privacy.map(|(f, rounds, under_clip)| PrivacyReport {
                epsilon: f[0],
                delta: f[1],
                q: f[2],
                noise_multiplier: f[3],
                clip: f[4],
                rounds,
                under_clip,
            }),
        }
    }
}

/// The simulator's part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SimState {
    /// [`experiment_hash`] of the run.
    pub experiment: String,
    /// Rounds completed.
    pub round: u64,
    pub clock_ms: u64,
    /// By client index, ascending.
    pub clients: Vec<ClientState>,
    rows: Vec<StoredRound>,
}

impl SimState {
    pub fn new(
        experiment: String,
        round: u64,
        clock_ms: u64,
        clients: Vec<ClientState>,
        rows: &[RoundMetrics],
    ) -> Self {
        SimState {
            experiment,
            round,
            clock_ms,
            clients,
            rows: rows.iter().map(StoredRound::from).collect(),
        }
    }

    /// The metrics rows, checked to be rounds `1..=round` in order.
    pub fn rows(&self, path: &Path) -> Result<Vec<RoundMetrics>, SimError> {
        if self.rows.len() as u64 != self.round {
            return Err(bad(
                path,
                format!("{} metrics rows for {} rounds", self.rows.len(), self.round),
            ));
        }
        self.rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if r.round != i as u64 + 1 {
                    return Err(bad(
                        path,
                        format!("metrics row {} is of round {}", i + 1, r.round),
                    ));
                }
                Ok(r.clone().into_metrics())
            })
            .collect()
    }
}

/// The file's bytes: magic, SHA-256 of the payload, bincode payload.
pub(crate) fn encode(state: &SimState) -> Result<Vec<u8>, SimError> {
    let payload = bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| SimError::Config(format!("encoding the simulator checkpoint: {e}")))?;
    let mut out = Vec::with_capacity(MAGIC.len() + HASH_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&sha256(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads [`encode`]'s bytes (`path` names them in errors). The checksum is
/// checked before anything is decoded; bincode's allocations are bounded
/// by a limit a little above the file's size.
pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<SimState, SimError> {
    let head = MAGIC.len() + HASH_LEN;
    if bytes.len() < head || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad(
            path,
            "not a simulator checkpoint (bad magic or truncated)",
        ));
    }
    let payload = &bytes[head..];
    if sha256(payload)[..] != bytes[MAGIC.len()..head] {
        return Err(bad(path, "damaged: its SHA-256 does not match"));
    }
    fn with_limit<const N: usize>(payload: &[u8]) -> Result<(SimState, usize), String> {
        bincode::serde::decode_from_slice(payload, bincode::config::standard().with_limit::<N>())
            .map_err(|e| e.to_string())
    }
    // serde's sequences preallocate at most 1 MiB whatever length a file
    // claims, so memory follows the bytes actually there; the limit bounds
    // the total on top. Past 256 MiB the file's own bound (`size_bound`,
    // checked before it was read) is the only one.
    let decoded = if payload.len() <= 16 << 20 {
        with_limit::<{ 64 << 20 }>(payload)
    } else if payload.len() <= 256 << 20 {
        with_limit::<{ 1 << 30 }>(payload)
    } else {
        with_limit::<{ usize::MAX >> 1 }>(payload)
    };
    let (state, used) = decoded.map_err(|e| bad(path, format!("undecodable: {e}")))?;
    if used != payload.len() {
        return Err(bad(path, "trailing bytes after the state"));
    }
    Ok(state)
}

/// An upper bound on the file of a run of `cfg` whose model has `params`
/// parameters: every client with f32 local heads and 8-bit residuals of
/// the whole model, every round's row with every task, and slack.
pub(crate) fn size_bound(cfg: &ExperimentConfig, params: u64) -> u64 {
    let per_client = params.saturating_mul(6).saturating_add(64 << 10);
    let per_row = 64u64
        .saturating_mul(cfg.tasks.len() as u64)
        .saturating_add(1 << 10);
    (cfg.clients.count as u64)
        .saturating_mul(per_client)
        .saturating_add(cfg.rounds.saturating_mul(per_row))
        .saturating_add(1 << 20)
}

/// Reads the simulator's file of one checkpoint, bounded by `limit` bytes.
pub(crate) fn read_sim(path: &Path, limit: u64) -> Result<SimState, SimError> {
    let bytes = read_bounded(path, limit).map_err(|e| bad(path, e.to_string()))?;
    decode(&bytes, path)
}

/// Writes one checkpoint into `dir`: the simulator's file (temporary file,
/// fsync, rename), then the engine's folder; then drops all but the
/// [`KEEP`] newest. Returns the engine's folder.
pub(crate) fn write(dir: &Path, engine: &Checkpoint, sim: &SimState) -> Result<PathBuf, SimError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = sim_file(dir, sim.round);
    let tmp = path.with_extension("tmp");
    let bytes = encode(sim)?;
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    let folder = engine.write(dir)?;
    prune(dir)?;
    Ok(folder)
}

/// Removes the checkpoints older than the [`KEEP`] newest (engine folders
/// and simulator files).
fn prune(dir: &Path) -> Result<(), SimError> {
    let found = engine_ckpt::all(dir)?;
    let Some(oldest_kept) = found.iter().take(KEEP).map(|(r, _)| *r).min() else {
        return Ok(());
    };
    for (_, path) in found.iter().skip(KEEP) {
        fs::remove_dir_all(path).map_err(io(path))?;
    }
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let round = entry.file_name().to_str().and_then(|n| {
            n.strip_prefix("sim-")?
                .strip_suffix(".bin")?
                .parse::<u64>()
                .ok()
        });
        if round.is_some_and(|r| r < oldest_kept) {
            fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}
