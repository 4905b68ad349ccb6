//! Hostile networks against real processes on 127.0.0.1:
//! - a flood of frame prefixes announcing 256 MiB, from strangers and from
//!   allowed peers, over many connections and streams: the aggregator's
//!   memory stays within a bound and honest nodes finish their rounds;
//! - an aggregator that cuts a node's connection 300 times and sends it 300
//!   requests: the node refuses every request, keeps reconnecting, and
//!   completes a round once a real aggregator answers;
//!
//! `COHORT_BIN_DIR` runs them against other binaries (e.g. an older build,
//! to see them fail).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_protocol::messages::{Envelope, Request};
use cohort_protocol::p2p::PROTOCOL_NAME;
use cohort_protocol::seal::SealKeyPair;
use cohort_protocol::transport::{build_swarm, load_or_create_identity, NetConfig};
use cohort_tests::net::{bin, peer_id, tail, Aggregator, Proc, TestDir};
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundFailure, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol};

mod common;
use common::connect_info;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A request-response codec that sends only a frame prefix announcing
/// `ANNOUNCED` bytes, then never another byte (and never closes).
#[derive(Clone, Debug, Default)]
struct PrefixOnly;

const ANNOUNCED: u64 = 256 << 20;

impl request_response::Codec for PrefixOnly {
    type Protocol = StreamProtocol;
    type Request = ();
    type Response = ();

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<()> {
        let mut b = [0u8; 256];
        while io.read(&mut b).await? > 0 {}
        Ok(())
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        _: (),
    ) -> io::Result<()> {
        io.write_all(&ANNOUNCED.to_le_bytes()).await?;
        io.flush().await?;
        // Hold the stream: the request is never complete.
        futures::future::pending::<()>().await;
        Ok(())
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: (),
    ) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct FloodStats {
    sent: AtomicU64,
    failed: AtomicU64,
}

/// One flooding peer: keeps `streams` prefix-only requests in flight to
/// `to` until `stop`, re-sending (at most every 100 ms) those that fail.
async fn flood(
    key: Keypair,
    to: PeerId,
    addr: Multiaddr,
    streams: usize,
    stop: Arc<AtomicBool>,
    stats: Arc<FloodStats>,
) {
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, || {
            let mut y = yamux::Config::default();
            y.set_max_num_streams(4 * streams);
            y
        })
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                PrefixOnly,
                [(
                    StreamProtocol::new(PROTOCOL_NAME),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(600))
                    .with_max_concurrent_streams(4 * streams),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    swarm.add_peer_address(to, addr);
    let mut in_flight = 0usize;
    let mut top_up = tokio::time::interval(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = top_up.tick() => {
                while in_flight < streams {
                    swarm.behaviour_mut().send_request(&to, ());
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    in_flight += 1;
                }
            }
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure { .. })
                | SwarmEvent::Behaviour(request_response::Event::Message { .. }) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    in_flight = in_flight.saturating_sub(1);
                }
                _ => {}
            },
        }
    }
}

fn write_node_config(dir: &Path, index: usize, count: usize) {
    std::fs::create_dir_all(dir).expect("node dir");
    let text = format!(
        r#"data_dir = "{dir}"
backbone = "mlp8x8"
seed = {index}

[[tasks]]
name = "digits"
dataset = "digits8x8"
shard = {{ index = {index}, count = {count}, partitioner = {{ kind = "iid" }}, seed = 3 }}

[backoff]
initial_ms = 5
max_ms = 20
"#,
        dir = dir.display()
    );
    std::fs::write(dir.join("node.toml"), text).expect("node config");
}

