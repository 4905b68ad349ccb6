//! Checkpoints: atomic folders, safetensors named by the layout, and a
//! resumed engine that continues bit-identically.

mod common;

use cohort_aggregator::checkpoint::{
    latest, weights_from_safetensors, weights_to_safetensors, CHECKSUMS_FILE, STATE_FILE,
    WEIGHTS_FILE,
};
use cohort_aggregator::strategy::AdaptiveParams;
use cohort_aggregator::{
    strategy_from_config, AggError, Engine, EngineConfig, Sampling, StrategyConfig, StrategyKind,
};
use cohort_protocol::messages::RoundPlan;
use cohort_protocol::BACKBONE;
use common::*;

fn adam() -> StrategyConfig {
    StrategyConfig {
        kind: StrategyKind::FedAdam(AdaptiveParams::default()),
        clip_norm: None,
    }
}

fn cfg() -> EngineConfig {
    let mut c = config();
    c.sampling = Sampling {
        fraction: 0.5,
        min_per_round: 1,
        min_available: 1,
    };
    c.rounds = 3;
    c
}

fn tasks_of(i: usize) -> Vec<(&'static str, u64)> {
    match i % 3 {
        0 => vec![("a", 10 + i as u64)],
        1 => vec![("b", 20 + i as u64)],
        _ => vec![("a", 5), ("b", 7)],
    }
}

fn register_all(e: &mut Engine) {
    for i in 0..6 {
        e.register(node(&format!("n{i}"), &tasks_of(i)))
            .expect("reg");
    }
}

/// A deterministic made-up delta for a node's plan (depends on the plan's
/// training seed, so a different sample or RNG state would show).
fn answer(e: &mut Engine, id: &str, plan: &RoundPlan, now: u64) {
    let i: usize = id[1..].parse().expect("index");
    let tasks = tasks_of(i);
    let s = (plan.train.seed % 1000) as f32 / 1000.0;
    let mut deltas = vec![(
        BACKBONE,
        (0..6)
            .map(|k| s - 0.1 * k as f32 + 0.01 * i as f32)
            .collect::<Vec<f32>>(),
    )];
    for (t, _) in &tasks {
        let g = if *t == "a" { "head/a" } else { "head/b" };
        deltas.push((g, vec![s * 0.5, -s + 0.03 * plan.round as f32]));
    }
    let n: u64 = tasks.iter().map(|(_, n)| n).sum();
    let u = update(id, plan, &deltas, n, &tasks);
    e.submit(u, now).expect("accept");
}

fn run_round(e: &mut Engine, start: u64) -> Vec<(String, RoundPlan)> {
    let plans = e.start_round(start).expect("start");
    for (id, p) in &plans {
        answer(e, id, p, start + 10);
    }
    let r = e.poll(start + 20).expect("closed");
    assert!(r.stepped);
    plans
}

fn bits(e: &Engine) -> Vec<(String, Vec<u32>)> {
    e.global()
        .iter()
        .map(|(g, v)| (g.to_string(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

#[test]
fn resumed_engine_is_bit_identical() {
    let dir = tempfile::tempdir().expect("tmp");
    assert!(
        Engine::resume(dir.path(), cfg(), strategy_from_config(&adam()))
            .expect("empty dir")
            .is_none()
    );

    let mut a = engine(cfg(), &adam());
    register_all(&mut a);
    run_round(&mut a, 0);
    a.save_checkpoint(dir.path()).expect("save 1");
    run_round(&mut a, 1000);
    let path = a.save_checkpoint(dir.path()).expect("save 2");
    assert!(path.ends_with("round-000002"));
    // Saving the same round again replaces it.
    a.save_checkpoint(dir.path()).expect("save 2 again");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("round-")),
        "no temp folder left: {names:?}"
    );
    assert_eq!(latest(dir.path()).expect("latest").expect("some").0, 2);
    let at2 = bits(&a);
    let plans_a = run_round(&mut a, 2000);
    assert!(a.is_finished());

    let mut b = Engine::resume(dir.path(), cfg(), strategy_from_config(&adam()))
        .expect("resume")
        .expect("found");
    assert_eq!((b.round(), b.version()), (2, 2));
    assert_eq!(bits(&b), at2);
    register_all(&mut b);
    let plans_b = run_round(&mut b, 2000);
    assert_eq!(plans_a, plans_b, "same sample and same seeds after resume");
    assert_eq!(bits(&a), bits(&b), "bit-identical weights after round 3");
    assert_eq!(a.strategy().state(), b.strategy().state());
    assert!(matches!(b.start_round(3000), Err(AggError::Finished(3))));
}

#[test]
fn weights_file_is_plain_safetensors_named_by_the_layout() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut a = engine(cfg(), &adam());
    register_all(&mut a);
    run_round(&mut a, 0);
    let path = a.save_checkpoint(dir.path()).expect("save");
    let bytes = std::fs::read(path.join(WEIGHTS_FILE)).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        vec![
            "backbone.0.bias",
            "backbone.0.weight",
            "head.a.weight",
            "head.b.weight"
        ]
    );
    let w = st.tensor("backbone.0.weight").expect("t");
    assert_eq!(w.shape(), &[2, 2]);
    assert_eq!(w.dtype(), safetensors::Dtype::F32);
    assert_eq!(st.tensor("head.b.weight").expect("t").shape(), &[1, 2]);
    let back = weights_from_safetensors(&layout(), &bytes).expect("back");
    assert_eq!(&back, a.global());
}

