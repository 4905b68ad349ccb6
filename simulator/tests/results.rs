//! What a run leaves on disk (issue 15): the run folder, its plots, the
//! comparison of runs and repeats over seeds, each checked against the
//! runs' own metrics files; and the `cohort-sim` binary's defaults, run as
//! a real process. All on the 8x8 digits (`digits-iid.toml`), few rounds.

use std::path::{Path, PathBuf};
use std::process::Command;

use cohort_aggregator::checkpoint::weights_from_safetensors;
use cohort_simulator::compare::compare;
use cohort_simulator::metrics::RunSummary;
use cohort_simulator::runs::{run_repeats, RunDir, Spread};
use cohort_simulator::{run_experiment, ExperimentConfig, SimError};
use cohort_tasks::ModelRegistry;

fn experiment_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/digits-iid.toml")
}

fn small(rounds: u64) -> ExperimentConfig {
    let mut cfg = ExperimentConfig::from_file(&experiment_file()).expect("experiment file");
    cfg.rounds = rounds;
    cfg.clients.per_round = 10;
    cfg
}

/// A column of a run's `metrics.csv`, parsed here and not by the library
/// (empty cells: rounds without evaluation).
fn csv_column(dir: &Path, column: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let at = header
        .iter()
        .position(|h| *h == column)
        .unwrap_or_else(|| panic!("no column {column}"));
    lines
        .filter_map(|l| {
            let cell = l.split(',').nth(at).expect("cell");
            (!cell.is_empty()).then(|| cell.parse().expect("number"))
        })
        .collect()
}

fn last_and_best(dir: &Path, task: &str) -> (f64, f64) {
    let acc = csv_column(dir, &format!("acc_{task}"));
    let best = acc.iter().copied().fold(f64::MIN, f64::max);
    (*acc.last().expect("evaluated"), best)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

/// A PNG of the chart size with more than a few colours: lines and
/// antialiased text, not a blank image.
fn check_png(path: &Path) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png data");
    assert_eq!((info.width, info.height), (800, 500), "{}", path.display());
    let mut colours: Vec<[u8; 3]> = buf[..info.buffer_size()]
        .chunks_exact(3)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(
        colours.len() > 20,
        "{}: {} colours",
        path.display(),
        colours.len()
    );
}

