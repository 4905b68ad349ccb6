//! The update codec: a group's `f32` delta to bytes and back.
//!
//! An encoding is self-describing, so [`decode_accumulate`] needs only the
//! bytes and the accumulator. Layout (all little-endian):
//!
//! ```text
//! header (40 bytes):
//!   0  magic "CQ"            2  format version (1)   3  bits (32,16,8,4,2,1)
//!   4  flags (bit 0 stochastic, bit 1 sparse, bit 2 bitmap index)
//!   5  3 zero bytes          8  chunk (u32)          12 4 zero bytes
//!   16 n: values decoded (u64)
//!   24 k: values stored (u64; k == n unless sparse)
//!   32 index section length in bytes (u64; 0 unless sparse)
//! index section (sparse only): a bitmap of n bits, or LEB128 varint gaps
//! scales: one f32 per chunk of `chunk` stored values (none for 32 bits)
//! codes: the stored values, each chunk starting on a byte boundary
//! ```
//!
//! Quantization is symmetric per chunk with scale `s = max |x|`: `b` bits
//! (8, 4, 2) give the grid `q * s / L`, `q` in `-L..=L`, `L = 2^(b-1) - 1`,
//! stored as the code `q + L`. 1 bit is the sign with a magnitude per chunk:
//! `mean |x|` for nearest rounding; for stochastic rounding `s = max |x|`
//! and `P(+s) = (1 + x/s) / 2`, which is unbiased. 16 bits store `x / s` as
//! IEEE half (always nearest). 32 bits store the raw `f32`.
//!
//! Stochastic rounding draws one 23-bit uniform per value from a
//! counter-based dither (the top bits of `key ^ i * golden`, with a key per
//! chunk derived from the seed): deterministic for a seed, exactly uniform
//! per value over seeds (so unbiased), and cheap enough to vectorize.
//!
//! Every decoded value is finite by construction: scales read from the wire
//! must be finite, non-negative and at most [`MAX_SCALE`]; a code above the
//! grid (which no encoder writes) is clamped onto it; raw and half values are
//! checked. A decoder that refuses an input leaves the accumulator untouched.

use half::f16;
use pulp::{Simd, WithSimd};
use rayon::prelude::*;
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
    /// Values per scale. A multiple of 8, from 8 to [`MAX_CHUNK`].
    pub chunk: u32,
    pub top_k: Option<TopK>,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            bits: 8,
            rounding: Rounding::Stochastic,
            chunk: 256,
            top_k: None,
        }
    }
}

/// Length of the header of every encoding.
pub const HEADER_LEN: usize = 40;
/// Largest chunk (values per scale).
pub const MAX_CHUNK: u32 = 1 << 24;
/// Largest magnitude the codec accepts, and largest scale a decoder accepts:
/// keeps every product of the grid finite, with room to spare.
pub const MAX_SCALE: f32 = 1.0e37;

const MAGIC: [u8; 2] = *b"CQ";

/// Finite and at most [`MAX_SCALE`] in magnitude (false for NaN).
#[inline(always)]
fn in_range(v: f32) -> bool {
    v.abs() <= MAX_SCALE
}
const FORMAT: u8 = 1;
const FLAG_STOCHASTIC: u8 = 1;
const FLAG_SPARSE: u8 = 2;
const FLAG_BITMAP: u8 = 4;

impl CodecConfig {
    /// Checks the settings; every encoder entry point calls it.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::UnsupportedCodec(m));
        if !matches!(self.bits, 1 | 2 | 4 | 8 | 16 | 32) {
            return bad(format!("bits = {} (use 32, 16, 8, 4, 2 or 1)", self.bits));
        }
        if self.chunk < 8 || self.chunk & 7 != 0 || self.chunk > MAX_CHUNK {
            return bad(format!(
                "chunk = {} (a multiple of 8 from 8 to {MAX_CHUNK})",
                self.chunk
            ));
        }
        match self.top_k {
            Some(TopK::Fraction(f)) if !(f > 0.0 && f <= 1.0) => {
                bad(format!("top-k fraction {f} not in (0, 1]"))
            }
            Some(TopK::Count(0)) => bad("top-k count 0".into()),
            _ => Ok(()),
        }
    }

    /// Number of values kept out of `n` (all of them without top-k).
    pub fn kept(&self, n: usize) -> usize {
        match self.top_k {
            None => n,
            Some(TopK::Count(c)) => usize::try_from(c).unwrap_or(usize::MAX).min(n),
            Some(TopK::Fraction(f)) => {
                ((f64::from(f) * n as f64).ceil() as usize).clamp(n.min(1), n)
            }
        }
    }
}

/// Bytes of the codes of `k` values stored in chunks of `chunk` (each chunk
/// byte-aligned; `chunk` is a multiple of 8, so this is `ceil(k * bits / 8)`).
fn code_bytes(bits: u8, k: u64) -> Option<u64> {
    match bits {
        32 => k.checked_mul(4),
        16 => k.checked_mul(2),
        8 => Some(k),
        4 => Some(k.div_ceil(2)),
        2 => Some(k.div_ceil(4)),
        1 => Some(k.div_ceil(8)),
        _ => None,
    }
}

fn num_scales(bits: u8, k: u64, chunk: u64) -> u64 {
    if bits == 32 {
        0
    } else {
        k.div_ceil(chunk)
    }
}

/// Runs `op` compiled for the widest instruction set the CPU has (AVX2 and
/// FMA where present, through `pulp`'s safe run-time dispatch: the
/// workspace builds for generic x86-64 and denies `unsafe`). What `op`
/// calls on its hot path is `#[inline(always)]`, so that its loops are
/// vectorized for that set. The results are the same bits on every path:
/// the loops are lane-wise or integer, and Rust never fuses a multiply and
/// an add on its own.
#[inline(always)]
fn simd<Op: WithSimd>(op: Op) -> Op::Output {
    pulp::Arch::new().dispatch(op)
}

/// Half-width of the integer grid of `bits` (8 → 127, 4 → 7, 2 → 1).
fn grid(bits: u8) -> u32 {
    (1u32 << (bits - 1)) - 1
}

#[inline(always)]
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Key of the dither of one chunk.
#[inline(always)]
fn chunk_key(seed: u64, chunk_index: u64) -> u32 {
    let z = splitmix64(seed ^ splitmix64(chunk_index));
    (z ^ (z >> 32)) as u32
}

const GOLDEN32: u32 = 0x9e37_79b9;

/// Uniform in `[0, 1)` with 23 bits, for position `i` of a chunk, from
/// `c = i * GOLDEN32`: the top bits of `key ^ c`. For a uniformly random key
/// this is exactly uniform for each position (so stochastic rounding stays
/// unbiased, up to ties of probability 2^-23), and along a chunk `c` is a
/// Weyl sequence, evenly spread. No multiply: the loop vectorizes well.
#[inline(always)]
fn dither(key: u32, c: u32) -> f32 {
    f32::from_bits(0x3f80_0000 | ((key ^ c) >> 9)) - 1.0
}

/// Largest magnitude, with eight lanes so that the loop vectorizes; infinity
/// if any value is NaN, infinite or above [`MAX_SCALE`] (the range check
/// rides along, sparing encode a separate pass).
#[inline(always)]
fn absmax(x: &[f32]) -> f32 {
    let mut m = [0.0f32; 8];
    let mut ok = [true; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            let a = c[j].abs();
            m[j] = if a > m[j] { a } else { m[j] };
            ok[j] &= a <= MAX_SCALE;
        }
    }
    let tail_ok = it.remainder().iter().all(|v| in_range(*v));
    if !(tail_ok && ok.iter().all(|&b| b)) {
        return f32::INFINITY;
    }
    let tail = it.remainder().iter().fold(0.0f32, |a, v| a.max(v.abs()));
    m.iter().fold(tail, |a, &v| a.max(v))
}