#[test]
fn resume_refuses_other_configs_and_damaged_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut a = engine(cfg(), &adam());
    register_all(&mut a);
    run_round(&mut a, 0);
    let path = a.save_checkpoint(dir.path()).expect("save");
    // More rounds is fine; another seed is not.
    let mut more = cfg();
    more.rounds = 10;
    Engine::resume(dir.path(), more, strategy_from_config(&adam())).expect("more rounds ok");
    let mut other = cfg();
    other.seed = 8;
    assert!(matches!(
        Engine::resume(dir.path(), other, strategy_from_config(&adam())),
        Err(AggError::Checkpoint(_))
    ));
    assert!(matches!(
        Engine::resume(
            dir.path(),
            cfg(),
            strategy_from_config(&StrategyConfig::default())
        ),
        Err(AggError::Checkpoint(_))
    ));
    // Truncated weights.
    let wpath = path.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).expect("read");
    std::fs::write(&wpath, &bytes[..bytes.len() / 2]).expect("write");
    assert!(Engine::resume(dir.path(), cfg(), strategy_from_config(&adam())).is_err());
    // A layout whose sizes overflow, and one far larger than the weights file.
    std::fs::write(&wpath, &bytes).expect("write");
    let spath = path.join(STATE_FILE);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spath).expect("read")).expect("json");
    // A file written as format 1 (no checksums), so that the size checks
    // behind the checksum are reached.
    std::fs::remove_file(path.join(CHECKSUMS_FILE)).expect("rm checksums");
    let with_shape = |group: usize, shape: serde_json::Value| {
        let mut v = state.clone();
        v["format"] = serde_json::json!(1);
        v["layout"]["groups"][group]["tensors"][0]["shape"] = shape;
        serde_json::to_vec(&v).expect("json")
    };
    std::fs::write(
        &spath,
        with_shape(
            0,
            serde_json::json!([4294967296u64, 4294967296u64, 4294967296u64]),
        ),
    )
    .expect("w");
    assert!(matches!(
        Engine::resume(dir.path(), cfg(), strategy_from_config(&adam())),
        Err(AggError::Checkpoint(_))
    ));
    std::fs::write(
        &spath,
        with_shape(2, serde_json::json!([100_000_000u64, 2])),
    )
    .expect("w");
    assert!(matches!(
        Engine::resume(dir.path(), cfg(), strategy_from_config(&adam())),
        Err(AggError::Checkpoint(_))
    ));
    // Garbage state.
    std::fs::write(path.join(STATE_FILE), b"{\"format\": 1, \"round\": ").expect("write");
    assert!(Engine::resume(dir.path(), cfg(), strategy_from_config(&adam())).is_err());
}

#[test]
fn no_checkpoint_while_a_round_is_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut a = engine(cfg(), &adam());
    register_all(&mut a);
    a.start_round(0).expect("start");
    assert!(matches!(
        a.save_checkpoint(dir.path()),
        Err(AggError::RoundOpen(1))
    ));
}

fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Rounds 1 and 2 saved; returns the engine and the weights of round 1.
fn two_checkpoints(dir: &std::path::Path) -> (Engine, Vec<(String, Vec<u32>)>) {
    let mut a = engine(cfg(), &adam());
    register_all(&mut a);
    run_round(&mut a, 0);
    a.save_checkpoint(dir).expect("save 1");
    let at1 = bits(&a);
    run_round(&mut a, 1000);
    a.save_checkpoint(dir).expect("save 2");
    (a, at1)
}

