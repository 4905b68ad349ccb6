//! Model download throughput between two swarms of `build_swarm` in one
//! process, over loopback: TCP (Noise, Yamux) and QUIC, a 50 MB and a 1 MB
//! model. Each figure is one whole request as the node sees it: the
//! request, the server's encode and framing, encryption, the transport,
//! the requester's framing and decode into a `ModelPayload`.
//!
//! `cargo bench -p cohort-protocol --bench transfer --features transport`

use std::time::{Duration, Instant};

use cohort_protocol::framing::{frame, read_frame};
use cohort_protocol::messages::{
    decode_envelope, encode_envelope, Envelope, ModelPayload, Request, Response,
};
use cohort_protocol::transport::{build_swarm, event_loop, Client, NetConfig, NetEvent};
use cohort_protocol::ParamGroups;
use futures::channel::mpsc;
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};

const FED: &str = "transfer-bench";
/// Timed transfers per transport and size (after one warm-up).
const RUNS: usize = 5;
const SIZES: [(&str, usize); 2] = [("50MB", 50_000_000), ("1MB", 1_000_000)];
const TRANSPORTS: [(&str, &str); 2] = [
    ("tcp", "/ip4/127.0.0.1/tcp/0"),
    ("quic", "/ip4/127.0.0.1/udp/0/quic-v1"),
];

/// A model of `bytes / 4` f32 (deterministic, not constant) in two groups.
fn model(bytes: usize) -> ModelPayload {
    let n = bytes / 4;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut values = |k: usize| -> Vec<f32> {
        (0..k)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    };
    let head = n / 25;
    let mut groups = ParamGroups::new();
    groups.insert("backbone", values(n - head));
    groups.insert("head/a", values(head));
    ModelPayload::from_groups(1, None, &groups)
}

fn payload_bytes(r: &Envelope<Response>) -> usize {
    match &r.body {
        Response::Model(m) => m.groups.iter().map(|g| g.data.len()).sum(),
        _ => 0,
    }
}

struct Peer {
    id: PeerId,
    client: Client,
    events: mpsc::Receiver<NetEvent>,
}

fn start() -> Peer {
    let swarm = build_swarm(Keypair::generate_ed25519(), &NetConfig::default()).expect("swarm");
    let (client, events, lp) = event_loop(swarm);
    let id = lp.local_peer_id();
    tokio::spawn(lp.run());
    Peer { id, client, events }
}

async fn listen(peer: &mut Peer, addr: &str) -> Multiaddr {
    peer.client
        .listen(addr.parse().expect("multiaddr"))
        .await
        .expect("listen");
    loop {
        match peer.events.next().await {
            Some(NetEvent::Listening(a)) => return a,
            Some(_) => {}
            None => panic!("event loop stopped"),
        }
    }
}

/// Serves `GetModel{groups: [size name]}`. The answers to every request
/// of the benchmark are cloned in advance, so that no clone is part of the
/// timing or competes with a transfer for the CPU (a real server would
/// answer from an `Arc` or a cached encoding).
fn serve(mut server: Peer) {
    tokio::spawn(async move {
        let models: Vec<(&str, Envelope<Response>)> = SIZES
            .iter()
            .map(|&(name, bytes)| (name, Envelope::new(FED, Response::Model(model(bytes)))))
            .collect();
        let mut ready: Vec<Vec<Envelope<Response>>> = models
            .iter()
            .map(|(_, m)| vec![m.clone(); RUNS + 1])
            .collect();
        while let Some(event) = server.events.next().await {
            if let NetEvent::Request {
                request, channel, ..
            } = event
            {
                let Request::GetModel { groups, .. } = &request.body else {
                    continue;
                };
                let Some(i) = models
                    .iter()
                    .position(|(n, _)| Some(*n) == groups.first().map(String::as_str))
                else {
                    continue;
                };
                let answer = ready[i].pop().unwrap_or_else(|| models[i].1.clone());
                server.client.respond(channel, answer).await;
            }
        }
    });
}

/// CPU time (user + system) of this process so far, from /proc/self/stat
/// (Linux; clock ticks of 10 ms), or None elsewhere.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn stats(times: &mut [Duration], bytes: usize) -> (Duration, Duration, f64, f64) {
    times.sort();
    let best = times[0];
    let median = times[times.len() / 2];
    let rate = |t: Duration| bytes as f64 / t.as_secs_f64();
    (best, median, rate(best), rate(median))
}

