//! A peer that breaks the rules, against a real `cohort-aggregator` process:
//! every bad request gets its own refusal, the model never moves for it,
//! and the aggregator keeps serving honest requests afterwards.

use std::time::Duration;

use cohort_protocol::messages::{
    Envelope, EvalMetrics, EvalReport, Hello, RefusalCode, Request, Response, TaskSamples, Update,
    UpdateHeader,
};
use cohort_protocol::seal::{seal, SealContext, SealPublicKey};
use cohort_protocol::transport::{build_swarm, event_loop, Client, NetConfig};
use cohort_tests::net::{read, Aggregator, TestDir};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};

fn connect_info(agg: &Aggregator) -> (PeerId, Multiaddr, SealPublicKey, String) {
    let text = read(&agg.connect_file());
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{k} in connect.toml:\n{text}"))
            .to_string()
    };
    let addr: Multiaddr = text
        .split('"')
        .find(|s| s.starts_with("/ip4/127.0.0.1/tcp/"))
        .expect("tcp address")
        .parse()
        .expect("multiaddr");
    (
        field("peer_id").parse().expect("peer id"),
        addr,
        field("aggregator_key").parse().expect("key"),
        field("federation"),
    )
}

async fn ask(client: &mut Client, to: PeerId, federation: &str, body: Request) -> Response {
    client
        .request(to, Envelope::new(federation, body))
        .await
        .expect("an answer")
        .body
}

fn refused(r: &Response) -> Option<RefusalCode> {
    match r {
        Response::Refused(r) => Some(r.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_refused_and_the_aggregator_keeps_serving() {
    let root = TestDir::new();
    // Two nodes awaited: the round never starts, so the model stays at 0.
    let agg = Aggregator::start(
        &root.path().join("agg"),
        "/ip4/127.0.0.1/tcp/0",
        &["--open", "--nodes", "2", "--per-round", "2"],
    );
    let (aggregator, addr, key, fed) = connect_info(&agg);

    let identity = Keypair::generate_ed25519();
    let me = identity.public().to_peer_id().to_string();
    let swarm = build_swarm(identity, &NetConfig::default()).expect("swarm");
    let (mut client, _events, lp) = event_loop(swarm);
    tokio::spawn(lp.run());
    client.add_address(aggregator, addr).await;

    let spec = cohort_tests::builtin_model("mlp8x8", &[("digits", 10)]);
    let hello = |node: &str| Hello {
        node: node.into(),
        tasks: vec![TaskSamples {
            task: "digits".into(),
            samples: 100,
        }],
        layout: spec.layout().fingerprint(),
        version: cohort_protocol::PROTOCOL_VERSION,
    };

    // Another federation's envelope.
    let r = ask(&mut client, aggregator, "other", Request::GetPlan).await;
    assert_eq!(refused(&r), Some(RefusalCode::WrongFederation));
    // Anything before hello.
    let r = ask(&mut client, aggregator, &fed, Request::GetPlan).await;
    assert_eq!(refused(&r), Some(RefusalCode::UnknownNode));
    // A hello in someone else's name.
    let other = PeerId::random().to_string();
    let r = ask(&mut client, aggregator, &fed, Request::Hello(hello(&other))).await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    // A hello with another model.
    let mut wrong = hello(&me);
    wrong.layout = cohort_tests::builtin_model("mlp_tab4", &[("digits", 10)])
        .layout()
        .fingerprint();
    let r = ask(&mut client, aggregator, &fed, Request::Hello(wrong)).await;
    assert_eq!(refused(&r), Some(RefusalCode::LayoutMismatch));
    // The real hello.
    let r = ask(&mut client, aggregator, &fed, Request::Hello(hello(&me))).await;
    assert!(matches!(r, Response::Welcome { .. }), "{r:?}");

    // A group that is not this node's.
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        Request::GetModel {
            groups: vec!["head/fashion".into()],
            have_version: None,
        },
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::GroupNotAllowed));

    let header = |node: &str| UpdateHeader {
        federation: fed.clone(),
        round: 1,
        base_version: 0,
        node: node.into(),
        groups: vec!["backbone".into()],
        metrics: Vec::new(),
        num_examples: 100,
    };
    // An update in someone else's name.
    let u = Update {
        header: header(&other),
        sealed: vec![0; 64],
    };
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u)).await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    // Garbage instead of a seal.
    let u = Update {
        header: header(&me),
        sealed: vec![7; 4096],
    };
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u)).await;
    assert_eq!(refused(&r), Some(RefusalCode::BadSeal));
    // A real seal over bytes that are no update, for a round that is not open.
    let h = header(&me);
    let sealed = seal(&key, &SealContext::of_update(&h), b"not packed groups").expect("seal");
    let u = Update { header: h, sealed };
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u.clone())).await;
    let code = refused(&r).expect("refused");
    assert!(
        matches!(code, RefusalCode::WrongRound | RefusalCode::Malformed),
        "{code:?}"
    );
    // The same sealed update again: a replay.
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u)).await;
    assert_eq!(refused(&r), Some(RefusalCode::Replay));
    // A report of a task it does not hold.
    let report = EvalReport {
        node: me.clone(),
        round: 0,
        version: 0,
        metrics: vec![EvalMetrics {
            task: "x".repeat(10_000),
            accuracy: 1.0,
            loss: 0.0,
            samples: 1,
        }],
    };
    let r = ask(&mut client, aggregator, &fed, Request::Report(report)).await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));

    // Still serving, and the model never moved.
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        Request::GetModel {
            groups: vec!["backbone".into(), "head/digits".into()],
            have_version: None,
        },
    )
    .await;
    match r {
        Response::Model(p) => {
            assert_eq!(p.version, 0);
            let w = p.to_groups(&spec.layout()).expect("weights");
            assert_eq!(w.get("backbone"), spec.init(cohort_aggregator::experiment::init_seed(3)).get("backbone"));
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        agg.proc.err().matches("request refused").count() >= 10,
        "each refusal is logged with its reason"
    );
    drop(agg);
}
