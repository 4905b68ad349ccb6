//! End-to-end workloads of DESIGN.md, timed in release mode:
//!
//! - `w1`: full Fashion-MNIST (apt-get install -y dataset-fashion-mnist),
//!   100 clients, 10 a round, 30 rounds: seconds per round and final accuracy.
//! - `scale`: 100,000 registered clients, 1,000 a round, the 8x8 digits MLP:
//!   seconds per round and peak RSS.
//! - `w0`: the embedded default.
//!
//! cargo bench -p cohort-simulator --bench workloads -- [w0|w1|scale] [--threads N]

use std::path::PathBuf;
use std::time::Instant;

use cohort_simulator::{ExperimentConfig, Simulation};

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn experiment(name: &str) -> ExperimentConfig {
    let file = match name {
        "w1" => "w1-fashion.toml",
        "scale" => "scale.toml",
        _ => return ExperimentConfig::default(),
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("experiments")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ExperimentConfig::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let which: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--") && a.parse::<usize>().is_err())
        .collect();
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let which = if which.is_empty() {
        vec!["w0", "w1", "scale"]
    } else {
        which
    };
    for name in which {
        let mut cfg = experiment(name);
        cfg.threads = threads;
        let t = Instant::now();
        let mut sim = match Simulation::new(cfg.clone()) {
            Ok(s) => s,
            Err(e) => {
                println!("{name}: skipped ({e})");
                continue;
            }
        };
        let setup = t.elapsed().as_secs_f64();
        let rounds = sim.run(|_| {}).expect("run");
        let total: f64 = rounds.iter().map(|r| r.wall_ms).sum::<f64>() / 1e3;
        let eval: f64 = rounds.iter().map(|r| r.eval_ms).sum::<f64>() / 1e3;
        let last = rounds.last().expect("rounds");
        let accs: Vec<String> = last
            .central
            .iter()
            .map(|s| format!("{} {:.2}%", s.task, 100.0 * s.accuracy))
            .collect();
        let per_round: Vec<f64> = rounds.iter().map(|r| r.wall_ms / 1e3).collect();
        let mut sorted = per_round.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{name}: {} clients ({} a round), {} rounds, threads {}: setup {setup:.2} s, {total:.2} s in rounds, \
             {:.3} s/round mean ({:.3} s of it central evaluation), {:.3} s/round median; final {}; state {} clients / {:.1} MB; peak RSS {:.0} MB",
            cfg.clients.count,
            cfg.clients.per_round,
            rounds.len(),
            if threads == 0 { rayon::current_num_threads() } else { threads },
            total / rounds.len() as f64,
            eval / rounds.len() as f64,
            sorted[sorted.len() / 2],
            accs.join(", "),
            sim.clients_with_state(),
            sim.state_bytes() as f64 / 1e6,
            peak_rss_mb().unwrap_or(f64::NAN)
        );
    }
}
