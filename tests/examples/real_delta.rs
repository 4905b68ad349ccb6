//! Writes a real delta for the compression table: the 784-256-128 MLP with a
//! 10-class head, one local epoch on MNIST 5k (batch 32, SGD lr 0.05) from
//! its initial weights; all groups concatenated as raw little-endian f32.
//!
//! cargo run --release -p cohort-tests --example real_delta -- /tmp/delta.f32
//! cargo run --release -p cohort-protocol --example compression_table -- /tmp/delta.f32

use cohort_protocol::messages::TrainConfig;
use cohort_tasks::TaskData;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "delta.f32".into());
    let split = cohort_tasks::builtin("mnist5k")?;
    let spec = cohort_tests::builtin_model("mlp28", &[("digits", 10)]);
    let start = spec.init(1);
    let all: Vec<usize> = (0..split.train.len()).collect();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 32,
        lr: 0.05,
        seed: 1,
        ..TrainConfig::default()
    };
    let trained = spec.train(
        &start,
        &[TaskData {
            task: "digits",
            data: &split.train,
            indices: &all,
        }],
        &cfg,
    )?;
    let delta = trained.params.delta_from(&start)?;
    let mut bytes = Vec::with_capacity(4 * delta.num_values());
    for (_, v) in delta.iter() {
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(&out, &bytes)?;
    println!(
        "wrote {} values ({} bytes) to {out}",
        delta.num_values(),
        bytes.len()
    );
    Ok(())
}
