//! Wire messages. This file holds the core types that the other crates build
//! on (training settings, the round plan, the update); the envelope and the
//! rest of the conversation are added beside them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::CodecConfig;
use crate::{Fingerprint, Layout, ParamGroups, ProtocolError, PROTOCOL_VERSION};

/// A node's identity as the aggregator knows it: the libp2p peer id in
/// deployment, `sim-<n>` in the simulator.
pub type NodeId = String;

/// Local optimizer a node uses for its training. In human-readable formats
/// (TOML, JSON) it is tagged by `kind`; on the wire (bincode, which cannot
/// decode internally tagged enums) it is a plain enum.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Optimizer {
    #[default]
    Sgd,
    Momentum {
        momentum: f32,
        nesterov: bool,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum OptimizerTagged {
    Sgd,
    Momentum { momentum: f32, nesterov: bool },
    Adam { beta1: f32, beta2: f32, eps: f32 },
}

#[derive(Serialize, Deserialize)]
enum OptimizerPlain {
    Sgd,
    Momentum { momentum: f32, nesterov: bool },
    Adam { beta1: f32, beta2: f32, eps: f32 },
}

macro_rules! optimizer_convert {
    ($t:ident) => {
        impl From<Optimizer> for $t {
            fn from(o: Optimizer) -> Self {
                match o {
                    Optimizer::Sgd => $t::Sgd,
                    Optimizer::Momentum { momentum, nesterov } => {
                        $t::Momentum { momentum, nesterov }
                    }
                    Optimizer::Adam { beta1, beta2, eps } => $t::Adam { beta1, beta2, eps },
                }
            }
        }
        impl From<$t> for Optimizer {
            fn from(o: $t) -> Self {
                match o {
                    $t::Sgd => Optimizer::Sgd,
                    $t::Momentum { momentum, nesterov } => {
                        Optimizer::Momentum { momentum, nesterov }
                    }
                    $t::Adam { beta1, beta2, eps } => Optimizer::Adam { beta1, beta2, eps },
                }
            }
        }
    };
}
optimizer_convert!(OptimizerTagged);
optimizer_convert!(OptimizerPlain);

impl Serialize for Optimizer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            OptimizerTagged::from(*self).serialize(s)
        } else {
            OptimizerPlain::from(*self).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Optimizer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            OptimizerTagged::deserialize(d).map(Into::into)
        } else {
            OptimizerPlain::deserialize(d).map(Into::into)
        }
    }
}

/// How a node trains locally in one round. Sent in every [`RoundPlan`], and
/// used as-is by `cohort-tasks` for centralized training too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub epochs: u32,
    pub batch_size: u32,
    pub lr: f32,
    pub optimizer: Optimizer,
    /// L2 weight decay added to the gradient (`wd * w`).
    pub weight_decay: f32,
    /// FedProx: adds `mu/2 * ||w - w_start||^2` to the loss. 0 disables it.
    pub prox_mu: f32,
    /// Groups that must not change (bit-identical after training).
    pub frozen: Vec<String>,
    /// Seed of the batch order (and of anything else random in training).
    pub seed: u64,
    /// Stop after this many optimizer steps, whatever `epochs` says.
    pub max_steps: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 32,
            lr: 0.05,
            optimizer: Optimizer::Sgd,
            weight_decay: 0.0,
            prox_mu: 0.0,
            frozen: Vec::new(),
            seed: 0,
            max_steps: None,
        }
    }
}

/// What the aggregator asks one node to do in one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub federation: String,
    pub round: u64,
    /// Version of the global weights the node must start from.
    pub base_version: u64,
    /// Groups whose delta the node sends back. A node trains every group it
    /// holds except `train.frozen`; groups it holds that are not listed here
    /// are local (personalized) and never leave the node.
    pub upload: Vec<String>,
    pub train: TrainConfig,
    pub codec: CodecConfig,
    /// Time the node has, from receiving the plan, in milliseconds.
    pub deadline_ms: u64,
    /// Differential privacy with noise at the clients: clip and noise the
    /// delta before encoding (none otherwise).
    pub privacy: Option<ClientNoise>,
}

/// Client-side differential privacy of a round: the node scales its delta
/// so that its L2 norm over all the uploaded groups is at most `clip`,
/// then adds Gaussian noise of std `noise_std` to every value, before
/// encoding (losslessly: no error-feedback residual is kept).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientNoise {
    pub clip: f32,
    pub noise_std: f32,
}

/// Training metrics of one task in one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    pub task: String,
    pub loss: f32,
    pub samples: u64,
    pub steps: u64,
}

