//! The node's network driver: what `cohort-node` runs, as a library type a
//! program runs with its own model and data.
//!
//! An [`Agent`] dials the aggregator, says hello (its tasks, their sample
//! counts, the fingerprint of its model), then follows round plans: it
//! downloads the model (a lossless delta when it holds an older version),
//! trains on a blocking thread (so the event loop keeps running), saves its
//! state (local heads, error-feedback residuals) atomically, seals and
//! submits; when asked it evaluates with its own heads and reports. Any
//! network trouble means backoff with jitter, then hello again. One event
//! loop ([`cohort_protocol::transport::EventLoop`]) owns the Swarm; the agent
//! talks to it through a [`Client`].
//!
//! ```no_run
//! use cohort_node::agent::{Agent, NodeConfig};
//! use cohort_tasks::ModelRegistry;
//!
//! # async fn f() -> Result<(), cohort_node::NodeError> {
//! let mut cfg = NodeConfig::default();
//! cfg.connect_file = Some("aggregator-data/connect.toml".into());
//! cfg.data_dir = "node-1".into();
//! // The model named by `cfg.backbone`, from the built-ins or your own
//! // registry (see examples/own-model); or `Agent::new(cfg, model, tasks)`
//! // with a model and data you built.
//! let agent = Agent::from_config(cfg, &ModelRegistry::default())?;
//! println!("peer id {}", agent.peer_id());
//! agent.run().await // Ok when the federation has finished
//! # }
//! ```

mod config;
mod data;
mod state;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cohort_protocol::messages::{
    Envelope, EvalMetrics, EvalReport, Hello, Refusal, RefusalCode, Request, Response, RoundPlan,
};
use cohort_protocol::seal::SealPublicKey;
use cohort_protocol::transport::{
    build_swarm_with, event_loop, load_or_create_identity, Admission, Client, NetEvent,
    RequestError,
};
use cohort_protocol::{ParamGroups, PROTOCOL_VERSION};
use cohort_tasks::{ModelRegistry, SharedModel, TaskData};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;
use tracing::{debug, info, warn};

pub use config::{Backoff, NodeConfig, NodeTask, Shard};
pub use data::{check_tasks, load_local_tasks, task_specs, LocalTask};
pub use state::{encode_state, load_state, write_slot, StateFile, MAX_STATE_BYTES};

use crate::{NodeError, NodeRuntime};

/// The peer id of the node whose identity lives in `data_dir` (created
/// there if it does not exist): what the aggregator's operator allows.
pub fn peer_id_of(data_dir: &Path) -> Result<PeerId, NodeError> {
    std::fs::create_dir_all(data_dir).map_err(NodeError::io(data_dir))?;
    let identity = load_or_create_identity(&data_dir.join("identity.key"))?;
    Ok(identity.public().to_peer_id())
}

/// A node ready to join its federation: settings checked, identity and
/// state loaded, the aggregator's address and key known. [`Agent::run`]
/// does the rest.
pub struct Agent {
    cfg: NodeConfig,
    identity: Keypair,
    aggregator: PeerId,
    address: Multiaddr,
    runtime: NodeRuntime,
    tasks: Vec<LocalTask>,
    state_file: StateFile,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("peer_id", &self.peer_id())
            .field("federation", &self.runtime.federation)
            .field("aggregator", &self.address)
            .field("model", &self.runtime.model.name())
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

impl Agent {
    /// A node as `cohort-node --config` makes it: the data of its
    /// `[[tasks]]` ([`load_local_tasks`]) and the model `cfg.backbone` on
    /// `cfg.backend` from `models` (`ModelRegistry::default()` holds the
    /// built-ins; register your own there).
    pub fn from_config(cfg: NodeConfig, models: &ModelRegistry) -> Result<Self, NodeError> {
        cfg.validate()?;
        let tasks = load_local_tasks(&cfg)?;
        let model = models.build(&cfg.backbone, cfg.backend, task_specs(&tasks))?;
        Self::new(cfg, model, tasks)
    }

    /// A node with a model and data the caller built (`cfg.tasks`,
    /// `cfg.backbone` and `cfg.backend` are not read). The data is checked
    /// against the model ([`check_tasks`]); the identity is created in
    /// `cfg.data_dir` if needed and the persisted state loaded from there.
    pub fn new(
        mut cfg: NodeConfig,
        model: SharedModel,
        tasks: Vec<LocalTask>,
    ) -> Result<Self, NodeError> {
        cfg.check_settings()?;
        check_tasks(model.as_ref(), &tasks)?;
        let (addr, key) = cfg.aggregator()?;
        let address: Multiaddr = addr
            .parse()
            .map_err(|_| NodeError::Config(format!("`{addr}` is not a multiaddr")))?;
        let Some(Protocol::P2p(aggregator)) = address.iter().last() else {
            return Err(NodeError::Config(format!(
                "the aggregator's address must end in /p2p/<its peer id>: {address}"
            )));
        };
        let key: SealPublicKey = key
            .parse()
            .map_err(|_| NodeError::Config(format!("`{key}` is not a sealing key")))?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(NodeError::io(&cfg.data_dir))?;
        let identity = load_or_create_identity(&cfg.data_dir.join("identity.key"))?;
        let peer_id = identity.public().to_peer_id();
        let mut runtime = NodeRuntime::new(peer_id.to_string(), cfg.federation.clone(), model, key);
        runtime.limits = cfg.limits.clone();
        let (state_file, state) =
            StateFile::load(&cfg.data_dir.join("state.bin"), &runtime.model.layout())?;
        runtime.state = state;
        Ok(Agent {
            cfg,
            identity,
            aggregator,
            address,
            runtime,
            tasks,
            state_file,
        })
    }

