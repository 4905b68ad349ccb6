//! The node's persisted state (`state.bin`: local heads and error-feedback
//! residuals): read with a size bound and checked against the model, written
//! atomically, durably and privately.

use std::io::{Read, Write};
use std::path::Path;

use crate::{NodeError, NodeState};
use cohort_protocol::Layout;

/// Largest state file read: local heads and residuals of a model far larger
/// than any built-in one.
pub const MAX_STATE_BYTES: u64 = 1 << 32;

fn state_err(path: &Path, reason: impl Into<String>) -> NodeError {
    NodeError::State {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Loads the node's persisted state; none yet is the empty state. A file
/// that does not fit `layout` is an error (the operator decides, nothing is
/// silently dropped).
pub fn load_state(path: &Path, layout: &Layout) -> Result<NodeState, NodeError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(NodeState::default()),
        Err(e) => return Err(NodeError::io(path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(NodeError::io(path))?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(state_err(path, "larger than any state file"));
    }
    let (state, _): (NodeState, usize) = bincode::serde::decode_from_slice(
        &bytes,
        bincode::config::standard().with_limit::<{ MAX_STATE_BYTES as usize }>(),
    )
    .map_err(|e| state_err(path, format!("not a node state file ({e})")))?;
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
    Ok(state)
}

/// Writes the state atomically and durably ([`write_state`]).
pub fn save_state(path: &Path, state: &NodeState) -> Result<(), NodeError> {
    write_state(path, &encode_state(state)?)
}

/// The bytes of a state file.
pub fn encode_state(state: &NodeState) -> Result<Vec<u8>, NodeError> {
    bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| NodeError::Internal(format!("encoding the node state: {e}")))
}

/// Writes state file bytes ([`encode_state`]) atomically and durably: a
/// temporary file created with mode 0600 (local heads are private),
/// fsynced, renamed over the old one, then the folder fsynced.
pub fn write_state(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(NodeError::io(&tmp))?;
    #[cfg(unix)]
    {
        // A temporary file left by an older version may have other bits.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(NodeError::io(&tmp))?;
    }
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(NodeError::io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(NodeError::io(path))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before: `std::fs::write` (mode from the umask, usually 0644, no
    /// fsync). After: 0600, also over an existing world-readable file.
    #[cfg(unix)]
    #[test]
    fn state_file_is_private_and_complete() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.bin");
        std::fs::write(&path, b"old").expect("old");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(path.with_extension("tmp"), b"stale").expect("stale tmp");
        std::fs::set_permissions(
            path.with_extension("tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .expect("chmod");
        let mut state = NodeState::default();
        state.local.insert("head/x", vec![1.0, 2.0]);
        save_state(&path, &state).expect("save");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        assert!(!path.with_extension("tmp").exists());
        let bytes = std::fs::read(&path).expect("read");
        let (back, _): (NodeState, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decode");
        assert_eq!(back.local, state.local);
    }

    #[test]
    fn damaged_or_foreign_state_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.bin");
        let layout = Layout {
            groups: vec![cohort_protocol::layout::GroupLayout {
                name: "head/x".into(),
                tensors: vec![cohort_protocol::layout::TensorSpec {
                    name: "head/x.weight".into(),
                    shape: vec![2],
                    offset: 0,
                }],
            }],
        };
        assert!(load_state(&path, &layout).expect("none").local.is_empty());
        std::fs::write(&path, b"\xff\xff\xff\xff not bincode").expect("write");
        assert!(matches!(
            load_state(&path, &layout),
            Err(NodeError::State { .. })
        ));
        let mut state = NodeState::default();
        state.local.insert("head/x", vec![1.0, 2.0, 3.0]);
        save_state(&path, &state).expect("save");
        let err = load_state(&path, &layout).expect_err("wrong length");
        assert!(err.to_string().contains("head/x"), "{err}");
    }
}