/// Grid codes (one byte each) of `x` on the grid `-L..=L` with `inv = L / s`.
#[inline(always)]
fn quantize(x: &[f32], inv: f32, l: u32, stochastic: bool, key: u32, out: &mut [u8]) {
    let lf = l as f32;
    let top = (2 * l) as f32;
    // y = x/s*L + L in [0, 2L]; floor(y + u) is y in expectation, floor(y + 1/2) is nearest.
    // Rounding by the magic number 2^23: adding it to y in [0, 2^23) leaves
    // round-to-nearest(y) in the low mantissa bits, with plain float ops
    // (a float-to-int conversion with Rust's saturation costs more).
    // Nearest: round(y). Stochastic: round(y + u - 1/2) = floor(y + u).
    // Selects rather than f32::max/min, whose NaN rules cost instructions
    // (the input is finite, checked by the caller).
    const MAGIC: f32 = 8_388_608.0;
    let code = |v: f32, u: f32| {
        let y = v * inv + (lf + u);
        let y = if y > 0.0 { y } else { 0.0 };
        let y = if y < top { y } else { top };
        ((y + MAGIC).to_bits() & 0xff) as u8
    };
    // One value per iteration with the Weyl counter `c = i * GOLDEN32` as an
    // induction variable: the loop vectorizer turns it into a step vector.
    if stochastic {
        let mut c = 0u32;
        for (o, v) in out.iter_mut().zip(x) {
            *o = code(*v, dither(key, c) - 0.5);
            c = c.wrapping_add(GOLDEN32);
        }
    } else {
        for (o, v) in out.iter_mut().zip(x) {
            *o = code(*v, 0.0);
        }
    }
}

/// Quantizes one chunk `x` (already checked finite and in range) into its
/// codes, appended at `codes`; returns the scale.
#[inline(always)]
fn encode_chunk(
    x: &[f32],
    s: f32,
    bits: u8,
    stochastic: bool,
    key: u32,
    codes: &mut [u8],
    tmp: &mut [u8],
) -> f32 {
    match bits {
        32 => {
            for (c, v) in codes.chunks_exact_mut(4).zip(x) {
                c.copy_from_slice(&v.to_le_bytes());
            }
            0.0
        }
        16 => {
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            for (c, v) in codes.chunks_exact_mut(2).zip(x) {
                // |v * inv| <= 1 up to rounding; clamp keeps the decoder's bound exact.
                let h = f16::from_f32((v * inv).clamp(-1.0, 1.0));
                c.copy_from_slice(&h.to_bits().to_le_bytes());
            }
            s
        }
        1 => {
            let n = x.len();
            let scale;
            if stochastic {
                let half_inv = if s > 0.0 { 0.5 / s } else { 0.0 };
                for (i, (t, v)) in tmp[..n].iter_mut().zip(x).enumerate() {
                    let p = 0.5 + v * half_inv;
                    *t = u8::from(dither(key, (i as u32).wrapping_mul(GOLDEN32)) < p);
                }
                scale = s;
            } else {
                let sum: f32 = x.iter().map(|v| v.abs()).sum();
                for (t, v) in tmp[..n].iter_mut().zip(x) {
                    *t = u8::from(*v >= 0.0);
                }
                scale = (sum / n as f32).min(s);
            }
            pack(&tmp[..n], 1, codes);
            scale
        }
        _ => {
            let l = grid(bits);
            let inv = if s > 0.0 { l as f32 / s } else { 0.0 };
            if bits == 8 {
                quantize(x, inv, l, stochastic, key, &mut codes[..x.len()]);
            } else {
                quantize(x, inv, l, stochastic, key, &mut tmp[..x.len()]);
                pack(&tmp[..x.len()], bits, codes);
            }
            s
        }
    }
}

/// Packs codes of `bits` (4, 2, 1) bits, lowest bits first.
#[inline(always)]
fn pack(codes: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        4 => {
            let mut it = codes.chunks_exact(2);
            for (o, c) in out.iter_mut().zip(&mut it) {
                *o = c[0] | c[1] << 4;
            }
            if let ([c], Some(o)) = (it.remainder(), out.get_mut(codes.len() / 2)) {
                *o = *c;
            }
        }
        _ => {
            let per = 8 / bits as usize;
            for (o, group) in out.iter_mut().zip(codes.chunks(per)) {
                let mut b = 0u8;
                for (j, c) in group.iter().enumerate() {
                    b |= c << (j * bits as usize);
                }
                *o = b;
            }
        }
    }
}

/// Adds `weight * value` of each of the `out.len()` values of one chunk.
/// `scale` has been validated; codes above the grid are clamped onto it.
#[inline(always)]
fn add_chunk(bits: u8, scale: f32, codes: &[u8], weight: f32, out: &mut [f32]) {
    decode_chunk(bits, scale, codes, weight, out, |o, x| *o += x);
}

/// Calls `put(&mut out[i], weight * value[i])` for each of the `out.len()`
/// values of one chunk, `weight * value` computed as [`add_chunk`] adds it.
#[inline(always)]
fn decode_chunk(
    bits: u8,
    scale: f32,
    codes: &[u8],
    weight: f32,
    out: &mut [f32],
    put: impl Fn(&mut f32, f32),
) {
    match bits {
        32 => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(4)) {
                put(o, weight * f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
        }
        16 => {
            let a = weight * scale;
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(2)) {
                put(
                    o,
                    a * f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
                );
            }
        }
        8 => {
            let a = weight * scale / 127.0;
            for (o, &c) in out.iter_mut().zip(codes) {
                put(o, a * (i32::from(c.min(254)) - 127) as f32);
            }
        }
        4 => {
            let a = weight * scale / 7.0;
            let half = out.len() / 2;
            let mut it = out.chunks_exact_mut(2);
            for (o, &c) in (&mut it).zip(codes) {
                put(&mut o[0], a * (i32::from((c & 15).min(14)) - 7) as f32);
                put(&mut o[1], a * (i32::from((c >> 4).min(14)) - 7) as f32);
            }
            if let ([o], Some(&c)) = (it.into_remainder(), codes.get(half)) {
                put(o, a * (i32::from((c & 15).min(14)) - 7) as f32);
            }
        }
        2 => {
            let a = weight * scale;
            for (o, &c) in out.chunks_mut(4).zip(codes) {
                for (j, v) in o.iter_mut().enumerate() {
                    put(v, a * (i32::from(((c >> (2 * j)) & 3).min(2)) - 1) as f32);
                }
            }
        }
        _ => {
            let a = weight * scale;
            for (o, &c) in out.chunks_mut(8).zip(codes) {
                for (j, v) in o.iter_mut().enumerate() {
                    put(v, if (c >> j) & 1 == 1 { a } else { -a });
                }
            }
        }
    }
}

/// Indices of the `k` largest magnitudes of `x`, ascending. Ties at the
/// threshold go to the lowest indices, so the choice is deterministic.
pub fn top_k_indices(x: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(x.len());
    if k == 0 {
        return Vec::new();
    }
    if k == x.len() {
        return (0..k).collect();
    }
    // The bits of |x| order like |x| itself (for non-NaN values).
    let mut mags: Vec<u32> = x.iter().map(|v| v.to_bits() & 0x7fff_ffff).collect();
    let (_, &mut threshold, _) = mags.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    drop(mags);
    let above = x
        .iter()
        .filter(|v| (v.to_bits() & 0x7fff_ffff) > threshold)
        .count();
    let mut ties = k - above;
    let mut out = Vec::with_capacity(k);
    for (i, v) in x.iter().enumerate() {
        let m = v.to_bits() & 0x7fff_ffff;
        if m > threshold {
            out.push(i);
        } else if m == threshold && ties > 0 {
            ties -= 1;
            out.push(i);
        }
    }
    out
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Encodes `delta`. `seed` drives stochastic rounding, so encoding is
/// deterministic.
pub fn encode(delta: &[f32], cfg: &CodecConfig, seed: u64) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    encode_into(delta, cfg, seed, &mut out)?;
    Ok(out)
}

