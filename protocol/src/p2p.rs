//! The libp2p request-response codec of Cohort: framed envelopes with the
//! size limits of [`Limits`] (libp2p's cbor/json codecs stop at 1 MiB for
//! requests and 10 MiB for responses, too small for models).

use std::io;

use futures::io::{AsyncRead, AsyncWrite};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::StreamProtocol;

use crate::framing::{read_frame, write_frame};
use crate::messages::{decode_envelope, encode_envelope, Envelope, Limits, Request, Response};
use crate::ProtocolError;

/// Protocol name negotiated on every stream.
pub const PROTOCOL_NAME: &str = "/cohort/1.0.0";

/// Request-response codec for `Envelope<Request>` / `Envelope<Response>`.
/// It checks sizes and the protocol version; the federation is checked by
/// whoever handles the message (so that it can answer with a refusal).
#[derive(Clone, Debug, Default)]
pub struct CohortCodec {
    pub limits: Limits,
}

impl CohortCodec {
    pub fn new(limits: Limits) -> Self {
        CohortCodec { limits }
    }
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
        let bytes = read_frame(io, self.limits.max_request).await?;
        decode_envelope(&bytes, self.limits.max_request, None).map_err(invalid)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Self::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_frame(io, self.limits.max_response).await?;
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
        write_frame(io, &bytes, self.limits.max_request).await
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
        write_frame(io, &bytes, self.limits.max_response).await
    }
}

/// A request-response behaviour speaking [`PROTOCOL_NAME`] with `limits`.
pub fn behaviour(
    limits: Limits,
    config: request_response::Config,
) -> request_response::Behaviour<CohortCodec> {
    request_response::Behaviour::with_codec(
        CohortCodec::new(limits),
        [(StreamProtocol::new(PROTOCOL_NAME), ProtocolSupport::Full)],
        config,
    )
}
