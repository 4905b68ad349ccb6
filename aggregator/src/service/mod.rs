//! The aggregator's network driver: what `cohort-aggregator` runs, as a
//! library type a program runs with its own model, strategy and evaluator.
//!
//! [`Aggregator`] is set up from the same two settings structs as the binary
//! ([`AggregatorConfig`]: folder, addresses, access; [`FederationConfig`]:
//! the experiment file) and a model. [`Aggregator::run`] locks the data
//! folder, resumes from the newest checkpoint or starts from the initial
//! weights, starts the event loop that owns the Swarm, and serves: the
//! service task owns the [`Engine`], answers each request the event loop
//! hands over (through a [`Client`], never touching the Swarm), runs rounds
//! on the clock, writes a checkpoint per round, evaluates centrally on a
//! blocking thread, asks nodes for federated evaluations, and appends one
//! line per round to `metrics.jsonl`.
//!
//! ```no_run
//! use cohort_aggregator::service::{Aggregator, AggregatorConfig, FederationConfig};
//! use cohort_tasks::ModelRegistry;
//!
//! # async fn f() -> Result<(), cohort_aggregator::AggError> {
//! let cfg = AggregatorConfig { open: true, ..AggregatorConfig::default() };
//! let fed = FederationConfig::default(); // the embedded W0
//! let aggregator = Aggregator::from_config(cfg, fed, &ModelRegistry::default())?;
//! // .with_strategy(|| Box::new(MyStrategy::default())) for your own rule,
//! // .with_evaluator(..) for your own central evaluation.
//! aggregator.run().await // Ok after the last round (and the linger time)
//! # }
//! ```

mod config;
mod evaluate;
mod setup;

pub use config::{allowlist, AggregatorConfig, Clients, EvalConfig, FederationConfig, TaskConfig};
pub use evaluate::{CentralEvaluator, Score, TestSetEvaluator};
pub use setup::{build_model, Aggregator, StrategyFactory};

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_protocol::codec::{CodecConfig, HEADER_LEN};
use cohort_protocol::messages::RoundPlan;
use cohort_protocol::messages::{
    Envelope, EvalReport, GroupBlob, Hello, ModelPayload, Refusal, RefusalCode, Request, Response,
    Update,
};
use cohort_protocol::p2p::SubmitCap;
use cohort_protocol::seal::{ReplayGuard, SealContext, SealKeyPair, MAX_SENDER_LEN};
use cohort_protocol::transport::{Client, LogBudget, NetEvent};
use cohort_protocol::PROTOCOL_VERSION;
use cohort_protocol::{model_delta, Layout, ParamGroups};
use futures::channel::mpsc;
use futures::StreamExt;
use libp2p::request_response::ResponseChannel;
use libp2p::PeerId;
use serde::Serialize;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::{AggError, Engine, FailureReason, Mode, NodeInfo, RoundReport};

/// How long a node waits before asking again when there is nothing to do
/// and its request could not be held.
const RETRY_MS: u64 = 200;
/// How long a plan request is held open (long poll) before the node is told
/// to ask again; well below the request timeout.
const PARK_MS: u64 = 10_000;
/// Refusal log lines per [`LOG_WINDOW`]; the rest are counted.
const LOG_LINES: u32 = 50;
const LOG_WINDOW: Duration = Duration::from_secs(10);
/// Bytes of a `Submit` request besides its sealed payload (envelope,
/// header: node id, group names, metrics).
const SUBMIT_SLACK: u64 = 64 << 10;

/// The most bytes that the sealed payload of an update answering `plan`
/// can take, whatever the codec's format: the seal's header and tag, and
/// per group its length, the codec header, the codes at the plan's bit
/// width (with 4-byte indices under top-k), and a scale per 8 values at
/// most. Anything longer is refused before its seal is opened.
pub fn sealed_bound(layout: &Layout, plan: &RoundPlan) -> u64 {
    let seal = 4 + 8 + 8 + 2 + MAX_SENDER_LEN as u64 + 32 + 16;
    plan.upload.iter().fold(seal, |acc, g| {
        let n = layout.group(g).map_or(0, |g| g.len());
        acc.saturating_add(group_bound(n, &plan.codec))
    })
}

fn group_bound(n: u64, codec: &CodecConfig) -> u64 {
    let bits = u64::from(codec.bits.max(1));
    let codes = n.saturating_mul(bits).div_ceil(8);
    let values = if codec.top_k.is_some() {
        codes.saturating_add(n.saturating_mul(4))
    } else {
        codes
    };
    // A scale (or min and max) of at most 8 bytes per chunk of >= 8 values.
    8 + HEADER_LEN as u64 + 64 + values.saturating_add(n)
}

/// Whether `names` holds a name twice.
fn has_duplicates<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    let mut seen = BTreeSet::new();
    names.into_iter().any(|n| !seen.insert(n))
}

/// A plan request held until there is something for the node to do: it
/// gets its plan the moment its round starts, not at its next poll.
struct Parked {
    node: String,
    channel: ResponseChannel<Envelope<Response>>,
    since: Instant,
}

/// What a closing round's blocking work returns: the checkpoint written,
/// then the scores (none: not evaluated).
type WorkResult = Result<Option<Vec<Score>>, AggError>;

