//! Multi-process federations for the network tests: real `cohort-aggregator`
//! and `cohort-node` processes on real sockets. Every process is killed when
//! its handle drops, so a failing test leaves nothing behind.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A binary of the workspace, built beside the test executable
/// (`target/<profile>/`): `cargo test --workspace` and `cargo nextest run
/// --workspace` build `cohort-node` and `cohort-aggregator` because their
/// packages have integration tests. `-p cohort-tests` alone does not
/// rebuild them: after changing a binary, run with `--workspace` or
/// `cargo build -p cohort-node -p cohort-aggregator` first.
///
/// `COHORT_BIN_DIR` names another folder (e.g. binaries of an older build).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("COHORT_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it with `cargo build -p cohort-node -p cohort-aggregator` \
         (a workspace test run builds it)",
        path.display()
    );
    path
}

/// A folder for one test's processes, deleted at the end unless
/// `COHORT_KEEP_TEST_DIRS` is set (then its path is printed).
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> TestDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        if std::env::var_os("COHORT_KEEP_TEST_DIRS").is_some() {
            let path = tmp.keep();
            eprintln!("test folder kept: {}", path.display());
            return TestDir { path, _tmp: None };
        }
        TestDir {
            path: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

/// The experiment file of the network tests.
pub fn experiment() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../simulator/experiments/digits-net.toml")
}