/// Appends the encoding of `delta` to `out` (the same bytes as [`encode`]),
/// so that a caller can encode straight into a buffer it reuses, or after
/// room for a seal's header ([`crate::seal::seal_in_place`]). On error `out`
/// is left as it was.
pub fn encode_into(
    delta: &[f32],
    cfg: &CodecConfig,
    seed: u64,
    out: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let start = out.len();
    let r = encode_append(delta, cfg, seed, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn encode_append(
    delta: &[f32],
    cfg: &CodecConfig,
    seed: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    cfg.validate()?;
    // Dense quantized encodings check the range chunk by chunk, along with
    // the scale; raw and sparse ones need it before anything else.
    if (cfg.bits == 32 || cfg.kept(delta.len()) < delta.len()) && absmax(delta) == f32::INFINITY {
        return Err(out_of_range(delta, 0));
    }
    let n = delta.len();
    let k = cfg.kept(n);
    let sparse = k < n;
    let stochastic = cfg.rounding == Rounding::Stochastic;
    let mut flags = if stochastic { FLAG_STOCHASTIC } else { 0 };

    let (index, kept): (Vec<u8>, Option<Vec<f32>>) = if sparse {
        flags |= FLAG_SPARSE;
        let idx = top_k_indices(delta, k);
        let mut prev = 0u64;
        let varints: usize = idx
            .iter()
            .map(|&i| {
                let gap = i as u64 - prev;
                prev = i as u64 + 1;
                varint_len(gap)
            })
            .sum();
        let bitmap = n.div_ceil(8);
        let mut index = Vec::with_capacity(varints.min(bitmap));
        if bitmap <= varints {
            flags |= FLAG_BITMAP;
            index.resize(bitmap, 0);
            for &i in &idx {
                index[i / 8] |= 1 << (i % 8);
            }
        } else {
            let mut prev = 0u64;
            for &i in &idx {
                put_varint(&mut index, i as u64 - prev);
                prev = i as u64 + 1;
            }
        }
        let kept = idx.iter().map(|&i| delta[i]).collect();
        (index, Some(kept))
    } else {
        (Vec::new(), None)
    };
    let values: &[f32] = kept.as_deref().unwrap_or(delta);

    let chunk = cfg.chunk as usize;
    let scales = num_scales(cfg.bits, k as u64, chunk as u64) as usize;
    let codes_len = code_bytes(cfg.bits, k as u64).unwrap_or(0) as usize;
    let total = HEADER_LEN + index.len() + 4 * scales + codes_len;
    let start = buf.len();
    buf.resize(start + total, 0);
    let out = &mut buf[start..];
    out[0..2].copy_from_slice(&MAGIC);
    out[2] = FORMAT;
    out[3] = cfg.bits;
    out[4] = flags;
    out[8..12].copy_from_slice(&cfg.chunk.to_le_bytes());
    out[16..24].copy_from_slice(&(n as u64).to_le_bytes());
    out[24..32].copy_from_slice(&(k as u64).to_le_bytes());
    out[32..40].copy_from_slice(&(index.len() as u64).to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + index.len()].copy_from_slice(&index);
    let (scale_bytes, codes) = out[HEADER_LEN + index.len()..].split_at_mut(4 * scales);

    let chunk_code_bytes = code_bytes(cfg.bits, chunk as u64).unwrap_or(0) as usize;
    let span_chunks = (SPAN_VALUES / chunk).max(1);
    if cfg.bits == 32 || values.len() <= span_chunks * chunk {
        return encode_chunks(values, 0, cfg, seed, codes, scale_bytes);
    }
    // Spans of chunks on the pool: each chunk's bytes depend on its index
    // only (its rounding key), so they are the same whatever the threads;
    // the first error in span order is the one-thread error.
    values
        .par_chunks(span_chunks * chunk)
        .zip(codes.par_chunks_mut(span_chunks * chunk_code_bytes))
        .zip(scale_bytes.par_chunks_mut(span_chunks * 4))
        .enumerate()
        .map(|(si, ((x, c), sc))| encode_chunks(x, si * span_chunks, cfg, seed, c, sc))
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// Encodes `values`, whole chunks of `cfg.chunk` from chunk `first` on,
/// into their `codes` and little-endian `scales` (none for raw values).
fn encode_chunks(
    values: &[f32],
    first: usize,
    cfg: &CodecConfig,
    seed: u64,
    codes: &mut [u8],
    scales: &mut [u8],
) -> Result<(), ProtocolError> {
    simd(EncodeChunks {
        values,
        first,
        cfg,
        seed,
        codes,
        scales,
    })
}

/// The arguments of [`encode_chunks`], for [`simd`].
struct EncodeChunks<'a> {
    values: &'a [f32],
    first: usize,
    cfg: &'a CodecConfig,
    seed: u64,
    codes: &'a mut [u8],
    scales: &'a mut [u8],
}

impl WithSimd for EncodeChunks<'_> {
    type Output = Result<(), ProtocolError>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> Self::Output {
        let (values, first, cfg, seed) = (self.values, self.first, self.cfg, self.seed);
        let (codes, scales) = (self.codes, self.scales);
        let chunk = cfg.chunk as usize;
        let stochastic = cfg.rounding == Rounding::Stochastic;
        let chunk_code_bytes = code_bytes(cfg.bits, chunk as u64).unwrap_or(0) as usize;
        let mut tmp = if cfg.bits < 8 {
            vec![0u8; chunk.min(values.len())]
        } else {
            Vec::new()
        };
        for (i, (x, c)) in values
            .chunks(chunk)
            .zip(codes.chunks_mut(chunk_code_bytes.max(1)))
            .enumerate()
        {
            let ci = first + i;
            let key = if stochastic {
                chunk_key(seed, ci as u64)
            } else {
                0
            };
            let m = if cfg.bits == 32 { 0.0 } else { absmax(x) };
            if m == f32::INFINITY {
                return Err(out_of_range(x, ci * chunk));
            }
            let s = encode_chunk(x, m, cfg.bits, stochastic, key, c, &mut tmp);
            if let Some(dst) = scales.get_mut(4 * i..4 * i + 4) {
                dst.copy_from_slice(&s.to_le_bytes());
            }
        }
        Ok(())
    }
}

/// The error for the first value of `x` out of range; `offset` is the index
/// of `x[0]` in the delta.
fn out_of_range(x: &[f32], offset: usize) -> ProtocolError {
    let i = x.iter().position(|v| !in_range(*v)).unwrap_or(0);
    ProtocolError::NonFinite(format!(
        "value {} at index {} is not finite or exceeds {MAX_SCALE:e}",
        x.get(i).copied().unwrap_or(f32::NAN),
        offset + i
    ))
}

/// The parsed header and the sections of an encoding, all bounds checked.
#[derive(Debug)]
struct Parsed<'a> {
    bits: u8,
    chunk: usize,
    n: u64,
    k: u64,
    bitmap: bool,
    index: Option<&'a [u8]>,
    scales: &'a [u8],
    codes: &'a [u8],
}

fn malformed(m: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed(format!("codec: {}", m.into()))
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, ProtocolError> {
    let head = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| malformed("truncated header"))?;
    if head[0..2] != MAGIC {
        return Err(malformed("bad magic"));
    }
    if head[2] != FORMAT {
        return Err(ProtocolError::UnsupportedCodec(format!(
            "codec format {}",
            head[2]
        )));
    }
    let bits = head[3];
    if !matches!(bits, 1 | 2 | 4 | 8 | 16 | 32) {
        return Err(malformed(format!("bits = {bits}")));
    }
    let flags = head[4];
    if flags & !(FLAG_STOCHASTIC | FLAG_SPARSE | FLAG_BITMAP) != 0
        || head[5..8] != [0; 3]
        || head[12..16] != [0; 4]
    {
        return Err(malformed("reserved bits set"));
    }
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let chunk = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if chunk < 8 || chunk & 7 != 0 || chunk > MAX_CHUNK {
        return Err(malformed(format!("chunk = {chunk}")));
    }
    let (n, k, index_len) = (u64_at(16), u64_at(24), u64_at(32));
    let sparse = flags & FLAG_SPARSE != 0;
    let bitmap = flags & FLAG_BITMAP != 0;
    if k > n || (!sparse && (k != n || index_len != 0 || bitmap)) {
        return Err(malformed("inconsistent counts"));
    }
    // Everything below is bounded by the actual length before use: no
    // allocation depends on these numbers.
    let rest = &bytes[HEADER_LEN..];
    if index_len > rest.len() as u64 {
        return Err(malformed("index overruns the input"));
    }
    let (index, rest) = rest.split_at(index_len as usize);
    let scales = num_scales(bits, k, u64::from(chunk))
        .checked_mul(4)
        .ok_or_else(|| malformed("count overflow"))?;
    let codes = code_bytes(bits, k).ok_or_else(|| malformed("count overflow"))?;
    if scales.checked_add(codes) != Some(rest.len() as u64) {
        return Err(malformed(format!(
            "{} bytes of scales and codes, the header implies {scales} + {codes}",
            rest.len()
        )));
    }
    let (scales, codes) = rest.split_at(scales as usize);
    Ok(Parsed {
        bits,
        chunk: chunk as usize,
        n,
        k,
        bitmap,
        index: sparse.then_some(index),
        scales,
        codes,
    })
}

