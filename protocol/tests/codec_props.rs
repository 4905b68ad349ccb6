//! Property tests of the update codec.

use cohort_protocol::codec::{
    decode, encode, top_k_indices, CodecConfig, ErrorFeedback, Rounding, TopK,
};
use proptest::prelude::*;

const CHUNK: usize = 16;

fn cfg(bits: u8, rounding: Rounding) -> CodecConfig {
    CodecConfig {
        bits,
        rounding,
        chunk: CHUNK as u32,
        top_k: None,
    }
}

fn values(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            8 => -10.0f32..10.0,
            1 => Just(0.0f32),
            1 => -1.0e-30f32..1.0e-30,
            1 => -1.0e30f32..1.0e30,
        ],
        1..max_len,
    )
}

fn chunk_absmax(x: &[f32], i: usize) -> f32 {
    let c = i / CHUNK;
    x[c * CHUNK..((c + 1) * CHUNK).min(x.len())]
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Nearest rounding: at most half a grid step per value.
    #[test]
    fn nearest_error_bounds(x in values(100)) {
        for bits in [32u8, 16, 8, 4, 2, 1] {
            let d = decode(&encode(&x, &cfg(bits, Rounding::Nearest), 0).expect("encode"), x.len()).expect("decode");
            for (i, (a, b)) in x.iter().zip(&d).enumerate() {
                let m = chunk_absmax(&x, i);
                let err = (a - b).abs();
                match bits {
                    32 => prop_assert_eq!(a, b),
                    16 => prop_assert!(err <= a.abs() * 4.9e-4 + m * 6.0e-8, "16 bits: {} vs {}", a, b),
                    1 => {
                        // The sign, with the chunk's mean magnitude.
                        prop_assert!(*b == 0.0 || (*a >= 0.0) == (*b > 0.0));
                        prop_assert!(b.abs() <= m * (1.0 + 1e-6));
                    }
                    _ => {
                        let step = m / ((1u32 << (bits - 1)) - 1) as f32;
                        prop_assert!(err <= step * 0.5001 + m * 1e-6, "{} bits: {} vs {} (step {})", bits, a, b, step);
                    }
                }
            }
        }
    }

    /// Top-k keeps exactly the k largest magnitudes, and (32 bits) their exact values.
    #[test]
    fn top_k_keeps_the_largest(x in values(300), k in 1usize..300) {
        let k = k.min(x.len());
        let idx = top_k_indices(&x, k);
        prop_assert_eq!(idx.len(), k);
        prop_assert!(idx.windows(2).all(|w| w[0] < w[1]));
        let kept_min = idx.iter().map(|&i| x[i].abs()).fold(f32::INFINITY, f32::min);
        let mut is_kept = vec![false; x.len()];
        for &i in &idx { is_kept[i] = true; }
        let dropped_max = x.iter().zip(&is_kept).filter(|(_, k)| !**k).map(|(v, _)| v.abs()).fold(0.0f32, f32::max);
        prop_assert!(kept_min >= dropped_max);
        let c = CodecConfig { bits: 32, rounding: Rounding::Nearest, chunk: 8, top_k: Some(TopK::Count(k as u64)) };
        let d = decode(&encode(&x, &c, 0).expect("encode"), x.len()).expect("decode");
        for (i, (a, b)) in x.iter().zip(&d).enumerate() {
            prop_assert_eq!(*b, if is_kept[i] { *a } else { 0.0 });
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The mean of many stochastic encodings converges to the input.
    #[test]
    fn stochastic_rounding_is_unbiased(x in prop::collection::vec(-1.0f32..1.0, 8..64), seed in any::<u64>()) {
        const M: usize = 2000;
        for bits in [8u8, 4, 2, 1] {
            let mut sum = vec![0.0f64; x.len()];
            for s in 0..M {
                let d = decode(&encode(&x, &cfg(bits, Rounding::Stochastic), seed.wrapping_add(s as u64)).expect("encode"), x.len()).expect("decode");
                for (a, b) in sum.iter_mut().zip(&d) { *a += f64::from(*b); }
            }
            for (i, (a, s)) in x.iter().zip(&sum).enumerate() {
                let m = f64::from(chunk_absmax(&x, i));
                // One draw spreads over a grid step (2m for 1 bit): its
                // standard deviation is at most half of it.
                let step = if bits == 1 { 2.0 * m } else { m / f64::from((1u32 << (bits - 1)) - 1) };
                let tol = 6.0 * 0.5 * step / (M as f64).sqrt() + 1e-6;
                let mean = s / M as f64;
                prop_assert!((mean - f64::from(*a)).abs() <= tol, "{} bits: mean {} vs {} (tol {})", bits, mean, a, tol);
            }
        }
    }

    /// With error feedback, the sum of decoded deltas tracks the sum of the
    /// true deltas: the gap is the residual, which stays bounded.
    #[test]
    fn error_feedback_tracks_the_sum(seed in any::<u64>()) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = 200;
        let settings = [
            (cfg(4, Rounding::Stochastic), 1.0f32),
            (cfg(2, Rounding::Nearest), 1.5),
            (CodecConfig { bits: 8, rounding: Rounding::Nearest, chunk: 16, top_k: Some(TopK::Fraction(0.1)) }, 15.0),
            (cfg(1, Rounding::Nearest), 20.0),
        ];
        for (c, bound) in settings {
            let mut ef = ErrorFeedback::default();
            let mut true_sum = vec![0.0f64; n];
            let mut dec_sum = vec![0.0f64; n];
            for step in 0..60u64 {
                let delta: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let bytes = ef.encode(&delta, &c, step).expect("encode");
                let d = decode(&bytes, n).expect("decode");
                for i in 0..n {
                    true_sum[i] += f64::from(delta[i]);
                    dec_sum[i] += f64::from(d[i]);
                }
                let r = ef.residual.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                prop_assert!(r <= bound, "bits {} residual {} > {}", c.bits, r, bound);
            }
            for i in 0..n {
                let gap = true_sum[i] - dec_sum[i];
                prop_assert!((gap - f64::from(ef.residual[i])).abs() < 1e-3, "gap {} residual {}", gap, ef.residual[i]);
                prop_assert!(gap.abs() <= f64::from(bound));
            }
        }
    }
}
