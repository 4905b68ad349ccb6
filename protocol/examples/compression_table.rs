//! Bytes per parameter and relative L2 error of every codec setting on a
//! real delta: a raw little-endian `f32` file.
//!
//! `cargo run -p cohort-protocol --release --example compression_table -- delta.f32`

use cohort_protocol::codec::{decode, encode, CodecConfig, Rounding, TopK};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: compression_table <raw f32 LE file>")?;
    let bytes = std::fs::read(&path)?;
    if bytes.len() % 4 != 0 {
        return Err(format!("{path}: {} bytes is not a whole number of f32", bytes.len()).into());
    }
    let x: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let norm: f64 = x
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    println!("{path}: {} parameters, L2 norm {norm:.6}", x.len());
    println!("| bits | rounding | top-k | bytes/param | relative L2 error |");
    println!("|---:|---|---|---:|---:|");
    let mut settings = Vec::new();
    for bits in [32u8, 16, 8, 4, 2, 1] {
        for rounding in [Rounding::Nearest, Rounding::Stochastic] {
            if bits >= 16 && rounding == Rounding::Stochastic {
                continue; // 32 and 16 bits always round to nearest
            }
            settings.push(CodecConfig {
                bits,
                rounding,
                chunk: 256,
                top_k: None,
            });
        }
    }
    for f in [0.1f32, 0.01] {
        for rounding in [Rounding::Nearest, Rounding::Stochastic] {
            settings.push(CodecConfig {
                bits: 8,
                rounding,
                chunk: 256,
                top_k: Some(TopK::Fraction(f)),
            });
        }
    }
    for cfg in settings {
        let enc = encode(&x, &cfg, 42)?;
        let dec = decode(&enc, x.len())?;
        let err: f64 = x
            .iter()
            .zip(&dec)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt();
        let top = match cfg.top_k {
            Some(TopK::Fraction(f)) => format!("{}%", f * 100.0),
            _ => "-".into(),
        };
        println!(
            "| {} | {:?} | {top} | {:.4} | {:.5} |",
            cfg.bits,
            cfg.rounding,
            enc.len() as f64 / x.len() as f64,
            err / norm.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}
