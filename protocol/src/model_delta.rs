//! Model downloads as a delta from the version a node holds, lossless: the
//! XOR of the `f32` bit patterns of the two versions, its bytes regrouped by
//! significance (every value's top byte first, then the second, ...), each
//! of these four planes deflated on its own or, when deflate gains little,
//! sent as it is. After a round most values keep their sign, exponent and
//! top mantissa bits, so the top planes are nearly all zeros and compress
//! away, while the low mantissa planes are noise that deflate cannot shrink
//! and that would cost every node an inflate; the node gets the new weights
//! bit for bit.
//!
//! Format: for each plane in order, a kind byte ([`RAW`] or [`DEFLATED`])
//! and the `u32` little-endian length of its data; then the four planes'
//! data in order. Every plane holds exactly one byte per value once
//! decoded.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::ProtocolError;

/// A plane sent as it is.
pub const RAW: u8 = 0;
/// A plane deflated (raw deflate, no zlib header).
pub const DEFLATED: u8 = 1;
const PLANES: usize = 4;
const HEADER: usize = PLANES * 5;

fn malformed(reason: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Malformed(format!("model delta: {reason}"))
}

/// Encodes `new` as a delta from `old` (same length).
pub fn encode(old: &[f32], new: &[f32]) -> Result<Vec<u8>, ProtocolError> {
    if old.len() != new.len() {
        return Err(malformed(format!(
            "{} values against a base of {}",
            new.len(),
            old.len()
        )));
    }
    let n = old.len();
    let mut planes = vec![0u8; PLANES * n];
    for (i, (o, w)) in old.iter().zip(new).enumerate() {
        let x = (o.to_bits() ^ w.to_bits()).to_be_bytes();
        for (p, b) in x.iter().enumerate() {
            planes[p * n + i] = *b;
        }
    }
    let mut out = vec![0u8; HEADER];
    for p in 0..PLANES {
        let plane = &planes[p * n..(p + 1) * n];
        let start = out.len();
        // Deflated only when that saves at least a sixteenth of the plane.
        let kind = match deflated(plane, n - n / 16)? {
            Some(d) => {
                out.extend_from_slice(&d);
                DEFLATED
            }
            None => {
                out.extend_from_slice(plane);
                RAW
            }
        };
        let len = u32::try_from(out.len() - start).map_err(|_| malformed("a plane over 4 GiB"))?;
        out[5 * p] = kind;
        out[5 * p + 1..5 * p + 5].copy_from_slice(&len.to_le_bytes());
    }
    Ok(out)
}

/// `plane` deflated, if that takes at most `budget` bytes.
fn deflated(plane: &[u8], budget: usize) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut z = Compress::new(Compression::fast(), false);
    // Written into the spare capacity only: a plane that does not fit
    // stops the stream short of its end.
    let mut out = Vec::with_capacity(budget);
    let status = z
        .compress_vec(plane, &mut out, FlushCompress::Finish)
        .map_err(malformed)?;
    Ok((status == Status::StreamEnd && out.len() <= budget).then_some(out))
}

/// Applies a delta made by [`encode`] to `old`. Every plane must decode to
/// exactly `old.len()` bytes (an inflate is bounded by that before anything
/// grows past it), the planes must fill the delta exactly, and every value
/// must be finite.
pub fn decode(old: &[f32], bytes: &[u8]) -> Result<Vec<f32>, ProtocolError> {
    let n = old.len();
    let (header, mut body) = bytes
        .split_first_chunk::<HEADER>()
        .ok_or_else(|| malformed("truncated header"))?;
    let mut planes = vec![0u8; PLANES * n];
    for (p, entry) in header.chunks_exact(5).enumerate() {
        let len = u32::from_le_bytes([entry[1], entry[2], entry[3], entry[4]]) as usize;
        if len > body.len() {
            return Err(malformed(format!(
                "plane {p} announces {len} bytes, {} left",
                body.len()
            )));
        }
        let (data, rest) = body.split_at(len);
        body = rest;
        let dst = &mut planes[p * n..(p + 1) * n];
        match entry[0] {
            RAW if len == n => dst.copy_from_slice(data),
            RAW => {
                return Err(malformed(format!(
                    "raw plane {p} of {len} bytes, {n} expected"
                )))
            }
            DEFLATED => {
                inflate_exact(data, dst).map_err(|e| malformed(format!("plane {p}: {e}")))?
            }
            k => return Err(malformed(format!("plane {p} of unknown kind {k}"))),
        }
    }
    if !body.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the last plane",
            body.len()
        )));
    }
    let (p0, rest) = planes.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    let mut out = Vec::with_capacity(n);
    for (i, o) in old.iter().enumerate() {
        let x = u32::from_be_bytes([p0[i], p1[i], p2[i], p3[i]]);
        let v = f32::from_bits(o.to_bits() ^ x);
        if !v.is_finite() {
            return Err(ProtocolError::NonFinite("model delta".into()));
        }
        out.push(v);
    }
    Ok(out)
}