/// Iterates the indices of a sparse index section, checking each one.
#[derive(Debug)]
struct Indices<'a> {
    data: &'a [u8],
    bitmap: bool,
    n: u64,
    pos: usize,
    bit: u64,
    next: u64,
}

impl Iterator for Indices<'_> {
    type Item = Result<u64, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.bitmap {
            while self.bit < self.n {
                let b = self.bit;
                self.bit += 1;
                if (self.data[(b / 8) as usize] >> (b % 8)) & 1 == 1 {
                    return Some(Ok(b));
                }
            }
            None
        } else {
            if self.pos >= self.data.len() {
                return None;
            }
            let mut v = 0u64;
            let mut shift = 0;
            loop {
                let Some(&b) = self.data.get(self.pos) else {
                    return Some(Err(malformed("truncated varint")));
                };
                self.pos += 1;
                if shift == 63 && b > 1 {
                    return Some(Err(malformed("varint overflows u64")));
                }
                v |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
                if shift > 63 {
                    return Some(Err(malformed("varint too long")));
                }
            }
            let i = match self.next.checked_add(v) {
                Some(i) if i < self.n => i,
                _ => return Some(Err(malformed("index out of range"))),
            };
            self.next = i + 1;
            Some(Ok(i))
        }
    }
}

impl Parsed<'_> {
    fn indices<'b>(&self, index: &'b [u8]) -> Result<Indices<'b>, ProtocolError> {
        if self.bitmap && index.len() as u64 != self.n.div_ceil(8) {
            return Err(malformed("bitmap length"));
        }
        Ok(Indices {
            data: index,
            bitmap: self.bitmap,
            n: self.n,
            pos: 0,
            bit: 0,
            next: 0,
        })
    }

    /// Checks everything a decode will read, so that decoding cannot fail
    /// halfway through an accumulator.
    fn validate(&self) -> Result<(), ProtocolError> {
        for s in self.scales.chunks_exact(4) {
            let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            if !(0.0..=MAX_SCALE).contains(&s) {
                return Err(malformed(format!(
                    "scale {s} not finite, negative or above {MAX_SCALE:e}"
                )));
            }
        }
        let raw_bad = || {
            self.codes
                .chunks_exact(4)
                .any(|c| !in_range(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        };
        // |x / s| <= 1 on the encoder's side.
        let half_bad = || {
            self.codes
                .chunks_exact(2)
                .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff > 0x3c00)
        };
        match self.bits {
            32 if raw_bad() => return Err(malformed("raw value not finite or too large")),
            16 if half_bad() => return Err(malformed("half value above 1 or not finite")),
            _ => {}
        }
        if let Some(index) = self.index {
            if self.bitmap {
                let tail = self.n % 8;
                if tail != 0 && index.last().is_some_and(|b| b >> tail != 0) {
                    return Err(malformed("bitmap bits past the end"));
                }
                let ones: u64 = index.iter().map(|b| u64::from(b.count_ones())).sum();
                if ones != self.k {
                    return Err(malformed("bitmap count differs from k"));
                }
            }
            let mut count = 0u64;
            for i in self.indices(index)? {
                i?;
                count += 1;
                if count > self.k {
                    return Err(malformed("more indices than k"));
                }
            }
            if count != self.k {
                return Err(malformed("fewer indices than k"));
            }
        }
        Ok(())
    }

    fn scale(&self, ci: usize) -> f32 {
        match self.scales.get(4 * ci..4 * ci + 4) {
            Some(s) => f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
            None => 0.0,
        }
    }
}

/// Number of values an encoding holds (read from its header).
pub fn decoded_len(bytes: &[u8]) -> Result<u64, ProtocolError> {
    Ok(parse(bytes)?.n)
}

/// The settings an encoding was made with, read from its header (`top_k` is
/// the count of kept values when sparse).
pub fn encoded_config(bytes: &[u8]) -> Result<CodecConfig, ProtocolError> {
    let p = parse(bytes)?;
    Ok(CodecConfig {
        bits: p.bits,
        rounding: if bytes[4] & FLAG_STOCHASTIC != 0 {
            Rounding::Stochastic
        } else {
            Rounding::Nearest
        },
        chunk: p.chunk as u32,
        top_k: p.index.map(|_| TopK::Count(p.k)),
    })
}

