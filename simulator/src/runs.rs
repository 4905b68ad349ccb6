//! Run folders: where a run's results go and how they are read back.
//!
//! A run folder holds
//!
//! | file | what |
//! |---|---|
//! | `experiment.toml` | the effective experiment (`cohort-sim --print-config`), without `output`, so that running it again starts a new folder; written before the first round |
//! | `metrics.csv`, `metrics.jsonl` | a row per round ([`crate::metrics::MetricsWriter`]) |
//! | `summary.txt`, `summary.json` | [`RunSummary`]: per task the final and best central accuracy, totals, epsilon |
//! | `result.json` | the whole [`ExperimentResult`] (personalized and federated evaluation, local-only baselines) |
//! | `weights.safetensors` | the final global weights (`cohort_aggregator::checkpoint::weights_to_safetensors`); with `sharing = "separate"` one `weights-<task>.safetensors` per federation |
//! | `plots/<chart>.svg`, `.png` | [`crate::plot::run_charts`] |
//! | `checkpoint/` | the checkpoints `cohort-sim --resume` continues from ([`crate::checkpoint`]) |
//!
//! Repeats over seeds ([`run_repeats`]) put one such folder per seed in
//! `seed-<N>/` and their statistics in the parent's `summary.txt` and
//! `summary.json` ([`RepeatSummary`]), with the mean-and-band plots in
//! its `plots/`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cohort_tasks::ModelRegistry;
use serde::{Deserialize, Serialize};

use crate::metrics::{RoundMetrics, RunSummary};
use crate::{plot, ExperimentConfig, ExperimentResult, SimError};

/// Where `cohort-sim` puts run folders unless `--output` says otherwise.
pub const DEFAULT_BASE: &str = "runs";

/// Bound on a `metrics.jsonl` read back (a million rounds of a few tasks).
const MAX_METRICS_BYTES: u64 = 512 << 20;
/// Bound on a run's `experiment.toml`.
const MAX_EXPERIMENT_BYTES: u64 = 1 << 20;

