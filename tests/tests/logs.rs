//! The log files of the real binaries: no terminal colour codes when
//! stderr is a file (without `NO_COLOR`), and with `--log-format json`
//! every line is a JSON object with a level, a target and the event's
//! fields.

use std::path::Path;
use std::process::Command;

use cohort_tests::net::{bin, experiment, tail, two_node_federation, TestDir};
use serde_json::Value;

const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];

fn assert_no_colour(name: &str, log: &str) {
    assert!(!log.trim().is_empty(), "{name} wrote no log lines");
    assert!(
        !log.contains("\x1b["),
        "{name}'s log file has ANSI escape codes:\n{}",
        tail(log, 10)
    );
}

/// Every line is a JSON object with `timestamp`, a `level`, a `target`
/// and `fields`; the events' messages are in `fields.message`. Returns
/// the messages.
fn json_messages(name: &str, log: &str) -> Vec<String> {
    let mut messages = Vec::new();
    for (i, line) in log.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{name}, line {}: not JSON ({e}): {line}", i + 1));
        let level = v["level"].as_str().unwrap_or_default();
        assert!(LEVELS.contains(&level), "{name}: level in {line}");
        assert!(
            v["target"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: target in {line}"
        );
        assert!(v["timestamp"].is_string(), "{name}: timestamp in {line}");
        assert!(v["fields"].is_object(), "{name}: fields in {line}");
        if let Some(m) = v["fields"]["message"].as_str() {
            messages.push(m.to_string());
        }
    }
    assert!(!messages.is_empty(), "{name}: no message in {log}");
    messages
}

/// Checks one log file in `format`; returns its messages (json) or lines.
fn check_log(name: &str, log: &str, format: &str) -> Vec<String> {
    assert_no_colour(name, log);
    match format {
        "json" => json_messages(name, log),
        _ => {
            assert!(
                log.lines()
                    .all(|l| serde_json::from_str::<Value>(l).is_err()),
                "{name}: text logs are not JSON"
            );
            log.lines().map(str::to_string).collect()
        }
    }
}

/// `cohort-sim` on the 8x8 digits for one round, stderr to a file.
fn sim_log(dir: &Path, format: &str) -> String {
    let err = dir.join(format!("sim-{format}.err"));
    let status = Command::new(bin("cohort-sim"))
        .args(["--config"])
        .arg(experiment())
        .args([
            "--rounds",
            "1",
            "--quiet",
            "--no-save",
            "--log-format",
            format,
        ])
        .env("RUST_LOG", "debug")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).expect("log file"))
        .status()
        .expect("cohort-sim runs");
    assert!(
        status.success(),
        "cohort-sim failed: {}",
        cohort_tests::net::read(&err)
    );
    cohort_tests::net::read(&err)
}

/// The (name, stderr) of each process of a two-node federation whose
/// processes all log with `--log-format format`.
fn federation_logs(root: &Path, format: &str) -> Vec<(String, String)> {
    let (agg, nodes) = two_node_federation(root, &["--log-format", format]);
    std::iter::once(("aggregator".to_string(), agg.proc.err()))
        .chain(nodes.iter().map(|n| (n.name.clone(), n.err())))
        .collect()
}

#[test]
fn cohort_sim_logs_to_a_file_without_colours_as_text_or_json() {
    let dir = TestDir::new();
    let text = sim_log(dir.path(), "text");
    let lines = check_log("cohort-sim", &text, "text");
    assert!(lines.iter().any(|l| l.contains("DEBUG")), "{text}");
    let json = sim_log(dir.path(), "json");
    let messages = check_log("cohort-sim --log-format json", &json, "json");
    assert!(
        messages.iter().any(|m| m == "update accepted"),
        "the engine's events are there: {messages:?}"
    );
}

#[test]
fn aggregator_and_node_log_files_have_no_colour_codes() {
    let root = TestDir::new();
    for (name, log) in federation_logs(root.path(), "text") {
        let lines = check_log(&name, &log, "text");
        assert!(lines.iter().any(|l| l.contains(" INFO ")), "{name}: {log}");
    }
}

#[test]
fn aggregator_and_node_write_json_lines_with_log_format_json() {
    let root = TestDir::new();
    let logs = federation_logs(root.path(), "json");
    for (name, log) in &logs {
        check_log(name, log, "json");
    }
    let agg = json_messages("aggregator", &logs[0].1);
    assert!(
        agg.iter().any(|m| m.contains("round")),
        "the aggregator's round events: {agg:?}"
    );
}