impl Parsed<'_> {
    fn check_len(&self, len: usize) -> Result<(), ProtocolError> {
        if self.n != len as u64 {
            return Err(ProtocolError::Malformed(format!(
                "codec: encoding holds {} values, the accumulator {len}",
                self.n
            )));
        }
        Ok(())
    }

    /// Bytes of the codes of one full chunk.
    fn chunk_codes(&self) -> usize {
        code_bytes(self.bits, self.chunk as u64).unwrap_or(0) as usize
    }

    /// Adds `weight * value` into `acc`; the encoding has been validated.
    fn accumulate(&self, weight: f32, acc: &mut [f32]) -> Result<(), ProtocolError> {
        let chunk = self.chunk;
        let chunk_codes = self.chunk_codes();
        match self.index {
            None => simd(AddChunks {
                p: self,
                weight,
                acc,
            }),
            Some(index) => {
                // Sparse: decode one chunk of kept values at a time, then scatter.
                let mut tmp = vec![0.0f32; chunk.min(self.k as usize)];
                let mut indices = self.indices(index)?;
                let mut left = self.k as usize;
                for (ci, codes) in self.codes.chunks(chunk_codes).enumerate() {
                    let len = left.min(chunk);
                    left -= len;
                    let out = &mut tmp[..len];
                    out.fill(0.0);
                    add_chunk(self.bits, self.scale(ci), codes, weight, out);
                    for (v, i) in out.iter().zip(indices.by_ref()) {
                        // Validated above: every index is in range.
                        let i = i? as usize;
                        acc[i] += v;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Adds `weight * decode(bytes)` into `acc`, without a decoded copy. The
/// encoding must hold exactly `acc.len()` values. On error `acc` is left
/// unchanged.
pub fn decode_accumulate(bytes: &[u8], weight: f32, acc: &mut [f32]) -> Result<(), ProtocolError> {
    let p = parse(bytes)?;
    p.check_len(acc.len())?;
    p.validate()?;
    p.accumulate(weight, acc)
}

/// Sum of squares in f64, in 8 lanes (position mod 8) plus a sequential
/// tail for the last `len % 8` values. Fed chunk by chunk (every chunk but
/// the last a multiple of 8 long) it makes the same additions in the same
/// order as one pass over the whole slice, so the result is the same bits.
#[derive(Clone, Copy, Debug, Default)]
pub struct SumSquares {
    lanes: [f64; 8],
    tail: f64,
}

impl SumSquares {
    /// Adds the squares of the next values. Only the last call may pass a
    /// length that is not a multiple of 8.
    #[inline]
    pub fn feed(&mut self, v: &[f32]) {
        let mut chunks = v.chunks_exact(8);
        for c in &mut chunks {
            for (l, x) in self.lanes.iter_mut().zip(c) {
                *l += f64::from(*x) * f64::from(*x);
            }
        }
        for &x in chunks.remainder() {
            self.tail += f64::from(x) * f64::from(x);
        }
    }

    pub fn total(&self) -> f64 {
        self.lanes.iter().sum::<f64>() + self.tail
    }
}

/// Sum of squares of `v` in f64 (see [`SumSquares`]): squares of finite
/// `f32` cannot overflow it, so a non-finite result means a NaN or an
/// infinity in `v`.
pub fn sum_squares(v: &[f32]) -> f64 {
    let mut s = SumSquares::default();
    s.feed(v);
    s.total()
}

/// Decodes into `out` (overwriting it) and returns [`sum_squares`] of the
/// decoded values, computed chunk by chunk while each chunk is in cache:
/// one pass where a decode and a separate check would make two. `out` ends
/// up exactly as after `out.fill(0.0)` then [`decode_accumulate`] with weight
/// 1, and the sum is `sum_squares(out)`, bit for bit. On error `out` is left
/// unchanged.
pub fn decode_into_sum_squares(bytes: &[u8], out: &mut [f32]) -> Result<f64, ProtocolError> {
    let p = parse(bytes)?;
    p.check_len(out.len())?;
    p.validate()?;
    if p.index.is_some() {
        out.fill(0.0);
        p.accumulate(1.0, out)?;
        return Ok(sum_squares(out));
    }
    let mut sq = SumSquares::default();
    for (ci, (o, codes)) in out
        .chunks_mut(p.chunk)
        .zip(p.codes.chunks(p.chunk_codes()))
        .enumerate()
    {
        o.fill(0.0);
        add_chunk(p.bits, p.scale(ci), codes, 1.0, o);
        sq.feed(o);
    }
    Ok(sq.total())
}

/// Values decoded at a time by [`Checked`] (a multiple of 8).
const BLOCK: usize = 1024;

/// An encoding that passed every check a decode makes, with the sum of
/// squares of its values: decoding it cannot fail, so a caller can check
/// every part of an update before any part touches an accumulator, without
/// a decoded copy.
#[derive(Debug)]
pub struct Checked<'a> {
    p: Parsed<'a>,
    sum_squares: f64,
}

/// Checks an encoding of `len` values and computes the sum of squares of
/// the values it stands for, in f64, reading it once and writing nothing
/// the size of the model. Quantized chunks are summed exactly in integers
/// (`scale² × Σ code²`), so the result can differ from [`sum_squares`] of
/// the decoded `f32` values in the last bits (each decoded value is
/// rounded to `f32`); raw and half values are squared one by one.
pub fn check(bytes: &[u8], len: usize) -> Result<Checked<'_>, ProtocolError> {
    let p = parse(bytes)?;
    p.check_len(len)?;
    p.validate()?;
    let bits = p.bits;
    let sum_squares = match bits {
        32 | 16 => {
            let mut sq = SumSquares::default();
            p.blocks(|v| sq.feed(v));
            sq.total()
        }
        // Sums over spans of chunks, added in span order: the same number
        // whatever the threads.
        _ => p
            .par_spans(|span| simd(SpanSquares { p: &p, span }))
            .iter()
            .sum(),
    };
    Ok(Checked { p, sum_squares })
}

/// Values per span of chunks handed to a thread by [`check`], [`Checked`]'s
/// dense decodes and [`encode_into`]: an encoding of one span or less stays
/// on the caller's thread.
const SPAN_VALUES: usize = 1 << 17;

/// The dense part of [`Parsed::accumulate`], for [`simd`].
struct AddChunks<'a, 'b> {
    p: &'a Parsed<'b>,
    weight: f32,
    acc: &'a mut [f32],
}

impl WithSimd for AddChunks<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let p = self.p;
        for (ci, (out, codes)) in self
            .acc
            .chunks_mut(p.chunk)
            .zip(p.codes.chunks(p.chunk_codes()))
            .enumerate()
        {
            add_chunk(p.bits, p.scale(ci), codes, self.weight, out);
        }
    }
}

/// One span of chunks of a dense [`Checked`] decode, from chunk `first`
/// on, for [`simd`].
struct ScatterSpan<'a, 'b, F> {
    p: &'a Parsed<'b>,
    first: usize,
    out: &'a mut [f32],
    f: &'a F,
}

impl<F: Fn(&mut f32, f32)> WithSimd for ScatterSpan<'_, '_, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let p = self.p;
        for (ci, out) in (self.first..).zip(self.out.chunks_mut(p.chunk)) {
            let (scale, codes, _) = p.chunk_at(ci);
            decode_chunk(p.bits, scale, codes, 1.0, out, self.f);
        }
    }
}

/// [`check`]'s sum of squares over one span of quantized chunks, for
/// [`simd`].
struct SpanSquares<'a, 'b> {
    p: &'a Parsed<'b>,
    span: std::ops::Range<usize>,
}

impl WithSimd for SpanSquares<'_, '_> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> f64 {
        let (p, bits) = (self.p, self.p.bits);
        self.span
            .map(|ci| {
                let (scale, codes, n) = p.chunk_at(ci);
                // The grid step, as `add_chunk` computes it.
                let a = f64::from(match bits {
                    8 => scale / 127.0,
                    4 => scale / 7.0,
                    _ => scale,
                });
                a * a * code_squares(bits, codes, n) as f64
            })
            .sum::<f64>()
    }
}

/// Sum of the squared grid steps of the first `n` codes of a chunk of
/// `bits` (8, 4, 2, 1), clamped as [`add_chunk`] clamps them.
#[inline(always)]
fn code_squares(bits: u8, codes: &[u8], n: usize) -> u64 {
    // u32 sums over blocks cannot overflow (127² × 4096 < 2³²) and
    // vectorize; u64 across blocks.
    let block = |c: &[u8], f: fn(u8) -> u32| -> u64 {
        c.chunks(4096)
            .map(|b| u64::from(b.iter().map(|&x| f(x)).sum::<u32>()))
            .sum()
    };
    match bits {
        8 => block(&codes[..n.min(codes.len())], |c| {
            let q = i32::from(c.min(254)) - 127;
            (q * q) as u32
        }),
        4 => {
            let sq = |c: u8| {
                let q = i32::from(c.min(14)) - 7;
                (q * q) as u32
            };
            let full = &codes[..(n / 2).min(codes.len())];
            let pairs = block(full, |c| {
                let lo = i32::from((c & 15).min(14)) - 7;
                let hi = i32::from((c >> 4).min(14)) - 7;
                (lo * lo + hi * hi) as u32
            });
            let odd = match (n % 2, codes.get(n / 2)) {
                (1, Some(&c)) => u64::from(sq(c & 15)),
                _ => 0,
            };
            pairs + odd
        }
        2 => {
            // Codes 0 and 2 (and 3, clamped to 2) are -1 and +1; 1 is 0.
            let mut total = 0u64;
            for (i, &c) in codes.iter().enumerate() {
                let k = (n - (4 * i).min(n)).min(4);
                total += (0..k).filter(|j| (c >> (2 * j)) & 3 != 1).count() as u64;
            }
            total
        }
        // Every value is +a or -a.
        _ => n as u64,
    }
}
impl Checked<'_> {
    pub fn sum_squares(&self) -> f64 {
        self.sum_squares
    }

    /// `acc[i] += m * (c * value[i])`: with `c = 1`, `m * value[i]`; the
    /// same bits as decoding, scaling the copy by `c`, then adding `m`
    /// times it. `acc` must hold the encoding's length (checked by
    /// [`check`]); a shorter one gets a prefix.
    pub fn add_scaled_to(&self, m: f32, c: f32, acc: &mut [f32]) {
        self.scatter(|a, x| *a += m * (c * x), acc);
    }

    /// `out[i] = c * value[i]` (0 where a sparse encoding keeps nothing).
    pub fn decode_scaled(&self, c: f32, out: &mut [f32]) {
        if self.p.index.is_some() {
            out.fill(0.0);
        }
        self.scatter(|o, x| *o = c * x, out);
    }

    /// Calls `f(&mut out[i], value[i])` for every value the encoding holds.
    #[inline(always)]
    fn scatter(&self, f: impl Fn(&mut f32, f32) + Sync, out: &mut [f32]) {
        match self.p.index {
            None => {
                let p = &self.p;
                let span = p.span_chunks() * p.chunk;
                let decode_span = |(si, out): (usize, &mut [f32])| {
                    simd(ScatterSpan {
                        p,
                        first: si * p.span_chunks(),
                        out,
                        f: &f,
                    });
                };
                if out.len() > span {
                    out.par_chunks_mut(span).enumerate().for_each(decode_span);
                } else {
                    decode_span((0, out));
                }
            }
            Some(index) => {
                // Validated by `check`: the indices parse and are in range.
                let Ok(indices) = self.p.indices(index) else {
                    return;
                };
                let mut indices = indices.flatten();
                self.p.blocks(|v| {
                    for (&x, i) in v.iter().zip(indices.by_ref()) {
                        if let Some(o) = out.get_mut(i as usize) {
                            f(o, x);
                        }
                    }
                });
            }
        }
    }
}

