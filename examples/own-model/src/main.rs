//! `cargo run --release -p cohort-example-own-model [rounds]`: federates the
//! residual MLP of this crate on MNIST 5k and prints the accuracy.

fn main() -> anyhow::Result<()> {
    let rounds = match std::env::args().nth(1) {
        Some(r) => r.parse()?,
        None => 15,
    };
    let result = cohort_example_own_model::run(rounds)?;
    let acc = result
        .accuracy("digits")
        .ok_or_else(|| anyhow::anyhow!("no central accuracy for `digits`"))?;
    println!(
        "final: digits accuracy {acc:.3} after {rounds} rounds ({:.1} s)",
        result.wall_s
    );
    Ok(())
}
