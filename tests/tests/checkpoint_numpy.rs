//! Checkpoints open outside Rust: `tests/python/check_checkpoint.py` loads a
//! `weights.safetensors` written by `cohort-aggregator` (a real federation)
//! and by `cohort-sim --output` with PyTorch's `safetensors` (numpy),
//! runs the forward pass of the equivalent `torch.nn.Sequential` in numpy,
//! and must find Cohort's logits for the same inputs within 1e-5.
//!
//! Needs a Python with `numpy` and `safetensors`: `COHORT_PYTHON`, else
//! `.venv-ci/bin/python` (which `.ci/run` creates), else `python3`. Without
//! one the tests fail under `CI=true` and are skipped (loudly) elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;

use cohort_aggregator::checkpoint::{latest, weights_from_safetensors, WEIGHTS_FILE};
use cohort_tasks::{Backend, ModelRegistry, TaskSpec};
use cohort_tests::net::{bin, experiment, two_node_federation, TestDir};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Python that imports numpy and safetensors, or `None` (outside CI).
fn python() -> Option<PathBuf> {
    let venv = repo().join(".venv-ci/bin/python");
    let candidate = std::env::var_os("COHORT_PYTHON")
        .map(PathBuf::from)
        .or_else(|| venv.is_file().then_some(venv))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let ok = Command::new(&candidate)
        .args(["-c", "import numpy, safetensors.numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(candidate);
    }
    let msg = format!(
        "{} cannot import numpy and safetensors: run `bash .ci/run` once (it creates .venv-ci \
         with both), or `python3 -m venv .venv-ci && .venv-ci/bin/pip install numpy safetensors`, \
         or set COHORT_PYTHON",
        candidate.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
    None
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Computes Cohort's logits of `task` for the first 64 test samples of
/// `dataset` with the weights in `weights` on `backend`, writes inputs and
/// logits into `dir`, and has the Python script check them.
fn check_in_numpy(
    python: &Path,
    weights: &Path,
    backbone: &str,
    backend: Backend,
    task: &str,
    dataset: &str,
    dir: &Path,
) {
    let split = cohort_tasks::data::builtin(dataset).expect("data set");
    let test = &split.test;
    let model = ModelRegistry::default()
        .build(backbone, backend, vec![TaskSpec::new(task, test.classes)])
        .expect("model");
    let bytes = std::fs::read(weights).expect("weights file");
    let params = weights_from_safetensors(&model.layout(), &bytes).expect("weights of this model");
    let idx: Vec<usize> = (0..64.min(test.len())).collect();
    let logits = model
        .logits(&params, task, test, Some(&idx))
        .expect("logits");
    assert_eq!(logits.len(), idx.len() * test.classes);
    // The logits are what `evaluate` scores.
    let argmax = |row: &[f32]| (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
    let correct = logits
        .chunks(test.classes)
        .zip(&idx)
        .filter(|(row, &i)| argmax(row) == test.labels[i] as usize)
        .count();
    let eval = model
        .evaluate(&params, task, test, Some(&idx))
        .expect("evaluate");
    assert_eq!(correct as f32 / idx.len() as f32, eval.accuracy);

    let mut inputs = vec![0.0f32; idx.len() * test.dim];
    for (r, &i) in idx.iter().enumerate() {
        test.copy_row(i, &mut inputs[r * test.dim..(r + 1) * test.dim]);
    }
    let (xb, lb) = (f32_bytes(&inputs), f32_bytes(&logits));
    let cases = safetensors::serialize(
        vec![
            (
                "inputs",
                TensorView::new(Dtype::F32, vec![idx.len(), test.dim], &xb).expect("view"),
            ),
            (
                "logits",
                TensorView::new(Dtype::F32, vec![idx.len(), test.classes], &lb).expect("view"),
            ),
        ],
        None,
    )
    .expect("cases");
    let cases_path = dir.join(format!("cases-{backbone}-{backend}.safetensors"));
    std::fs::write(&cases_path, cases).expect("cases file");
    let out = Command::new(python)
        .arg(repo().join("tests/python/check_checkpoint.py"))
        .arg(weights)
        .arg(&cases_path)
        .args(["--backbone", backbone, "--task", task, "--tol", "1e-5"])
        // One BLAS thread: tests run side by side on a busy machine.
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{backend}: {text}");
    assert!(
        out.status.success(),
        "numpy disagrees with Cohort ({backend}):\n{text}"
    );
    assert!(text.contains("OK"), "{text}");
}

/// `cohort-sim` with `args` and `--output`; returns the weights it wrote.
fn sim_weights(dir: &Path, args: &[&str]) -> PathBuf {
    let out_dir = dir.join("run");
    let out = Command::new(bin("cohort-sim"))
        .args(args)
        .args(["--quiet", "--output"])
        .arg(&out_dir)
        .output()
        .expect("cohort-sim runs");
    assert!(
        out.status.success(),
        "cohort-sim failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out_dir.join("weights.safetensors")
}

#[test]
fn a_checkpoint_of_cohort_aggregator_gives_cohorts_logits_in_numpy() {
    let Some(py) = python() else { return };
    let root = TestDir::new();
    let (agg, _nodes) = two_node_federation(root.path(), &[]);
    let (round, ckpt) = latest(&agg.dir.join("checkpoints"))
        .expect("checkpoints readable")
        .expect("a checkpoint");
    assert_eq!(round, 2);
    let weights = ckpt.join(WEIGHTS_FILE);
    for backend in [Backend::Gemm, Backend::Dfdx] {
        check_in_numpy(
            &py,
            &weights,
            "mlp8x8",
            backend,
            "digits",
            "digits8x8",
            root.path(),
        );
    }
}

#[test]
fn the_weights_of_cohort_sim_output_give_cohorts_logits_in_numpy() {
    let Some(py) = python() else { return };
    let root = TestDir::new();
    let exp = experiment();
    let weights = sim_weights(
        root.path(),
        &[
            "--config",
            exp.to_str().expect("utf-8 path"),
            "--rounds",
            "2",
        ],
    );
    for backend in [Backend::Gemm, Backend::Dfdx] {
        check_in_numpy(
            &py,
            &weights,
            "mlp8x8",
            backend,
            "digits",
            "digits8x8",
            root.path(),
        );
    }
}

/// The CNN's channel-last convolution weights, converted to PyTorch's
/// (out, in, kh, kw) as the README says, give the same logits.
#[test]
fn the_cnn_of_cohort_sim_output_gives_cohorts_logits_in_numpy_in_pytorchs_layout() {
    let Some(py) = python() else { return };
    let root = TestDir::new();
    let weights = sim_weights(
        root.path(),
        &[
            "--task",
            "digits=mnist5k",
            "--backbone",
            "cnn28",
            "--clients",
            "2",
            "--per-round",
            "2",
            "--rounds",
            "1",
        ],
    );
    check_in_numpy(
        &py,
        &weights,
        "cnn28",
        Backend::Gemm,
        "digits",
        "mnist5k",
        root.path(),
    );
}
