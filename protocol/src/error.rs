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
    GroupLength {
        group: String,
        expected: u64,
        got: u64,
    },
    #[error("malformed encoding: {0}")]
    Malformed(String),
    #[error("{what} of {got} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        got: u64,
        limit: u64,
    },
    #[error("unsupported codec setting: {0}")]
    UnsupportedCodec(String),
    #[error("value out of range: {0}")]
    NonFinite(String),
    #[error("wrong federation: expected `{expected}`, got `{got}`")]
    WrongFederation { expected: String, got: String },
    #[error("i/o: {0}")]
    Io(String),
    #[error("sealed update was changed in transit (authentication failed)")]
    Tampered,
    #[error("sealed update was sealed to another aggregator key")]
    WrongKey,
    #[error("sealed update presented under another context: {0}")]
    ContextMismatch(String),
    #[error("replayed update: round {round} from `{sender}` was already opened")]
    Replay { round: u64, sender: String },
    #[error("cryptography failed: {0}")]
    Crypto(String),
    #[error("bad key: {0}")]
    BadKey(String),
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
}