async fn run() {
    println!(
        "model download over loopback, {RUNS} timed transfers after 1 warm-up; \
         rates in payload bytes (MB = 1e6 B, GiB = 2^30 B)"
    );
    for (tname, addr) in TRANSPORTS {
        let mut server = start();
        let server_addr = listen(&mut server, addr).await;
        let server_id = server.id;
        serve(server);
        let mut client = start();
        client.client.add_address(server_id, server_addr).await;

        for (sname, bytes) in SIZES {
            let req = Envelope::new(
                FED,
                Request::GetModel {
                    groups: vec![sname.into()],
                    have_version: None,
                },
            );
            let mut times = Vec::with_capacity(RUNS);
            let mut cpu0 = None;
            for i in 0..=RUNS {
                if i == 1 {
                    cpu0 = cpu_time();
                }
                let t0 = Instant::now();
                let got = client
                    .client
                    .request(server_id, req.clone())
                    .await
                    .expect("download");
                let dt = t0.elapsed();
                assert_eq!(payload_bytes(&got), bytes / 4 * 4, "{tname} {sname}");
                drop(got);
                if i > 0 {
                    times.push(dt);
                }
            }
            let wall: Duration = times.iter().sum();
            let cores = match (cpu0, cpu_time()) {
                (Some(a), Some(b)) if bytes >= 10_000_000 => {
                    format!("{:.1}", (b - a).as_secs_f64() / wall.as_secs_f64())
                }
                _ => "-".into(),
            };
            let (best, median, r_best, r_median) = stats(&mut times, bytes);
            println!(
                "{tname:>4} {sname:>4}: best {:>8.2} ms  {:>7.1} MB/s  {:>5.2} GiB/s | median {:>8.2} ms  {:>7.1} MB/s  {:>5.2} GiB/s | cpu {cores} cores",
                best.as_secs_f64() * 1e3,
                r_best / 1e6,
                r_best / (1u64 << 30) as f64,
                median.as_secs_f64() * 1e3,
                r_median / 1e6,
                r_median / (1u64 << 30) as f64,
            );
        }
    }
}

/// Best of `RUNS` of `f`, in ms.
fn best_ms(mut f: impl FnMut()) -> f64 {
    (0..RUNS)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// What a 50 MB download costs without any network: the steps of the
/// codec on either side, one thread, from memory.
fn local_costs() {
    let (name, bytes) = SIZES[0];
    let env = Envelope::new(FED, Response::Model(model(bytes)));
    let encoded = encode_envelope(&env).expect("encode");
    let framed = frame(&encoded);
    let max = u64::MAX;
    let rows: [(&str, f64); 5] = [
        (
            "clone of the response (outside the timing above)",
            best_ms(|| drop(std::hint::black_box(env.clone()))),
        ),
        (
            "encode_envelope (server)",
            best_ms(|| drop(std::hint::black_box(encode_envelope(&env).expect("encode")))),
        ),
        (
            "read_frame from memory (requester)",
            best_ms(|| {
                let mut io = futures::io::Cursor::new(&framed[..]);
                let v = futures::executor::block_on(read_frame(&mut io, max)).expect("read");
                drop(std::hint::black_box(v));
            }),
        ),
        (
            "  reference: read_exact into vec![0; len]",
            best_ms(|| {
                use futures::io::AsyncReadExt;
                let mut io = futures::io::Cursor::new(&framed[8..]);
                let mut v = vec![0u8; encoded.len()];
                futures::executor::block_on(io.read_exact(&mut v)).expect("read");
                drop(std::hint::black_box(v));
            }),
        ),
        (
            "decode_envelope (requester)",
            best_ms(|| {
                let e: Envelope<Response> = decode_envelope(&encoded, max, None).expect("decode");
                drop(std::hint::black_box(e));
            }),
        ),
    ];
    println!("local costs of one {name} model, no network (best of {RUNS}):");
    for (what, ms) in rows {
        println!(
            "  {what:<50} {ms:>7.2} ms  {:>7.1} MB/s",
            bytes as f64 / (ms / 1e3) / 1e6
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
    local_costs();
}