/// One run's folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl RunDir {
    /// A new folder `base/<name>-<YYYYMMDD-HHMMSS>` (UTC, now); when that
    /// is taken (two runs in one second), `-2`, `-3`, ... Never an
    /// existing folder: each candidate is made with `create_dir`, which
    /// fails if it exists, so two processes cannot pick the same one.
    pub fn create(base: &Path, name: &str) -> Result<Self, SimError> {
        Self::create_at(base, name, SystemTime::now())
    }

    /// [`RunDir::create`] with the time given.
    pub fn create_at(base: &Path, name: &str, now: SystemTime) -> Result<Self, SimError> {
        std::fs::create_dir_all(base).map_err(io(base))?;
        let stem = format!("{}-{}", folder_name(name), utc_stamp(now));
        for i in 1..=10_000u32 {
            let path = match i {
                1 => base.join(&stem),
                _ => base.join(format!("{stem}-{i}")),
            };
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Err(SimError::Run {
            path: base.join(stem),
            reason: "10000 runs of this name in one second".into(),
        })
    }

    /// `path` as the folder of a new run (`--output`): made if missing;
    /// refused if it already holds a run (its `experiment.toml` or
    /// `metrics.csv`), so an earlier run is never overwritten.
    pub fn fresh(path: &Path) -> Result<Self, SimError> {
        let dir = RunDir {
            path: path.to_path_buf(),
        };
        if dir.experiment().exists() || dir.metrics_csv().exists() {
            return Err(SimError::Run {
                path: path.to_path_buf(),
                reason: "holds a run already; pick another --output or remove it".into(),
            });
        }
        std::fs::create_dir_all(path).map_err(io(path))?;
        Ok(dir)
    }

    /// An existing run folder (to compare, resume or read): it must hold
    /// an `experiment.toml`.
    pub fn open(path: &Path) -> Result<Self, SimError> {
        let dir = RunDir {
            path: path.to_path_buf(),
        };
        if !dir.experiment().is_file() {
            return Err(SimError::Run {
                path: path.to_path_buf(),
                reason: "not a run folder (no experiment.toml)".into(),
            });
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder's own name: the run's name in comparisons.
    pub fn name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    pub fn experiment(&self) -> PathBuf {
        self.path.join("experiment.toml")
    }
    pub fn metrics_csv(&self) -> PathBuf {
        self.path.join("metrics.csv")
    }
    pub fn metrics_jsonl(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }
    pub fn summary_txt(&self) -> PathBuf {
        self.path.join("summary.txt")
    }
    pub fn summary_json(&self) -> PathBuf {
        self.path.join("summary.json")
    }
    pub fn result_json(&self) -> PathBuf {
        self.path.join("result.json")
    }
    /// The final global weights; `task` names the federation of one task
    /// (`sharing = "separate"`).
    pub fn weights(&self, task: Option<&str>) -> PathBuf {
        match task {
            None => self.path.join("weights.safetensors"),
            Some(t) => self
                .path
                .join(format!("weights-{}.safetensors", folder_name(t))),
        }
    }
    pub fn plots(&self) -> PathBuf {
        self.path.join("plots")
    }
    /// Reserved for checkpoints of the run (resume).
    pub fn checkpoint(&self) -> PathBuf {
        self.path.join("checkpoint")
    }
    /// The folder of one seed of a repeat.
    pub fn seed(&self, seed: u64) -> PathBuf {
        self.path.join(format!("seed-{seed}"))
    }

    /// Writes `experiment.toml`: `cfg` without its `output`.
    pub fn write_experiment(&self, cfg: &ExperimentConfig) -> Result<(), SimError> {
        let mut cfg = cfg.clone();
        cfg.output = None;
        write(&self.experiment(), cfg.to_toml()?)
    }

    /// The run's experiment, parsed and checked.
    pub fn read_experiment(&self) -> Result<ExperimentConfig, SimError> {
        let text = read_bounded(&self.experiment(), MAX_EXPERIMENT_BYTES)?;
        ExperimentConfig::from_toml(&text).map_err(|e| SimError::Run {
            path: self.experiment(),
            reason: e.to_string(),
        })
    }

    /// The rounds of `metrics.jsonl`, each line checked.
    pub fn read_metrics(&self) -> Result<Vec<RoundMetrics>, SimError> {
        let path = self.metrics_jsonl();
        let text = read_bounded(&path, MAX_METRICS_BYTES)?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| SimError::Run {
                    path: path.clone(),
                    reason: format!("line {}: {e}", i + 1),
                })
            })
            .collect()
    }

    /// Everything a finished run leaves besides its metrics (which
    /// [`crate::metrics::MetricsWriter`] wrote round by round): summaries,
    /// the result, the final weights and the plots.
    pub fn write_results(&self, result: &ExperimentResult) -> Result<(), SimError> {
        let summary = RunSummary::from_rounds(&result.rounds);
        write(&self.summary_txt(), summary.table())?;
        write(&self.summary_json(), to_json(&summary)?)?;
        write(&self.result_json(), to_json(result)?)?;
        for w in &result.weights {
            let bytes =
                cohort_aggregator::checkpoint::weights_to_safetensors(&w.layout, &w.global)?;
            write(&self.weights(w.task.as_deref()), bytes)?;
        }
        plot::write_charts(
            &self.plots(),
            &plot::run_charts(&result.name, &result.rounds),
        )
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<String, SimError> {
    serde_json::to_string_pretty(v).map_err(|e| SimError::Config(e.to_string()))
}

/// A temporary file renamed over `path`: a run killed mid-write (see
/// `--resume`) leaves the old file or the new one, never half of one.
fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), SimError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads a text file of at most `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<String, SimError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(io(path))?;
    if text.len() as u64 > max {
        return Err(SimError::Run {
            path: path.to_path_buf(),
            reason: format!("larger than {max} bytes"),
        });
    }
    Ok(text)
}

/// A name made safe as one path component: ASCII letters, digits, `.`,
/// `_` and `-`, everything else `_`; no leading dot; at most 64 bytes.
fn folder_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let s = s.trim_start_matches('.');
    if s.is_empty() {
        "run".into()
    } else {
        s.into()
    }
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Mean and standard deviation of one figure over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator); 0 for one value.
    pub sd: f64,
    pub min: f64,
    pub max: f64,
    /// One value per seed, in the order of `RepeatSummary::seeds`.
    pub values: Vec<f64>,
}

impl Spread {
    pub fn of(values: Vec<f64>) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n.max(1.0);
        let sd = if values.len() > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Spread {
            mean,
            sd,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            values,
        }
    }
}

/// The central accuracy of one task over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpread {
    pub task: String,
    /// Accuracy at each seed's last evaluated round.
    pub final_accuracy: Spread,
    /// Each seed's best accuracy over its rounds.
    pub best_accuracy: Spread,
}

/// What repeats over seeds report (the parent's `summary.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepeatSummary {
    pub name: String,
    pub seeds: Vec<u64>,
    /// Per task evaluated in every seed's run.
    pub tasks: Vec<TaskSpread>,
}