/// Before: no checksum, a flipped bit in a weight loaded silently, and a
/// damaged newest checkpoint stopped the resume. After: it is detected and
/// the previous good checkpoint is used.
#[test]
fn damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let (a, at1) = two_checkpoints(dir.path());
    let newest = dir.path().join("round-000002");
    assert!(newest.join(CHECKSUMS_FILE).is_file());
    // Intact: round 2.
    let b = Engine::resume(dir.path(), cfg(), strategy_from_config(&adam()))
        .expect("resume")
        .expect("found");
    assert_eq!(b.round(), 2);
    assert_eq!(bits(&b), bits(&a));
    // One bit of one weight flipped: still valid safetensors.
    let wpath = newest.join(WEIGHTS_FILE);
    let good = std::fs::read(&wpath).expect("read");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    std::fs::write(&wpath, &bad).expect("write");
    assert!(
        weights_from_safetensors(&layout(), &bad).is_ok(),
        "the damage is invisible to the format"
    );
    assert!(matches!(
        Engine::resume_from(&newest, cfg(), strategy_from_config(&adam())),
        Err(AggError::Checkpoint(m)) if m.contains("damaged")
    ));
    let b = Engine::resume(dir.path(), cfg(), strategy_from_config(&adam()))
        .expect("falls back")
        .expect("found");
    assert_eq!((b.round(), b.version()), (1, 1));
    assert_eq!(bits(&b), at1);
    // A truncated state file: same.
    std::fs::write(&wpath, &good).expect("restore");
    let spath = newest.join(STATE_FILE);
    let state = std::fs::read(&spath).expect("read");
    std::fs::write(&spath, &state[..state.len() / 2]).expect("write");
    let b = Engine::resume(dir.path(), cfg(), strategy_from_config(&adam()))
        .expect("falls back")
        .expect("found");
    assert_eq!(b.round(), 1);
    // Every checkpoint damaged: an error, not a fresh start.
    let old = dir.path().join("round-000001").join(WEIGHTS_FILE);
    std::fs::write(&old, b"garbage").expect("write");
    assert!(matches!(
        Engine::resume(dir.path(), cfg(), strategy_from_config(&adam())),
        Err(AggError::Checkpoint(_))
    ));
}

/// Before: a NaN model loaded (and a NaN state was saved). After: a
/// checkpoint with a non-finite weight, even with valid checksums, is
/// refused at load (and resume falls back), and none is written.
#[test]
fn non_finite_checkpoints_are_neither_loaded_nor_saved() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_a, at1) = two_checkpoints(dir.path());
    let newest = dir.path().join("round-000002");
    let mut nan = initial();
    nan.get_mut(BACKBONE).expect("bb")[3] = f32::NAN;
    let bytes = weights_to_safetensors(&layout(), &nan).expect("st");
    std::fs::write(newest.join(WEIGHTS_FILE), &bytes).expect("write");
    let sums_path = newest.join(CHECKSUMS_FILE);
    let mut sums: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sums_path).expect("read")).expect("json");
    sums[WEIGHTS_FILE] = serde_json::json!(sha256_hex(&bytes));
    std::fs::write(&sums_path, serde_json::to_vec(&sums).expect("json")).expect("write");
    let err = Engine::resume_from(&newest, cfg(), strategy_from_config(&adam()))
        .expect_err("NaN refused");
    assert!(err.to_string().contains("not finite"), "{err}");
    let b = Engine::resume(dir.path(), cfg(), strategy_from_config(&adam()))
        .expect("falls back")
        .expect("found");
    assert_eq!(bits(&b), at1);

    // Save: a strategy whose state holds a NaN is not written.
    #[derive(Debug)]
    struct NanState;
    impl cohort_aggregator::Strategy for NanState {
        fn name(&self) -> &str {
            "nan"
        }
        fn aggregate(
            &mut self,
            _: &cohort_aggregator::AggregateInput<'_>,
            _: &mut cohort_protocol::ParamGroups,
        ) -> Result<(), AggError> {
            Ok(())
        }
        fn state(&self) -> cohort_aggregator::StrategyState {
            let mut s = cohort_aggregator::StrategyState {
                name: "nan".into(),
                ..Default::default()
            };
            s.tensors.insert("m/backbone".into(), vec![f32::NAN; 6]);
            s
        }
        fn restore(
            &mut self,
            _: cohort_aggregator::StrategyState,
            _: &cohort_protocol::Layout,
        ) -> Result<(), AggError> {
            Ok(())
        }
    }
    let e = Engine::new(cfg(), layout(), initial(), Box::new(NanState)).expect("engine");
    let other = tempfile::tempdir().expect("tmp");
    let err = e.save_checkpoint(other.path()).expect_err("not saved");
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(latest(other.path()).expect("ls").is_none());
    // A non-finite initial model is refused at the start.
    assert!(Engine::new(cfg(), layout(), nan, strategy_from_config(&adam())).is_err());
}
