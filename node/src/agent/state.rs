//! The node's persisted state (local heads and error-feedback residuals)
//! in two slot files, `state.bin` and `state.1.bin`, rewritten in turn in
//! place: each slot holds a sequence number and the SHA-256 of its state,
//! so a write cut short by a crash leaves the other slot, one save older,
//! to load. A save is one write and one `fdatasync`; the rename scheme
//! before it (new file, fsync, rename, folder fsync) cost the federation
//! several percent of its CPU, most of it creating an inode every round.
//! Read with a size bound and checked against the model; private (0600).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{NodeError, NodeState};
use cohort_protocol::Layout;
use tracing::warn;

/// Largest state file read: local heads and residuals of a model far larger
/// than any built-in one.
pub const MAX_STATE_BYTES: u64 = 1 << 32;

const MAGIC: &[u8; 8] = b"COHSTAT2";
/// Magic, sequence number, payload length, SHA-256 of the payload.
const HEADER: usize = 8 + 8 + 8 + 32;

fn state_err(path: &Path, reason: impl Into<String>) -> NodeError {
    NodeError::State {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Where the state lives and which slot the next save overwrites.
#[derive(Debug, Clone)]
pub struct StateFile {
    slots: [PathBuf; 2],
    /// Sequence number of the newest state on disk (0: none, or a file of
    /// the format before slots).
    seq: u64,
    /// The slot that holds it (1 when there is none: the first save goes
    /// to `state.bin`).
    newest: usize,
}

impl StateFile {
    /// The slots of the state at `path` (`state.bin` → also `state.1.bin`).
    pub fn new(path: &Path) -> Self {
        StateFile {
            slots: [path.to_path_buf(), path.with_extension("1.bin")],
            seq: 0,
            newest: 1,
        }
    }

    /// The slot file and sequence number of the next save: never the slot
    /// that holds the newest state.
    pub fn next(&self) -> (PathBuf, u64) {
        (self.slots[1 - self.newest].clone(), self.seq + 1)
    }

    /// Records that the save [`StateFile::next`] named is on disk.
    pub fn saved(&mut self, seq: u64) {
        self.seq = seq;
        self.newest = 1 - self.newest;
    }

    /// Encodes and writes `state` into the next slot.
    pub fn save(&mut self, state: &NodeState) -> Result<(), NodeError> {
        let (path, seq) = self.next();
        write_slot(&path, seq, &encode_state(state)?)?;
        self.saved(seq);
        Ok(())
    }

    /// Loads the newest good slot; none yet is the empty state. A slot that
    /// fails its checksum is passed over with a warning when the other is
    /// good (a save cut short); when none is good, or the state does not
    /// fit `layout`, it is an error (the operator decides, nothing is
    /// silently dropped).
    pub fn load(path: &Path, layout: &Layout) -> Result<(Self, NodeState), NodeError> {
        let mut file = Self::new(path);
        // A temporary file of the format before slots, left by a crash.
        let _ = std::fs::remove_file(path.with_extension("tmp"));
        let mut best: Option<(usize, u64, NodeState)> = None;
        let mut damaged = Vec::new();
        for (i, slot) in file.slots.iter().enumerate() {
            match read_slot(slot, i == 0) {
                Ok(None) => {}
                Ok(Some((seq, state))) => {
                    if best.as_ref().is_none_or(|(_, b, _)| seq > *b) {
                        best = Some((i, seq, state));
                    }
                }
                Err(e) => damaged.push(e),
            }
        }
        let Some((newest, seq, state)) = best else {
            return match damaged.into_iter().next() {
                Some(e) => Err(e),
                None => Ok((file, NodeState::default())),
            };
        };
        for e in damaged {
            match e {
                NodeError::State { path, reason } => warn!(
                    path = %path.display(),
                    reason,
                    "a state slot is damaged (a save cut short?); the other slot, one save older, is used"
                ),
                e => warn!(%e, "a state slot cannot be read; the other slot is used"),
            }
        }
        check_fits(path, &state, layout)?;
        (file.seq, file.newest) = (seq, newest);
        Ok((file, state))
    }
}

/// Loads the node's persisted state ([`StateFile::load`]).
pub fn load_state(path: &Path, layout: &Layout) -> Result<NodeState, NodeError> {
    StateFile::load(path, layout).map(|(_, s)| s)
}

fn check_fits(path: &Path, state: &NodeState, layout: &Layout) -> Result<(), NodeError> {
    for (name, values) in state.local.iter() {
        match layout.group(name) {
            Some(g) if g.len() == values.len() as u64 => {}
            _ => {
                return Err(state_err(
                    path,
                    format!("group `{name}` does not fit this node's model"),
                ))
            }
        }
    }
    for (name, r) in &state.residuals {
        match layout.group(name) {
            Some(g) if g.len() == r.residual.len() as u64 => {}
            _ => {
                return Err(state_err(
                    path,
                    format!("the residual of `{name}` does not fit this node's model"),
                ))
            }
        }
    }
    Ok(())
}

/// One slot: its sequence number and state, `None` when the file does not
/// exist. `legacy`: a file without the slot header is read as the format
/// before slots (sequence 0).
fn read_slot(path: &Path, legacy: bool) -> Result<Option<(u64, NodeState)>, NodeError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(NodeError::io(path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES + HEADER as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(NodeError::io(path))?;
    if bytes.len() as u64 > MAX_STATE_BYTES + HEADER as u64 {
        return Err(state_err(path, "larger than any state file"));
    }
    let (seq, payload) = match bytes.split_first_chunk::<HEADER>() {
        Some((h, rest)) if h.starts_with(MAGIC) => {
            let word = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
            let (seq, len) = (word(8), word(16));
            if len != rest.len() as u64 {
                return Err(state_err(
                    path,
                    format!(
                        "not a node state file (cut short: {} of {len} bytes)",
                        rest.len()
                    ),
                ));
            }
            if ring::digest::digest(&ring::digest::SHA256, rest).as_ref() != &h[24..] {
                return Err(state_err(path, "not a node state file (checksum mismatch)"));
            }
            (seq, rest)
        }
        _ if legacy => (0, &bytes[..]),
        _ => return Err(state_err(path, "not a node state file (no slot header)")),
    };
    let (state, _): (NodeState, usize) = bincode::serde::decode_from_slice(
        payload,
        bincode::config::standard().with_limit::<{ MAX_STATE_BYTES as usize }>(),
    )
    .map_err(|e| state_err(path, format!("not a node state file ({e})")))?;
    Ok(Some((seq, state)))
}

/// The bytes of a state ([`write_slot`] adds the slot header).
pub fn encode_state(state: &NodeState) -> Result<Vec<u8>, NodeError> {
    bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| NodeError::Internal(format!("encoding the node state: {e}")))
}

/// Writes `payload` ([`encode_state`]) as state number `seq` into the slot
/// file at `path`, in place, and `fdatasync`s it; the file is created with
/// mode 0600 (local heads are private), and its folder fsynced then.
pub fn write_slot(path: &Path, seq: u64, payload: &[u8]) -> Result<(), NodeError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let created = !path.exists();
    let mut f = opts.open(path).map_err(NodeError::io(path))?;
    let meta = f.metadata().map_err(NodeError::io(path))?;
    #[cfg(unix)]
    {
        // A file left by an older version may have other bits.
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o777 != 0o600 {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(NodeError::io(path))?;
        }
    }
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..].copy_from_slice(ring::digest::digest(&ring::digest::SHA256, payload).as_ref());
    let total = (HEADER + payload.len()) as u64;
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.write_all(&header))
        .and_then(|()| f.write_all(payload))
        .and_then(|()| {
            if meta.len() == total {
                Ok(())
            } else {
                f.set_len(total)
            }
        })
        .and_then(|()| f.sync_data())
        .map_err(NodeError::io(path))?;
    if created {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n: u64) -> Layout {
        Layout {
            groups: vec![cohort_protocol::layout::GroupLayout {
                name: "head/x".into(),
                tensors: vec![cohort_protocol::layout::TensorSpec {
                    name: "head/x.weight".into(),
                    shape: vec![n],
                    offset: 0,
                }],
            }],
        }
    }

    fn state(v: &[f32]) -> NodeState {
        let mut s = NodeState::default();
        s.local.insert("head/x", v.to_vec());
        s
    }

    /// Both slots are 0600, also over a world-readable file an older
    /// version left, and a leftover temporary file is removed at load.
    #[cfg(unix)]
    #[test]
    fn state_slots_are_private_and_alternate() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.bin");
        std::fs::write(&path, b"old").expect("old");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(path.with_extension("tmp"), b"stale").expect("stale tmp");
        let mut file = StateFile::new(&path);
        file.save(&state(&[1.0, 2.0])).expect("save 1");
        file.save(&state(&[3.0, 4.0])).expect("save 2");
        for slot in [&path, &path.with_extension("1.bin")] {
            let mode = std::fs::metadata(slot).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}: mode {mode:o}", slot.display());
        }
        let (mut file, back) = StateFile::load(&path, &layout(2)).expect("load");
        assert_eq!(back.local, state(&[3.0, 4.0]).local, "the newest save");
        assert!(!path.with_extension("tmp").exists());
        // The third save overwrites the older slot, and a shorter state
        // leaves no tail of the longer one.
        file.save(&state(&[5.0, 6.0])).expect("save 3");
        let (_, back) = StateFile::load(&path, &layout(2)).expect("load");
        assert_eq!(back.local, state(&[5.0, 6.0]).local);
    }

    /// A save cut short (the newest slot damaged) falls back to the other
    /// slot, one save older; the next save overwrites the damaged one.
    #[test]
    fn a_torn_newest_slot_falls_back_to_the_older_one() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.bin");
        let mut file = StateFile::new(&path);
        file.save(&state(&[1.0, 2.0])).expect("save 1");
        file.save(&state(&[3.0, 4.0])).expect("save 2");
        let newest = path.with_extension("1.bin");
        let bytes = std::fs::read(&newest).expect("read");
        std::fs::write(&newest, &bytes[..bytes.len() - 3]).expect("cut");
        let (file, back) = StateFile::load(&path, &layout(2)).expect("load");
        assert_eq!(back.local, state(&[1.0, 2.0]).local);
        assert_eq!(file.next().0, newest, "the damaged slot is written next");
        // A flipped bit is caught by the checksum, not decoded.
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&newest, &flipped).expect("flip");
        let (_, back) = StateFile::load(&path, &layout(2)).expect("load");
        assert_eq!(back.local, state(&[1.0, 2.0]).local);
    }

    /// A file of the format before slots (bare bincode in `state.bin`)
    /// still loads.
    #[test]
    fn a_state_file_without_slots_loads() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.bin");
        std::fs::write(&path, encode_state(&state(&[7.0, 8.0])).expect("encode")).expect("write");
        let (mut file, back) = StateFile::load(&path, &layout(2)).expect("load");
        assert_eq!(back.local, state(&[7.0, 8.0]).local);
        file.save(&state(&[9.0, 9.5])).expect("save");
        assert_eq!(
            load_state(&path, &layout(2)).expect("load").local,
            state(&[9.0, 9.5]).local
        );
    }

    #[test]
    fn damaged_or_foreign_state_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.bin");
        assert!(load_state(&path, &layout(2))
            .expect("none")
            .local
            .is_empty());
        std::fs::write(&path, b"\xff\xff\xff\xff not bincode").expect("write");
        assert!(matches!(
            load_state(&path, &layout(2)),
            Err(NodeError::State { .. })
        ));
        // Both slots damaged: an error, not an empty state.
        let mut file = StateFile::new(&path);
        file.save(&state(&[1.0, 2.0])).expect("save");
        std::fs::write(path.with_extension("1.bin"), b"COHSTAT2 cut").expect("write");
        std::fs::write(&path, b"\xff").expect("write");
        assert!(matches!(
            load_state(&path, &layout(2)),
            Err(NodeError::State { .. })
        ));
        // A good state of another model.
        let _ = std::fs::remove_file(path.with_extension("1.bin"));
        let mut file = StateFile::new(&path);
        file.save(&state(&[1.0, 2.0, 3.0])).expect("save");
        let err = load_state(&path, &layout(2)).expect_err("wrong length");
        assert!(err.to_string().contains("head/x"), "{err}");
    }
}
