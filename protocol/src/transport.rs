//! The libp2p stack of the two binaries: a persistent identity and a Swarm
//! speaking [`PROTOCOL_NAME`](crate::p2p::PROTOCOL_NAME) over TCP and QUIC,
//! with Noise and Yamux on TCP. Both `cohort-node` and `cohort-aggregator`
//! build their Swarm here so that the two ends cannot drift apart.
//!
//! Admission happens at the connection: with an allowlist, a peer not on it
//! is refused as soon as its identity is authenticated (libp2p's
//! `allow_block_list`), before it can open a stream; connections are
//! counted (`connection_limits`) and refused when the process uses too much
//! memory (`memory_connection_limits`); a connection carries a handful of
//! streams, and the codec reads frames in chunks with a stall timeout.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use futures::channel::{mpsc, oneshot};
use futures::{SinkExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, memory_connection_limits, noise, tcp, yamux, Multiaddr,
    PeerId, Swarm,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::messages::{Envelope, Limits, Refusal, RefusalCode, Request, Response};
use crate::p2p::{behaviour_with, CohortCodec, SubmitCap};
use crate::seal::create_private_file;
use crate::ProtocolError;

/// The behaviour of either binary: admission (allowlist, connection and
/// memory limits, in that order: a stranger is refused before it is
/// counted) and request-response with Cohort's codec.
#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
pub struct CohortBehaviour {
    allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    limits: connection_limits::Behaviour,
    memory: memory_connection_limits::Behaviour,
    rr: request_response::Behaviour<CohortCodec>,
}

impl std::fmt::Debug for CohortBehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CohortBehaviour")
            .field("allowlist", &self.allow.is_enabled())
            .finish_non_exhaustive()
    }
}

impl CohortBehaviour {
    /// The request-response behaviour (sending requests and responses).
    pub fn rr(&mut self) -> &mut request_response::Behaviour<CohortCodec> {
        &mut self.rr
    }
}

/// The Swarm of either binary.
pub type CohortSwarm = Swarm<CohortBehaviour>;

/// Network settings shared by the node and the aggregator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// Message size limits (requests carry updates, responses carry models).
    pub limits: Limits,
    /// How long a request may take end to end (a 50 MB model on a slow link
    /// needs more than libp2p's default of 10 s).
    pub request_timeout_s: u64,
    /// Longest wait for the next chunk of a frame being read or written: a
    /// peer that announces a frame and goes quiet loses its stream after
    /// this, whatever `request_timeout_s` says.
    pub read_timeout_s: u64,
    /// How long an idle connection (no request in flight) stays open.
    pub idle_timeout_s: u64,
    /// Concurrent request streams per connection (inbound beyond this are
    /// dropped); the multiplexers allow twice as many raw streams.
    pub max_streams: usize,
    /// Established connections in all.
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
    /// Incoming connections in their handshake at once.
    pub max_pending_incoming: u32,
    /// New connections are refused while the process uses more than this
    /// fraction of the machine's memory (a backstop).
    pub max_memory_fraction: f64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            limits: Limits::default(),
            request_timeout_s: 300,
            read_timeout_s: 10,
            idle_timeout_s: 120,
            max_streams: 8,
            max_connections: 256,
            max_connections_per_peer: 2,
            max_pending_incoming: 16,
            max_memory_fraction: 0.8,
        }
    }
}

/// Who may connect and what a connection may do.
#[derive(Clone, Debug)]
pub struct Admission {
    /// The peers that may hold a connection at all; `None`: anyone (an
    /// aggregator started with `--open`).
    pub allow: Option<HashSet<PeerId>>,
    /// Whether inbound requests are answered (the aggregator). A node only
    /// asks: it accepts no inbound stream of the protocol.
    pub serve: bool,
    /// The current bound of `Submit` requests (see [`SubmitCap`]).
    pub submit_cap: SubmitCap,
}

impl Admission {
    /// Anyone may connect and ask (tests, demos, `--open`).
    pub fn open() -> Self {
        Admission {
            allow: None,
            serve: true,
            submit_cap: SubmitCap::default(),
        }
    }

