//! The libp2p request-response codec of Cohort: framed envelopes with the
//! size limits of [`Limits`] (libp2p's cbor/json codecs stop at 1 MiB for
//! requests and 10 MiB for responses, too small for models).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::io::{AsyncRead, AsyncWrite};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::StreamProtocol;

use crate::framing::{read_frame_timed, read_into, read_prefix, write_frame_timed};
use crate::messages::{decode_envelope, encode_envelope, Envelope, Limits, Request, Response};
use crate::ProtocolError;

/// Protocol name negotiated on every stream.
pub const PROTOCOL_NAME: &str = "/cohort/1.0.0";

/// The largest `Submit` request accepted right now, shared between the
/// codec (every connection's copy) and whoever knows the round: the
/// aggregator sets it from the open round's plans, and to the control
/// limit while no round is open. Starts at `u64::MAX` (only
/// [`Limits::max_request`] applies).
#[derive(Clone, Debug)]
pub struct SubmitCap(Arc<AtomicU64>);

impl Default for SubmitCap {
    fn default() -> Self {
        SubmitCap(Arc::new(AtomicU64::new(u64::MAX)))
    }
}

impl SubmitCap {
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Index of [`Request::Submit`] in bincode's encoding of [`Request`].
const SUBMIT_VARIANT: u32 = 3;

/// Whether the first bytes of an encoded request envelope announce a
/// [`Request::Submit`]: the version (`u16` LE), the federation (a bincode
/// string), then the variant index. `None` when `head` is too short to
/// tell (a federation name longer than the head: not a request of ours).
pub fn head_is_submit(head: &[u8]) -> Option<bool> {
    let rest = head.get(2..)?;
    let cfg = bincode::config::standard().with_limit::<{ 1 << 16 }>();
    let ((_, variant), _): ((&str, u32), usize) =
        bincode::serde::borrow_decode_from_slice(rest, cfg).ok()?;
    Some(variant == SUBMIT_VARIANT)
}

/// Request-response codec for `Envelope<Request>` / `Envelope<Response>`.
/// It checks sizes and the protocol version; the federation is checked by
/// whoever handles the message (so that it can answer with a refusal).
///
/// Requests other than `Submit` may hold at most `limits.max_control`
/// bytes; a `Submit` at most the [`SubmitCap`] (and `limits.max_request`).
/// A frame is read in chunks that must each arrive within `stall`: the
/// buffer holds what arrived, never what the prefix announced.
#[derive(Clone, Debug, Default)]
pub struct CohortCodec {
    pub limits: Limits,
    pub submit_cap: SubmitCap,
    /// Longest wait for the next chunk of a frame; `None`: no limit (the
    /// request timeout of the behaviour still applies).
    pub stall: Option<Duration>,
}

impl CohortCodec {
    pub fn new(limits: Limits) -> Self {
        CohortCodec {
            limits,
            submit_cap: SubmitCap::default(),
            stall: None,
        }
    }
}

fn too_large(got: u64, limit: u64) -> io::Error {
    invalid(ProtocolError::TooLarge {
        what: "request",
        got,
        limit,
    })
}

fn invalid(e: ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The [`ProtocolError`] inside an I/O error of this codec, if any.
pub fn protocol_error(e: &io::Error) -> Option<&ProtocolError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<ProtocolError>())
}

impl request_response::Codec for CohortCodec {
    type Protocol = StreamProtocol;
    type Request = Envelope<Request>;
    type Response = Envelope<Response>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Self::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let max = self.limits.max_request;
        let control = self.limits.max_control.min(max);
        let len = read_prefix(io, max, self.stall).await?;
        let submit = self.submit_cap.get().min(max);
        if len > control && len > submit {
            // Neither a control request nor a Submit may be this long now:
            // refused before a byte of it is read.
            return Err(too_large(len, control.max(submit)));
        }
        let mut bytes = Vec::new();
        read_into(io, &mut bytes, len.min(control), self.stall).await?;
        if len > control {
            // Only a Submit may be longer than a control request.
            if head_is_submit(&bytes) != Some(true) {
                return Err(too_large(len, control));
            }
            read_into(io, &mut bytes, len - control, self.stall).await?;
        }
        decode_envelope(&bytes, max, None).map_err(invalid)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Self::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_frame_timed(io, self.limits.max_response, self.stall).await?;
        decode_envelope(&bytes, self.limits.max_response, None).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Self::Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode_envelope(&req).map_err(invalid)?;
        write_frame_timed(io, &bytes, self.limits.max_request, self.stall).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Self::Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode_envelope(&res).map_err(invalid)?;
        write_frame_timed(io, &bytes, self.limits.max_response, self.stall).await
    }
}

/// A request-response behaviour speaking [`PROTOCOL_NAME`] with `limits`,
/// answering and sending requests.
pub fn behaviour(
    limits: Limits,
    config: request_response::Config,
) -> request_response::Behaviour<CohortCodec> {
    behaviour_with(CohortCodec::new(limits), ProtocolSupport::Full, config)
}

/// A request-response behaviour with `codec`; `support` is
/// [`ProtocolSupport::Outbound`] for a peer that only asks (a node): it
/// then accepts no inbound stream of the protocol at all.
pub fn behaviour_with(
    codec: CohortCodec,
    support: ProtocolSupport,
    config: request_response::Config,
) -> request_response::Behaviour<CohortCodec> {
    request_response::Behaviour::with_codec(
        codec,
        [(StreamProtocol::new(PROTOCOL_NAME), support)],
        config,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{encode_envelope, Envelope, Request, Update, UpdateHeader};

    #[test]
    fn the_head_of_a_request_tells_a_submit() {
        let submit = Request::Submit(Update {
            header: UpdateHeader {
                federation: "f".into(),
                round: 1,
                base_version: 0,
                node: "n".into(),
                groups: vec!["backbone".into()],
                metrics: Vec::new(),
                num_examples: 1,
            },
            sealed: vec![0; 100],
        });
        let bytes = encode_envelope(&Envelope::new("some federation", submit)).expect("encode");
        assert_eq!(head_is_submit(&bytes[..40]), Some(true));
        for other in [
            Request::GetPlan,
            Request::GetModel {
                groups: vec!["backbone".into()],
                have_version: None,
            },
        ] {
            let bytes = encode_envelope(&Envelope::new("some federation", other)).expect("encode");
            assert_eq!(head_is_submit(&bytes), Some(false));
        }
        assert_eq!(head_is_submit(&[1, 0, 200]), None);
    }
}