/// The clear part of an update: who, which round, which groups, how much
/// data. The encoded deltas travel sealed beside it, and the sealing binds
/// these fields as associated data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    pub federation: String,
    pub round: u64,
    pub base_version: u64,
    pub node: NodeId,
    /// Groups in the sealed payload, in payload order.
    pub groups: Vec<String>,
    /// Examples seen per task (weights of the per-group averages).
    pub metrics: Vec<TaskMetrics>,
    /// Examples the node trained on (weight of the backbone average).
    pub num_examples: u64,
}

/// A node's update as sent: the header and the sealed, encoded deltas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub header: UpdateHeader,
    #[serde(with = "bulk")]
    pub sealed: Vec<u8>,
}

/// Packs the encoded groups of an update (the plaintext that gets sealed):
/// for each group, its byte length as `u64` LE, then its bytes.
pub fn pack_groups<B: AsRef<[u8]>>(encoded: &[B]) -> Vec<u8> {
    let mut out = Vec::with_capacity(packed_len(encoded));
    pack_groups_into(encoded, &mut out);
    out
}

/// Bytes [`pack_groups`] makes of `encoded`.
pub fn packed_len<B: AsRef<[u8]>>(encoded: &[B]) -> usize {
    encoded.iter().map(|b| 8 + b.as_ref().len()).sum()
}

/// [`pack_groups`], appended to `out` (e.g. after the room that
/// `seal::seal_in_place` expects).
pub fn pack_groups_into<B: AsRef<[u8]>>(encoded: &[B], out: &mut Vec<u8>) {
    out.reserve(packed_len(encoded));
    for b in encoded {
        out.extend_from_slice(&(b.as_ref().len() as u64).to_le_bytes());
        out.extend_from_slice(b.as_ref());
    }
}

/// Splits a packed payload into exactly `count` encoded groups, borrowing
/// from `bytes`. Any length that overruns the payload, a missing group or a
/// trailing byte is an error.
pub fn unpack_groups(bytes: &[u8], count: usize) -> Result<Vec<&[u8]>, crate::ProtocolError> {
    let malformed = |m: &str| crate::ProtocolError::Malformed(format!("packed groups: {m}"));
    // Each group takes at least its 8-byte length: bound `count` first.
    if count > bytes.len() / 8 {
        return Err(malformed("more groups announced than bytes allow"));
    }
    let mut out = Vec::with_capacity(count);
    let mut rest = bytes;
    for _ in 0..count {
        let (len, tail) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| malformed("truncated length"))?;
        let len = u64::from_le_bytes(*len);
        if len > tail.len() as u64 {
            return Err(malformed("group overruns the payload"));
        }
        let (group, tail) = tail.split_at(len as usize);
        out.push(group);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(out)
}

/// Serde helpers for bulk bytes: serialized as bytes, deserialized through
/// `deserialize_bytes`, which bincode's borrowing decoder answers with a
/// slice of the input, already bounded by its length (its owned path would
/// allocate whatever length the peer claims before reading).
pub mod bulk {
    use std::fmt;

    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_bytes(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        // Human-readable formats (JSON) write bytes as a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// A task a node holds and its number of training examples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSamples {
    pub task: String,
    pub samples: u64,
}

/// A node introduces itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node: NodeId,
    pub tasks: Vec<TaskSamples>,
    /// Fingerprint of the node's sub-layout (backbone and its heads).
    pub layout: Fingerprint,
    pub version: u16,
}

/// Evaluation metrics of one task on a node's local test data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub task: String,
    pub accuracy: f32,
    pub loss: f32,
    pub samples: u64,
}

/// Federated evaluation: a node reports metrics of the model of `version`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub node: NodeId,
    pub round: u64,
    pub version: u64,
    pub metrics: Vec<EvalMetrics>,
}

/// The weights (or a delta) of one group, as raw little-endian `f32`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBlob {
    pub name: String,
    #[serde(with = "bulk")]
    pub data: Vec<u8>,
}

/// Model weights sent to a node: full weights of some groups, or, when
/// `base_version` is set, each group as a lossless [`crate::model_delta`]
/// from that version (which the node said it holds). No groups with
/// `base_version == Some(version)`: the node is up to date.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPayload {
    pub version: u64,
    pub base_version: Option<u64>,
    pub groups: Vec<GroupBlob>,
}

impl ModelPayload {
    /// Packs every group of `params` as raw little-endian `f32`.
    pub fn from_groups(version: u64, base_version: Option<u64>, params: &ParamGroups) -> Self {
        let groups = params
            .iter()
            .map(|(name, values)| {
                let mut data = Vec::with_capacity(values.len() * 4);
                for v in values {
                    data.extend_from_slice(&v.to_le_bytes());
                }
                GroupBlob {
                    name: name.to_string(),
                    data,
                }
            })
            .collect();
        ModelPayload {
            version,
            base_version,
            groups,
        }
    }