#[test]
fn a_run_folder_holds_its_experiment_metrics_summaries_weights_and_plots() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("run");
    let mut cfg = small(3);
    cfg.output = Some(dir.clone());
    let result = run_experiment(&cfg, |_| {}).expect("runs");
    let run = RunDir::open(&dir).expect("a run folder");

    let mut want = cfg.clone();
    want.output = None;
    assert_eq!(run.read_experiment().expect("experiment.toml"), want);
    // Field by field: a train loss has no accuracy (NaN, not equal to
    // itself), and serde_json reads an f64 back to within an ulp.
    let same = |a: &[cohort_simulator::RoundMetrics]| {
        a.len() == result.rounds.len()
            && a.iter().zip(&result.rounds).all(|(x, y)| {
                x.round == y.round
                    && x.central.len() == y.central.len()
                    && x.central.iter().zip(&y.central).all(|(a, b)| {
                        a.task == b.task
                            && (a.accuracy - b.accuracy).abs() < 1e-6
                            && (a.loss - b.loss).abs() < 1e-6
                    })
                    && (x.sampled, x.accepted, x.dropped, x.late, x.refused)
                        == (y.sampled, y.accepted, y.dropped, y.late, y.refused)
                    && (x.bytes_up, x.bytes_down) == (y.bytes_up, y.bytes_down)
                    && x.train_loss.len() == y.train_loss.len()
                    && x.train_loss
                        .iter()
                        .zip(&y.train_loss)
                        .all(|(a, b)| (a.loss - b.loss).abs() < 1e-6)
                    && (x.wall_ms - y.wall_ms).abs() < 1e-9 * y.wall_ms.max(1.0)
            })
    };
    assert!(
        same(&run.read_metrics().expect("metrics.jsonl")),
        "metrics.jsonl reads back"
    );
    let summary: RunSummary =
        serde_json::from_value(json(&run.summary_json())).expect("summary.json");
    let want = RunSummary::from_rounds(&result.rounds);
    assert!(
        (summary.wall_ms - want.wall_ms).abs() < 1e-9 * want.wall_ms,
        "within an ulp"
    );
    for (a, b) in summary.tasks.iter().zip(&want.tasks) {
        assert_eq!((&a.task, a.best_round), (&b.task, b.best_round));
        assert!((a.final_accuracy - b.final_accuracy).abs() < 1e-6);
        assert!((a.best_accuracy - b.best_accuracy).abs() < 1e-6);
    }
    assert_eq!(
        RunSummary {
            wall_ms: want.wall_ms,
            tasks: want.tasks.clone(),
            ..summary.clone()
        },
        want
    );
    let (last, best) = last_and_best(&dir, "digits");
    let digits = summary.task("digits").expect("digits");
    assert!((f64::from(digits.final_accuracy) - last).abs() < 1e-6);
    assert!((f64::from(digits.best_accuracy) - best).abs() < 1e-6);
    assert!((f64::from(result.accuracy("digits").expect("final")) - last).abs() < 1e-6);
    let text = std::fs::read_to_string(run.summary_txt()).expect("summary.txt");
    assert!(text.contains(&format!("{:.2}%", 100.0 * last)), "{text}");

    let w = &result.weights[0];
    let bytes = std::fs::read(run.weights(None)).expect("weights.safetensors");
    assert_eq!(
        weights_from_safetensors(&w.layout, &bytes).expect("weights"),
        w.global
    );

    for chart in ["accuracy", "loss", "traffic", "clients"] {
        let svg = std::fs::read_to_string(run.plots().join(format!("{chart}.svg"))).expect("svg");
        assert!(
            svg.contains("round") && svg.contains("<polyline"),
            "{chart}.svg"
        );
        check_png(&run.plots().join(format!("{chart}.png")));
    }
    let loss = std::fs::read_to_string(run.plots().join("loss.svg")).expect("svg");
    assert!(
        loss.contains("digits central") && loss.contains("digits clients&apos; training")
            || loss.contains("digits clients' training"),
        "loss legend"
    );
    assert!(
        !run.plots().join("privacy.svg").exists(),
        "no DP, no epsilon chart"
    );

    // The same folder again: refused, the first run intact.
    let again = run_experiment(&cfg, |_| {});
    assert!(matches!(again, Err(SimError::Run { .. })), "{again:?}");
    assert!(
        same(&run.read_metrics().expect("still there")),
        "the first run intact"
    );
}

