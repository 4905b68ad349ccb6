//! Encode, seal, open and decode_accumulate of 1M and 10M parameters.
//! Throughput is in decimal GB/s of `f32` input (4 bytes per parameter, the
//! f32 equivalent), one thread. Prints the load average at start and end.
//!
//! `cargo bench -p cohort-protocol --bench codec_seal` (a filter such as
//! `end_to_end_8bit` runs a subset).

use cohort_protocol::codec::{
    check, decode_accumulate, encode, encode_into, CodecConfig, Rounding, TopK,
};
use cohort_protocol::model_delta;
use cohort_protocol::seal::{seal, seal_in_place, sealed_header_len, SealContext, SealKeyPair};
use cohort_protocol::PROTOCOL_VERSION;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

fn delta(n: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let normal = Normal::new(0.0f32, 0.01).expect("normal");
    (0..n).map(|_| normal.sample(&mut rng)).collect()
}

fn ctx() -> SealContext {
    SealContext {
        version: PROTOCOL_VERSION,
        federation: "bench".into(),
        round: 1,
        sender: "node-1".into(),
        groups: vec!["backbone".into()],
    }
}

fn benches(c: &mut Criterion) {
    let keys = SealKeyPair::generate().expect("keys");
    let public = keys.public();
    let eight = CodecConfig {
        bits: 8,
        rounding: Rounding::Stochastic,
        chunk: 256,
        top_k: None,
    };
    let eight_nearest = CodecConfig {
        rounding: Rounding::Nearest,
        ..eight.clone()
    };
    let four = CodecConfig {
        bits: 4,
        ..eight.clone()
    };
    let top1 = CodecConfig {
        top_k: Some(TopK::Fraction(0.01)),
        ..eight.clone()
    };
    for n in [1usize << 20, 10 << 20] {
        let x = delta(n);
        let label = format!("{}M", n >> 20);
        let mut g = c.benchmark_group("codec_seal");
        g.throughput(Throughput::BytesDecimal(4 * n as u64));
        g.sample_size(10);
        for (name, cfg) in [
            ("encode_8bit", &eight),
            ("encode_8bit_nearest", &eight_nearest),
            ("encode_4bit", &four),
            ("encode_top1pct_8bit", &top1),
        ] {
            g.bench_function(BenchmarkId::new(name, &label), |b| {
                b.iter(|| encode(&x, cfg, 1).expect("encode"))
            });
        }
        let enc = encode(&x, &eight, 1).expect("encode");
        let sealed = seal(&public, &ctx(), &enc).expect("seal");
        g.bench_function(BenchmarkId::new("seal_8bit", &label), |b| {
            b.iter(|| seal(&public, &ctx(), &enc).expect("seal"))
        });
        g.bench_function(BenchmarkId::new("open_8bit", &label), |b| {
            b.iter(|| keys.open(&ctx(), &sealed).expect("open"))
        });
        let mut acc = vec![0.0f32; n];
        g.bench_function(BenchmarkId::new("decode_accumulate_8bit", &label), |b| {
            b.iter(|| decode_accumulate(&enc, 0.5, &mut acc).expect("decode"))
        });
        let enc4 = encode(&x, &four, 1).expect("encode");
        g.bench_function(BenchmarkId::new("decode_accumulate_4bit", &label), |b| {
            b.iter(|| decode_accumulate(&enc4, 0.5, &mut acc).expect("decode"))
        });
        let enc_top = encode(&x, &top1, 1).expect("encode");
        g.bench_function(BenchmarkId::new("decode_accumulate_top1pct", &label), |b| {
            b.iter(|| decode_accumulate(&enc_top, 0.5, &mut acc).expect("decode"))
        });
        for (name, cfg) in [
            ("end_to_end_8bit", &eight),
            ("end_to_end_4bit", &four),
            ("end_to_end_top1pct_8bit", &top1),
        ] {
            g.bench_function(BenchmarkId::new(name, &label), |b| {
                b.iter(|| {
                    let e = encode(&x, cfg, 1).expect("encode");
                    let s = seal(&public, &ctx(), &e).expect("seal");
                    let o = keys.open(&ctx(), &s).expect("open");
                    decode_accumulate(&o, 0.5, &mut acc).expect("decode");
                })
            });
        }
        // The same work without the copies: one buffer, reused across
        // updates, holds the encoding after room for the seal's header, is
        // sealed and opened in place, then decoded into the sum.
        for (name, cfg) in [
            ("end_to_end_8bit_in_place", &eight),
            ("end_to_end_4bit_in_place", &four),
        ] {
            let c = ctx();
            let mut buf = Vec::new();
            g.bench_function(BenchmarkId::new(name, &label), |b| {
                b.iter(|| {
                    buf.clear();
                    buf.resize(sealed_header_len(&c), 0);
                    encode_into(&x, cfg, 1, &mut buf).expect("encode");
                    seal_in_place(&public, &c, &mut buf).expect("seal");
                    let o = keys.open_in_place(&c, &mut buf).expect("open");
                    decode_accumulate(o, 0.5, &mut acc).expect("decode");
                })
            });
        }
        // What the node and the engine run since: the in-place path, then
        // the engine's one-read check and its decode into the sum.
        {
            let c = ctx();
            let mut buf = Vec::new();
            g.bench_function(
                BenchmarkId::new("end_to_end_8bit_in_place_checked", &label),
                |b| {
                    b.iter(|| {
                        buf.clear();
                        buf.resize(sealed_header_len(&c), 0);
                        encode_into(&x, &eight, 1, &mut buf).expect("encode");
                        seal_in_place(&public, &c, &mut buf).expect("seal");
                        let o = keys.open_in_place(&c, &mut buf).expect("open");
                        let checked = check(o, n).expect("check");
                        checked.add_scaled_to(0.5, 1.0, &mut acc);
                    })
                },
            );
        }
        g.bench_function(BenchmarkId::new("check_add_8bit", &label), |b| {
            b.iter(|| {
                check(&enc, n)
                    .expect("check")
                    .add_scaled_to(0.5, 1.0, &mut acc)
            })
        });
        // A download as a lossless delta: weights of spread 0.1 after a step
        // of spread 0.01 of theirs.
        let old: Vec<f32> = x.iter().map(|d| 10.0 * d).collect();
        let new: Vec<f32> = old.iter().zip(&x).map(|(w, d)| w + 0.1 * d).collect();
        let packed = model_delta::encode(&old, &new).expect("delta");
        g.bench_function(BenchmarkId::new("model_delta_encode", &label), |b| {
            b.iter(|| model_delta::encode(&old, &new).expect("delta"))
        });
        g.bench_function(BenchmarkId::new("model_delta_decode", &label), |b| {
            b.iter(|| model_delta::decode(&old, &packed).expect("delta"))
        });
        g.finish();
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

criterion_group!(codec_seal, benches);

fn main() {
    println!("load average at start: {}", load_average());
    codec_seal();
    Criterion::default().configure_from_args().final_summary();
    println!("load average at end: {}", load_average());
}