    /// The weights this payload carries, given the version the node holds
    /// (`held`): full groups as [`ModelPayload::to_groups`]; delta groups
    /// applied to the held ones; nothing changed = the held groups.
    pub fn apply(
        &self,
        layout: &Layout,
        held: Option<(u64, &ParamGroups)>,
    ) -> Result<ParamGroups, ProtocolError> {
        let Some(base) = self.base_version else {
            return self.to_groups(layout);
        };
        let old = match held {
            Some((v, w)) if v == base => w,
            _ => {
                return Err(ProtocolError::Malformed(format!(
                    "model payload: a delta from version {base}, which is not held"
                )))
            }
        };
        if self.groups.is_empty() {
            return Ok(old.clone());
        }
        let mut out = ParamGroups::new();
        for blob in &self.groups {
            if layout.group(&blob.name).is_none() {
                return Err(ProtocolError::UnknownGroup(blob.name.clone()));
            }
            let prev = old.get(&blob.name).ok_or_else(|| {
                ProtocolError::Malformed(format!("model payload: no base for `{}`", blob.name))
            })?;
            if out.contains(&blob.name) {
                return Err(ProtocolError::Malformed(format!(
                    "model payload: group `{}` twice",
                    blob.name
                )));
            }
            out.insert(
                blob.name.clone(),
                crate::model_delta::decode(prev, &blob.data)?,
            );
        }
        Ok(out)
    }

    /// Unpacks the groups, each checked against `layout` (known name, exact
    /// length, no duplicate, finite values).
    pub fn to_groups(&self, layout: &Layout) -> Result<ParamGroups, ProtocolError> {
        let mut out = ParamGroups::new();
        for blob in &self.groups {
            let g = layout
                .group(&blob.name)
                .ok_or_else(|| ProtocolError::UnknownGroup(blob.name.clone()))?;
            if blob.data.len() as u64 != g.len().saturating_mul(4) {
                return Err(ProtocolError::GroupLength {
                    group: blob.name.clone(),
                    expected: g.len(),
                    got: blob.data.len() as u64 / 4,
                });
            }
            if out.contains(&blob.name) {
                return Err(ProtocolError::Malformed(format!(
                    "model payload: group `{}` twice",
                    blob.name
                )));
            }
            let values: Vec<f32> = blob
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(ProtocolError::NonFinite(format!(
                    "model payload: group `{}`",
                    blob.name
                )));
            }
            out.insert(blob.name.clone(), values);
        }
        Ok(out)
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    NotAllowed,
    UnknownNode,
    VersionMismatch,
    WrongFederation,
    LayoutMismatch,
    WrongRound,
    StaleRound,
    StaleBase,
    LateUpdate,
    Duplicate,
    NotSampled,
    GroupNotAllowed,
    WrongLength,
    NonFinite,
    NormTooLarge,
    BadWeight,
    Replay,
    BadSeal,
    Malformed,
    TooLarge,
    Busy,
    MemoryCap,
    /// The federation has run all its rounds.
    Finished,
}

/// A refusal with a human-readable reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

/// What a node asks the aggregator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Hello(Hello),
    /// The plan of the current round for this node, if any.
    GetPlan,
    /// Weights of `groups`; with `have_version`, the delta from that version
    /// is enough.
    GetModel {
        groups: Vec<String>,
        have_version: Option<u64>,
    },
    Submit(Update),
    Report(EvalReport),
}

/// What the aggregator answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Welcome {
        node: NodeId,
        model_version: u64,
    },
    Plan(RoundPlan),
    /// Nothing to do now: ask again after this many milliseconds.
    Wait {
        retry_ms: u64,
    },
    Model(ModelPayload),
    /// Federated evaluation: evaluate the global model of `version` (with
    /// the node's own local heads) on the local test split and send a
    /// [`Request::Report`].
    Evaluate {
        round: u64,
        version: u64,
    },
    Ack,
    Refused(Refusal),
}

/// Every message on the wire: the protocol version and the federation come
/// first, so that a peer of another version or federation gets a clear error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope<B> {
    pub version: u16,
    pub federation: String,
    pub body: B,
}

impl<B> Envelope<B> {
    /// An envelope of this protocol version.
    pub fn new(federation: impl Into<String>, body: B) -> Self {
        Envelope {
            version: PROTOCOL_VERSION,
            federation: federation.into(),
            body,
        }
    }

