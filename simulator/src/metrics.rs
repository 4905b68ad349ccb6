//! Per-round metrics: what a researcher reads, as CSV, JSON lines and a
//! summary table.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::SimError;

/// Accuracy and loss of one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    pub task: String,
    #[serde(deserialize_with = "null_as_nan")]
    pub accuracy: f32,
    #[serde(deserialize_with = "null_as_nan")]
    pub loss: f32,
}

/// serde_json writes a non-finite float as `null`; read it back as NaN.
fn null_as_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// What happened in one round (a line of `metrics.jsonl`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub round: u64,
    /// Model version after the round.
    pub version: u64,
    /// Central evaluation of the global model, per task (empty when not
    /// evaluated this round).
    pub central: Vec<TaskScore>,
    /// Mean local training loss of the accepted clients, per task.
    pub train_loss: Vec<TaskScore>,
    pub sampled: usize,
    pub accepted: usize,
    pub dropped: usize,
    pub late: usize,
    pub refused: usize,
    /// Sealed update bytes sent by clients.
    pub bytes_up: u64,
    /// Model bytes sent to clients (raw f32 of the groups each one needed).
    pub bytes_down: u64,
    /// Wall time of the round, evaluation included.
    pub wall_ms: f64,
    /// Wall time of the central evaluation.
    pub eval_ms: f64,
    /// Differential privacy: epsilon after this round and the round's
    /// parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<cohort_aggregator::PrivacyReport>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `metrics.csv` and `metrics.jsonl` in a folder, a row per round.
#[derive(Debug)]
pub struct MetricsWriter {
    csv: BufWriter<File>,
    jsonl: BufWriter<File>,
    csv_path: PathBuf,
    jsonl_path: PathBuf,
    tasks: Vec<String>,
    privacy: bool,
}

impl MetricsWriter {
    pub fn create(dir: &Path, tasks: &[String]) -> Result<Self, SimError> {
        Self::create_with(dir, tasks, false)
    }

    /// With `privacy`, the CSV has two more columns: `epsilon` (spent after
    /// the round) and `clip` (the round's clip norm).
    pub fn create_with(dir: &Path, tasks: &[String], privacy: bool) -> Result<Self, SimError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let csv_path = dir.join("metrics.csv");
        let jsonl_path = dir.join("metrics.jsonl");
        let mut csv = BufWriter::new(File::create(&csv_path).map_err(io_err(&csv_path))?);
        let jsonl = BufWriter::new(File::create(&jsonl_path).map_err(io_err(&jsonl_path))?);
        let mut header = String::from("round,version");
        for t in tasks {
            let _ = write!(header, ",acc_{t},loss_{t},train_loss_{t}");
        }
        header
            .push_str(",sampled,accepted,dropped,late,refused,bytes_up,bytes_down,wall_ms,eval_ms");
        if privacy {
            header.push_str(",epsilon,clip");
        }
        writeln!(csv, "{header}").map_err(io_err(&csv_path))?;
        Ok(MetricsWriter {
            csv,
            jsonl,
            csv_path,
            jsonl_path,
            tasks: tasks.to_vec(),
            privacy,
        })
    }

    pub fn write(&mut self, m: &RoundMetrics) -> Result<(), SimError> {
        let mut row = format!("{},{}", m.round, m.version);
        for t in &self.tasks {
            let c = m.central.iter().find(|s| &s.task == t);
            let l = m.train_loss.iter().find(|s| &s.task == t);
            let f = |x: Option<f32>| x.map(|v| format!("{v:.6}")).unwrap_or_default();
            let _ = write!(
                row,
                ",{},{},{}",
                f(c.map(|s| s.accuracy)),
                f(c.map(|s| s.loss)),
                f(l.map(|s| s.loss))
            );
        }
        let _ = write!(
            row,
            ",{},{},{},{},{},{},{},{:.1},{:.1}",
            m.sampled,
            m.accepted,
            m.dropped,
            m.late,
            m.refused,
            m.bytes_up,
            m.bytes_down,
            m.wall_ms,
            m.eval_ms
        );
        if self.privacy {
            match &m.privacy {
                Some(p) => {
                    let _ = write!(row, ",{:.6},{:.6}", p.epsilon, p.clip);
                }
                None => row.push_str(",,"),
            }
        }
        writeln!(self.csv, "{row}").map_err(io_err(&self.csv_path))?;
        let line = serde_json::to_string(m).map_err(|e| SimError::Config(e.to_string()))?;
        writeln!(self.jsonl, "{line}").map_err(io_err(&self.jsonl_path))?;
        self.csv.flush().map_err(io_err(&self.csv_path))?;
        self.jsonl.flush().map_err(io_err(&self.jsonl_path))
    }
}