/// A closed round whose checkpoint write and central evaluation run on a
/// blocking thread; its metrics line is written when both are done.
struct Closing {
    report: RoundReport,
    /// The checkpoint written, then the scores (none: not evaluated).
    work: tokio::task::JoinHandle<WorkResult>,
    /// Its outcome, once the service loop saw it finish ([`closing_step`]).
    done: Option<Result<WorkResult, tokio::task::JoinError>>,
    /// Fires when the checkpoint is on disk (dropped unfired when the
    /// write failed); `None` once seen ([`closing_step`]).
    written: Option<oneshot::Receiver<()>>,
    /// The checkpoint is durable: the next round may start (and hand out
    /// this round's version) while the evaluation runs.
    durable: bool,
    wall_ms: u64,
    /// Model bytes sent while the round ran (full, delta).
    sent: (u64, u64),
    /// A line written after a restart (see `Service::recover_last_line`).
    recovered: bool,
}

/// Waits for the next step of the closing rounds and records it: a
/// checkpoint written or failed (`written`, `durable`), or the oldest
/// round's work done (`done`). Pending forever when nothing is left to
/// wait for. Cancel-safe: a step is taken only when it is recorded.
async fn closing_step(closing: &mut VecDeque<Closing>) {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    std::future::poll_fn(|cx| {
        for c in closing.iter_mut() {
            if let Some(rx) = c.written.as_mut() {
                if let Poll::Ready(r) = Pin::new(rx).poll(cx) {
                    c.durable = r.is_ok();
                    c.written = None;
                    return Poll::Ready(());
                }
            }
        }
        match closing.front_mut() {
            Some(c) if c.done.is_none() => Pin::new(&mut c.work).poll(cx).map(|r| {
                c.done = Some(r);
            }),
            _ => Poll::Pending,
        }
    })
    .await
}

/// The task that owns the engine while the aggregator runs (built by
/// [`Aggregator::run`]).
struct Service {
    engine: Engine,
    fed: FederationConfig,
    evaluator: Option<Arc<dyn CentralEvaluator>>,
    /// Rounds closed whose metrics line waits for their checkpoint and
    /// evaluation, oldest first. Synchronous rounds: at most one; the next
    /// round starts once its checkpoint is durable and closes only after
    /// its line, so lines stay in order and a crash loses at most one.
    closing: VecDeque<Closing>,
    /// Test hook (`COHORT_DEBUG_CLOSE_DELAY_MS`): a slower evaluation.
    close_delay: Duration,
    keys: SealKeyPair,
    allow: Option<BTreeSet<PeerId>>,
    client: Client,
    checkpoints: PathBuf,
    keep_checkpoints: usize,
    metrics: File,
    metrics_path: PathBuf,
    linger: Duration,
    connect_file: PathBuf,
    connect: ConnectInfo,
    replay: ReplayGuard,
    started: Instant,
    /// The first round of this process waits for `clients.count` nodes.
    waiting_first: bool,
    eval_due: BTreeMap<String, (u64, u64)>,
    /// Evaluations asked of nodes and not reported yet: a report is
    /// accepted only against one of these.
    eval_asked: BTreeMap<String, (u64, u64)>,
    /// Federated evaluations in progress, by round: who was asked (the
    /// strategy's `configure_evaluate`) and the reports so far; handed to
    /// the strategy's `aggregate_evaluate` when all are in, when the next
    /// evaluation starts, or at exit.
    fed_evals: BTreeMap<u64, FedEval>,
    /// The bound of `Submit` frames read by the codec.
    submit_cap: SubmitCap,
    /// Bound of requests other than `Submit` (the codec's `max_control`).
    control_limit: u64,
    refusal_log: LogBudget,
    finished_at: Option<Instant>,
    round_started: Option<Instant>,
    parked: Vec<Parked>,
    /// Recent global versions, oldest first (the current one last): the
    /// bases of delta downloads.
    history: VecDeque<(u64, ParamGroups)>,
    /// Versions kept besides the current one; 0 = full downloads only.
    keep_versions: usize,
    /// The first round starts without all `clients.count` nodes after this.
    start_wait: Duration,
    /// Encoded deltas to the current version, by (group, base version).
    deltas: HashMap<(String, u64), Vec<u8>>,
    /// Model bytes sent since the last round closed (full, delta).
    sent: (u64, u64),
}

/// One federated evaluation: the nodes asked and their reports so far.
#[derive(Default)]
struct FedEval {
    asked: BTreeSet<String>,
    reports: Vec<EvalReport>,
}

/// What a node operator needs, printed at start and written to
/// `connect.toml` in the data folder.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectInfo {
    pub federation: String,
    pub peer_id: String,
    pub aggregator_key: String,
    pub addrs: Vec<String>,
}

#[derive(Serialize)]
struct RoundLine<'a> {
    kind: &'static str,
    round: u64,
    /// Written after a restart for a round whose checkpoint was written but
    /// whose line was not (the process died in between): its counts were
    /// lost with the process, its weights were not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    recovered: bool,
    version: u64,
    stepped: bool,
    quorum_met: bool,
    sampled: usize,
    accepted: usize,
    accepted_nodes: &'a [String],
    failures: Vec<(String, String)>,
    refused: Vec<(String, RefusalCode)>,
    /// Updates aggregated into each parameter group.
    contributors: &'a BTreeMap<String, u32>,
    bytes_received: u64,
    /// Model bytes sent as full weights and as deltas during the round.
    bytes_sent_full: u64,
    bytes_sent_delta: u64,
    central: Vec<Score>,
    /// From the start of the round to its close.
    wall_ms: u64,
    /// When the round closed, in ms since the process started.
    closed_at_ms: u64,
    /// Differential privacy: epsilon after this round and its parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    privacy: Option<&'a crate::PrivacyReport>,
}