fn start_node_with(name: &str, dir: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("cohort-node"));
    cmd.arg("--config").arg(dir.join("node.toml")).args(args);
    Proc::spawn(name, cmd, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_length_prefixes_costs_the_aggregator_little_memory() {
    const STREAMS: usize = 150;
    const BOUND_KIB: u64 = 64 << 10;
    let root = TestDir::new();
    let honest: Vec<String> = (0..2)
        .map(|i| peer_id(&root.path().join(format!("node{i}"))))
        .collect();
    // Allowed peers that misbehave, and strangers.
    let allowed_flooders: Vec<Keypair> = (0..2).map(|_| Keypair::generate_ed25519()).collect();
    let strangers: Vec<Keypair> = (0..4).map(|_| Keypair::generate_ed25519()).collect();
    let allowed_ids: Vec<String> = honest
        .iter()
        .cloned()
        .chain(
            allowed_flooders
                .iter()
                .map(|k| k.public().to_peer_id().to_string()),
        )
        .collect();
    let mut args = vec![
        "--rounds",
        "3",
        "--nodes",
        "2",
        "--per-round",
        "2",
        "--linger-s",
        "1",
    ];
    for a in &allowed_ids {
        args.extend(["--allow", a.as_str()]);
    }
    let mut agg = Aggregator::start(&root.path().join("agg"), "/ip4/127.0.0.1/tcp/0", &args);
    let pid = agg.proc.child.id();
    let (aggregator, addr, _, _) = connect_info(&agg);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(pid).expect("rss");

    let stop = Arc::new(AtomicBool::new(false));
    let mut stats = BTreeMap::new();
    let mut tasks = Vec::new();
    for (kind, keys) in [("allowed", allowed_flooders), ("stranger", strangers)] {
        let s = Arc::new(FloodStats::default());
        stats.insert(kind, Arc::clone(&s));
        for k in keys {
            tasks.push(tokio::spawn(flood(
                k,
                aggregator,
                addr.clone(),
                STREAMS,
                Arc::clone(&stop),
                Arc::clone(&s),
            )));
        }
    }
    // The flood for a few seconds alone, then honest nodes join under it.
    let mut peak = idle;
    let sample_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < sample_until {
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut nodes: Vec<Proc> = (0..2)
        .map(|i| {
            let dir = root.path().join(format!("node{i}"));
            cohort_tests::net::node_config(&dir, i, 2, "");
            cohort_tests::net::start_node(&format!("node{i}"), &dir, &agg.connect_file())
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Ok(Some(s)) = agg.proc.child.try_wait() {
            break Some(s);
        }
        if Instant::now() > end {
            break None;
        }
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    for (kind, s) in &stats {
        println!(
            "{kind} flooders: {} prefixes sent, {} failed",
            s.sent.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed)
        );
    }
    println!(
        "aggregator RSS: idle {} KiB, peak {} KiB (+{} KiB)",
        idle,
        peak,
        peak.saturating_sub(idle)
    );
    let Some(status) = status else {
        let mut msg = format!(
            "aggregator did not finish under the flood\n{}",
            tail(&agg.proc.err(), 30)
        );
        for n in &nodes {
            msg += &format!("\n--- {}\n{}", n.name, tail(&n.err(), 15));
        }
        panic!("{msg}");
    };
    assert!(status.success(), "{}", tail(&agg.proc.err(), 30));
    assert!(
        peak.saturating_sub(idle) <= BOUND_KIB,
        "the flood raised the aggregator's RSS from {idle} KiB to {peak} KiB"
    );
    let rounds = agg.rounds();
    assert_eq!(rounds.len(), 3, "every round closed");
    assert!(
        rounds.iter().all(|r| r["accepted"] == 2),
        "both honest nodes in every round: {rounds:?}"
    );
    for n in nodes.iter_mut() {
        let s = n.expect_exit(Duration::from_secs(30));
        assert!(s.success(), "{} failed:\n{}", n.name, tail(&n.err(), 20));
    }
    let log = agg.proc.err();
    assert!(
        log.lines()
            .any(|l| l.contains("connection refused") && l.contains("not in the allow list")),
        "strangers are refused at the connection"
    );
    assert!(
        log.lines().count() < 2_000,
        "the flood's log lines are rate-limited ({} lines)",
        log.lines().count()
    );
}

/// The hostile "aggregator" of the reconnection test: the Swarm of
/// `build_swarm` (which answers and sends requests), driven by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_survives_300_cut_connections_and_300_inbound_requests() {
    const CYCLES: u64 = 300;
    let root = TestDir::new();
    let agg_dir = root.path().join("agg");
    std::fs::create_dir_all(&agg_dir).expect("agg dir");
    // The aggregator's identity and sealing key, created ahead: the hostile
    // peer uses them first, the real aggregator after.
    let identity = load_or_create_identity(&agg_dir.join("identity.key")).expect("identity");
    let keys = SealKeyPair::load_or_create(&agg_dir.join("seal.key")).expect("seal key");
    let agg_id = identity.public().to_peer_id();
    let port = cohort_tests::net::free_port();
    let listen: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr");

    let node_dir = root.path().join("node");
    write_node_config(&node_dir, 0, 1);
    let node_id: PeerId = peer_id(&node_dir).parse().expect("peer id");
    let aggregator_arg = format!("{listen}/p2p/{agg_id}");
    let key_arg = keys.public().to_string();
    let mut node = start_node_with(
        "node",
        &node_dir,
        &[
            "--aggregator",
            &aggregator_arg,
            "--aggregator-key",
            &key_arg,
            "--federation",
            "digits",
        ],
    );

    let cfg = NetConfig {
        request_timeout_s: 5,
        max_connections_per_peer: 8,
        ..NetConfig::default()
    };
    let mut swarm = build_swarm(identity, &cfg).expect("swarm");
    swarm.listen_on(listen.clone()).expect("listen");
    let mut connections = 0u64;
    let mut sent = 0u64;
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    // Per connection: the node's hello seen.
    let mut hello_seen = false;
    let deadline = Instant::now() + Duration::from_secs(150);
    let resolved = |o: &BTreeMap<String, u64>| o.values().sum::<u64>();
    while connections < CYCLES || resolved(&outcomes) < sent {
        assert!(
            Instant::now() < deadline,
            "the node stopped reconnecting after {connections} connections \
             ({outcomes:?} of {sent} requests resolved)\n{}",
            tail(&node.err(), 20)
        );
        let ev = tokio::time::timeout(Duration::from_secs(1), swarm.select_next_some()).await;
        let Ok(ev) = ev else { continue };
        use request_response::{Event, Message};
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == node_id => {
                connections += 1;
                hello_seen = false;
                if sent < CYCLES {
                    let env = Envelope::new("digits", Request::GetPlan);
                    swarm.behaviour_mut().rr().send_request(&node_id, env);
                    sent += 1;
                }
            }
            SwarmEvent::Behaviour(cohort_protocol::transport::CohortBehaviourEvent::Rr(e)) => {
                match e {
                    Event::Message {
                        message: Message::Request { .. },
                        ..
                    } => hello_seen = true, // never answered
                    Event::Message {
                        message: Message::Response { .. },
                        ..
                    } => {
                        *outcomes.entry("answered".into()).or_default() += 1;
                    }
                    Event::OutboundFailure { error, .. } => {
                        let kind = match error {
                            OutboundFailure::UnsupportedProtocols => "unsupported",
                            OutboundFailure::Timeout => "timeout",
                            OutboundFailure::ConnectionClosed => "closed",
                            OutboundFailure::DialFailure => "dial",
                            OutboundFailure::Io(_) => "io",
                        };
                        *outcomes.entry(kind.into()).or_default() += 1;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        // Cut as soon as the node has spoken: our request is in flight by
        // then (sent when the connection came up).
        if hello_seen && connections <= CYCLES {
            let _ = swarm.disconnect_peer_id(node_id);
            hello_seen = false;
        }
    }
    println!("{connections} connections, {sent} requests to the node: {outcomes:?}");
    assert_eq!(sent, CYCLES);
    assert_eq!(
        outcomes.get("answered").copied().unwrap_or(0),
        0,
        "the node answers no inbound request: {outcomes:?}"
    );
    drop(swarm);

    // The real aggregator, same identity, key and address: the node joins
    // and completes a round.
    let listen_s = listen.to_string();
    let node_s = node_id.to_string();
    let mut agg = Aggregator::start(
        &agg_dir,
        &listen_s,
        &[
            "--allow",
            &node_s,
            "--nodes",
            "1",
            "--per-round",
            "1",
            "--rounds",
            "1",
            "--linger-s",
            "2",
        ],
    );
    let status = agg.proc.expect_exit(Duration::from_secs(120));
    assert!(status.success(), "{}", tail(&agg.proc.err(), 30));
    let rounds = agg.rounds();
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0]["accepted"], 1, "{rounds:?}");
    let s = node.expect_exit(Duration::from_secs(30));
    assert!(s.success(), "node failed:\n{}", tail(&node.err(), 30));
}

/// A registered peer that only polls: hello, then plan and model requests
/// back to back until `stop`; records the longest wait for an answer.
async fn parker(
    fed: String,
    to: PeerId,
    addr: Multiaddr,
    fingerprint: cohort_protocol::Fingerprint,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    longest_ms: Arc<AtomicU64>,
) {
    use cohort_protocol::messages::{Hello, Response, TaskSamples};
    use cohort_protocol::transport::event_loop;
    let key = Keypair::generate_ed25519();
    let me = key.public().to_peer_id().to_string();
    let swarm = build_swarm(key, &NetConfig::default()).expect("swarm");
    let (mut client, mut events, lp) = event_loop(swarm);
    tokio::spawn(lp.run());
    tokio::spawn(async move { while events.next().await.is_some() {} });
    client.add_address(to, addr).await;
    let hello = Request::Hello(Hello {
        node: me,
        tasks: vec![TaskSamples {
            task: "digits".into(),
            samples: 10,
        }],
        layout: fingerprint,
        version: cohort_protocol::PROTOCOL_VERSION,
    });
    let mut registered = false;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let body = if !registered {
            hello.clone()
        } else if i.is_multiple_of(2) {
            Request::GetPlan
        } else {
            Request::GetModel {
                groups: vec!["backbone".into()],
                have_version: None,
            }
        };
        let t = Instant::now();
        let r = client.request(to, Envelope::new(fed.clone(), body)).await;
        longest_ms.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
        match r {
            Ok(env) => {
                answered.fetch_add(1, Ordering::Relaxed);
                match env.body {
                    Response::Welcome { .. } => registered = true,
                    Response::Refused(r)
                        if r.code == cohort_protocol::messages::RefusalCode::UnknownNode =>
                    {
                        registered = false
                    }
                    _ => {}
                }
            }
            Err(_) => {
                registered = false;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_plans_and_a_flood_during_slow_round_closes_make_progress() {
    const PARKERS: usize = 120;
    let root = TestDir::new();
    // Every round's close takes 3 s more (central evaluation slowed by
    // the aggregator's test hook); rounds wait at most 3 s for a node.
    std::env::set_var("COHORT_DEBUG_CLOSE_DELAY_MS", "3000");
    let mut agg = Aggregator::start(
        &root.path().join("agg"),
        "/ip4/127.0.0.1/tcp/0",
        &[
            "--open",
            "--nodes",
            "1",
            "--per-round",
            "1",
            "--rounds",
            "3",
            "--deadline-ms",
            "3000",
            "--linger-s",
            "2",
        ],
    );
    let (aggregator, addr, _, fed) = connect_info(&agg);
    let node_dir = root.path().join("node");
    cohort_tests::net::node_config(&node_dir, 0, 1, "");
    let mut node = cohort_tests::net::start_node("node", &node_dir, &agg.connect_file());

    let spec = cohort_tests::builtin_model("mlp8x8", &[("digits", 10)]);
    let fingerprint = spec.layout().fingerprint();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let longest = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..PARKERS)
        .map(|_| {
            tokio::spawn(parker(
                fed.clone(),
                aggregator,
                addr.clone(),
                fingerprint,
                Arc::clone(&stop),
                Arc::clone(&answered),
                Arc::clone(&longest),
            ))
        })
        .collect();
    let status = tokio::task::spawn_blocking(move || {
        let s = agg.proc.wait(Duration::from_secs(150));
        (agg, s)
    })
    .await
    .expect("wait");
    let (agg, status) = status;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    std::env::remove_var("COHORT_DEBUG_CLOSE_DELAY_MS");
    let answered = answered.load(Ordering::Relaxed);
    let longest = longest.load(Ordering::Relaxed);
    println!("{answered} answers to {PARKERS} parkers; longest wait {longest} ms");
    let status = status.unwrap_or_else(|| {
        panic!(
            "the aggregator did not finish:\n{}",
            tail(&agg.proc.err(), 30)
        )
    });
    assert!(status.success(), "{}", tail(&agg.proc.err(), 30));
    assert_eq!(agg.rounds().len(), 3, "every round closed");
    assert!(
        agg.proc.err().contains("round started round=3"),
        "rounds went on after slow closes"
    );
    // Parked requests are answered within the 10 s hold (plus slack),
    // slow closes or not.
    assert!(longest < 20_000, "a request waited {longest} ms");
    assert!(
        answered >= 4 * PARKERS as u64,
        "only {answered} answers to {PARKERS} polling peers"
    );
    let s = node.expect_exit(Duration::from_secs(30));
    assert!(s.success(), "{}", tail(&node.err(), 20));
}