impl Parsed<'_> {
    /// Each chunk's scale, codes and number of values, in order (a sparse
    /// encoding's chunks of kept values).
    fn chunks(&self) -> impl Iterator<Item = (f32, &[u8], usize)> + '_ {
        let mut left = self.k as usize;
        self.codes
            .chunks(self.chunk_codes())
            .enumerate()
            .map(move |(ci, codes)| {
                let n = left.min(self.chunk);
                left -= n;
                (self.scale(ci), codes, n)
            })
    }

    /// Chunk `ci`'s scale, codes and number of values (empty past the end).
    fn chunk_at(&self, ci: usize) -> (f32, &[u8], usize) {
        let cc = self.chunk_codes();
        let lo = ci.saturating_mul(cc).min(self.codes.len());
        let hi = lo.saturating_add(cc).min(self.codes.len());
        let first = ci.saturating_mul(self.chunk) as u64;
        let n = self.k.saturating_sub(first).min(self.chunk as u64) as usize;
        (self.scale(ci), &self.codes[lo..hi], n)
    }

    /// Chunks per span (see [`SPAN_VALUES`]).
    fn span_chunks(&self) -> usize {
        (SPAN_VALUES / self.chunk).max(1)
    }

    /// `f` of each span of chunk indices, in order; on the pool when there
    /// are two spans or more.
    fn par_spans<T: Send>(&self, f: impl Fn(std::ops::Range<usize>) -> T + Sync) -> Vec<T> {
        let per = self.span_chunks();
        let chunks = (self.k as usize).div_ceil(self.chunk);
        let span = |s: usize| f(s * per..((s + 1) * per).min(chunks));
        match chunks.div_ceil(per) {
            0 | 1 => vec![span(0)],
            n => (0..n).into_par_iter().map(span).collect(),
        }
    }

    /// Decodes the values (a sparse encoding's kept values), in order, at
    /// most [`BLOCK`] at a time into a buffer on the stack, and passes each
    /// block to `f`; every block but the last is a multiple of 8 long.
    /// Values are exactly [`decode_accumulate`]'s into zeros, weight 1.
    #[inline(always)]
    fn blocks(&self, mut f: impl FnMut(&[f32])) {
        let mut buf = [0.0f32; BLOCK];
        let bits = self.bits as usize;
        for (scale, codes, len) in self.chunks() {
            let mut start = 0;
            while start < len {
                let n = (len - start).min(BLOCK);
                // `start` is a multiple of 8, so its codes start on a byte.
                let lo = (start * bits / 8).min(codes.len());
                let hi = ((start + n) * bits).div_ceil(8).min(codes.len());
                let out = &mut buf[..n];
                out.fill(0.0);
                add_chunk(self.bits, scale, &codes[lo..hi], 1.0, out);
                f(out);
                start += n;
            }
        }
    }
}