/// The highest round of a `round` line among the last 1 MiB of a metrics
/// file (0 when there is none or it cannot be read).
fn last_round_line(path: &std::path::Path) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 1 << 20;
    let Ok(mut f) = File::open(path) else {
        return 0;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).is_err() {
        return 0;
    }
    let mut bytes = Vec::new();
    if f.take(TAIL).read_to_end(&mut bytes).is_err() {
        return 0;
    }
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "round")
        .filter_map(|v| v["round"].as_u64())
        .max()
        .unwrap_or(0)
}

fn refuse(code: RefusalCode, message: impl Into<String>) -> Response {
    Response::Refused(Refusal {
        code,
        message: message.into(),
    })
}

fn request_kind(r: &Request) -> &'static str {
    match r {
        Request::Hello(_) => "hello",
        Request::GetPlan => "get_plan",
        Request::GetModel { .. } => "get_model",
        Request::Submit(_) => "submit",
        Request::Report(_) => "report",
    }
}

/// What the service is made of; the settings come from [`AggregatorConfig`].
struct Parts {
    engine: Engine,
    fed: FederationConfig,
    evaluator: Option<Arc<dyn CentralEvaluator>>,
    keys: SealKeyPair,
    allow: Option<BTreeSet<PeerId>>,
    client: Client,
    peer_id: PeerId,
    /// Shared with the codec: the service sets it from the round's plans.
    submit_cap: SubmitCap,
    control_limit: u64,
}

/// What node operators need: the federation, the peer id, the sealing key
/// and who may join.
fn print_banner(
    connect: &ConnectInfo,
    fed: &FederationConfig,
    engine: &Engine,
    allow: Option<&BTreeSet<PeerId>>,
) {
    println!(
        "cohort-aggregator: federation `{}`, {} rounds, model version {} (round {}), {} nodes awaited",
        connect.federation,
        fed.rounds,
        engine.version(),
        engine.round(),
        fed.clients.count
    );
    println!("peer id:     {}", connect.peer_id);
    println!("sealing key: {}", connect.aggregator_key);
    match allow {
        Some(a) => println!("access:      {} allowed peer ids", a.len()),
        None => println!("access:      open (any peer may join)"),
    }
}

