//! Length-prefixed frames: a `u64` little-endian length, then the payload.
//! Readers check the length against their maximum before they allocate, and
//! grow the buffer only as bytes arrive.

use crate::ProtocolError;

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 8;

/// A frame holding `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of the one frame that `bytes` must be exactly.
pub fn unframe(bytes: &[u8], max: u64) -> Result<&[u8], ProtocolError> {
    let (len, rest) = bytes
        .split_first_chunk::<PREFIX_LEN>()
        .ok_or_else(|| ProtocolError::Malformed("frame: truncated length".into()))?;
    let len = u64::from_le_bytes(*len);
    if len > max {
        return Err(ProtocolError::TooLarge {
            what: "frame",
            got: len,
            limit: max,
        });
    }
    if len != rest.len() as u64 {
        return Err(ProtocolError::Malformed(format!(
            "frame: announces {len} bytes, holds {}",
            rest.len()
        )));
    }
    Ok(rest)
}

#[cfg(feature = "libp2p")]
mod io {
    use std::io;

    use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::PREFIX_LEN;
    use crate::ProtocolError;

    fn invalid(e: ProtocolError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// Writes one frame; refuses a payload above `max` (the peer would refuse it).
    pub async fn write_frame<W: AsyncWrite + Unpin>(
        io: &mut W,
        payload: &[u8],
        max: u64,
    ) -> io::Result<()> {
        if payload.len() as u64 > max {
            return Err(invalid(ProtocolError::TooLarge {
                what: "frame",
                got: payload.len() as u64,
                limit: max,
            }));
        }
        io.write_all(&(payload.len() as u64).to_le_bytes()).await?;
        io.write_all(payload).await?;
        io.flush().await
    }

    /// Reads one frame of at most `max` payload bytes.
    pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, max: u64) -> io::Result<Vec<u8>> {
        let mut len = [0u8; PREFIX_LEN];
        io.read_exact(&mut len).await?;
        let len = u64::from_le_bytes(len);
        if len > max {
            return Err(invalid(ProtocolError::TooLarge {
                what: "frame",
                got: len,
                limit: max,
            }));
        }
        // Start small: a peer announcing a large frame and sending little
        // costs only what it sends.
        let mut buf = Vec::with_capacity(len.min(1 << 20) as usize);
        io.take(len).read_to_end(&mut buf).await?;
        if buf.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "frame: stream ended early",
            ));
        }
        Ok(buf)
    }
}

#[cfg(feature = "libp2p")]
pub use io::{read_frame, write_frame};