    /// A peer that talks to `peers` only, and only asks (a node and its
    /// aggregator).
    pub fn client_of(peers: impl IntoIterator<Item = PeerId>) -> Self {
        Admission {
            allow: Some(peers.into_iter().collect()),
            serve: false,
            submit_cap: SubmitCap::default(),
        }
    }
}
fn key_err(path: &Path, reason: impl ToString) -> ProtocolError {
    ProtocolError::KeyFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Loads the libp2p identity (ed25519, protobuf encoding) from `path`, or
/// creates it there on first start (mode 0600): the peer id survives
/// restarts, and with it the aggregator's allowlist entries.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, ProtocolError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)
                    .map_err(|e| key_err(path, e))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(key_err(
                        path,
                        format!("readable by others (mode {:o}); chmod 600 it", mode & 0o777),
                    ));
                }
            }
            if bytes.len() > 4096 {
                return Err(key_err(path, "not a libp2p identity (too large)"));
            }
            Keypair::from_protobuf_encoding(&bytes)
                .map_err(|e| key_err(path, format!("not a libp2p identity: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate_ed25519();
            let bytes = kp
                .to_protobuf_encoding()
                .map_err(|e| key_err(path, e.to_string()))?;
            if create_private_file(path, &bytes).map_err(|e| key_err(path, e))? {
                Ok(kp)
            } else {
                // Another process created it first: use theirs.
                load_or_create_identity(path)
            }
        }
        Err(e) => Err(key_err(path, e)),
    }
}

/// A Swarm for `identity`: TCP (Noise, Yamux) and QUIC on tokio, Cohort's
/// request-response behaviour with `cfg`'s limits and timeouts, open to
/// anyone and answering requests ([`Admission::open`]).
pub fn build_swarm(identity: Keypair, cfg: &NetConfig) -> Result<CohortSwarm, ProtocolError> {
    build_swarm_with(identity, cfg, Admission::open())
}

/// [`build_swarm`] with the admission rules of `admission`.
pub fn build_swarm_with(
    identity: Keypair,
    cfg: &NetConfig,
    admission: Admission,
) -> Result<CohortSwarm, ProtocolError> {
    let streams = cfg.max_streams.max(1);
    let rr = request_response::Config::default()
        .with_request_timeout(Duration::from_secs(cfg.request_timeout_s.max(1)))
        .with_max_concurrent_streams(streams);
    let codec = CohortCodec {
        limits: cfg.limits,
        submit_cap: admission.submit_cap.clone(),
        stall: Some(Duration::from_secs(cfg.read_timeout_s.max(1))),
    };
    let support = if admission.serve {
        ProtocolSupport::Full
    } else {
        ProtocolSupport::Outbound
    };
    let allow = admission.allow.map(|peers| {
        let mut b = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for p in peers {
            b.allow_peer(p);
        }
        b
    });
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(cfg.max_pending_incoming.max(1)))
        .with_max_established(Some(cfg.max_connections.max(1)))
        .with_max_established_per_peer(Some(cfg.max_connections_per_peer.max(1)));
    let fraction = if cfg.max_memory_fraction > 0.0 && cfg.max_memory_fraction <= 1.0 {
        cfg.max_memory_fraction
    } else {
        1.0
    };
    let raw_streams = streams.saturating_mul(2);
    let behaviour = CohortBehaviour {
        allow: Toggle::from(allow),
        limits: connection_limits::Behaviour::new(limits),
        memory: memory_connection_limits::Behaviour::with_max_percentage(fraction),
        rr: behaviour_with(codec, support, rr),
    };
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            move || {
                let mut y = yamux::Config::default();
                y.set_max_num_streams(raw_streams);
                y
            },
        )
        .map_err(|e| ProtocolError::Io(format!("tcp transport: {e}")))?
        .with_quic_config(|mut q| {
            q.max_concurrent_stream_limit = u32::try_from(raw_streams).unwrap_or(u32::MAX);
            q
        })
        .with_behaviour(|_| behaviour)
        .map_err(|e| ProtocolError::Io(format!("behaviour: {e}")))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(cfg.idle_timeout_s.max(1)))
                .with_max_negotiating_inbound_streams(raw_streams)
                // Every stream speaks the one protocol both ends know: the
                // request goes out with the protocol proposal instead of
                // one round trip after it (multistream-select's lazy mode).
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