impl Service {
    /// The service, after printing what node operators need.
    fn new(parts: Parts, cfg: &AggregatorConfig) -> Result<Self, AggError> {
        let Parts {
            engine,
            fed,
            evaluator,
            keys,
            allow,
            client,
            peer_id,
            submit_cap,
            control_limit,
        } = parts;
        let connect = ConnectInfo {
            federation: engine.config().federation.clone(),
            peer_id: peer_id.to_string(),
            aggregator_key: keys.public().to_string(),
            addrs: Vec::new(),
        };
        print_banner(&connect, &fed, &engine, allow.as_ref());
        let data_dir = &cfg.data_dir;
        let metrics_path = data_dir.join("metrics.jsonl");
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|source| AggError::Io {
                path: metrics_path.clone(),
                source,
            })?;
        Ok(Service {
            engine,
            fed,
            evaluator,
            closing: VecDeque::new(),
            close_delay: Duration::from_millis(
                std::env::var("COHORT_DEBUG_CLOSE_DELAY_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
            keys,
            allow,
            client,
            checkpoints: data_dir.join("checkpoints"),
            keep_checkpoints: cfg.keep_checkpoints,
            metrics,
            metrics_path,
            linger: Duration::from_secs(cfg.linger_s),
            connect_file: data_dir.join("connect.toml"),
            connect,
            replay: ReplayGuard::default(),
            started: Instant::now(),
            waiting_first: true,
            eval_due: BTreeMap::new(),
            eval_asked: BTreeMap::new(),
            fed_evals: BTreeMap::new(),
            submit_cap,
            control_limit,
            refusal_log: LogBudget::new(LOG_LINES, LOG_WINDOW),
            finished_at: None,
            round_started: None,
            parked: Vec::new(),
            history: VecDeque::new(),
            keep_versions: cfg.delta_versions,
            start_wait: Duration::from_secs(cfg.start_wait_s),
            deltas: HashMap::new(),
            sent: (0, 0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn federation(&self) -> &str {
        &self.engine.config().federation
    }

    /// Serves until the run is over (and the linger time has passed) or
    /// the event loop stops.
    async fn run(mut self, mut events: mpsc::Receiver<NetEvent>) -> Result<(), AggError> {
        self.recover_last_line();
        self.update_submit_cap();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(e) => {
                        // A submit, a hello or a departure may complete the
                        // round (or the wait for the first one): advance now
                        // rather than at the next tick.
                        if self.on_event(e).await? && self.on_tick().await? {
                            info!("run finished; exiting");
                            return Ok(());
                        }
                    }
                    None => return Err(AggError::Net("the network event loop stopped".into())),
                },
                // A closing round's checkpoint is durable (the next round
                // may start) or its evaluation is done (its line): now
                // rather than at the next tick.
                () = closing_step(&mut self.closing) => {
                    if self.on_tick().await? {
                        info!("run finished; exiting");
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    if self.on_tick().await? {
                        info!("run finished; exiting");
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Handles one event; true when the round state may have moved.
    async fn on_event(&mut self, event: NetEvent) -> Result<bool, AggError> {
        match event {
            NetEvent::Request {
                peer,
                request,
                channel,
            } => {
                let moved = matches!(request.body, Request::Submit(_) | Request::Hello(_));
                let get_plan = matches!(request.body, Request::GetPlan);
                let response = self.handle(peer, request);
                if get_plan && matches!(response, Response::Wait { .. }) {
                    // One held request per node: an older one is answered.
                    let node = peer.to_string();
                    if let Some(i) = self.parked.iter().position(|p| p.node == node) {
                        let old = self.parked.swap_remove(i);
                        let env = Envelope::new(self.federation(), response.clone());
                        self.client.respond(old.channel, env).await;
                    }
                    self.parked.push(Parked {
                        node,
                        channel,
                        since: Instant::now(),
                    });
                    return Ok(false);
                }
                let env = Envelope::new(self.federation(), response);
                self.client.respond(channel, env).await;
                return Ok(moved);
            }
            NetEvent::Listening(addr) => {
                let full = format!("{addr}/p2p/{}", self.connect.peer_id);
                println!("listening:   {full}");
                self.connect.addrs.push(full);
                self.write_connect_file()?;
            }
            NetEvent::Connected(peer) => debug!(%peer, "connected"),
            NetEvent::Disconnected(peer) => {
                // Its plan fails now rather than at the deadline; it says
                // hello again when it comes back.
                let node = peer.to_string();
                if self.engine.is_registered(&node) {
                    info!(%peer, "node disconnected; unregistered");
                    self.engine.unregister(&node);
                    return Ok(true);
                }
            }
            NetEvent::InboundFailure { .. } => {}
        }
        Ok(false)
    }

    /// After a restart: when the round the engine resumed at has no line in
    /// `metrics.jsonl` (killed between its checkpoint and its line), its
    /// line is written now, marked `recovered`, with its central
    /// evaluation, before the next round starts.
    fn recover_last_line(&mut self) {
        let round = self.engine.round();
        if round == 0 || self.engine.round_open() || last_round_line(&self.metrics_path) >= round {
            return;
        }
        warn!(
            round,
            "the last round's metrics line is missing (killed after its checkpoint); writing it"
        );
        let report = RoundReport {
            round,
            version: self.engine.version(),
            ..RoundReport::default()
        };
        let eval = self.central_job(true);
        let work =
            tokio::task::spawn_blocking(move || Ok(eval.map(|(ev, g)| ev.evaluate(round, &g))));
        self.closing.push_back(Closing {
            report,
            work,
            done: None,
            written: None,
            durable: true,
            wall_ms: 0,
            sent: (0, 0),
            recovered: true,
        });
    }

    fn write_connect_file(&self) -> Result<(), AggError> {
        let text = toml::to_string_pretty(&self.connect)
            .map_err(|e| AggError::Config(format!("connect file: {e}")))?;
        let tmp = self.connect_file.with_extension("tmp");
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| AggError::Io { path, source }
        };
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.connect_file).map_err(io(&self.connect_file))?;
        Ok(())
    }

    /// One request, one answer; every refusal is logged with its reason.
    fn handle(&mut self, peer: PeerId, env: Envelope<Request>) -> Response {
        let kind = request_kind(&env.body);
        let response = self.answer(peer, env);
        if let Response::Refused(r) = &response {
            // Peers choose how often they are refused: a bounded log.
            if let Some(skipped) = self.refusal_log.allow() {
                warn!(%peer, request = kind, code = ?r.code, reason = %r.message, skipped, "request refused");
            }
        }
        response
    }

    fn answer(&mut self, peer: PeerId, env: Envelope<Request>) -> Response {
        if let Err(e) = env.check_federation(self.federation()) {
            return refuse(RefusalCode::WrongFederation, e.to_string());
        }
        if let Some(allow) = &self.allow {
            if !allow.contains(&peer) {
                return refuse(
                    RefusalCode::NotAllowed,
                    format!(
                        "peer {peer} is not allowed in federation `{}`",
                        self.federation()
                    ),
                );
            }
        }
        let node = peer.to_string();
        if !matches!(env.body, Request::Hello(_)) && !self.engine.is_registered(&node) {
            return refuse(RefusalCode::UnknownNode, "unknown node: say hello first");
        }
        match env.body {
            Request::Hello(h) => self.hello(node, h),
            Request::GetPlan => self.get_plan(&node),
            Request::GetModel {
                groups,
                have_version,
            } => self.get_model(&node, groups, have_version),
            Request::Submit(update) => self.submit(&node, update),
            Request::Report(report) => self.report(&node, report),
        }
    }

    fn hello(&mut self, node: String, h: Hello) -> Response {
        if h.node != node {
            return refuse(
                RefusalCode::Malformed,
                format!("hello names `{}`, the connection is {node}", h.node),
            );
        }
        if h.version != PROTOCOL_VERSION {
            return refuse(
                RefusalCode::VersionMismatch,
                format!("node speaks {}, aggregator {PROTOCOL_VERSION}", h.version),
            );
        }
        if h.tasks.len() > self.fed.tasks.len()
            || has_duplicates(h.tasks.iter().map(|t| t.task.as_str()))
        {
            return refuse(
                RefusalCode::Malformed,
                "a hello names each of the federation's tasks at most once",
            );
        }
        let info = NodeInfo {
            id: node.clone(),
            tasks: h.tasks.into_iter().map(|t| (t.task, t.samples)).collect(),
            fingerprint: h.layout,
        };
        match self.engine.register(info) {
            Ok(()) => {
                info!(node, registered = self.engine.num_nodes(), "node joined");
                Response::Welcome {
                    node,
                    model_version: self.engine.version(),
                }
            }
            Err(e) => refuse(RefusalCode::LayoutMismatch, e.to_string()),
        }
    }

    /// Every round has closed (the engine counts a round as done once it
    /// has started).
    fn over(&self) -> bool {
        self.engine.is_finished() && !self.engine.round_open()
    }

    fn ready(&self) -> bool {
        let n = self.engine.num_nodes();
        !self.waiting_first
            || n >= self.fed.clients.count
            || (n > 0 && self.started.elapsed() >= self.start_wait)
    }

    fn get_plan(&mut self, node: &str) -> Response {
        if let Some((round, version)) = self.eval_due.remove(node) {
            self.eval_asked.insert(node.to_string(), (round, version));
            return Response::Evaluate { round, version };
        }
        if self.over() {
            return refuse(
                RefusalCode::Finished,
                format!("the federation ran its {} rounds", self.fed.rounds),
            );
        }
        if matches!(self.engine.config().mode, Mode::Async(_)) {
            if !self.ready() {
                return Response::Wait { retry_ms: RETRY_MS };
            }
            self.waiting_first = false;
        }
        let now = self.now_ms();
        match self.engine.plan_for(node, now) {
            Ok(plan) => Response::Plan(plan),
            Err(_) => Response::Wait { retry_ms: RETRY_MS },
        }
    }

    fn get_model(&mut self, node: &str, groups: Vec<String>, have: Option<u64>) -> Response {
        let tasks: Vec<String> = self
            .engine
            .node(node)
            .map(|n| n.tasks.iter().map(|(t, _)| t.clone()).collect())
            .unwrap_or_default();
        let held = self.engine.groups_of(&tasks);
        // Every name costs a copy of its group: each at most once, and no
        // more names than the node has groups.
        if groups.len() > held.len() || has_duplicates(groups.iter().map(String::as_str)) {
            return refuse(
                RefusalCode::Malformed,
                format!(
                    "a model request names each of the node's {} groups at most once",
                    held.len()
                ),
            );
        }
        if let Some(g) = groups.iter().find(|g| !held.contains(g)) {
            return refuse(
                RefusalCode::GroupNotAllowed,
                format!("group `{g}` is not one of this node's groups"),
            );
        }
        self.remember_version();
        let version = self.engine.version();
        if have == Some(version) {
            // The node holds this version already: nothing to send.
            return Response::Model(ModelPayload {
                version,
                base_version: Some(version),
                groups: Vec::new(),
            });
        }
        if let Some(base) = have.filter(|_| self.keep_versions > 0) {
            match self.delta_payload(&groups, base) {
                Ok(Some(p)) => {
                    self.sent.1 += p.groups.iter().map(|g| g.data.len() as u64).sum::<u64>();
                    return Response::Model(p);
                }
                Ok(None) => {}
                Err(e) => warn!(%e, "delta download failed; sending full weights"),
            }
        }
        let p = ModelPayload::from_groups(version, None, &self.engine.weights_for(&groups));
        self.sent.0 += p.groups.iter().map(|g| g.data.len() as u64).sum::<u64>();
        Response::Model(p)
    }

    /// Records the current global version (once) and forgets versions
    /// beyond `keep_versions`, and deltas to older versions.
    fn remember_version(&mut self) {
        let version = self.engine.version();
        if self.history.back().is_some_and(|(v, _)| *v == version) {
            return;
        }
        self.deltas.clear();
        if self.keep_versions == 0 {
            self.history.clear();
            return;
        }
        self.history
            .push_back((version, self.engine.global().clone()));
        while self.history.len() > self.keep_versions + 1 {
            self.history.pop_front();
        }
    }

    /// `groups` as deltas from `base`, if that version is still known.
    /// Each group's delta is encoded once per version and shared by every
    /// node that asks.
    fn delta_payload(
        &mut self,
        groups: &[String],
        base: u64,
    ) -> Result<Option<ModelPayload>, cohort_protocol::ProtocolError> {
        let Some((_, old)) = self.history.iter().find(|(v, _)| *v == base) else {
            return Ok(None);
        };
        let current = self.engine.global();
        let mut blobs = Vec::with_capacity(groups.len());
        for g in groups {
            let (Some(o), Some(n)) = (old.get(g), current.get(g)) else {
                return Ok(None);
            };
            let key = (g.clone(), base);
            let data = match self.deltas.get(&key) {
                Some(d) => d.clone(),
                None => {
                    let d = model_delta::encode(o, n)?;
                    self.deltas.insert(key, d.clone());
                    d
                }
            };
            blobs.push(GroupBlob {
                name: g.clone(),
                data,
            });
        }
        Ok(Some(ModelPayload {
            version: self.engine.version(),
            base_version: Some(base),
            groups: blobs,
        }))
    }

    fn submit(&mut self, node: &str, update: Update) -> Response {
        let h = &update.header;
        if h.node != node {
            return refuse(
                RefusalCode::Malformed,
                format!("update names `{}`, the connection is {node}", h.node),
            );
        }
        // The clear header against the engine first: opening costs a copy
        // and a decryption of up to the whole payload.
        if let Err(r) = self.check_header(node, h, update.sealed.len() as u64) {
            return r;
        }
        let ctx = SealContext::of_update(h);
        // Open before recording: a corrupted copy must not burn the honest
        // one. Recorded only for the open round (the header check passed).
        let plain = match self.keys.open(&ctx, &update.sealed) {
            Ok(p) => p,
            Err(e) => return refuse(RefusalCode::BadSeal, e.to_string()),
        };
        if let Err(e) = self.replay.check_and_record(&ctx) {
            return refuse(RefusalCode::Replay, e.to_string());
        }
        let now = self.now_ms();
        match self.engine.submit_packed(h, &plain, now) {
            Ok(o) => {
                info!(node, round = o.round, "update accepted");
                Response::Ack
            }
            Err(r) => Response::Refused(Refusal {
                code: r.code,
                message: r.message,
            }),
        }
    }

    /// The checks of an update's clear header that need no payload: the
    /// node has a plan open, the update answers it (round, base version,
    /// exactly its upload groups), and the sealed payload is no longer
    /// than the plan allows.
    #[allow(clippy::result_large_err)] // the refusal is the response sent as it is
    fn check_header(
        &self,
        node: &str,
        h: &cohort_protocol::messages::UpdateHeader,
        sealed_len: u64,
    ) -> Result<(), Response> {
        let Some(plan) = self.engine.open_plan(node) else {
            let round = self.engine.round();
            let (code, why) =
                if h.round > round || !self.engine.round_open() && h.round == round + 1 {
                    (
                        RefusalCode::WrongRound,
                        format!("round {} has not started", h.round),
                    )
                } else if h.round < round || !self.engine.round_open() {
                    (
                        RefusalCode::LateUpdate,
                        format!("round {} is closed", h.round),
                    )
                } else {
                    (
                        RefusalCode::NotSampled,
                        format!("no plan open for this node in round {}", h.round),
                    )
                };
            return Err(refuse(code, why));
        };
        if h.round != plan.round {
            let code = if h.round < plan.round {
                RefusalCode::LateUpdate
            } else {
                RefusalCode::WrongRound
            };
            return Err(refuse(
                code,
                format!("round {} is not the plan's round {}", h.round, plan.round),
            ));
        }
        if h.base_version != plan.base_version {
            return Err(refuse(
                RefusalCode::StaleBase,
                format!(
                    "base version {} instead of {}",
                    h.base_version, plan.base_version
                ),
            ));
        }
        if h.groups.len() > plan.upload.len()
            || has_duplicates(h.groups.iter().map(String::as_str))
            || has_duplicates(h.metrics.iter().map(|m| m.task.as_str()))
            || h.metrics.len() > self.fed.tasks.len()
        {
            return Err(refuse(
                RefusalCode::Malformed,
                "an update names each of its plan's groups and tasks at most once",
            ));
        }
        if let Some(g) = h.groups.iter().find(|g| !plan.upload.contains(g)) {
            return Err(refuse(
                RefusalCode::GroupNotAllowed,
                format!("group `{g}` is not in this node's plan"),
            ));
        }
        let bound = sealed_bound(self.engine.layout(), plan);
        if sealed_len > bound {
            return Err(refuse(
                RefusalCode::TooLarge,
                format!("sealed update of {sealed_len} bytes; the plan allows {bound}"),
            ));
        }
        Ok(())
    }

    /// The largest `Submit` frame any open plan allows; the control limit
    /// when no round is open.
    fn update_submit_cap(&self) {
        let layout = self.engine.layout();
        let cap = match self.engine.config().mode {
            Mode::Sync if !self.engine.round_open() => self.control_limit,
            Mode::Sync => self
                .engine
                .node_ids()
                .filter_map(|n| self.engine.open_plan(n))
                .map(|p| sealed_bound(layout, p))
                .max()
                .map_or(self.control_limit, |b| b.saturating_add(SUBMIT_SLACK)),
            // Plans are issued on demand: bounded by the whole model at the
            // configured codec.
            Mode::Async(_) => {
                let plan = RoundPlan {
                    federation: String::new(),
                    round: 0,
                    base_version: 0,
                    upload: layout.group_names().map(str::to_string).collect(),
                    train: Default::default(),
                    codec: self.engine.config().codec.clone(),
                    deadline_ms: 0,
                    privacy: None,
                };
                sealed_bound(layout, &plan).saturating_add(SUBMIT_SLACK)
            }
        };
        self.submit_cap.set(cap);
    }

    fn report(&mut self, node: &str, report: EvalReport) -> Response {
        let holds = |task: &str| {
            self.engine
                .node(node)
                .is_some_and(|n| n.tasks.iter().any(|(t, _)| t == task))
        };
        if report.node != node
            || report.metrics.len() > self.fed.tasks.len()
            || !report.metrics.iter().all(|m| holds(&m.task))
            || has_duplicates(report.metrics.iter().map(|m| m.task.as_str()))
        {
            return refuse(
                RefusalCode::Malformed,
                "a report must name this node and only tasks it holds, each once",
            );
        }
        // Only the evaluation that was asked of this node, once.
        if self.eval_asked.get(node) != Some(&(report.round, report.version)) {
            return refuse(
                RefusalCode::NotSampled,
                format!(
                    "no evaluation of round {} (version {}) was asked of this node",
                    report.round, report.version
                ),
            );
        }
        self.eval_asked.remove(node);
        let round = report.round;
        for m in &report.metrics {
            info!(node, round = report.round, task = %m.task, accuracy = m.accuracy, samples = m.samples, "federated evaluation");
        }
        #[derive(Serialize)]
        struct Line<'a> {
            kind: &'static str,
            #[serde(flatten)]
            report: &'a EvalReport,
        }
        let line = Line {
            kind: "federated_eval",
            report: &report,
        };
        if let Err(e) = self.write_line(&line) {
            warn!(%e, "metrics file");
        }
        let done = match self.fed_evals.get_mut(&round) {
            Some(fe) => {
                fe.reports.push(report);
                fe.reports.len() >= fe.asked.len()
            }
            None => false,
        };
        if done {
            self.finish_fed_eval(round);
        }
        Response::Ack
    }

    /// Ends every federated evaluation still open.
    fn finish_fed_evals(&mut self) {
        let open: Vec<u64> = self.fed_evals.keys().copied().collect();
        for r in open {
            self.finish_fed_eval(r);
        }
    }

    /// The evaluator and a copy of the global model, when the central
    /// evaluation is on and `due`.
    fn central_job(&self, due: bool) -> Option<(Arc<dyn CentralEvaluator>, ParamGroups)> {
        self.evaluator
            .as_ref()
            .filter(|_| due && self.fed.eval.central)
            .map(|ev| (Arc::clone(ev), self.engine.global().clone()))
    }

    /// Hands a federated evaluation to the strategy (`aggregate_evaluate`):
    /// the reports, and as failures the nodes asked that did not report
    /// (`Timeout`). Writes its summary line.
    fn finish_fed_eval(&mut self, round: u64) {
        let Some(mut fe) = self.fed_evals.remove(&round) else {
            return;
        };
        // In node order, not arrival order: the strategy's float sums are
        // then the same whichever node answered first.
        fe.reports.sort_by(|a, b| a.node.cmp(&b.node));
        let failures: Vec<(String, FailureReason)> = fe
            .asked
            .iter()
            .filter(|n| !fe.reports.iter().any(|r| &r.node == *n))
            .map(|n| (n.clone(), FailureReason::Timeout))
            .collect();
        let metrics = self
            .engine
            .aggregate_evaluate(round, &fe.reports, &failures);
        if let Some(m) = &metrics {
            let shown: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            println!(
                "federated evaluation of round {round}: {} ({} reports, {} missing)",
                shown.join(", "),
                fe.reports.len(),
                failures.len()
            );
        }
        #[derive(Serialize)]
        struct Summary<'a> {
            kind: &'static str,
            round: u64,
            reports: usize,
            missing: Vec<&'a str>,
            metrics: Option<&'a crate::Metrics>,
        }
        let line = Summary {
            kind: "federated_summary",
            round,
            reports: fe.reports.len(),
            missing: failures.iter().map(|(n, _)| n.as_str()).collect(),
            metrics: metrics.as_ref(),
        };
        if let Err(e) = self.write_line(&line) {
            warn!(%e, "metrics file");
        }
    }

    fn write_line<T: Serialize>(&mut self, line: &T) -> Result<(), AggError> {
        let mut text =
            serde_json::to_string(line).map_err(|e| AggError::Config(format!("metrics: {e}")))?;
        text.push('\n');
        self.metrics
            .write_all(text.as_bytes())
            .and_then(|()| self.metrics.flush())
            .map_err(|source| AggError::Io {
                path: "metrics.jsonl".into(),
                source,
            })
    }

    /// Clock work: close the round at all-in or the deadline, start the
    /// next one. Returns true when the process should exit.
    async fn on_tick(&mut self) -> Result<bool, AggError> {
        self.remember_version();
        let now = self.now_ms();
        let sync = matches!(self.engine.config().mode, Mode::Sync);
        // Enough nodes for the first round (async: for the first plans).
        let mut changed = self.waiting_first && self.ready();
        changed |= self.finish_closing().await?;
        // A synchronous round closes only after the previous one's line.
        if !sync || self.closing.is_empty() {
            while let Some(report) = self.engine.poll(now) {
                self.on_round_closed(report)?;
                changed = true;
            }
        }
        if changed {
            self.update_submit_cap();
        }
        self.answer_parked(changed).await;
        if self.over() {
            if !self.closing.is_empty() {
                // No exit before every round's line.
                return Ok(false);
            }
            let at = *self.finished_at.get_or_insert_with(Instant::now);
            let leaving = at.elapsed() >= self.linger;
            if leaving {
                self.finish_fed_evals();
            }
            return Ok(leaving);
        }
        if !sync && !self.closing.is_empty() {
            return Ok(false);
        }
        if sync && !self.engine.round_open() {
            // The version a round hands out must survive a crash.
            if !self.ready() || !self.closing.iter().all(|c| c.durable) {
                return Ok(false);
            }
            match self.engine.start_round(now) {
                Ok(plans) => {
                    self.waiting_first = false;
                    self.round_started = Some(Instant::now());
                    self.update_submit_cap();
                    let names: Vec<&str> = plans.iter().map(|(n, _)| n.as_str()).collect();
                    info!(round = self.engine.round(), sampled = ?names, "round started");
                    self.answer_parked(true).await;
                }
                Err(AggError::NotEnoughNodes { .. }) => {}
                Err(e) => warn!(%e, "cannot start a round"),
            }
        }
        Ok(false)
    }

    /// Answers held plan requests: all of them when something `changed`
    /// (a round started or closed), otherwise those held too long.
    async fn answer_parked(&mut self, changed: bool) {
        if self.parked.is_empty() {
            return;
        }
        let parked = std::mem::take(&mut self.parked);
        for p in parked {
            if !self.engine.is_registered(&p.node) {
                // Gone (disconnected); dropping the channel is the answer.
                continue;
            }
            let expired = p.since.elapsed() >= Duration::from_millis(PARK_MS);
            if !changed && !expired {
                self.parked.push(p);
                continue;
            }
            let response = match self.get_plan(&p.node) {
                Response::Wait { .. } if !expired => {
                    self.parked.push(p);
                    continue;
                }
                Response::Wait { .. } => Response::Wait { retry_ms: 0 },
                r => r,
            };
            let env = Envelope::new(self.federation(), response);
            self.client.respond(p.channel, env).await;
        }
    }

    /// A round closed: its checkpoint encoded now, the bookkeeping of the
    /// next round, then on a blocking thread the checkpoint written and the
    /// central evaluation; the metrics line follows in
    /// [`Service::finish_closing`] once both are done. The next round
    /// starts as soon as the checkpoint is durable, its training overlapping
    /// this evaluation.
    fn on_round_closed(&mut self, report: RoundReport) -> Result<(), AggError> {
        // The checkpoint before the metrics line and before the next round
        // starts: a crash loses at most the round in progress, and every
        // round in metrics.jsonl has its checkpoint. It is encoded here (a
        // copy of the model) and written to disk on a blocking thread, so
        // that the service keeps answering while the disk works.
        let checkpoint = self.engine.checkpoint()?;
        // A node that let the deadline pass leaves the pool (later rounds
        // do not wait for it again); it says hello again when it returns.
        for (node, reason) in &report.failures {
            if matches!(reason, FailureReason::Timeout) {
                self.engine.unregister(node);
            }
        }
        self.replay.prune_below(report.round.saturating_sub(1));
        let every = self.fed.eval.federated_every;
        if self.engine.is_finished() || (every > 0 && report.round.is_multiple_of(every)) {
            // An older evaluation still open ends now, with whoever reported.
            self.finish_fed_evals();
            let version = self.engine.version();
            let nodes = self.engine.configure_evaluate(report.round);
            if !nodes.is_empty() {
                let fe = self.fed_evals.entry(report.round).or_default();
                for n in nodes {
                    fe.asked.insert(n.clone());
                    self.eval_due.insert(n, (report.round, version));
                }
            }
        }
        let eval = self.central_job(
            report.round.is_multiple_of(self.fed.eval.every.max(1)) || self.engine.is_finished(),
        );
        let (dir, delay, round) = (self.checkpoints.clone(), self.close_delay, report.round);
        // Written first, evaluated after: an evaluation that fails or
        // crashes the process never loses the round.
        let (written_tx, written) = oneshot::channel();
        let work = tokio::task::spawn_blocking(move || {
            checkpoint.write(&dir)?;
            let _ = written_tx.send(());
            Ok(eval.map(|(ev, global)| {
                std::thread::sleep(delay);
                ev.evaluate(round, &global)
            }))
        });
        let wall_ms = self
            .round_started
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0);
        self.closing.push_back(Closing {
            report,
            work,
            done: None,
            written: Some(written),
            durable: false,
            wall_ms,
            sent: std::mem::take(&mut self.sent),
            recovered: false,
        });
        Ok(())
    }

    /// Writes the metrics lines of closed rounds whose evaluation is done,
    /// in order; true when one was written.
    async fn finish_closing(&mut self) -> Result<bool, AggError> {
        let mut any = false;
        while let Some(c) = self.closing.front() {
            if c.done.is_none() && !c.work.is_finished() {
                break;
            }
            let Some(mut c) = self.closing.pop_front() else {
                break;
            };
            let outcome = match c.done.take() {
                Some(d) => d,
                None => (&mut c.work).await,
            };
            let central = match outcome {
                // A checkpoint that cannot be written stops the aggregator:
                // going on would break "every round has its checkpoint".
                Ok(done) => done?.unwrap_or_default(),
                // A panicking evaluator loses its scores, not the round
                // (the checkpoint was written before it ran).
                Err(e) => {
                    warn!(round = c.report.round, %e, "central evaluation panicked");
                    Vec::new()
                }
            };
            self.prune_checkpoints();
            self.write_round(&c, central)?;
            any = true;
        }
        Ok(any)
    }

    fn write_round(&mut self, c: &Closing, central: Vec<Score>) -> Result<(), AggError> {
        let report = &c.report;
        let scores: Vec<String> = central
            .iter()
            .map(|s| format!("{} {:.1}%", s.task, 100.0 * s.accuracy))
            .collect();
        println!(
            "round {}/{}: {}/{} accepted{}, version {} {}",
            report.round,
            self.fed.rounds,
            report.accepted.len(),
            report.sampled,
            if report.quorum_met {
                ""
            } else {
                " (below quorum: model unchanged)"
            },
            report.version,
            scores.join(", ")
        );
        if let Some(p) = &report.privacy {
            println!(
                "  privacy: ({:.4}, {:.0e})-DP after {} rounds (clip {:.4})",
                p.epsilon, p.delta, p.rounds, p.clip
            );
        }
        let line = RoundLine {
            kind: "round",
            round: report.round,
            recovered: c.recovered,
            version: report.version,
            stepped: report.stepped,
            quorum_met: report.quorum_met,
            sampled: report.sampled,
            accepted: report.accepted.len(),
            accepted_nodes: &report.accepted,
            failures: report
                .failures
                .iter()
                .map(|(n, r)| (n.clone(), format!("{r:?}")))
                .collect(),
            refused: report
                .refused
                .iter()
                .map(|(n, r)| (n.clone(), r.code))
                .collect(),
            contributors: &report.contributors,
            bytes_received: report.bytes_received,
            bytes_sent_full: c.sent.0,
            bytes_sent_delta: c.sent.1,
            central,
            wall_ms: c.wall_ms,
            closed_at_ms: report.closed_at_ms,
            privacy: report.privacy.as_ref(),
        };
        self.write_line(&line)
    }

    fn prune_checkpoints(&self) {
        let Ok(dir) = std::fs::read_dir(&self.checkpoints) else {
            return;
        };
        let mut rounds: Vec<(String, PathBuf)> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.starts_with("round-").then(|| (name, e.path()))
            })
            .collect();
        rounds.sort();
        let excess = rounds.len().saturating_sub(self.keep_checkpoints.max(1));
        for (_, path) in rounds.into_iter().take(excess) {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                warn!(path = %path.display(), %e, "cannot delete an old checkpoint");
            }
        }
    }
}
