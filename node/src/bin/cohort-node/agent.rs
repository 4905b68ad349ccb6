//! The node's driver: hello, follow round plans, train off the async
//! runtime, seal and submit, evaluate when asked; reconnect with backoff.
//! It talks to the event loop (which owns the Swarm) through a [`Client`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use cohort_node::{NodeRuntime, NodeState};
use cohort_protocol::messages::{
    Envelope, EvalMetrics, EvalReport, Hello, Refusal, RefusalCode, Request, Response, RoundPlan,
};
use cohort_protocol::transport::{Client, RequestError};
use cohort_protocol::{ParamGroups, PROTOCOL_VERSION};
use cohort_tasks::{Dataset, TaskData};
use libp2p::{Multiaddr, PeerId};
use rand::Rng;
use tracing::{info, warn};

use crate::config::Backoff;

/// A task's data on this node: its training and local test samples.
#[derive(Debug)]
pub struct LocalTask {
    pub name: String,
    pub data: Dataset,
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

pub struct Agent {
    pub client: Client,
    pub aggregator: PeerId,
    /// Its address: given to the event loop again before every hello,
    /// because libp2p forgets an address whose dial failed (an aggregator
    /// that is restarting).
    pub address: Multiaddr,
    pub federation: String,
    pub runtime: Option<NodeRuntime>,
    pub tasks: Arc<Vec<LocalTask>>,
    pub state_path: PathBuf,
    pub backoff: Backoff,
    pub hello: Hello,
    /// Longest wait for any answer (beyond the transport's own request
    /// timeout, a guard against a loop that never answers).
    pub request_timeout: Duration,
    registered: bool,
    /// The global weights of the version held (for `have_version`).
    held: Option<(u64, ParamGroups)>,
    failures: u32,
}

enum Flow {
    Continue,
    Sleep(u64),
    Done,
}

enum StepError {
    /// Network trouble: back off, reconnect, say hello again.
    Net(RequestError),
    Refused(Refusal),
    /// An answer that does not check out (bad model bytes, wrong kind):
    /// logged, the cached model dropped, then like `Net`.
    BadAnswer(String),
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for StepError {
    fn from(e: anyhow::Error) -> Self {
        StepError::Fatal(e)
    }
}

/// The name of an answer (never its content, which may be a whole model).
fn kind(r: &Response) -> &'static str {
    match r {
        Response::Welcome { .. } => "welcome",
        Response::Plan(_) => "plan",
        Response::Wait { .. } => "wait",
        Response::Model(_) => "model",
        Response::Evaluate { .. } => "evaluate",
        Response::Ack => "ack",
        Response::Refused(_) => "refused",
    }
}

/// The aggregator will never take this node (not allowed, another
/// federation, protocol version or model).
#[derive(Debug)]
pub struct RefusedForGood(pub Refusal);

impl std::fmt::Display for RefusedForGood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused by the aggregator ({:?}): {}",
            self.0.code, self.0.message
        )
    }
}

impl std::error::Error for RefusedForGood {}

/// Exit code when the aggregator refuses this node for good.
pub const EXIT_REFUSED: i32 = 3;

/// Loads the node's persisted state; a file that does not fit the model is
/// an error (the operator decides, nothing is silently dropped).
pub fn load_state(path: &std::path::Path, runtime: &NodeRuntime) -> anyhow::Result<NodeState> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(NodeState::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let (state, _): (NodeState, usize) = bincode::serde::decode_from_slice(
        &bytes,
        bincode::config::standard().with_limit::<{ 1 << 32 }>(),
    )
    .map_err(|e| {
        anyhow!(
            "{}: not a node state file ({e}); move it aside to start afresh",
            path.display()
        )
    })?;
    let layout = runtime.model.layout();
    for (name, values) in state.local.iter() {
        match layout.group(name) {
            Some(g) if g.len() == values.len() as u64 => {}
            _ => anyhow::bail!(
                "{}: group `{name}` does not fit this node's model; move the file aside to start afresh",
                path.display()
            ),
        }
    }
    Ok(state)
}

