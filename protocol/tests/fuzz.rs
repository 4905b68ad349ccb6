//! Fuzzing of every decoder with random and mutated inputs, in-process
//! (cargo-fuzz needs nightly). A counting allocator records the largest
//! single allocation made while decoding each input.
//!
//! Default `cargo test` runs 20,000 inputs; the documented run is
//! `COHORT_FUZZ_INPUTS=1000000 cargo test -p cohort-protocol --test fuzz -- --nocapture`
//! (the test profile is optimized).
#![allow(unsafe_code)] // the counting global allocator

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cohort_protocol::codec::{
    check, decode_accumulate, decode_into_sum_squares, encode, CodecConfig, Rounding, TopK,
};
use cohort_protocol::framing::{frame, unframe};
use cohort_protocol::messages::*;
use cohort_protocol::model_delta;
use cohort_protocol::seal::{seal, SealContext, SealKeyPair};
use cohort_protocol::{
    Fingerprint, GroupLayout, Layout, ParamGroups, TensorSpec, PROTOCOL_VERSION,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Counting;

static TRACK: AtomicBool = AtomicBool::new(false);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        if TRACK.load(Ordering::Relaxed) {
            PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwards the caller's contract to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        if TRACK.load(Ordering::Relaxed) {
            PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        if TRACK.load(Ordering::Relaxed) {
            PEAK.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns the largest single allocation it made.
fn peak_of(f: impl FnOnce()) -> usize {
    PEAK.store(0, Ordering::Relaxed);
    TRACK.store(true, Ordering::Relaxed);
    f();
    TRACK.store(false, Ordering::Relaxed);
    PEAK.load(Ordering::Relaxed)
}

const ACC_LEN: usize = 1000;

fn layout() -> Layout {
    Layout {
        groups: vec![GroupLayout {
            name: "backbone".into(),
            tensors: vec![TensorSpec {
                name: "w".into(),
                shape: vec![40],
                offset: 0,
            }],
        }],
    }
}

fn ctx() -> SealContext {
    SealContext {
        version: PROTOCOL_VERSION,
        federation: "fed".into(),
        round: 3,
        sender: "n1".into(),
        groups: vec!["backbone".into()],
    }
}

/// Valid encodings of every kind, to be mutated.
fn seeds(keys: &SealKeyPair) -> Vec<(Kind, Vec<u8>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..ACC_LEN).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut out = Vec::new();
    for bits in [32u8, 16, 8, 4, 2, 1] {
        for top_k in [None, Some(TopK::Fraction(0.01)), Some(TopK::Fraction(0.5))] {
            let c = CodecConfig {
                bits,
                rounding: Rounding::Stochastic,
                chunk: 64,
                top_k,
            };
            out.push((Kind::Codec, encode(&x, &c, 5).expect("encode")));
        }
    }
    let mut p = ParamGroups::new();
    p.insert("backbone", x[..40].to_vec());
    let plan = RoundPlan {
        federation: "fed".into(),
        round: 3,
        base_version: 2,
        upload: vec!["backbone".into()],
        train: TrainConfig::default(),
        codec: CodecConfig::default(),
        deadline_ms: 1000,
        privacy: None,
    };
    let groups = [
        encode(&x[..40], &CodecConfig::default(), 1).expect("encode"),
        vec![1, 2, 3],
    ];
    let packed = pack_groups(&groups);
    out.push((Kind::Packed, packed.clone()));
    let sealed = seal(&keys.public(), &ctx(), &packed).expect("seal");
    out.push((Kind::Sealed, sealed.clone()));
    let requests = [
        Request::Hello(Hello {
            node: "n1".into(),
            tasks: vec![TaskSamples {
                task: "digits".into(),
                samples: 10,
            }],
            layout: Fingerprint([1; 32]),
            version: 1,
        }),
        Request::GetModel {
            groups: vec!["backbone".into()],
            have_version: None,
        },
        Request::Submit(Update {
            header: UpdateHeader {
                federation: "fed".into(),
                round: 3,
                base_version: 2,
                node: "n1".into(),
                groups: vec!["backbone".into()],
                metrics: vec![TaskMetrics {
                    task: "digits".into(),
                    loss: 1.0,
                    samples: 10,
                    steps: 1,
                }],
                num_examples: 10,
            },
            sealed,
        }),
    ];
    for r in requests {
        let b = encode_envelope(&Envelope::new("fed", r)).expect("encode");
        out.push((Kind::Request, b.clone()));
        out.push((Kind::Frame, frame(&b)));
    }
    for r in [
        Response::Plan(plan),
        Response::Model(ModelPayload::from_groups(3, None, &p)),
        Response::Wait { retry_ms: 5 },
    ] {
        let b = encode_envelope(&Envelope::new("fed", r)).expect("encode");
        out.push((Kind::Response, b));
    }
    // Model downloads as a delta from the held version: a small step, a
    // large one, a delta of a 1000x larger model (a deflate bomb against
    // this base) and one of a smaller model.
    let base = delta_base();
    let small: Vec<f32> = base.iter().map(|w| w + 1e-3 * w.abs()).collect();
    let large: Vec<f32> = x.iter().map(|v| v * 3.0).collect();
    out.push((
        Kind::ModelDelta,
        model_delta::encode(&base, &small).expect("encode"),
    ));
    out.push((
        Kind::ModelDelta,
        model_delta::encode(&base, &large).expect("encode"),
    ));
    let bomb = vec![0.5f32; 1000 * ACC_LEN];
    out.push((
        Kind::ModelDelta,
        model_delta::encode(&bomb, &bomb).expect("encode"),
    ));
    out.push((
        Kind::ModelDelta,
        model_delta::encode(&base[..10], &small[..10]).expect("encode"),
    ));
    out
}

/// The version a node holds, which a model delta applies to.
fn delta_base() -> Vec<f32> {
    (0..ACC_LEN)
        .map(|i| ((i as f32) * 0.37).sin() * 0.1)
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Codec,
    Packed,
    Sealed,
    Request,
    Response,
    Frame,
    ModelDelta,
}

const KINDS: [Kind; 7] = [
    Kind::Codec,
    Kind::Packed,
    Kind::Sealed,
    Kind::Request,
    Kind::Response,
    Kind::Frame,
    Kind::ModelDelta,
];

fn mutate(rng: &mut ChaCha8Rng, b: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..4) {
        match rng.gen_range(0..7) {
            0 if !b.is_empty() => {
                let i = rng.gen_range(0..b.len());
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !b.is_empty() => {
                let i = rng.gen_range(0..b.len());
                b[i] = [0, 1, 0x7f, 0x80, 0xfb, 0xfc, 0xfd, 0xff][rng.gen_range(0..8)];
            }
            2 => {
                let n = rng.gen_range(0..=b.len());
                b.truncate(n);
            }
            3 => {
                for _ in 0..rng.gen_range(1..16) {
                    b.push(rng.gen());
                }
            }
            4 if b.len() >= 8 => {
                // A huge or boundary length at a random place.
                let i = rng.gen_range(0..=b.len() - 8);
                let v: u64 =
                    [u64::MAX, 1 << 60, 1 << 32, u64::from(u32::MAX), 0][rng.gen_range(0..5)];
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 if !b.is_empty() => {
                let i = rng.gen_range(0..b.len());
                let n = rng.gen_range(0..=(b.len() - i).min(32));
                b.drain(i..i + n);
            }
            _ => {
                let i = rng.gen_range(0..=b.len());
                let n = rng.gen_range(0..5);
                let v: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                b.splice(i..i, v);
            }
        }
    }
}

/// Runs the decoder of `kind` on `b`; must return (Ok or a typed error).
fn run(kind: Kind, b: &[u8], keys: &SealKeyPair, acc: &mut [f32], base: &[f32]) {
    let limits = Limits {
        max_request: 1 << 20,
        max_response: 1 << 20,
        ..Limits::default()
    };
    match kind {
        Kind::Codec => {
            let _ = decode_accumulate(b, 0.5, acc);
            let _ = decode_into_sum_squares(b, acc);
            // What the engine runs: a check, then decodes that cannot fail.
            if let Ok(c) = check(b, acc.len()) {
                assert!(
                    c.sum_squares().is_finite(),
                    "a checked encoding sums to a finite value"
                );
                c.add_scaled_to(0.5, 2.0, acc);
                c.decode_scaled(1.0, acc);
            }
        }
        Kind::Packed => {
            let _ = unpack_groups(b, 2);
        }
        Kind::Sealed => {
            let copied = keys.open(&ctx(), b);
            let mut inplace = b.to_vec();
            let opened = keys.open_in_place(&ctx(), &mut inplace);
            // The two ways of opening agree on what they accept.
            assert_eq!(copied.is_ok(), opened.is_ok());
        }
        Kind::Request => {
            let _ = decode_request(b, &limits, Some("fed"));
        }
        Kind::Response => {
            if let Ok(env) = decode_response(b, &limits, Some("fed")) {
                if let Response::Model(m) = env.body {
                    let _ = m.to_groups(&layout());
                }
            }
        }
        Kind::Frame => {
            if let Ok(p) = unframe(b, 1 << 20) {
                let _ = decode_request(p, &limits, None);
            }
        }
        Kind::ModelDelta => {
            // What it promises when it accepts: the base's length, finite.
            if let Ok(w) = model_delta::decode(base, b) {
                assert_eq!(
                    w.len(),
                    base.len(),
                    "model delta of another length accepted"
                );
                assert!(
                    w.iter().all(|v| v.is_finite()),
                    "non-finite weight accepted"
                );
            }
        }
    }
}

fn fuzz(inputs: u64) {
    let keys = SealKeyPair::generate().expect("keys");
    let seeds = seeds(&keys);
    let mut rng = ChaCha8Rng::seed_from_u64(0xf022);
    let mut acc = vec![0.0f32; ACC_LEN];
    let mut worst = (0usize, 0usize, Kind::Codec);
    let mut per_kind = [0u64; KINDS.len()];
    let base = delta_base();
    for i in 0..inputs {
        let (kind, b) = if i % 4 == 0 {
            // Random bytes, sometimes behind a valid-looking prefix.
            let kind = KINDS[rng.gen_range(0..KINDS.len())];
            let n = rng.gen_range(0..200);
            let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) {
                let prefix: &[u8] = match kind {
                    Kind::Codec => b"CQ\x01",
                    Kind::Sealed => b"CSL1",
                    Kind::Request | Kind::Response => &[1, 0, 3, b'f', b'e', b'd'],
                    // A raw deflate block header (stored, fixed, dynamic).
                    Kind::ModelDelta => [&[0x01u8][..], &[0x03], &[0x05]][rng.gen_range(0..3)],
                    _ => &[],
                };
                b.splice(0..0, prefix.iter().copied());
            }
            (kind, b)
        } else {
            let (kind, s) = &seeds[rng.gen_range(0..seeds.len())];
            let mut b = s.clone();
            mutate(&mut rng, &mut b);
            (*kind, b)
        };
        per_kind[KINDS.iter().position(|k| *k == kind).unwrap_or(0)] += 1;
        let peak = peak_of(|| run(kind, &b, &keys, &mut acc, &base));
        // Bound: 1 MiB (serde preallocates a sequence up to 1 MiB, whatever
        // length it claims), or 64 times the input (bincode's claim limit),
        // or the accumulator (sparse decoding buffers one chunk of it).
        let bound = (1usize << 20).max(64 * b.len()).max(4 * ACC_LEN);
        assert!(
            peak <= bound,
            "{kind:?}: input of {} bytes allocated {peak} bytes at once",
            b.len()
        );
        if peak > worst.0 {
            worst = (peak, b.len(), kind);
        }
    }
    println!(
        "fuzz: {inputs} inputs (per kind {:?} = {per_kind:?}), no panic; largest single allocation {} bytes ({:?}, input of {} bytes)",
        KINDS, worst.0, worst.2, worst.1
    );
}

/// Every model-delta seed is exercised (the bomb is refused, the others
/// round-trip), so the fuzz loop starts from inputs that reach deep.
#[test]
fn model_delta_seeds_behave() {
    let base = delta_base();
    let keys = SealKeyPair::generate().expect("keys");
    let s: Vec<Vec<u8>> = seeds(&keys)
        .into_iter()
        .filter(|(k, _)| *k == Kind::ModelDelta)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(s.len(), 4);
    assert!(model_delta::decode(&base, &s[0]).is_ok());
    assert!(model_delta::decode(&base, &s[1]).is_ok());
    let peak = peak_of(|| {
        assert!(model_delta::decode(&base, &s[2]).is_err(), "bomb refused");
    });
    assert!(peak < 1 << 20, "the bomb allocated {peak} bytes");
    assert!(model_delta::decode(&base, &s[3]).is_err(), "too short");
}

#[test]
fn decoders_survive_hostile_inputs() {
    let inputs = std::env::var("COHORT_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    fuzz(inputs);
}