impl RepeatSummary {
    /// From each seed's rounds, in the order of `seeds`.
    pub fn from_runs(name: &str, seeds: &[u64], runs: &[Vec<RoundMetrics>]) -> Self {
        let sums: Vec<RunSummary> = runs.iter().map(|r| RunSummary::from_rounds(r)).collect();
        let tasks = sums
            .first()
            .map(|s| s.tasks.iter().map(|t| t.task.clone()).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|task| {
                let per: Vec<_> = sums.iter().map(|s| s.task(&task)).collect::<Option<_>>()?;
                let spread = |f: fn(&crate::metrics::TaskSummary) -> f32| {
                    Spread::of(per.iter().map(|t| f64::from(f(t))).collect())
                };
                Some(TaskSpread {
                    final_accuracy: spread(|t| t.final_accuracy),
                    best_accuracy: spread(|t| t.best_accuracy),
                    task,
                })
            })
            .collect();
        RepeatSummary {
            name: name.to_string(),
            seeds: seeds.to_vec(),
            tasks,
        }
    }

    /// The table of `summary.txt`: accuracy in %, mean ± sd over seeds.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let seeds: Vec<String> = self.seeds.iter().map(u64::to_string).collect();
        let mut out = format!(
            "{} seeds ({}): central accuracy, mean ± sample sd\n{:<12} {:>18} {:>18}\n",
            self.seeds.len(),
            seeds.join(", "),
            "task",
            "final",
            "best"
        );
        for t in &self.tasks {
            let f = |s: &Spread| format!("{:.2}% ± {:.2}", 100.0 * s.mean, 100.0 * s.sd);
            let _ = writeln!(
                out,
                "{:<12} {:>18} {:>18}",
                t.task,
                f(&t.final_accuracy),
                f(&t.best_accuracy)
            );
        }
        out
    }
}

/// Runs `cfg` once per seed, each into `dir.seed(seed)` (a complete run
/// folder), then writes the spread over seeds into `dir`: `summary.txt`,
/// `summary.json` ([`RepeatSummary`]), `experiment.toml` (the first
/// seed's) and the mean-and-band charts in `plots/`. `on_round` sees
/// every round of every seed, with the seed.
pub fn run_repeats(
    cfg: &ExperimentConfig,
    models: &ModelRegistry,
    seeds: &[u64],
    dir: &RunDir,
    mut on_round: impl FnMut(u64, &RoundMetrics),
) -> Result<RepeatSummary, SimError> {
    if seeds.is_empty() {
        return Err(SimError::Config("repeats need at least one seed".into()));
    }
    let mut runs = Vec::with_capacity(seeds.len());
    for &seed in seeds {
        let mut one = cfg.clone();
        one.seed = seed;
        one.output = Some(dir.seed(seed));
        let result = crate::run_experiment_with(&one, models, |m| on_round(seed, m))?;
        runs.push(result.rounds);
    }
    let mut first = cfg.clone();
    first.seed = seeds[0];
    dir.write_experiment(&first)?;
    let summary = RepeatSummary::from_runs(&cfg.name, seeds, &runs);
    write(&dir.summary_txt(), summary.table())?;
    write(&dir.summary_json(), to_json(&summary)?)?;
    plot::write_charts(&dir.plots(), &plot::repeat_charts(&cfg.name, &runs))?;
    Ok(summary)
}
