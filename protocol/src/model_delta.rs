//! Model downloads as a delta from the version a node holds, lossless: the
//! XOR of the `f32` bit patterns of the two versions, its bytes regrouped by
//! significance (every value's top byte first, then the second, ...), then
//! deflated. After a round most values keep their sign, exponent and top
//! mantissa bits, so the top byte planes are nearly all zeros and compress
//! away; the node gets the new weights bit for bit.

use std::io::{Read, Write};

use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use flate2::Compression;

use crate::ProtocolError;

/// Encodes `new` as a delta from `old` (same length).
pub fn encode(old: &[f32], new: &[f32]) -> Result<Vec<u8>, ProtocolError> {
    if old.len() != new.len() {
        return Err(ProtocolError::Malformed(format!(
            "model delta: {} values against a base of {}",
            new.len(),
            old.len()
        )));
    }
    let n = old.len();
    let mut planes = vec![0u8; 4 * n];
    for (i, (o, w)) in old.iter().zip(new).enumerate() {
        let x = (o.to_bits() ^ w.to_bits()).to_be_bytes();
        for (p, b) in x.iter().enumerate() {
            planes[p * n + i] = *b;
        }
    }
    let mut enc = DeflateEncoder::new(Vec::with_capacity(n), Compression::fast());
    enc.write_all(&planes)
        .map_err(|e| ProtocolError::Io(format!("model delta: {e}")))?;
    enc.finish()
        .map_err(|e| ProtocolError::Io(format!("model delta: {e}")))
}

/// Applies a delta made by [`encode`] to `old`. The inflated size must be
/// exactly `4 * old.len()` bytes (it is bounded before anything grows past
/// it), and every value must be finite.
pub fn decode(old: &[f32], bytes: &[u8]) -> Result<Vec<f32>, ProtocolError> {
    let n = old.len();
    let want = 4 * n;
    let mut planes = Vec::with_capacity(want);
    DeflateDecoder::new(bytes)
        .take(want as u64 + 1)
        .read_to_end(&mut planes)
        .map_err(|e| ProtocolError::Malformed(format!("model delta: {e}")))?;
    if planes.len() != want {
        return Err(ProtocolError::Malformed(format!(
            "model delta: {} bytes inflated, {want} expected",
            planes.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    for (i, o) in old.iter().enumerate() {
        let x = u32::from_be_bytes([
            planes[i],
            planes[n + i],
            planes[2 * n + i],
            planes[3 * n + i],
        ]);
        let v = f32::from_bits(o.to_bits() ^ x);
        if !v.is_finite() {
            return Err(ProtocolError::NonFinite("model delta".into()));
        }
        out.push(v);
    }
    Ok(out)
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
