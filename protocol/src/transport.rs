//! The libp2p stack of the two binaries: a persistent identity and a Swarm
//! speaking [`PROTOCOL_NAME`](crate::p2p::PROTOCOL_NAME) over TCP and QUIC,
//! with Noise and Yamux on TCP. Both `cohort-node` and `cohort-aggregator`
//! build their Swarm here so that the two ends cannot drift apart.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::{SinkExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, Swarm};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::messages::{Envelope, Limits, Request, Response};
use crate::p2p::{behaviour, CohortCodec};
use crate::seal::create_private_file;
use crate::ProtocolError;

/// The Swarm of either binary: request-response with Cohort's codec only.
pub type CohortSwarm = Swarm<request_response::Behaviour<CohortCodec>>;

/// Network settings shared by the node and the aggregator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// Message size limits (requests carry updates, responses carry models).
    pub limits: Limits,
    /// How long a request may take end to end (a 50 MB model on a slow link
    /// needs more than libp2p's default of 10 s).
    pub request_timeout_s: u64,
    /// How long an idle connection stays open.
    pub idle_timeout_s: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            limits: Limits::default(),
            request_timeout_s: 300,
            idle_timeout_s: 3600,
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
/// request-response behaviour with `cfg`'s limits and timeouts.
pub fn build_swarm(identity: Keypair, cfg: &NetConfig) -> Result<CohortSwarm, ProtocolError> {
    let rr = request_response::Config::default()
        .with_request_timeout(Duration::from_secs(cfg.request_timeout_s.max(1)))
        .with_max_concurrent_streams(1024);
    let limits = cfg.limits;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| ProtocolError::Io(format!("tcp transport: {e}")))?
        .with_quic()
        .with_behaviour(|_| behaviour(limits, rr))
        .map_err(|e| ProtocolError::Io(format!("behaviour: {e}")))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(cfg.idle_timeout_s.max(1)))
        })
        .build();
    Ok(swarm)
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
/// shape): commands in, events out, answers matched by request id.
pub struct EventLoop {
    swarm: CohortSwarm,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Envelope<Response>, RequestError>>>,
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
                event = self.swarm.select_next_some() => self.on_swarm_event(event).await,
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
                let id = self.swarm.behaviour_mut().send_request(&peer, request);
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!("response dropped: the requester is gone");
                }
            }
        }
    }

    async fn emit(&mut self, event: NetEvent) {
        // A full queue means the service is slow: wait rather than drop
        // (requests carry response channels that must be answered).
        let _ = self.events.send(event).await;
    }

    async fn on_swarm_event(
        &mut self,
        event: SwarmEvent<request_response::Event<Envelope<Request>, Envelope<Response>>>,
    ) {
        use request_response::{Event, Message, OutboundFailure};
        match event {
            SwarmEvent::Behaviour(Event::Message { peer, message, .. }) => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    self.emit(NetEvent::Request {
                        peer,
                        request,
                        channel,
                    })
                    .await
                }
                Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(tx) = self.pending.remove(&request_id) {
                        let _ = tx.send(Ok(response));
                    }
                }
            },
            SwarmEvent::Behaviour(Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
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
            SwarmEvent::Behaviour(Event::InboundFailure { peer, error, .. }) => {
                warn!(%peer, %error, "inbound request failed");
                self.emit(NetEvent::InboundFailure {
                    peer,
                    error: error.to_string(),
                })
                .await;
            }
            SwarmEvent::Behaviour(Event::ResponseSent { .. }) => {}
            SwarmEvent::NewListenAddr { address, .. } => {
                self.emit(NetEvent::Listening(address)).await;
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } if num_established.get() == 1 => {
                self.emit(NetEvent::Connected(peer_id)).await;
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                if num_established == 0 {
                    self.emit(NetEvent::Disconnected(peer_id)).await;
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                debug!(%error, "incoming connection failed");
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