/// A port that was free a moment ago (for an aggregator that must come back
/// on the same address).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process with its output in files; killed on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, logs: &Path) -> Proc {
        let stdout = logs.join(format!("{name}.out"));
        let stderr = logs.join(format!("{name}.err"));
        // Append: a restarted process keeps the earlier output.
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("log file")
        };
        cmd.stdout(Stdio::from(open(&stdout)))
            .stderr(Stdio::from(open(&stderr)))
            .stdin(Stdio::null());
        // A RUST_LOG the caller set wins. No NO_COLOR: the binaries write
        // no colour codes to a file by themselves (tests/tests/logs.rs).
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env(
                "RUST_LOG",
                "info,libp2p=warn,libp2p_request_response=error,cohort_protocol=debug",
            );
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    pub fn out(&self) -> String {
        read(&self.stdout)
    }

    pub fn err(&self) -> String {
        read(&self.stderr)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits for an exit, panicking with both logs if it does not come.
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait(timeout) {
            Some(s) => s,
            None => panic!(
                "{} did not exit in {timeout:?}\n--- stdout\n{}\n--- stderr (tail)\n{}",
                self.name,
                self.out(),
                tail(&self.err(), 40)
            ),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Polls `f` every 50 ms until it returns `Some`, at most `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An aggregator process and its data folder.
#[derive(Debug)]
pub struct Aggregator {
    pub proc: Proc,
    pub dir: PathBuf,
}

impl Aggregator {
    /// Starts `cohort-aggregator` on `listen` with data in `dir`, and waits
    /// until its connect file names a TCP address.
    pub fn start(dir: &Path, listen: &str, args: &[&str]) -> Aggregator {
        Self::start_with(&experiment(), dir, listen, args)
    }

    /// [`Aggregator::start`] with another experiment file.
    pub fn start_with(experiment: &Path, dir: &Path, listen: &str, args: &[&str]) -> Aggregator {
        Self::start_with_bin(&bin("cohort-aggregator"), experiment, dir, listen, args)
    }

    /// [`Aggregator::start_with`] with a given `cohort-aggregator` binary.
    pub fn start_with_bin(
        binary: &Path,
        experiment: &Path,
        dir: &Path,
        listen: &str,
        args: &[&str],
    ) -> Aggregator {
        Self::start_command(Command::new(binary), experiment, dir, listen, args)
    }

    /// [`Aggregator::start_with`] with a command that takes the flags of
    /// `cohort-aggregator` (e.g. a user's program in its aggregator mode).
    pub fn start_command(
        mut cmd: Command,
        experiment: &Path,
        dir: &Path,
        listen: &str,
        args: &[&str],
    ) -> Aggregator {
        std::fs::create_dir_all(dir).expect("aggregator dir");
        let connect = dir.join("connect.toml");
        let _ = std::fs::remove_file(&connect);
        cmd.arg("--experiment")
            .arg(experiment)
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg(listen)
            .args(args);
        let mut proc = Proc::spawn("aggregator", cmd, dir);
        wait_for(
            Duration::from_secs(30),
            "the aggregator's connect.toml",
            || {
                if let Ok(Some(s)) = proc.child.try_wait() {
                    panic!("aggregator exited early ({s}):\n{}", proc.err());
                }
                read(&connect).contains("/p2p/").then_some(())
            },
        );
        Aggregator {
            proc,
            dir: dir.to_path_buf(),
        }
    }

    pub fn connect_file(&self) -> PathBuf {
        self.dir.join("connect.toml")
    }

    /// The lines of metrics.jsonl of one kind (`round`, `federated_eval`).
    pub fn metrics(&self, kind: &str) -> Vec<Value> {
        read(&self.dir.join("metrics.jsonl"))
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == kind)
            .collect()
    }

    /// Round lines, by round number (the last line of a round wins).
    pub fn rounds(&self) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        for v in self.metrics("round") {
            out.retain(|r| r["round"] != v["round"]);
            out.push(v);
        }
        out.sort_by_key(|v| v["round"].as_u64());
        out
    }

    /// Highest closed round so far.
    pub fn last_round(&self) -> u64 {
        self.rounds()
            .last()
            .and_then(|v| v["round"].as_u64())
            .unwrap_or(0)
    }

    /// Central accuracy of `task` in the last round line.
    pub fn accuracy(&self, task: &str) -> f64 {
        self.rounds()
            .last()
            .and_then(|v| {
                v["central"]
                    .as_array()?
                    .iter()
                    .find(|s| s["task"] == task)?["accuracy"]
                    .as_f64()
            })
            .unwrap_or(f64::NAN)
    }
}

/// Writes the config of node `index` of `count` (shard `index` of an IID
/// split of the digits) and returns its path.
pub fn node_config(dir: &Path, index: usize, count: usize, extra: &str) -> PathBuf {
    node_config_for(dir, index, count, extra, "mlp8x8", "digits8x8")
}

/// [`node_config`] for the task `digits` on another data set and backbone.
pub fn node_config_for(
    dir: &Path,
    index: usize,
    count: usize,
    extra: &str,
    backbone: &str,
    dataset: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir).expect("node dir");
    let text = format!(
        r#"data_dir = "{dir}"
backbone = "{backbone}"
seed = {index}
{extra}

[[tasks]]
name = "digits"
dataset = "{dataset}"
shard = {{ index = {index}, count = {count}, partitioner = {{ kind = "iid" }}, seed = 3 }}

[backoff]
initial_ms = 100
max_ms = 1000
"#,
        dir = dir.display()
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, text).expect("node config");
    path
}

/// Starts `cohort-node` with the config in `dir` (see [`node_config`]).
pub fn start_node(name: &str, dir: &Path, connect: &Path) -> Proc {
    let mut cmd = Command::new(bin("cohort-node"));
    cmd.arg("--config")
        .arg(dir.join("node.toml"))
        .arg("--connect")
        .arg(connect);
    Proc::spawn(name, cmd, dir)
}

/// The peer id of the node whose data folder is `dir` (created if needed).
pub fn peer_id(dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("node dir");
    let out = Command::new(bin("cohort-node"))
        .arg("--data-dir")
        .arg(dir)
        .arg("--print-peer-id")
        .output()
        .expect("cohort-node --print-peer-id");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A finished federation of one `cohort-aggregator` and two `cohort-node`
/// processes on 127.0.0.1 (TCP), two rounds of `experiment()`, `extra`
/// flags on every process, `NO_COLOR` unset. Panics with the logs when a
/// process fails.
pub fn two_node_federation(root: &Path, extra: &[&str]) -> (Aggregator, Vec<Proc>) {
    let mut cmd = Command::new(bin("cohort-aggregator"));
    cmd.env_remove("NO_COLOR");
    let mut args = vec![
        "--open",
        "--rounds",
        "2",
        "--nodes",
        "2",
        "--per-round",
        "2",
        "--linger-s",
        "3",
    ];
    args.extend_from_slice(extra);
    let mut agg = Aggregator::start_command(
        cmd,
        &experiment(),
        &root.join("agg"),
        "/ip4/127.0.0.1/tcp/0",
        &args,
    );
    let mut nodes: Vec<Proc> = (0..2)
        .map(|i| {
            let dir = root.join(format!("node{i}"));
            node_config(&dir, i, 2, "");
            let mut cmd = Command::new(bin("cohort-node"));
            cmd.arg("--config")
                .arg(dir.join("node.toml"))
                .arg("--connect")
                .arg(agg.connect_file())
                .args(extra)
                .env_remove("NO_COLOR");
            Proc::spawn(&format!("node{i}"), cmd, &dir)
        })
        .collect();
    let status = agg.proc.expect_exit(Duration::from_secs(180));
    assert!(
        status.success(),
        "aggregator: {}",
        tail(&agg.proc.err(), 30)
    );
    for n in &mut nodes {
        let s = n.expect_exit(Duration::from_secs(60));
        assert!(s.success(), "{}: {}", n.name, tail(&n.err(), 30));
    }
    assert_eq!(agg.last_round(), 2, "two rounds closed");
    (agg, nodes)
}
