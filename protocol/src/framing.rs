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
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::task::Poll;
    use std::time::{Duration, Instant};

    use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::PREFIX_LEN;
    use crate::ProtocolError;

    /// Bytes read (or written) per step; a frame's buffer grows only by
    /// what arrived, never by what the prefix announces.
    pub const CHUNK: usize = 16 << 10;

    fn invalid(e: ProtocolError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// The stall limit of one call: an operation fails with `TimedOut` once
    /// no operation of the call has made progress for `limit` (`None`: no
    /// limit). One timer per call, made only when an operation has to wait:
    /// futures-timer wakes its thread for every timer made and dropped, and
    /// a timer per chunk cost the federation a few percent of its CPU.
    struct Stall {
        limit: Option<Duration>,
        last: Instant,
        timer: Option<futures_timer::Delay>,
    }

    impl Stall {
        fn new(limit: Option<Duration>) -> Self {
            Self {
                limit,
                last: Instant::now(),
                timer: None,
            }
        }

        /// `fut`, or a `TimedOut` error when the call stalls.
        async fn run<T>(
            &mut self,
            what: &'static str,
            fut: impl Future<Output = io::Result<T>>,
        ) -> io::Result<T> {
            let Some(limit) = self.limit else {
                return fut.await;
            };
            let mut fut = std::pin::pin!(fut);
            let (last, timer) = (self.last, &mut self.timer);
            let out = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                loop {
                    let idle = last.elapsed();
                    if idle >= limit {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{what}: no progress in {limit:?}"),
                        )));
                    }
                    match timer.as_mut() {
                        None => *timer = Some(futures_timer::Delay::new(limit - idle)),
                        Some(t) => {
                            if Pin::new(&mut *t).poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            // Set before the last progress: the rest of it.
                            t.reset(limit - idle);
                        }
                    }
                }
            })
            .await;
            if out.is_ok() {
                self.last = Instant::now();
            }
            out
        }
    }

    /// Writes one frame; refuses a payload above `max` (the peer would refuse it).
    pub async fn write_frame<W: AsyncWrite + Unpin>(
        io: &mut W,
        payload: &[u8],
        max: u64,
    ) -> io::Result<()> {
        write_frame_timed(io, payload, max, None).await
    }

    /// [`write_frame`] where every chunk must be taken by the peer within
    /// `stall` (a peer that stops reading cannot hold the stream).
    pub async fn write_frame_timed<W: AsyncWrite + Unpin>(
        io: &mut W,
        payload: &[u8],
        max: u64,
        stall: Option<Duration>,
    ) -> io::Result<()> {
        if payload.len() as u64 > max {
            return Err(invalid(ProtocolError::TooLarge {
                what: "frame",
                got: payload.len() as u64,
                limit: max,
            }));
        }
        let prefix = (payload.len() as u64).to_le_bytes();
        let mut stall = Stall::new(stall);
        stall.run("write", io.write_all(&prefix)).await?;
        for chunk in payload.chunks(CHUNK * 4) {
            stall.run("write", io.write_all(chunk)).await?;
        }
        stall.run("write", io.flush()).await
    }

    /// Reads the length prefix of a frame; at most `max` (checked before
    /// anything else is read).
    pub async fn read_prefix<R: AsyncRead + Unpin>(
        io: &mut R,
        max: u64,
        stall: Option<Duration>,
    ) -> io::Result<u64> {
        let mut len = [0u8; PREFIX_LEN];
        Stall::new(stall)
            .run("frame length", io.read_exact(&mut len))
            .await?;
        let len = u64::from_le_bytes(len);
        if len > max {
            return Err(invalid(ProtocolError::TooLarge {
                what: "frame",
                got: len,
                limit: max,
            }));
        }
        Ok(len)
    }

    /// Appends exactly `n` bytes from `io` to `buf`, reading straight into
    /// it. Each step reserves at most what `buf` already holds (at least
    /// [`CHUNK`]), so its capacity stays within twice what arrived plus one
    /// chunk whatever the prefix announced, and large frames take few
    /// steps; each read must arrive within `stall`. On an error `buf` holds
    /// the bytes that arrived.
    pub async fn read_into<R: AsyncRead + Unpin>(
        io: &mut R,
        buf: &mut Vec<u8>,
        mut n: u64,
        stall: Option<Duration>,
    ) -> io::Result<()> {
        let mut stall = Stall::new(stall);
        while n > 0 {
            let step = n.min(buf.len().max(CHUNK) as u64) as usize;
            let filled = buf.len();
            buf.reserve_exact(step);
            // Zeroes this step only (an `AsyncRead` needs initialized bytes).
            buf.resize(filled + step, 0);
            let got = read_step(io, &mut buf[filled..], &mut stall).await;
            buf.truncate(filled + got.as_ref().map_or_else(|(k, _)| *k, |k| *k));
            got.map_err(|(_, e)| e)?;
            n -= step as u64;
        }
        Ok(())
    }

    /// Fills `dst` from `io`; the error says how many bytes came first.
    async fn read_step<R: AsyncRead + Unpin>(
        io: &mut R,
        dst: &mut [u8],
        stall: &mut Stall,
    ) -> Result<usize, (usize, io::Error)> {
        let mut k = 0;
        while k < dst.len() {
            match stall.run("frame body", io.read(&mut dst[k..])).await {
                Ok(0) => {
                    return Err((
                        k,
                        io::Error::new(io::ErrorKind::UnexpectedEof, "frame: stream ended early"),
                    ))
                }
                Ok(got) => k += got,
                Err(e) => return Err((k, e)),
            }
        }
        Ok(k)
    }

    /// Reads one frame of at most `max` payload bytes.
    pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, max: u64) -> io::Result<Vec<u8>> {
        read_frame_timed(io, max, None).await
    }

    /// [`read_frame`] where every chunk (the prefix included) must arrive
    /// within `stall`.
    pub async fn read_frame_timed<R: AsyncRead + Unpin>(
        io: &mut R,
        max: u64,
        stall: Option<Duration>,
    ) -> io::Result<Vec<u8>> {
        let len = read_prefix(io, max, stall).await?;
        // Nothing reserved ahead: a peer announcing a large frame and
        // sending little costs only what it sends.
        let mut buf = Vec::new();
        read_into(io, &mut buf, len, stall).await?;
        Ok(buf)
    }
}