/// At most `per_window` log lines per `window`; the lines left out are
/// counted and reported with the next line that is written. Peers choose
/// how often something is refused: they must not choose the log's size.
#[derive(Debug)]
pub struct LogBudget {
    per_window: u32,
    window: Duration,
    start: Instant,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(per_window: u32, window: Duration) -> Self {
        LogBudget {
            per_window,
            window,
            start: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(lines left out since the last one written)` when this line
    /// may be written, `None` when it must be left out.
    pub fn allow(&mut self) -> Option<u64> {
        if self.start.elapsed() >= self.window {
            self.start = Instant::now();
            self.used = 0;
        }
        if self.used < self.per_window {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// What the rest of a process asks of its event loop.
#[derive(Debug)]
pub enum Command {
    /// Listen on a multiaddr; the reply says whether the listener started.
    Listen {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Remember `addr` for `peer` (dialed when a request needs it).
    AddAddress { peer: PeerId, addr: Multiaddr },
    /// Sends a request; the answer (or why none came) goes to `reply`.
    Request {
        peer: PeerId,
        request: Envelope<Request>,
        reply: oneshot::Sender<Result<Envelope<Response>, RequestError>>,
    },
    /// Answers an inbound request.
    Respond {
        channel: ResponseChannel<Envelope<Response>>,
        response: Envelope<Response>,
    },
}

/// Why an outbound request got no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("could not reach the peer: {0}")]
    Dial(String),
    #[error("no answer in time")]
    Timeout,
    #[error("connection closed before the answer")]
    ConnectionClosed,
    #[error("the peer does not speak the Cohort protocol")]
    Unsupported,
    #[error("stream failed: {0}")]
    Io(String),
    #[error("the event loop has stopped")]
    Stopped,
}

/// What the event loop tells the rest of the process.
#[derive(Debug)]
pub enum NetEvent {
    /// A request came in from `peer` (the authenticated identity of the
    /// connection, not anything the message claims).
    Request {
        peer: PeerId,
        request: Envelope<Request>,
        channel: ResponseChannel<Envelope<Response>>,
    },
    Listening(Multiaddr),
    Connected(PeerId),
    /// The last connection to `peer` closed.
    Disconnected(PeerId),
    /// An inbound request could not be read or answered (bad frame, size
    /// limit, timeout): logged by the loop, reported for accounting.
    InboundFailure {
        peer: PeerId,
        error: String,
    },
}

/// A cloneable handle to the event loop.
#[derive(Clone, Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
}

impl Client {
    pub async fn listen(&mut self, addr: Multiaddr) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Listen { addr, reply })
            .await
            .map_err(|_| "the event loop has stopped".to_string())?;
        rx.await
            .map_err(|_| "the event loop has stopped".to_string())?
    }

    pub async fn add_address(&mut self, peer: PeerId, addr: Multiaddr) {
        let _ = self.commands.send(Command::AddAddress { peer, addr }).await;
    }

    /// Sends `request` to `peer` and waits for its answer.
    pub async fn request(
        &mut self,
        peer: PeerId,
        request: Envelope<Request>,
    ) -> Result<Envelope<Response>, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Request {
                peer,
                request,
                reply,
            })
            .await
            .map_err(|_| RequestError::Stopped)?;
        rx.await.map_err(|_| RequestError::Stopped)?
    }

    pub async fn respond(
        &mut self,
        channel: ResponseChannel<Envelope<Response>>,
        response: Envelope<Response>,
    ) {
        let _ = self
            .commands
            .send(Command::Respond { channel, response })
            .await;
    }
}

/// Creates the event loop of `swarm`: run [`EventLoop::run`] on its own
/// task; talk to it through the [`Client`]; read its [`NetEvent`]s.
pub fn event_loop(swarm: CohortSwarm) -> (Client, mpsc::Receiver<NetEvent>, EventLoop) {
    let (commands_tx, commands) = mpsc::channel(64);
    let (events, events_rx) = mpsc::channel(256);
    let lp = EventLoop {
        swarm,
        commands,
        events,
        pending: HashMap::new(),
        dropped: 0,
        log: LogBudget::new(20, Duration::from_secs(10)),
    };
    (
        Client {
            commands: commands_tx,
        },
        events_rx,
        lp,
    )
}

/// The one owner of the Swarm (rust-libp2p's file-sharing example's
/// shape): commands in, events out, answers matched by request id. It
/// never waits for the reader of its events: when their queue is full, a
/// request is answered `Busy` and any other event is dropped (counted).
pub struct EventLoop {
    swarm: CohortSwarm,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Envelope<Response>, RequestError>>>,
    /// Events dropped (or requests answered busy) on a full queue.
    dropped: u64,
    /// Budget of the loop's warnings (inbound failures, dropped events).
    log: LogBudget,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer", self.swarm.local_peer_id())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl EventLoop {
    pub fn local_peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Runs until every [`Client`] is dropped.
    pub async fn run(mut self) {
        loop {
            futures::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.next() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listen { addr, reply } => {
                let r = self
                    .swarm
                    .listen_on(addr.clone())
                    .map(|_| ())
                    .map_err(|e| format!("listen on {addr}: {e}"));
                let _ = reply.send(r);
            }
            Command::AddAddress { peer, addr } => {
                self.swarm.add_peer_address(peer, addr);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().rr.send_request(&peer, request);
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!("response dropped: the requester is gone");
                }
            }
        }
    }

    /// Hands `event` over without waiting: a full queue means the reader is
    /// slow (or never reads), and the Swarm must not stop for it.
    fn emit(&mut self, event: NetEvent) {
        let event = match self.events.try_send(event) {
            Ok(()) => return,
            Err(e) if e.is_disconnected() => return,
            Err(e) => e.into_inner(),
        };
        self.dropped += 1;
        if let Some(skipped) = self.log.allow() {
            warn!(
                dropped = self.dropped,
                skipped, "event queue full: answering busy / dropping events"
            );
        }
        if let NetEvent::Request {
            request, channel, ..
        } = event
        {
            let busy = Envelope::new(
                request.federation,
                Response::Refused(Refusal {
                    code: RefusalCode::Busy,
                    message: "the service is busy; ask again later".into(),
                }),
            );
            let _ = self.swarm.behaviour_mut().rr.send_response(channel, busy);
        }
    }

    /// Events dropped on a full queue so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<CohortBehaviourEvent>) {
        use request_response::{Event, Message, OutboundFailure};
        match event {
            SwarmEvent::Behaviour(CohortBehaviourEvent::Rr(Event::Message {
                peer,
                message,
                ..
            })) => match message {
                Message::Request {
                    request, channel, ..
                } => self.emit(NetEvent::Request {
                    peer,
                    request,
                    channel,
                }),
                Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(tx) = self.pending.remove(&request_id) {
                        let _ = tx.send(Ok(response));
                    }
                }
            },
            SwarmEvent::Behaviour(CohortBehaviourEvent::Rr(Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            })) => {
                debug!(%peer, %error, "request failed");
                let e = match error {
                    OutboundFailure::DialFailure => {
                        RequestError::Dial(format!("dial {peer} failed"))
                    }
                    OutboundFailure::Timeout => RequestError::Timeout,
                    OutboundFailure::ConnectionClosed => RequestError::ConnectionClosed,
                    OutboundFailure::UnsupportedProtocols => RequestError::Unsupported,
                    OutboundFailure::Io(e) => RequestError::Io(e.to_string()),
                };
                if let Some(tx) = self.pending.remove(&request_id) {
                    let _ = tx.send(Err(e));
                }
            }
            SwarmEvent::Behaviour(CohortBehaviourEvent::Rr(Event::InboundFailure {
                peer,
                error,
                ..
            })) => {
                // Peers choose how often this happens: rate-limited.
                if let Some(skipped) = self.log.allow() {
                    warn!(%peer, %error, skipped, "inbound request failed");
                }
                self.emit(NetEvent::InboundFailure {
                    peer,
                    error: error.to_string(),
                });
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                self.emit(NetEvent::Listening(address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } if num_established.get() == 1 => {
                self.emit(NetEvent::Connected(peer_id));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                if num_established == 0 {
                    self.emit(NetEvent::Disconnected(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError {
                error,
                peer_id,
                send_back_addr,
                ..
            } => {
                // Strangers and limits: refused at the connection. Logged
                // within a budget (peers choose how often this happens).
                if let libp2p::swarm::ListenError::Denied { cause } = &error {
                    if let Some(skipped) = self.log.allow() {
                        let reason = if let Some(e) =
                            cause.downcast_ref::<allow_block_list::NotAllowed>()
                        {
                            e.to_string()
                        } else if let Some(e) = cause.downcast_ref::<connection_limits::Exceeded>()
                        {
                            format!("connection limit: {e}")
                        } else if let Some(e) = cause
                            .downcast_ref::<memory_connection_limits::MemoryUsageLimitExceeded>(
                        ) {
                            e.to_string()
                        } else {
                            cause.to_string()
                        };
                        let peer = peer_id.map(|p| p.to_string()).unwrap_or_default();
                        warn!(%peer, from = %send_back_addr, %reason, skipped, "connection refused");
                    }
                } else {
                    debug!(%error, "incoming connection failed");
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_a_restart_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        let a = load_or_create_identity(&path).expect("create");
        let b = load_or_create_identity(&path).expect("load");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(load_or_create_identity(&path).is_err());
        }
    }

    #[test]
    fn processes_starting_together_share_one_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        let ids: Vec<PeerId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| load_or_create_identity(&path).map(|k| k.public().to_peer_id()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread").expect("identity"))
                .collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    }

    #[test]
    fn garbage_identity_file_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        create_private_file(&path, b"not a key").expect("write");
        assert!(matches!(
            load_or_create_identity(&path),
            Err(ProtocolError::KeyFile { .. })
        ));
    }
}