#[test]
fn compare_table_and_charts_match_the_runs_metrics_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut dirs = Vec::new();
    for (name, lr) in [("lr-0.2", 0.2), ("lr-0.02", 0.02)] {
        let mut cfg = small(4);
        cfg.engine.train.lr = lr;
        cfg.output = Some(tmp.path().join(name));
        run_experiment(&cfg, |_| {}).expect("runs");
        dirs.push(tmp.path().join(name));
    }
    let out = tmp.path().join("cmp");
    let cmp = compare(&dirs, &out).expect("compare");
    assert_eq!(cmp.rows.len(), 2);
    let table = std::fs::read_to_string(out.join("compare.txt")).expect("compare.txt");
    for (row, dir) in cmp.rows.iter().zip(&dirs) {
        assert_eq!(row.run, dir.file_name().expect("name").to_string_lossy());
        assert_eq!(row.task, "digits");
        let (last, best) = last_and_best(dir, "digits");
        assert!(
            (f64::from(row.final_accuracy) - last).abs() < 1e-6,
            "{row:?} vs {last}"
        );
        assert!(
            (f64::from(row.best_accuracy) - best).abs() < 1e-6,
            "{row:?} vs {best}"
        );
        let line = table
            .lines()
            .find(|l| l.contains(&format!(" {} ", row.run)))
            .expect("row");
        assert!(line.contains(&format!("{:.2}%", 100.0 * last)), "{line}");
        assert!(line.contains(&format!("{:.2}%", 100.0 * best)), "{line}");
    }
    assert_ne!(
        cmp.rows[0].final_accuracy, cmp.rows[1].final_accuracy,
        "the runs differ"
    );
    let back: serde_json::Value = json(&out.join("compare.json"));
    assert_eq!(back["rows"][1]["run"], "lr-0.02");
    for chart in [
        "accuracy_digits",
        "loss_digits",
        "train_loss_digits",
        "bytes_up",
        "accepted",
    ] {
        let svg = std::fs::read_to_string(out.join(format!("plots/{chart}.svg"))).expect("svg");
        assert!(
            svg.contains("lr-0.2") && svg.contains("lr-0.02"),
            "{chart}: a legend entry per run"
        );
        check_png(&out.join(format!("plots/{chart}.png")));
    }
    assert!(
        compare(&dirs[..1], &out).is_err(),
        "one run is no comparison"
    );
    assert!(compare(&[tmp.path().join("nothing"), dirs[0].clone()], &out).is_err());
}

#[test]
fn repeats_report_mean_and_sd_of_the_seeds_metrics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = RunDir::fresh(&tmp.path().join("rep")).expect("folder");
    let seeds = [1u64, 2, 3];
    let cfg = small(3);
    let summary =
        run_repeats(&cfg, &ModelRegistry::default(), &seeds, &dir, |_, _| {}).expect("repeats");
    let stats = |v: &[f64]| {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (v.len() - 1) as f64;
        (mean, var.sqrt())
    };
    let (mut finals, mut bests) = (Vec::new(), Vec::new());
    for s in seeds {
        let seed_dir = dir.seed(s);
        let run = RunDir::open(&seed_dir).expect("seed folder");
        assert_eq!(run.read_experiment().expect("experiment").seed, s);
        let (last, best) = last_and_best(&seed_dir, "digits");
        finals.push(last);
        bests.push(best);
    }
    assert!(
        finals.windows(2).any(|w| w[0] != w[1]),
        "seeds differ: {finals:?}"
    );
    let back = json(&dir.summary_json());
    assert_eq!(back["seeds"], serde_json::json!([1, 2, 3]));
    let task = &back["tasks"][0];
    assert_eq!(task["task"], "digits");
    for (key, values) in [("final_accuracy", &finals), ("best_accuracy", &bests)] {
        let (mean, sd) = stats(values);
        let got = |k: &str| task[key][k].as_f64().expect("number");
        assert!(
            (got("mean") - mean).abs() < 1e-6,
            "{key} mean {} vs {mean}",
            got("mean")
        );
        assert!(
            (got("sd") - sd).abs() < 1e-6,
            "{key} sd {} vs {sd}",
            got("sd")
        );
    }
    assert_eq!(summary.tasks[0].final_accuracy.values.len(), 3);
    let text = std::fs::read_to_string(dir.summary_txt()).expect("summary.txt");
    let (mean, sd) = stats(&finals);
    assert!(
        text.contains(&format!("{:.2}% ± {:.2}", 100.0 * mean, 100.0 * sd)),
        "{text}"
    );
    let svg = std::fs::read_to_string(dir.plots().join("accuracy.svg")).expect("svg");
    assert!(
        svg.contains("<polygon") && svg.contains("band min"),
        "a band on the mean"
    );
    check_png(&dir.plots().join("accuracy.png"));
}