#[cfg(feature = "libp2p")]
pub use io::{
    read_frame, read_frame_timed, read_into, read_prefix, write_frame, write_frame_timed, CHUNK,
};

#[cfg(all(test, feature = "libp2p"))]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use futures::io::AsyncRead;

    use super::*;

    /// Serves `data`, then nothing more, ever (a peer that went quiet).
    struct Stalling {
        data: Vec<u8>,
        pos: usize,
    }

    impl AsyncRead for Stalling {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            if self.pos == self.data.len() {
                return Poll::Pending;
            }
            let n = buf.len().min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_frame_round_trips_in_chunks() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut r = Stalling {
            data: frame(&payload),
            pos: 0,
        };
        let got = futures::executor::block_on(read_frame_timed(
            &mut r,
            1 << 20,
            Some(Duration::from_secs(5)),
        ))
        .expect("frame");
        assert_eq!(got, payload);
    }

    #[test]
    fn a_prefix_alone_times_out_and_reserves_nothing() {
        let mut data = (256u64 << 20).to_le_bytes().to_vec();
        data.extend_from_slice(b"abc");
        let mut r = Stalling { data, pos: 0 };
        let mut buf = Vec::new();
        let t = Instant::now();
        let e = futures::executor::block_on(async {
            let len = read_prefix(&mut r, 512 << 20, Some(Duration::from_millis(200))).await?;
            read_into(&mut r, &mut buf, len, Some(Duration::from_millis(200))).await
        })
        .expect_err("stalls");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
        // Only the 3 bytes that came, in one chunk: no space reserved for
        // the 256 MiB.
        assert_eq!(buf, b"abc");
        assert!(buf.capacity() <= CHUNK, "capacity {}", buf.capacity());
    }

    #[test]
    fn a_prefix_above_the_limit_is_refused_before_reading_on() {
        let mut r = Stalling {
            data: (256u64 << 20).to_le_bytes().to_vec(),
            pos: 0,
        };
        let e = futures::executor::block_on(read_frame_timed(&mut r, 1 << 20, None))
            .expect_err("too large");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
