//! The aggregator's data folder (issue 13, item 8) and its start-up checks
//! (item 6), on the real `cohort-aggregator` binary.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cohort_aggregator::checkpoint::{lock_dir, LOCK_FILE};
use cohort_aggregator::AggError;

const BIN: &str = env!("CARGO_BIN_EXE_cohort-aggregator");

/// Before: there was no lock. After: the second lock on a folder fails at
/// once, naming it, and the folder is free again when the first is dropped.
#[test]
fn data_folder_lock_is_exclusive() {
    let dir = tempfile::tempdir().expect("tmp");
    let first = lock_dir(dir.path()).expect("first lock");
    assert_eq!(first.path(), dir.path().join(LOCK_FILE));
    match lock_dir(dir.path()) {
        Err(AggError::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("second lock: {other:?}"),
    }
    drop(first);
    lock_dir(dir.path()).expect("free again");
}

fn wait_for_lock_holder(dir: &Path, pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap_or_default();
        if text.trim() == pid.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the first aggregator never took the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two real processes on one data folder: the second refuses to start.
#[test]
fn a_second_aggregator_on_the_same_folder_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let args = |d: &Path| {
        vec![
            "--data-dir".to_string(),
            d.display().to_string(),
            "--open".into(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--rounds".into(),
            "1".into(),
            "--nodes".into(),
            "1".into(),
            "--per-round".into(),
            "1".into(),
        ]
    };
    let mut first = Command::new(BIN)
        .args(args(&data))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("first aggregator");
    wait_for_lock_holder(&data, first.id());
    let second = Command::new(BIN)
        .args(args(&data))
        .env("RUST_LOG", "warn")
        .output()
        .expect("second aggregator");
    let still_running = first.try_wait().expect("status").is_none();
    let _ = first.kill();
    let _ = first.wait();
    assert!(still_running, "the first aggregator kept running");
    assert!(!second.status.success(), "the second one must refuse");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("in use by another aggregator"),
        "stderr: {err}"
    );
    // Once the first is gone, the folder can be used again.
    let _lock = lock_dir(&data).expect("released when the process died");
}

/// Before: these experiment files started, and every node failed at its
/// first round. After: the aggregator refuses them at start, naming the
/// field.
#[test]
fn bad_train_or_codec_settings_stop_the_aggregator_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        ("[engine.train]\nbatch_size = 0\n", "train.batch_size"),
        ("[engine.codec]\nbits = 3\n", "codec.bits"),
        ("[engine.train]\nlr = 1e30\n", "train.lr"),
        ("[engine.train]\nepochs = 0\n", "train.epochs"),
        ("[engine.train]\nepochs = 4000000000\n", "train.epochs"),
        ("[engine.train]\nmax_steps = 0\n", "train.max_steps"),
        ("[engine]\nmax_weight_share = 0.0\n", "max_weight_share"),
        ("[engine]\ndeadline_ms = 0\n", "deadline_ms"),
    ];
    for (i, (body, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, body).expect("write");
        let out = Command::new(BIN)
            .arg("--experiment")
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join(format!("d{i}")))
            .arg("--print-config")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{field}: must refuse; stderr {err}");
        assert!(err.contains(field), "{field}: stderr {err}");
    }
    // The embedded default passes.
    let out = Command::new(BIN)
        .arg("--print-config")
        .arg("--data-dir")
        .arg(dir.path().join("ok"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
