//! The one error type of `cohort-protocol`.

use thiserror::Error;

/// Everything that can go wrong in this crate. Decoders never panic on peer
/// input: they return one of these.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("protocol version mismatch: peer speaks {got}, we speak {expected}")]
    VersionMismatch { expected: u16, got: u16 },
    #[error("layout is invalid: {0}")]
    InvalidLayout(String),
    #[error("layout mismatch: {0}")]
    LayoutMismatch(String),
    #[error("unknown parameter group `{0}`")]
    UnknownGroup(String),
    #[error("group `{group}` has {got} values, the layout says {expected}")]
    GroupLength { group: String, expected: u64, got: u64 },
    #[error("malformed encoding: {0}")]
    Malformed(String),
    #[error("{what} of {got} bytes exceeds the limit of {limit} bytes")]
    TooLarge { what: &'static str, got: u64, limit: u64 },
    #[error("unsupported codec setting: {0}")]
    UnsupportedCodec(String),
}