fn cohort_sim(cwd: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort-sim"))
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("cohort-sim starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_binary_saves_each_run_in_its_own_folder_by_default() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = experiment_file();
    let args = [
        "--config",
        file.to_str().expect("utf-8"),
        "--rounds",
        "2",
        "--quiet",
    ];
    let mut folders = Vec::new();
    for _ in 0..2 {
        let stdout = cohort_sim(tmp.path(), &args);
        let last = stdout.lines().last().expect("output");
        let path = last
            .strip_prefix("results in ")
            .unwrap_or_else(|| panic!("last line: {last}"));
        assert!(path.starts_with("runs/digits-iid-"), "{path}");
        let run = RunDir::open(&tmp.path().join(path)).expect("run folder");
        assert_eq!(run.read_metrics().expect("metrics").len(), 2);
        assert!(run.weights(None).is_file() && run.plots().join("accuracy.png").is_file());
        let printed = cohort_sim(
            tmp.path(),
            &[&args[..2], &["--rounds", "2", "--print-config"]].concat(),
        );
        assert_eq!(
            std::fs::read_to_string(run.experiment()).expect("toml"),
            printed
        );
        folders.push(path.to_string());
    }
    assert_ne!(folders[0], folders[1], "two runs, two folders");

    let cmp = cohort_sim(tmp.path(), &["--compare", &folders[0], &folders[1]]);
    assert!(
        cmp.lines()
            .last()
            .expect("line")
            .starts_with("comparison in runs/compare-"),
        "{cmp}"
    );

    let bare = tempfile::tempdir().expect("tmp");
    cohort_sim(bare.path(), &[&args[..], &["--no-save"]].concat());
    assert!(
        !bare.path().join("runs").exists(),
        "--no-save writes nothing"
    );
}

#[test]
fn run_folders_are_named_safely_by_utc_time_and_never_shared() {
    let base = tempfile::tempdir().expect("tmp");
    let at = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
    let name = |n: &str, s: u64| {
        RunDir::create_at(base.path(), n, at(s))
            .expect("folder")
            .name()
    };
    assert_eq!(name("w0", 0), "w0-19700101-000000");
    assert_eq!(name("w0", 951_782_400), "w0-20000229-000000");
    assert_eq!(name("w0", 1_798_761_599), "w0-20261231-235959");
    // A name from a file is one path component, inside `base`.
    assert_eq!(
        name("../../etc/passwd", 1_000_000_000),
        "_.._etc_passwd-20010909-014640"
    );
    assert_eq!(name("", 1_000_000_000), "run-20010909-014640");
    // Two runs in one second.
    let a = RunDir::create_at(base.path(), "w0", at(1_000_000_000)).expect("first");
    let b = RunDir::create_at(base.path(), "w0", at(1_000_000_000)).expect("second");
    assert_eq!(a.name(), "w0-20010909-014640");
    assert_eq!(b.name(), "w0-20010909-014640-2");
    std::fs::write(a.experiment(), "").expect("write");
    assert!(matches!(RunDir::fresh(a.path()), Err(SimError::Run { .. })));
    assert!(RunDir::fresh(b.path()).is_ok(), "an empty folder is fresh");
    assert!(RunDir::open(b.path()).is_err(), "no experiment.toml");
    std::fs::write(a.metrics_jsonl(), "{\"round\": 1, \"central\": 7}\n").expect("write");
    let bad = RunDir::open(a.path()).expect("opens").read_metrics();
    assert!(
        matches!(&bad, Err(SimError::Run { reason, .. }) if reason.starts_with("line 1")),
        "{bad:?}"
    );
}

#[test]
fn spread_uses_the_sample_sd() {
    let s = Spread::of(vec![0.8, 0.9, 1.0]);
    assert!((s.mean - 0.9).abs() < 1e-12);
    assert!((s.sd - 0.1).abs() < 1e-12);
    assert_eq!((s.min, s.max), (0.8, 1.0));
    assert_eq!(Spread::of(vec![0.5]).sd, 0.0);
}