/// Final and best central figures of one task in one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    pub task: String,
    /// Central accuracy at the last evaluated round.
    #[serde(deserialize_with = "null_as_nan")]
    pub final_accuracy: f32,
    #[serde(deserialize_with = "null_as_nan")]
    pub final_loss: f32,
    /// The highest central accuracy of any evaluated round, and that round
    /// (the first one on a tie).
    #[serde(deserialize_with = "null_as_nan")]
    pub best_accuracy: f32,
    pub best_round: u64,
}

/// What `summary.txt` and `summary.json` say about a run: computed from
/// its rounds only, so a run folder's `metrics.jsonl` gives it back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub rounds: usize,
    /// Per task, in the order of the last evaluated round.
    pub tasks: Vec<TaskSummary>,
    pub accepted: usize,
    pub dropped: usize,
    pub refused_or_late: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub wall_ms: f64,
    /// Differential privacy: the report of the last round that had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<cohort_aggregator::PrivacyReport>,
}

impl RunSummary {
    pub fn from_rounds(rounds: &[RoundMetrics]) -> Self {
        let evaluated: Vec<&RoundMetrics> =
            rounds.iter().filter(|r| !r.central.is_empty()).collect();
        let tasks = evaluated.last().map_or_else(Vec::new, |last| {
            last.central
                .iter()
                .map(|s| {
                    let (best_accuracy, best_round) = evaluated
                        .iter()
                        .filter_map(|r| {
                            r.central
                                .iter()
                                .find(|c| c.task == s.task)
                                .map(|c| (c.accuracy, r.round))
                        })
                        .fold((f32::MIN, 0), |a, b| if b.0 > a.0 { b } else { a });
                    TaskSummary {
                        task: s.task.clone(),
                        final_accuracy: s.accuracy,
                        final_loss: s.loss,
                        best_accuracy,
                        best_round,
                    }
                })
                .collect()
        });
        RunSummary {
            rounds: rounds.len(),
            tasks,
            accepted: rounds.iter().map(|r| r.accepted).sum(),
            dropped: rounds.iter().map(|r| r.dropped).sum(),
            refused_or_late: rounds.iter().map(|r| r.refused + r.late).sum(),
            bytes_up: rounds.iter().map(|r| r.bytes_up).sum(),
            bytes_down: rounds.iter().map(|r| r.bytes_down).sum(),
            wall_ms: rounds.iter().map(|r| r.wall_ms).sum(),
            privacy: rounds.iter().rev().find_map(|r| r.privacy.clone()),
        }
    }

    /// The figures of `task`, if it was evaluated.
    pub fn task(&self, task: &str) -> Option<&TaskSummary> {
        self.tasks.iter().find(|t| t.task == task)
    }

    /// The table `cohort-sim` prints and `summary.txt` holds.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if self.tasks.is_empty() {
            out.push_str("no central evaluation was run\n");
        } else {
            let _ = writeln!(
                out,
                "{:<12} {:>9} {:>9} {:>9} {:>10}",
                "task", "acc", "best", "loss", "best@round"
            );
            for t in &self.tasks {
                let _ = writeln!(
                    out,
                    "{:<12} {:>8.2}% {:>8.2}% {:>9.4} {:>10}",
                    t.task,
                    100.0 * t.final_accuracy,
                    100.0 * t.best_accuracy,
                    t.final_loss,
                    t.best_round
                );
            }
        }
        let _ = writeln!(
            out,
            "rounds {}, updates accepted {}, dropped {}, refused or late {}; {:.2} MB up, {:.2} MB down; {:.2} s ({:.3} s/round)",
            self.rounds,
            self.accepted,
            self.dropped,
            self.refused_or_late,
            self.bytes_up as f64 / 1e6,
            self.bytes_down as f64 / 1e6,
            self.wall_ms / 1e3,
            self.wall_ms / 1e3 / self.rounds.max(1) as f64
        );
        if let Some(p) = &self.privacy {
            let _ = writeln!(
                out,
                "differential privacy: ({:.4}, {:.0e})-DP after {} rounds (Poisson rate q = {:.4}, noise multiplier {:.4}, last clip {:.4})",
                p.epsilon, p.delta, p.rounds, p.q, p.noise_multiplier, p.clip
            );
        }
        out
    }
}

/// The final table: per task, the last and the best central accuracy.
pub fn summary_table(rounds: &[RoundMetrics]) -> String {
    RunSummary::from_rounds(rounds).table()
}