/// Writes the state atomically and durably: a temporary file created with
/// mode 0600 (local heads are private), fsynced, renamed over the old one,
/// then the folder fsynced.
pub fn save_state(path: &std::path::Path, state: &NodeState) -> anyhow::Result<()> {
    use std::io::Write;
    let bytes = bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| anyhow!("encoding the node state: {e}"))?;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        // A temporary file left by an older version may have other bits.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", tmp.display()))?;
    }
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl Agent {
    pub fn new(
        client: Client,
        aggregator: PeerId,
        address: Multiaddr,
        runtime: NodeRuntime,
        tasks: Vec<LocalTask>,
        state_path: PathBuf,
        backoff: Backoff,
    ) -> Self {
        let hello = Hello {
            node: runtime.id.clone(),
            tasks: tasks
                .iter()
                .map(|t| cohort_protocol::messages::TaskSamples {
                    task: t.name.clone(),
                    samples: t.train.len() as u64,
                })
                .collect(),
            layout: runtime.model.layout().fingerprint(),
            version: PROTOCOL_VERSION,
        };
        Agent {
            client,
            aggregator,
            address,
            federation: runtime.federation.clone(),
            runtime: Some(runtime),
            tasks: Arc::new(tasks),
            state_path,
            backoff,
            hello,
            request_timeout: Duration::from_secs(330),
            registered: false,
            held: None,
            failures: 0,
        }
    }

    /// Runs until the federation is over (Ok) or the aggregator refuses the
    /// node for good (Err holding a [`RefusedForGood`]).
    pub async fn run(mut self) -> anyhow::Result<()> {
        loop {
            match self.step().await {
                Ok(Flow::Continue) => self.failures = 0,
                Ok(Flow::Sleep(ms)) => {
                    self.failures = 0;
                    tokio::time::sleep(Duration::from_millis(ms.min(5_000))).await;
                }
                Ok(Flow::Done) => return Ok(()),
                Err(StepError::Net(e)) => {
                    self.registered = false;
                    let wait = self.next_backoff();
                    if self.failures == 4 {
                        // An aggregator refuses a peer that is not on its
                        // allowlist at the connection, without a word.
                        warn!(
                            peer_id = %self.hello.node,
                            "the aggregator keeps closing the connection: is this peer id on its allowlist?"
                        );
                    }
                    warn!(%e, retry_ms = wait, "aggregator unreachable; reconnecting");
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(StepError::Refused(r)) => match r.code {
                    RefusalCode::NotAllowed
                    | RefusalCode::VersionMismatch
                    | RefusalCode::LayoutMismatch
                    | RefusalCode::WrongFederation => return Err(RefusedForGood(r).into()),
                    RefusalCode::UnknownNode => self.registered = false,
                    code => {
                        // A late or refused update, a refused download: try
                        // again, but never in a tight loop.
                        let wait = self.next_backoff();
                        warn!(?code, reason = %r.message, retry_ms = wait, "refused");
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                },
                Err(StepError::BadAnswer(e)) => {
                    self.registered = false;
                    self.held = None;
                    let wait = self.next_backoff();
                    warn!(reason = %e, retry_ms = wait, "bad answer from the aggregator");
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(StepError::Fatal(e)) => return Err(e),
            }
        }
    }

    fn next_backoff(&mut self) -> u64 {
        let exp = self.failures.min(20);
        self.failures += 1;
        let base = self
            .backoff
            .initial_ms
            .saturating_mul(1 << exp)
            .min(self.backoff.max_ms);
        // +-20% jitter so that nodes cut off together do not return together.
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        (base as f64 * jitter) as u64
    }

    async fn ask(&mut self, body: Request) -> Result<Response, StepError> {
        let env = Envelope::new(self.federation.clone(), body);
        let answer = tokio::time::timeout(
            self.request_timeout,
            self.client.request(self.aggregator, env),
        )
        .await
        .map_err(|_| StepError::Net(RequestError::Timeout))?
        .map_err(StepError::Net)?;
        match answer.body {
            Response::Refused(r) => Err(StepError::Refused(r)),
            other => Ok(other),
        }
    }

    async fn step(&mut self) -> Result<Flow, StepError> {
        if !self.registered {
            self.client
                .add_address(self.aggregator, self.address.clone())
                .await;
            match self.ask(Request::Hello(self.hello.clone())).await? {
                Response::Welcome {
                    node,
                    model_version,
                } => {
                    info!(node, model_version, "joined the federation");
                    self.registered = true;
                    return Ok(Flow::Continue);
                }
                other => {
                    return Err(StepError::BadAnswer(format!(
                        "unexpected answer to hello: {}",
                        kind(&other)
                    )))
                }
            }
        }
        match self.ask(Request::GetPlan).await {
            Ok(Response::Plan(plan)) => self.round(plan).await,
            Ok(Response::Wait { retry_ms }) => Ok(Flow::Sleep(retry_ms)),
            Ok(Response::Evaluate { round, version }) => self.evaluate(round, version).await,
            Ok(other) => Err(StepError::BadAnswer(format!(
                "unexpected answer to get_plan: {}",
                kind(&other)
            ))),
            Err(StepError::Refused(r)) if r.code == RefusalCode::Finished => {
                info!("{}", r.message);
                Ok(Flow::Done)
            }
            Err(e) => Err(e),
        }
    }

    fn runtime(&self) -> Result<&NodeRuntime, StepError> {
        self.runtime
            .as_ref()
            .ok_or_else(|| StepError::Fatal(anyhow!("training thread lost the runtime")))
    }

    /// The global weights of `version` for the groups this node needs:
    /// every group it holds, except local groups it has trained already.
    async fn model(&mut self, version: u64) -> Result<ParamGroups, StepError> {
        let rt = self.runtime()?;
        let layout = rt.model.layout();
        let groups: Vec<String> = layout
            .group_names()
            .filter(|g| rt.state.local.get(g).is_none())
            .map(str::to_string)
            .collect();
        let held = self
            .held
            .as_ref()
            .filter(|(_, w)| groups.iter().all(|g| w.contains(g)));
        if let Some((v, w)) = held {
            if *v == version {
                return Ok(w.clone());
            }
        }
        let have_version = held.map(|(v, _)| *v);
        let payload = match self
            .ask(Request::GetModel {
                groups: groups.clone(),
                have_version,
            })
            .await?
        {
            Response::Model(p) => p,
            other => {
                return Err(StepError::BadAnswer(format!(
                    "unexpected answer to get_model: {}",
                    kind(&other)
                )))
            }
        };
        let weights = payload
            .apply(&layout, self.held.as_ref().map(|(v, w)| (*v, w)))
            .map_err(|e| StepError::BadAnswer(format!("model: {e}")))?;
        if let Some(g) = groups.iter().find(|g| !weights.contains(g)) {
            return Err(StepError::BadAnswer(format!("model lacks group `{g}`")));
        }
        info!(
            version = payload.version,
            delta_from = ?payload.base_version,
            bytes = payload.groups.iter().map(|g| g.data.len()).sum::<usize>(),
            "model received"
        );
        self.held = Some((payload.version, weights.clone()));
        Ok(weights)
    }

    async fn round(&mut self, plan: RoundPlan) -> Result<Flow, StepError> {
        let global = self.model(plan.base_version).await?;
        info!(
            round = plan.round,
            deadline_ms = plan.deadline_ms,
            "training"
        );
        let mut runtime = self
            .runtime
            .take()
            .ok_or_else(|| StepError::Fatal(anyhow!("training thread lost the runtime")))?;
        let tasks = Arc::clone(&self.tasks);
        let plan2 = plan.clone();
        // Training is CPU work: off the async runtime, so that the event
        // loop keeps answering.
        let (runtime, result) = tokio::task::spawn_blocking(move || {
            let data: Vec<TaskData<'_>> = tasks
                .iter()
                .map(|t| TaskData {
                    task: &t.name,
                    data: &t.data,
                    indices: &t.train,
                })
                .collect();
            let result = runtime.run_round(&plan2, &global, &data);
            (runtime, result)
        })
        .await
        .map_err(|e| StepError::Fatal(anyhow!("training thread: {e}")))?;
        self.runtime = Some(runtime);
        // A plan or weights that break this node's limits, or training that
        // diverged on them: a refusal (back off, ask again), not an exit.
        let output = match result {
            Ok(o) => o,
            Err(e) if e.is_refusal() => {
                return Err(StepError::BadAnswer(format!("round {}: {e}", plan.round)))
            }
            Err(e) => return Err(StepError::Fatal(anyhow!("training: {e}"))),
        };
        save_state(&self.state_path, &self.runtime()?.state)?;
        let bytes = output.update.sealed.len();
        match self.ask(Request::Submit(output.update)).await {
            Ok(Response::Ack) => {
                info!(round = plan.round, bytes, "update accepted");
                Ok(Flow::Continue)
            }
            Ok(other) => Err(StepError::BadAnswer(format!(
                "unexpected answer to submit: {}",
                kind(&other)
            ))),
            Err(e) => Err(e),
        }
    }

    async fn evaluate(&mut self, round: u64, version: u64) -> Result<Flow, StepError> {
        let global = self.model(version).await?;
        let rt = self.runtime()?;
        let mut params = global;
        for (name, w) in rt.state.local.iter() {
            params.insert(name, w.to_vec());
        }
        let mut metrics = Vec::new();
        for t in self.tasks.iter().filter(|t| !t.test.is_empty()) {
            let m = rt
                .model
                .evaluate(&params, &t.name, &t.data, Some(&t.test))
                .map_err(|e| StepError::Fatal(anyhow!("evaluation: {e}")))?;
            println!(
                "evaluation of version {version}: {} {:.1}% on {} local samples",
                t.name,
                100.0 * m.accuracy,
                m.samples
            );
            metrics.push(EvalMetrics {
                task: t.name.clone(),
                accuracy: m.accuracy,
                loss: m.loss,
                samples: m.samples,
            });
        }
        let report = EvalReport {
            node: rt.id.clone(),
            round,
            version,
            metrics,
        };
        match self.ask(Request::Report(report)).await? {
            Response::Ack => Ok(Flow::Continue),
            other => Err(StepError::BadAnswer(format!(
                "unexpected answer to report: {}",
                kind(&other)
            ))),
        }
    }
}

#[cfg(test)]
mod state_file_tests {
    use super::*;

    /// Before: `std::fs::write` (mode from the umask, usually 0644, no
    /// fsync). After: 0600, also over an existing world-readable file.
    #[cfg(unix)]
    #[test]
    fn state_file_is_private_and_complete() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cohort-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.bin");
        std::fs::write(&path, b"old").expect("old");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(path.with_extension("tmp"), b"stale").expect("stale tmp");
        std::fs::set_permissions(
            path.with_extension("tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .expect("chmod");
        let mut state = NodeState::default();
        state.local.insert("head/x", vec![1.0, 2.0]);
        save_state(&path, &state).expect("save");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        assert!(!path.with_extension("tmp").exists());
        let bytes = std::fs::read(&path).expect("read");
        let (back, _): (NodeState, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decode");
        assert_eq!(back.local, state.local);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
