//! Everything that crosses Cohort's wire.
//!
//! This crate knows nothing of dfdx or of any runtime: it works on **named
//! groups of flat `f32`** ([`ParamGroups`]) described by a [`Layout`], and on
//! bytes. See `ARCHITECTURE.md` at the repository root.

pub mod codec;
pub mod error;
pub mod framing;
pub mod layout;
pub mod messages;
pub mod model_delta;
#[cfg(feature = "libp2p")]
pub mod p2p;
pub mod seal;
#[cfg(feature = "transport")]
pub mod transport;

pub use error::ProtocolError;
pub use layout::{
    head_group, task_of_group, Fingerprint, GroupLayout, Layout, ParamGroups, TensorSpec, BACKBONE,
};

/// Version of the wire protocol. Every envelope carries it; a peer speaking
/// another version is refused with [`ProtocolError::VersionMismatch`].
pub const PROTOCOL_VERSION: u16 = 1;
