//! The update codec: a group's `f32` delta to bytes and back.
//!
//! PLACEHOLDER: the signatures here are the contract; the body is a raw
//! 32-bit encoding until the quantizing codec lands.

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// How values are rounded to the quantization grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    Nearest,
    /// Unbiased: rounds up with probability equal to the fractional part.
    Stochastic,
}

/// Top-k sparsification: keep only the largest magnitudes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopK {
    Fraction(f32),
    Count(u64),
}

/// Settings of the codec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CodecConfig {
    /// 32 (raw), 16, 8, 4, 2 or 1 (sign with a scale).
    pub bits: u8,
    pub rounding: Rounding,
    /// Values per scale.
    pub chunk: u32,
    pub top_k: Option<TopK>,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig { bits: 8, rounding: Rounding::Stochastic, chunk: 256, top_k: None }
    }
}

/// Encodes `delta`. `seed` drives stochastic rounding, so encoding is
/// deterministic.
pub fn encode(delta: &[f32], _cfg: &CodecConfig, _seed: u64) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::with_capacity(8 + delta.len() * 4);
    out.extend_from_slice(&(delta.len() as u64).to_le_bytes());
    for v in delta {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Number of values an encoding holds (read from its header).
pub fn decoded_len(bytes: &[u8]) -> Result<u64, ProtocolError> {
    let head: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ProtocolError::Malformed("truncated header".into()))?;
    Ok(u64::from_le_bytes(head))
}

/// Adds `weight * decode(bytes)` into `acc`, without a decoded copy. The
/// encoding must hold exactly `acc.len()` values.
pub fn decode_accumulate(bytes: &[u8], weight: f32, acc: &mut [f32]) -> Result<(), ProtocolError> {
    let n = decoded_len(bytes)?;
    if n != acc.len() as u64 || bytes.len() as u64 != 8 + 4 * n {
        return Err(ProtocolError::Malformed("length mismatch".into()));
    }
    for (a, c) in acc.iter_mut().zip(bytes[8..].chunks_exact(4)) {
        *a += weight * f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

/// Decodes into a new vector of `expected_len` values.
pub fn decode(bytes: &[u8], expected_len: usize) -> Result<Vec<f32>, ProtocolError> {
    let mut out = vec![0.0; expected_len];
    decode_accumulate(bytes, 1.0, &mut out)?;
    Ok(out)
}

/// Error feedback: what encoding lost last time is added to the next delta.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorFeedback {
    pub residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Encodes `delta + residual` and keeps what the encoding lost.
    pub fn encode(&mut self, delta: &[f32], cfg: &CodecConfig, seed: u64) -> Result<Vec<u8>, ProtocolError> {
        if self.residual.len() != delta.len() {
            self.residual = vec![0.0; delta.len()];
        }
        let corrected: Vec<f32> = delta.iter().zip(&self.residual).map(|(d, r)| d + r).collect();
        let bytes = encode(&corrected, cfg, seed)?;
        let decoded = decode(&bytes, corrected.len())?;
        for ((r, c), d) in self.residual.iter_mut().zip(&corrected).zip(&decoded) {
            *r = c - d;
        }
        Ok(bytes)
    }
}