    /// This node's peer id (what the aggregator's allowlist names).
    pub fn peer_id(&self) -> PeerId {
        self.identity.public().to_peer_id()
    }

    /// The federation it joins (from the connect file when one was given).
    pub fn federation(&self) -> &str {
        &self.runtime.federation
    }

    /// The aggregator's address, as dialled.
    pub fn aggregator(&self) -> &Multiaddr {
        &self.address
    }

    /// The model this node trains.
    pub fn model(&self) -> &SharedModel {
        &self.runtime.model
    }

    /// Runs the node until the federation is over (`Ok`), or the aggregator
    /// refuses it for good ([`NodeError::Refused`]), or its own machinery
    /// fails. Network trouble is never an error: the node backs off and
    /// reconnects. Needs a tokio runtime with timers and I/O enabled (either
    /// flavour: training runs on its blocking pool).
    pub async fn run(self) -> Result<(), NodeError> {
        let Agent {
            cfg,
            identity,
            aggregator,
            address,
            runtime,
            tasks,
            state_file,
        } = self;
        // A node talks to its aggregator only, and only asks: no other peer
        // holds a connection, and no inbound request is accepted at all.
        let swarm = build_swarm_with(identity, &cfg.net, Admission::client_of([aggregator]))?;
        let (client, mut events, lp) = event_loop(swarm);
        let net = tokio::spawn(lp.run());
        // The loop reports connections (and would hand over requests): read
        // them, so that nothing piles up whatever the aggregator does.
        let drain = tokio::spawn(async move {
            while let Some(e) = events.next().await {
                match e {
                    NetEvent::Connected(p) => debug!(peer = %p, "connected"),
                    NetEvent::Disconnected(p) => debug!(peer = %p, "disconnected"),
                    // Never happens (no inbound protocol); dropping the
                    // channel is the answer.
                    NetEvent::Request { peer, .. } => debug!(%peer, "inbound request dropped"),
                    NetEvent::Listening(_) | NetEvent::InboundFailure { .. } => {}
                }
            }
        });
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
        let session = Session {
            client,
            aggregator,
            address,
            federation: runtime.federation.clone(),
            runtime: Some(runtime),
            tasks: Arc::new(tasks),
            state_file,
            backoff: cfg.backoff.clone(),
            hello,
            request_timeout: Duration::from_secs(
                cfg.net.request_timeout_s.max(1).saturating_add(30),
            ),
            registered: false,
            held: None,
            failures: 0,
        };
        let result = session.run().await;
        net.abort();
        drain.abort();
        result
    }
}

/// One run of the request loop over a live event loop.
struct Session {
    client: Client,
    aggregator: PeerId,
    /// Its address: given to the event loop again before every hello,
    /// because libp2p forgets an address whose dial failed (an aggregator
    /// that is restarting).
    address: Multiaddr,
    federation: String,
    /// Away (`None`) while a round trains on the blocking pool.
    runtime: Option<NodeRuntime>,
    tasks: Arc<Vec<LocalTask>>,
    state_file: StateFile,
    backoff: Backoff,
    hello: Hello,
    /// Longest wait for any answer (beyond the transport's own request
    /// timeout, a guard against a loop that never answers).
    request_timeout: Duration,
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
    Fatal(NodeError),
}

impl From<NodeError> for StepError {
    fn from(e: NodeError) -> Self {
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

impl Session {
    /// Runs until the federation is over (Ok) or the aggregator refuses the
    /// node for good ([`NodeError::Refused`]).
    async fn run(mut self) -> Result<(), NodeError> {
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
                    | RefusalCode::WrongFederation => return Err(NodeError::Refused(r)),
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
        self.runtime.as_ref().ok_or_else(|| {
            StepError::Fatal(NodeError::Internal(
                "training thread lost the runtime".into(),
            ))
        })
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
        let mut runtime = self.runtime.take().ok_or_else(|| {
            StepError::Fatal(NodeError::Internal(
                "training thread lost the runtime".into(),
            ))
        })?;
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
        .map_err(|e| StepError::Fatal(NodeError::Internal(format!("training thread: {e}"))))?;
        self.runtime = Some(runtime);
        // A plan or weights that break this node's limits, or training that
        // diverged on them: a refusal (back off, ask again), not an exit.
        let output = match result {
            Ok(o) => o,
            Err(e) if e.is_refusal() => {
                return Err(StepError::BadAnswer(format!("round {}: {e}", plan.round)))
            }
            Err(e) => return Err(StepError::Fatal(e)),
        };
        // The state is written while the update travels (off the round's
        // critical path) and is durable before the next plan; a crash in
        // between leaves the previous residuals, one round's bounded
        // compression error.
        let state = encode_state(&self.runtime()?.state)?;
        let (path, seq) = self.state_file.next();
        let saving = tokio::task::spawn_blocking(move || write_slot(&path, seq, &state));
        let bytes = output.update.sealed.len();
        let answer = self.ask(Request::Submit(output.update)).await;
        saving
            .await
            .map_err(|e| StepError::Fatal(NodeError::Internal(format!("state writer: {e}"))))??;
        self.state_file.saved(seq);
        match answer {
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
                .map_err(|e| StepError::Fatal(e.into()))?;
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
