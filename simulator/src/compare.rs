//! Several finished runs side by side: a table of the final and best
//! central accuracy per task and run, and one chart per metric with a line
//! per run ([`crate::plot::compare_charts`]).

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::metrics::{RoundMetrics, RunSummary};
use crate::runs::RunDir;
use crate::{plot, SimError};

/// One run of a comparison: its folder's name and its rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub name: String,
    pub rounds: Vec<RoundMetrics>,
}

impl Run {
    /// Reads a run folder's `metrics.jsonl`.
    pub fn load(dir: &Path) -> Result<Self, SimError> {
        let run = RunDir::open(dir)?;
        Ok(Run {
            name: run.name(),
            rounds: run.read_metrics()?,
        })
    }
}

/// One line of the comparison table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareRow {
    pub run: String,
    pub task: String,
    pub rounds: usize,
    pub final_accuracy: f32,
    pub best_accuracy: f32,
    pub best_round: u64,
    pub final_loss: f32,
    pub mb_up: f64,
}

/// The table of a comparison (`compare.json`), by task, then run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub rows: Vec<CompareRow>,
}

impl Comparison {
    pub fn of(runs: &[Run]) -> Self {
        let sums: Vec<(String, RunSummary)> = runs
            .iter()
            .map(|r| (r.name.clone(), RunSummary::from_rounds(&r.rounds)))
            .collect();
        let mut tasks: Vec<String> = Vec::new();
        for (_, s) in &sums {
            for t in &s.tasks {
                if !tasks.contains(&t.task) {
                    tasks.push(t.task.clone());
                }
            }
        }
        let rows = tasks
            .iter()
            .flat_map(|task| {
                sums.iter().filter_map(move |(run, s)| {
                    s.task(task).map(|t| CompareRow {
                        run: run.clone(),
                        task: task.clone(),
                        rounds: s.rounds,
                        final_accuracy: t.final_accuracy,
                        best_accuracy: t.best_accuracy,
                        best_round: t.best_round,
                        final_loss: t.final_loss,
                        mb_up: s.bytes_up as f64 / 1e6,
                    })
                })
            })
            .collect();
        Comparison { rows }
    }

    /// The printed table: accuracy in % with two decimals.
    pub fn table(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|r| r.run.len())
            .max()
            .unwrap_or(3)
            .max(3);
        let mut out = format!(
            "{:<12} {:<width$} {:>7} {:>9} {:>9} {:>10} {:>9} {:>9}\n",
            "task", "run", "rounds", "final", "best", "best@round", "loss", "MB up"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{:<12} {:<width$} {:>7} {:>8.2}% {:>8.2}% {:>10} {:>9.4} {:>9.2}",
                r.task,
                r.run,
                r.rounds,
                100.0 * r.final_accuracy,
                100.0 * r.best_accuracy,
                r.best_round,
                r.final_loss,
                r.mb_up
            );
        }
        out
    }
}

/// Compares the run folders `dirs` into `out`: `compare.txt` (the table),
/// `compare.json` ([`Comparison`]) and `plots/<metric>.svg|png`.
pub fn compare(dirs: &[impl AsRef<Path>], out: &Path) -> Result<Comparison, SimError> {
    if dirs.len() < 2 {
        return Err(SimError::Config(
            "compare needs at least two run folders".into(),
        ));
    }
    let mut runs = dirs
        .iter()
        .map(|d| Run::load(d.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    // Folders of one name (`a/seed-1`, `b/seed-1`) are told apart by path.
    for (run, dir) in runs.iter_mut().zip(dirs) {
        if dirs
            .iter()
            .filter(|d| Path::new(d.as_ref()).file_name() == dir.as_ref().file_name())
            .count()
            > 1
        {
            run.name = dir.as_ref().display().to_string();
        }
    }
    let cmp = Comparison::of(&runs);
    std::fs::create_dir_all(out).map_err(|source| SimError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|source| SimError::Io { path, source })
    };
    write("compare.txt", cmp.table())?;
    write(
        "compare.json",
        serde_json::to_string_pretty(&cmp).map_err(|e| SimError::Config(e.to_string()))?,
    )?;
    let named: Vec<(String, Vec<RoundMetrics>)> =
        runs.into_iter().map(|r| (r.name, r.rounds)).collect();
    plot::write_charts(&out.join("plots"), &plot::compare_charts(&named))?;
    Ok(cmp)
}