    /// Refuses an envelope of another federation.
    pub fn check_federation(&self, expected: &str) -> Result<(), ProtocolError> {
        if self.federation == expected {
            Ok(())
        } else {
            Err(ProtocolError::WrongFederation {
                expected: expected.into(),
                got: self.federation.clone(),
            })
        }
    }
}

/// Size limits of messages, in bytes (frame payloads). libp2p's own codecs
/// stop at 1 MiB / 10 MiB, far too small for models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub max_request: u64,
    pub max_response: u64,
    /// Requests other than `Submit` (hello, plan, model and report
    /// requests): far below `max_request`, so that a peer that has sent
    /// no update yet can make a process hold little.
    pub max_control: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request: 256 << 20,
            max_response: 512 << 20,
            max_control: 64 << 10,
        }
    }
}

fn wire_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes an envelope: the version as `u16` LE, then the rest with bincode.
///
/// Two passes: the first only counts bytes (no payload is copied), the
/// second writes straight into a buffer of exactly that size, so the payload
/// is copied once (no growing buffer, no second buffer for the version).
pub fn encode_envelope<B: Serialize>(env: &Envelope<B>) -> Result<Vec<u8>, ProtocolError> {
    let rest = (&env.federation, &env.body);
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(rest, &mut size, wire_config()).map_err(encode_error)?;
    let version = env.version.to_le_bytes();
    let mut out = Vec::with_capacity(version.len() + size.bytes_written);
    out.extend_from_slice(&version);
    bincode::serde::encode_into_writer(rest, VecWriter(&mut out), wire_config())
        .map_err(encode_error)?;
    Ok(out)
}

fn encode_error(e: bincode::error::EncodeError) -> ProtocolError {
    ProtocolError::Malformed(format!("encode: {e}"))
}

/// Appends bincode's output to a `Vec` (reserved beforehand).
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Decodes with bincode, bounding what bincode may claim before it
/// allocates. Its limit is a type parameter: pick the smallest of a ladder of
/// limits above 16 times the input (in-memory sizes of integers and
/// containers exceed their wire sizes, never by that much for these types).
fn decode_bounded<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, ProtocolError> {
    use bincode::error::DecodeError;
    let need = (bytes.len() as u64).saturating_mul(16).max(1 << 16);
    let exp = 64 - (need - 1).leading_zeros();
    macro_rules! ladder {
        ($($e:literal)*) => {
            match exp {
                $( x if x <= $e => bincode::serde::borrow_decode_from_slice::<T, _>(
                    bytes, wire_config().with_limit::<{ 1usize << $e }>()), )*
                _ => Err(DecodeError::LimitExceeded),
            }
        };
    }
    let (value, used) = ladder!(16 18 20 22 24 26 28 30 32 34 36 38 40).map_err(|e| match e {
        DecodeError::LimitExceeded => ProtocolError::TooLarge {
            what: "claimed length",
            got: u64::MAX,
            limit: 1 << exp,
        },
        e => ProtocolError::Malformed(format!("decode: {e}")),
    })?;
    if used != bytes.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Decodes an envelope of at most `max_len` bytes. The version is checked
/// first (a peer of another version gets [`ProtocolError::VersionMismatch`],
/// not a garbled decode), then the federation when `expected_federation` is
/// given.
pub fn decode_envelope<B: DeserializeOwned>(
    bytes: &[u8],
    max_len: u64,
    expected_federation: Option<&str>,
) -> Result<Envelope<B>, ProtocolError> {
    if bytes.len() as u64 > max_len {
        return Err(ProtocolError::TooLarge {
            what: "message",
            got: bytes.len() as u64,
            limit: max_len,
        });
    }
    let (version, rest) = bytes
        .split_first_chunk::<2>()
        .ok_or_else(|| ProtocolError::Malformed("truncated envelope".into()))?;
    let version = u16::from_le_bytes(*version);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::VersionMismatch {
            expected: PROTOCOL_VERSION,
            got: version,
        });
    }
    let (federation, body): (String, B) = decode_bounded(rest)?;
    let env = Envelope {
        version,
        federation,
        body,
    };
    if let Some(f) = expected_federation {
        env.check_federation(f)?;
    }
    Ok(env)
}

/// [`decode_envelope`] of a request within `limits.max_request`.
pub fn decode_request(
    bytes: &[u8],
    limits: &Limits,
    federation: Option<&str>,
) -> Result<Envelope<Request>, ProtocolError> {
    decode_envelope(bytes, limits.max_request, federation)
}

/// [`decode_envelope`] of a response within `limits.max_response`.
pub fn decode_response(
    bytes: &[u8],
    limits: &Limits,
    federation: Option<&str>,
) -> Result<Envelope<Response>, ProtocolError> {
    decode_envelope(bytes, limits.max_response, federation)
}