/// Decodes into a new vector of `expected_len` values.
pub fn decode(bytes: &[u8], expected_len: usize) -> Result<Vec<f32>, ProtocolError> {
    let n = decoded_len(bytes)?;
    if n != expected_len as u64 {
        return Err(ProtocolError::Malformed(format!(
            "codec: encoding holds {n} values, expected {expected_len}"
        )));
    }
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
    /// Encodes `delta + residual` and keeps what the encoding lost. Works in
    /// place in the residual buffer: no decoded copy is allocated.
    pub fn encode(
        &mut self,
        delta: &[f32],
        cfg: &CodecConfig,
        seed: u64,
    ) -> Result<Vec<u8>, ProtocolError> {
        if self.residual.len() != delta.len() {
            self.residual = vec![0.0; delta.len()];
        }
        cfg.validate()?;
        // Check first, so that a refused delta leaves the residual as it was.
        if let Some(i) = delta
            .iter()
            .zip(&self.residual)
            .position(|(d, r)| !in_range(d + r))
        {
            return Err(ProtocolError::NonFinite(format!(
                "delta {} plus residual at index {i} is not finite or too large",
                delta[i]
            )));
        }
        for (r, d) in self.residual.iter_mut().zip(delta) {
            *r += d;
        }
        let bytes = encode(&self.residual, cfg, seed)?;
        // residual = corrected - decoded.
        decode_accumulate(&bytes, -1.0, &mut self.residual)?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `op` through the generic path (what a CPU without AVX2 runs) or
    /// through [`simd`]'s dispatch.
    fn via<Op: WithSimd>(generic: bool, op: Op) -> Op::Output {
        if generic {
            op.with_simd(pulp::Scalar::new())
        } else {
            simd(op)
        }
    }

    /// `x` encoded by [`EncodeChunks`]: its codes and scales.
    fn encode_via(generic: bool, x: &[f32], c: &CodecConfig) -> (Vec<u8>, Vec<u8>) {
        let n = x.len() as u64;
        let mut codes = vec![0u8; code_bytes(c.bits, n).expect("len") as usize];
        let mut scales = vec![0u8; 4 * num_scales(c.bits, n, u64::from(c.chunk)) as usize];
        let op = EncodeChunks {
            values: x,
            first: 0,
            cfg: c,
            seed: 9,
            codes: &mut codes,
            scales: &mut scales,
        };
        via(generic, op).expect("encode");
        (codes, scales)
    }

    /// The bits of `check`'s sum of squares and of both dense decodes of `p`.
    fn decode_via(generic: bool, p: &Parsed<'_>, n: usize) -> (u64, Vec<u32>, Vec<u32>) {
        let squares = via(
            generic,
            SpanSquares {
                p,
                span: 0..n.div_ceil(p.chunk),
            },
        );
        let (mut a, mut b) = (vec![0.5f32; n], vec![0.5f32; n]);
        via(
            generic,
            AddChunks {
                p,
                weight: 0.3,
                acc: &mut a,
            },
        );
        let f = |o: &mut f32, v: f32| *o += 0.7 * v;
        via(
            generic,
            ScatterSpan {
                p,
                first: 0,
                out: &mut b,
                f: &f,
            },
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect();
        (squares.to_bits(), bits(&a), bits(&b))
    }

    /// The loops `simd` compiles for the CPU's widest instruction set give
    /// the bits of the same loops without it: encode, the sum of squares of
    /// `check`, and both decodes.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n: usize = 5_003; // several chunks and a partial one
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * 1e-2).collect();
        for bits in [32u8, 16, 8, 4, 2, 1] {
            for rounding in [Rounding::Nearest, Rounding::Stochastic] {
                let c = CodecConfig {
                    bits,
                    rounding,
                    chunk: 256,
                    top_k: None,
                };
                let (generic, dispatched) = (encode_via(true, &x, &c), encode_via(false, &x, &c));
                assert_eq!(generic, dispatched, "encode, {bits} bits");
                let e = encode(&x, &c, 9).expect("encode");
                let p = parse(&e).expect("parse");
                assert_eq!(
                    decode_via(true, &p, n),
                    decode_via(false, &p, n),
                    "check and decode, {bits} bits"
                );
            }
        }
    }

    fn cfg(bits: u8, rounding: Rounding) -> CodecConfig {
        CodecConfig {
            bits,
            rounding,
            chunk: 8,
            top_k: None,
        }
    }

    use proptest::prelude::*;

    /// The quantizer as it was before the one-value-per-iteration loop
    /// (eight lanes by hand): the reference the new loop must match.
    fn quantize_reference(x: &[f32], inv: f32, l: u32, stochastic: bool, key: u32, out: &mut [u8]) {
        let lf = l as f32;
        let top = (2 * l) as f32;
        const MAGIC: f32 = 8_388_608.0;
        let code = |v: f32, u: f32| {
            let y = v * inv + (lf + u);
            let y = if y > 0.0 { y } else { 0.0 };
            let y = if y < top { y } else { top };
            ((y + MAGIC).to_bits() & 0xff) as u8
        };
        const STEPS: [u32; 8] = [
            0,
            GOLDEN32,
            GOLDEN32.wrapping_mul(2),
            GOLDEN32.wrapping_mul(3),
            GOLDEN32.wrapping_mul(4),
            GOLDEN32.wrapping_mul(5),
            GOLDEN32.wrapping_mul(6),
            GOLDEN32.wrapping_mul(7),
        ];
        let mut it = out.chunks_exact_mut(8).zip(x.chunks_exact(8));
        let mut done = 0usize;
        if stochastic {
            for (o, v) in &mut it {
                let base = (done as u32).wrapping_mul(GOLDEN32);
                for j in 0..8 {
                    o[j] = code(v[j], dither(key, base.wrapping_add(STEPS[j])) - 0.5);
                }
                done += 8;
            }
            for (i, (o, v)) in out[done..].iter_mut().zip(&x[done..]).enumerate() {
                *o = code(
                    *v,
                    dither(key, ((done + i) as u32).wrapping_mul(GOLDEN32)) - 0.5,
                );
            }
        } else {
            for (o, v) in &mut it {
                for j in 0..8 {
                    o[j] = code(v[j], 0.0);
                }
                done += 8;
            }
            for (o, v) in out[done..].iter_mut().zip(&x[done..]) {
                *o = code(*v, 0.0);
            }
        }
    }

    /// The engine's check before the fused decode: a zeroed buffer, a
    /// decode, then one pass of sum of squares.
    fn sum_squares_reference(v: &[f32]) -> f64 {
        let mut lanes = [0.0f64; 8];
        let mut chunks = v.chunks_exact(8);
        for c in &mut chunks {
            for (l, x) in lanes.iter_mut().zip(c) {
                *l += f64::from(*x) * f64::from(*x);
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum();
        lanes.iter().sum::<f64>() + tail
    }

    fn any_config() -> impl Strategy<Value = CodecConfig> {
        config_with_chunks(vec![8, 16, 24, 256], 200)
    }

    fn config_with_chunks(chunks: Vec<u32>, max_top: u64) -> impl Strategy<Value = CodecConfig> {
        (
            prop::sample::select(vec![32u8, 16, 8, 4, 2, 1]),
            any::<bool>(),
            prop::sample::select(chunks),
            prop::option::of(1u64..max_top),
        )
            .prop_map(|(bits, stochastic, chunk, top)| CodecConfig {
                bits,
                rounding: if stochastic {
                    Rounding::Stochastic
                } else {
                    Rounding::Nearest
                },
                chunk,
                top_k: top.map(TopK::Count),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn quantize_matches_the_reference(
            x in prop::collection::vec(-3.0f32..3.0, 0..600),
            bits in prop::sample::select(vec![8u8, 4, 2]),
            stochastic in any::<bool>(),
            key in any::<u32>(),
        ) {
            let l = grid(bits);
            let s = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let inv = if s > 0.0 { l as f32 / s } else { 0.0 };
            let mut a = vec![0u8; x.len()];
            let mut b = vec![0u8; x.len()];
            quantize(&x, inv, l, stochastic, key, &mut a);
            quantize_reference(&x, inv, l, stochastic, key, &mut b);
            prop_assert_eq!(a, b);
        }

        /// The fused decode writes what a zeroed buffer plus
        /// `decode_accumulate` held, and its sum of squares is the separate
        /// pass's, bit for bit; `encode_into` appends `encode`'s bytes.
        #[test]
        fn fused_decode_matches_decode_then_sum(
            x in prop::collection::vec(prop_oneof![
                8 => -10.0f32..10.0,
                1 => Just(0.0f32),
                1 => Just(-0.0f32),
                1 => -1.0e30f32..1.0e30,
            ], 0..700),
            cfg in any_config(),
            seed in any::<u64>(),
        ) {
            let bytes = encode(&x, &cfg, seed).expect("encode");
            let mut appended = vec![9u8, 8, 7];
            encode_into(&x, &cfg, seed, &mut appended).expect("encode");
            prop_assert_eq!(&appended[..3], &[9u8, 8, 7][..]);
            prop_assert_eq!(&appended[3..], &bytes[..]);

            let mut want = vec![0.0f32; x.len()];
            decode_accumulate(&bytes, 1.0, &mut want).expect("decode");
            let want_sq = sum_squares_reference(&want);
            let mut got = vec![f32::NAN; x.len()];
            let got_sq = decode_into_sum_squares(&bytes, &mut got).expect("decode");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&got), bits(&want));
            prop_assert_eq!(got_sq.to_bits(), want_sq.to_bits());
            prop_assert_eq!(sum_squares(&want).to_bits(), want_sq.to_bits());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(120))]

        /// `check` gives the decoded values' sum of squares (up to their
        /// rounding to f32) and `Checked` the decoded values, scaled, bit
        /// for bit (zeros of either sign
        /// where a sparse encoding keeps nothing), also with chunks longer
        /// than a block.
        #[test]
        fn checked_matches_decode(
            x in prop::collection::vec(prop_oneof![
                8 => -10.0f32..10.0,
                1 => Just(-0.0f32),
                1 => -1.0e30f32..1.0e30,
            ], 0..5000),
            cfg in config_with_chunks(vec![8, 256, 1024, 2056, 4096], 3000),
            seed in any::<u64>(),
            m in -3.0f32..3.0,
            c in 0.1f32..2.0,
        ) {
            let n = x.len();
            let bytes = encode(&x, &cfg, seed).expect("encode");
            let mut dec = vec![0.0f32; n];
            let want_sq = decode_into_sum_squares(&bytes, &mut dec).expect("decode");
            let checked = check(&bytes, n).expect("check");
            // Exact per chunk against f32-rounded squares: 2^-23 apart each.
            let got_sq = checked.sum_squares();
            prop_assert!((got_sq - want_sq).abs() <= want_sq * 4e-7, "{} vs {}", got_sq, want_sq);
            prop_assert!(check(&bytes, n + 1).is_err());

            let same = |a: &[f32], b: &[f32]| {
                a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0))
            };
            let mut out = vec![f32::NAN; n];
            checked.decode_scaled(c, &mut out);
            let want: Vec<f32> = dec.iter().map(|v| c * v).collect();
            prop_assert!(same(&out, &want));
            let mut acc = x.clone();
            checked.add_scaled_to(m, c, &mut acc);
            let want: Vec<f32> = x.iter().zip(&dec).map(|(a, v)| a + m * (c * v)).collect();
            prop_assert!(same(&acc, &want));
        }
    }

    /// Encodings long enough to be split into spans over threads decode
    /// to the same bits as the one-thread decode.
    #[test]
    fn checked_spans_match_decode() {
        let n = 3 * SPAN_VALUES + 1000;
        let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1e-2).collect();
        for (bits, chunk) in [(8, 256), (4, 256), (1, 8), (8, 1 << 20)] {
            let cfg = CodecConfig {
                bits,
                chunk,
                ..CodecConfig::default()
            };
            let bytes = encode(&x, &cfg, 7).expect("encode");
            let mut dec = vec![0.0f32; n];
            let want_sq = decode_into_sum_squares(&bytes, &mut dec).expect("decode");
            let checked = check(&bytes, n).expect("check");
            let rel = (checked.sum_squares() - want_sq).abs() / want_sq;
            assert!(rel < 4e-7, "bits {bits}: relative error {rel}");
            let mut acc = x.clone();
            checked.add_scaled_to(0.5, 0.25, &mut acc);
            let want: Vec<f32> = x
                .iter()
                .zip(&dec)
                .map(|(a, v)| a + 0.5 * (0.25 * v))
                .collect();
            assert!(
                acc.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "bits {bits}"
            );
        }
    }

    /// An encoding split into spans over threads is the one-thread one,
    /// byte for byte, and an out-of-range value in a later span is found
    /// at its index.
    #[test]
    fn span_encoding_is_the_one_thread_encoding() {
        let n = 3 * SPAN_VALUES + 1000;
        let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1e-2).collect();
        for bits in [8u8, 4, 2, 1, 16] {
            let cfg = CodecConfig {
                bits,
                ..CodecConfig::default()
            };
            let bytes = encode(&x, &cfg, 11).expect("encode");
            let p = parse(&bytes).expect("parse");
            let split = HEADER_LEN + p.scales.len();
            let mut one = bytes.clone();
            let (scales, codes) = one[HEADER_LEN..].split_at_mut(split - HEADER_LEN);
            codes.fill(0);
            scales.fill(0);
            encode_chunks(&x, 0, &cfg, 11, codes, scales).expect("encode");
            assert!(one == bytes, "bits {bits}");
        }
        let mut bad = x.clone();
        bad[2 * SPAN_VALUES + 5] = f32::NAN;
        let err = encode(&bad, &CodecConfig::default(), 0).expect_err("NaN");
        assert!(
            err.to_string()
                .contains(&format!("index {}", 2 * SPAN_VALUES + 5)),
            "{err}"
        );
    }

    #[test]
    fn refused_inputs_leave_buffers_as_they_were() {
        let x: Vec<f32> = (0..40).map(|i| i as f32 - 20.0).collect();
        let b = encode(&x, &CodecConfig::default(), 0).expect("encode");
        let mut evil = b.clone();
        evil[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let mut out = vec![3.0f32; 40];
        assert!(matches!(
            decode_into_sum_squares(&evil, &mut out),
            Err(ProtocolError::Malformed(_))
        ));
        assert_eq!(out, vec![3.0f32; 40]);
        let mut short = vec![3.0f32; 39];
        assert!(decode_into_sum_squares(&b, &mut short).is_err());
        assert_eq!(short, vec![3.0f32; 39]);
        // A value out of range in the second chunk: nothing appended.
        let mut bad = vec![0.5f32; 300];
        bad[290] = f32::INFINITY;
        let mut buf = vec![1u8, 2];
        assert!(matches!(
            encode_into(&bad, &CodecConfig::default(), 0, &mut buf),
            Err(ProtocolError::NonFinite(_))
        ));
        assert_eq!(buf, vec![1u8, 2]);
    }

    #[test]
    fn eight_bit_grid_by_hand() {
        // absmax 1.27 → step 0.01; 0.5 → code 50+127, exact up to f32.
        let x = [1.27f32, -1.27, 0.5, 0.0, -0.004, 0.006, 0.1, -0.1];
        let bytes = encode(&x, &cfg(8, Rounding::Nearest), 0).expect("encode");
        assert_eq!(bytes.len(), HEADER_LEN + 4 + 8);
        assert_eq!(
            &bytes[HEADER_LEN + 4..],
            &[254, 0, 177, 127, 127, 128, 137, 117]
        );
        let d = decode(&bytes, 8).expect("decode");
        let want = [1.27f32, -1.27, 0.5, 0.0, 0.0, 0.01, 0.1, -0.1];
        for (a, b) in d.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn sizes_per_setting() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        for (bits, per) in [
            (32, 4000),
            (16, 2000),
            (8, 1000),
            (4, 500),
            (2, 250),
            (1, 125),
        ] {
            let c = CodecConfig {
                bits,
                rounding: Rounding::Nearest,
                chunk: 256,
                top_k: None,
            };
            let b = encode(&x, &c, 1).expect("encode");
            let scales = if bits == 32 { 0 } else { 4 * 4 };
            assert_eq!(b.len(), HEADER_LEN + scales + per, "bits {bits}");
            assert_eq!(decoded_len(&b), Ok(1000));
        }
    }

    #[test]
    fn sparse_round_trip_keeps_largest() {
        let x = [0.1f32, -5.0, 0.2, 3.0, 0.0, 0.0, -0.3, 4.0, 0.05, 0.0];
        let c = CodecConfig {
            bits: 32,
            rounding: Rounding::Nearest,
            chunk: 8,
            top_k: Some(TopK::Count(3)),
        };
        let b = encode(&x, &c, 0).expect("encode");
        let d = decode(&b, 10).expect("decode");
        assert_eq!(d, vec![0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0]);
        assert_eq!(top_k_indices(&x, 3), vec![1, 3, 7]);
        // Ties at the threshold go to the lowest index.
        assert_eq!(top_k_indices(&[1.0, 2.0, 1.0, 1.0], 2), vec![0, 1]);
    }

    #[test]
    fn refuses_bad_inputs_with_typed_errors() {
        let c = CodecConfig::default();
        assert!(matches!(
            encode(&[1.0, f32::NAN], &c, 0),
            Err(ProtocolError::NonFinite(_))
        ));
        assert!(matches!(
            encode(&[f32::INFINITY], &c, 0),
            Err(ProtocolError::NonFinite(_))
        ));
        let bad = CodecConfig {
            bits: 3,
            ..CodecConfig::default()
        };
        assert!(matches!(
            encode(&[1.0], &bad, 0),
            Err(ProtocolError::UnsupportedCodec(_))
        ));
        let b = encode(&[1.0, 2.0, 3.0], &c, 0).expect("encode");
        let mut acc = vec![0.0; 4];
        assert!(matches!(
            decode_accumulate(&b, 1.0, &mut acc),
            Err(ProtocolError::Malformed(_))
        ));
        // A NaN scale on the wire is refused and the accumulator is untouched.
        let mut evil = b.clone();
        evil[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let mut acc = vec![7.0; 3];
        assert!(matches!(
            decode_accumulate(&evil, 1.0, &mut acc),
            Err(ProtocolError::Malformed(_))
        ));
        assert_eq!(acc, vec![7.0; 3]);
        // A header claiming 2^60 values is refused before anything is allocated.
        let mut huge = b[..HEADER_LEN].to_vec();
        huge[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        huge[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(decode(&huge, 3), Err(ProtocolError::Malformed(_))));
        assert!(matches!(
            decode_accumulate(&huge, 1.0, &mut acc),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn deterministic_by_seed_and_self_describing() {
        let x: Vec<f32> = (0..300).map(|i| (i as f32 * 0.7).cos()).collect();
        let c = CodecConfig {
            bits: 4,
            rounding: Rounding::Stochastic,
            chunk: 64,
            top_k: Some(TopK::Count(100)),
        };
        let a = encode(&x, &c, 9).expect("encode");
        assert_eq!(a, encode(&x, &c, 9).expect("encode"));
        assert_ne!(a, encode(&x, &c, 10).expect("encode"));
        let read = encoded_config(&a).expect("header");
        assert_eq!(read, c);
        // A scale beyond MAX_SCALE (finite, but unsafe to multiply) is refused.
        let mut evil = encode(&x, &CodecConfig::default(), 0).expect("encode");
        evil[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&f32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&evil, 300),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn error_feedback_residual_is_what_was_lost() {
        let c = CodecConfig {
            bits: 2,
            rounding: Rounding::Nearest,
            chunk: 8,
            top_k: None,
        };
        let mut ef = ErrorFeedback::default();
        let d = [0.3f32, -1.0, 0.6, 0.1, 0.0, 0.2, -0.4, 0.9];
        let b = ef.encode(&d, &c, 0).expect("encode");
        let dec = decode(&b, 8).expect("decode");
        for ((x, y), r) in d.iter().zip(&dec).zip(&ef.residual) {
            assert!((x - y - r).abs() < 1e-6);
        }
    }
}
