//! Everything that crosses Cohort's wire.
//!
//! This crate knows nothing of dfdx or of any runtime: it works on **named
//! groups of flat `f32`** ([`ParamGroups`]) described by a [`Layout`], and on
//! bytes. See `ARCHITECTURE.md` at the repository root.

pub mod codec;
pub mod error;
pub mod framing;
pub mod layout;
#[cfg(feature = "logging")]
pub mod logging;
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
/// 2: model deltas per byte plane, each deflated or raw ([`model_delta`]).
pub const PROTOCOL_VERSION: u16 = 2;

/// SplitMix64 of `a` combined with `b`: derives independent, reproducible
/// seeds (per node, round, group) from one experiment seed. Every crate
/// derives its seeds with this one function.
pub fn mix_seed(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