/// Inflates `data` into `dst`, which it must fill exactly: a stream that
/// ends early, runs past `dst` or leaves input unread is refused.
fn inflate_exact(data: &[u8], dst: &mut [u8]) -> Result<(), String> {
    let mut z = Decompress::new(false);
    let status = z
        .decompress(data, dst, FlushDecompress::Finish)
        .map_err(|e| e.to_string())?;
    let (read, written) = (z.total_in() as usize, z.total_out() as usize);
    match status {
        Status::StreamEnd if written == dst.len() && read == data.len() => Ok(()),
        Status::StreamEnd if written != dst.len() => {
            Err(format!("{written} bytes inflated, {} expected", dst.len()))
        }
        Status::StreamEnd => Err(format!("{} bytes after the stream", data.len() - read)),
        // Output full before the stream ended: longer than the plane.
        _ if written == dst.len() => Err(format!("inflates past {} bytes", dst.len())),
        _ => Err("truncated stream".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_and_smaller_than_raw_for_a_small_step() {
        let old: Vec<f32> = (0..10_000)
            .map(|i| ((i as f32) * 0.37).sin() * 0.1)
            .collect();
        let new: Vec<f32> = old
            .iter()
            .enumerate()
            .map(|(i, w)| w - 1e-3 * ((i as f32) * 1.3).cos() * w.abs().max(1e-3))
            .collect();
        let d = encode(&old, &new).expect("encode");
        let back = decode(&old, &d).expect("decode");
        assert!(back
            .iter()
            .zip(&new)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(
            d.len() < 4 * old.len() * 3 / 4,
            "{} bytes for {}",
            d.len(),
            4 * old.len()
        );
    }

    /// A real step keeps the top planes nearly constant and the lowest
    /// mantissa plane noise: the first are deflated, the last sent raw
    /// (no inflate for the node), and any size round-trips exactly.
    #[test]
    fn noisy_planes_are_raw_and_every_size_round_trips() {
        for n in [0usize, 1, 15, 16, 17, 4096, 10_007] {
            let old: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
            let new: Vec<f32> = old
                .iter()
                .enumerate()
                .map(|(i, w)| w + 1e-4 * ((i as f32) * 1.3).cos())
                .collect();
            let d = encode(&old, &new).expect("encode");
            let back = decode(&old, &d).expect("decode");
            assert!(
                back.iter()
                    .zip(&new)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n = {n}"
            );
            if n >= 4096 {
                assert_eq!(d[0], DEFLATED, "top plane, n = {n}");
                assert_eq!(d[15], RAW, "lowest plane, n = {n}");
            }
        }
    }

    #[test]
    fn a_delta_must_fill_its_planes_exactly() {
        let old = vec![0.5f32; 1000];
        let new: Vec<f32> = (0..1000).map(|i| 0.5 + i as f32 * 1e-6).collect();
        let d = encode(&old, &new).expect("encode");
        let refused = |bytes: &[u8]| decode(&old, bytes).is_err();
        let mut trailing = d.clone();
        trailing.push(0);
        assert!(refused(&trailing), "bytes after the last plane");
        assert!(refused(&d[..d.len() - 1]), "last plane cut short");
        assert!(refused(&d[..HEADER - 1]), "header cut short");
        let mut unknown = d.clone();
        unknown[0] = 7;
        assert!(refused(&unknown), "unknown plane kind");
        // The last plane claims one byte too few: one is left over.
        let mut short = d.clone();
        let at = 5 * 3 + 1;
        let len = u32::from_le_bytes(short[at..at + 4].try_into().expect("4")) - 1;
        short[at..at + 4].copy_from_slice(&len.to_le_bytes());
        assert!(refused(&short), "a plane of the wrong length");
        // A length beyond the delta.
        let mut long = d;
        long[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(refused(&long), "plane longer than the delta");
    }

    #[test]
    fn hostile_deltas_are_typed_errors() {
        let old = vec![0.5f32; 1000];
        assert!(decode(&old, b"not deflate").is_err());
        // Too long once inflated (a delta of a larger model).
        let big = encode(&[0.5; 2000], &[0.25; 2000]).expect("encode");
        assert!(decode(&old, &big).is_err());
        // Too short.
        let small = encode(&[0.5; 10], &[0.25; 10]).expect("encode");
        assert!(decode(&old, &small).is_err());
        // Turns a value into a NaN.
        let nan = encode(&[0.5], &[f32::NAN]).expect("encode");
        assert!(matches!(
            decode(&[0.5], &nan),
            Err(ProtocolError::NonFinite(_))
        ));
        assert!(encode(&[1.0], &[1.0, 2.0]).is_err());
    }
}
