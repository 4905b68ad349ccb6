//! A peer that breaks the rules, against a real `cohort-aggregator` process
//! (once open to anyone, once with an allowlist that names it): every bad
//! request gets its own refusal, the model never moves for it, and the
//! aggregator keeps serving honest requests afterwards. With the allowlist,
//! a stranger gets no answer at all.

use std::time::Duration;

use cohort_protocol::messages::{
    Envelope, EvalMetrics, EvalReport, Hello, RefusalCode, Request, Response, TaskSamples, Update,
    UpdateHeader,
};
use cohort_protocol::seal::{seal, SealContext, SealPublicKey};
use cohort_protocol::transport::{build_swarm, event_loop, Client, NetConfig, RequestError};
use cohort_tests::net::{Aggregator, TestDir};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};

mod common;
use common::connect_info;

async fn ask(client: &mut Client, to: PeerId, federation: &str, body: Request) -> Response {
    try_ask(client, to, federation, body)
        .await
        .expect("an answer")
}

async fn try_ask(
    client: &mut Client,
    to: PeerId,
    federation: &str,
    body: Request,
) -> Result<Response, RequestError> {
    client
        .request(to, Envelope::new(federation, body))
        .await
        .map(|e| e.body)
}

async fn client_for(identity: Keypair, aggregator: PeerId, addr: &Multiaddr) -> Client {
    let swarm = build_swarm(identity, &NetConfig::default()).expect("swarm");
    let (mut client, mut events, lp) = event_loop(swarm);
    tokio::spawn(lp.run());
    // Read the loop's events (connections) so that none pile up.
    tokio::spawn(async move { while futures_next(&mut events).await.is_some() {} });
    client.add_address(aggregator, addr.clone()).await;
    client
}

async fn futures_next<T>(rx: &mut futures::channel::mpsc::Receiver<T>) -> Option<T> {
    std::future::poll_fn(|cx| futures::Stream::poll_next(std::pin::Pin::new(&mut *rx), cx)).await
}

fn refused(r: &Response) -> Option<RefusalCode> {
    match r {
        Response::Refused(r) => Some(r.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_refused_and_the_aggregator_keeps_serving_open() {
    every_bad_request_is_refused(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_refused_and_the_aggregator_keeps_serving_allowlisted() {
    every_bad_request_is_refused(true).await;
}

async fn every_bad_request_is_refused(allowlist: bool) {
    let root = TestDir::new();
    let identity = Keypair::generate_ed25519();
    let me = identity.public().to_peer_id().to_string();
    // One node awaited: the round opens when this peer says hello; its
    // updates are all refused, so the model stays at version 0.
    let mut args = vec!["--nodes", "1", "--per-round", "1"];
    if allowlist {
        args.extend(["--allow", me.as_str()]);
    } else {
        args.push("--open");
    }
    let agg = Aggregator::start(&root.path().join("agg"), "/ip4/127.0.0.1/tcp/0", &args);
    let (aggregator, addr, key, fed) = connect_info(&agg);
    let key: SealPublicKey = key.parse().expect("key");
    let mut client = client_for(identity, aggregator, &addr).await;

    let spec = cohort_tests::builtin_model("mlp8x8", &[("digits", 10)]);
    let layout = spec.layout();
    let hello = |node: &str| Hello {
        node: node.into(),
        tasks: vec![TaskSamples {
            task: "digits".into(),
            samples: 100,
        }],
        layout: layout.fingerprint(),
        version: cohort_protocol::PROTOCOL_VERSION,
    };
    let mut refusals = 0;

    if allowlist {
        // A stranger holds no connection: no answer, not even a refusal.
        let mut stranger = client_for(Keypair::generate_ed25519(), aggregator, &addr).await;
        let r = try_ask(&mut stranger, aggregator, &fed, Request::Hello(hello(&me))).await;
        assert!(r.is_err(), "a stranger got an answer: {r:?}");
    }

    // Another federation's envelope.
    let r = ask(&mut client, aggregator, "other", Request::GetPlan).await;
    assert_eq!(refused(&r), Some(RefusalCode::WrongFederation));
    // Anything before hello.
    let r = ask(&mut client, aggregator, &fed, Request::GetPlan).await;
    assert_eq!(refused(&r), Some(RefusalCode::UnknownNode));
    // A request above the control limit (64 KiB) that is no update: the
    // codec refuses it unread; the connection is still served after.
    let r = try_ask(
        &mut client,
        aggregator,
        &fed,
        Request::GetModel {
            groups: vec!["x".repeat(100_000)],
            have_version: None,
        },
    )
    .await;
    assert!(r.is_err(), "an oversized control request was read: {r:?}");
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
    // A hello naming its task twice (its samples would count twice).
    let mut twice = hello(&me);
    twice.tasks.push(twice.tasks[0].clone());
    let r = ask(&mut client, aggregator, &fed, Request::Hello(twice)).await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    refusals += 5;
    // The real hello.
    let r = ask(&mut client, aggregator, &fed, Request::Hello(hello(&me))).await;
    assert!(matches!(r, Response::Welcome { .. }), "{r:?}");

    // A group that is not this node's.
    let get_model = |groups: Vec<&str>| Request::GetModel {
        groups: groups.into_iter().map(str::to_string).collect(),
        have_version: None,
    };
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        get_model(vec!["head/fashion"]),
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::GroupNotAllowed));
    // The same group many times (each copy would cost a copy of the group).
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        get_model(vec!["backbone"; 4000]),
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        get_model(vec!["backbone", "head/digits", "backbone"]),
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    // More names than the node has groups.
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        get_model(vec!["backbone", "head/digits", "head/fashion"]),
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    refusals += 4;

    // The round opened with the hello: this peer's plan.
    let plan = match ask(&mut client, aggregator, &fed, Request::GetPlan).await {
        Response::Plan(p) => p,
        other => panic!("expected a plan: {other:?}"),
    };
    let header = |node: &str, round: u64| UpdateHeader {
        federation: fed.clone(),
        round,
        base_version: plan.base_version,
        node: node.into(),
        groups: plan.upload.clone(),
        metrics: Vec::new(),
        num_examples: 100,
    };
    // An update in someone else's name.
    let u = Update {
        header: header(&other, plan.round),
        sealed: vec![0; 64],
    };
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u)).await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    // An update for a round that has not started: refused on its header,
    // before its seal is opened, and not recorded (a second copy gets the
    // same answer, not a replay).
    let h = header(&me, plan.round + 1);
    let sealed = seal(&key, &SealContext::of_update(&h), b"not packed groups").expect("seal");
    let future = Update { header: h, sealed };
    for _ in 0..2 {
        let r = ask(
            &mut client,
            aggregator,
            &fed,
            Request::Submit(future.clone()),
        )
        .await;
        assert_eq!(refused(&r), Some(RefusalCode::WrongRound));
    }
    // Groups that are not the plan's, or one twice.
    let mut h = header(&me, plan.round);
    h.groups = vec!["backbone".into(), "backbone".into()];
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        Request::Submit(Update {
            header: h,
            sealed: vec![0; 64],
        }),
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    // A payload longer than the plan allows (8-bit codes of the plan's
    // groups and their scales, well under 2 bytes a value): not opened.
    let values: u64 = plan
        .upload
        .iter()
        .map(|g| layout.group(g).expect("group").len())
        .sum();
    let u = Update {
        header: header(&me, plan.round),
        sealed: vec![7; (3 * values + 16_384) as usize],
    };
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u)).await;
    assert_eq!(refused(&r), Some(RefusalCode::TooLarge), "{r:?}");
    // Garbage instead of a seal.
    let u = Update {
        header: header(&me, plan.round),
        sealed: vec![7; 4096],
    };
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u)).await;
    assert_eq!(refused(&r), Some(RefusalCode::BadSeal));
    // A real seal over bytes that are no update, in the open round.
    let h = header(&me, plan.round);
    let sealed = seal(&key, &SealContext::of_update(&h), b"not packed groups").expect("seal");
    let u = Update { header: h, sealed };
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u.clone())).await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    // The same sealed update again: a replay.
    let r = ask(&mut client, aggregator, &fed, Request::Submit(u)).await;
    assert_eq!(refused(&r), Some(RefusalCode::Replay));
    refusals += 8;
    // A report of a task it does not hold.
    let report = |task: String, n: usize| EvalReport {
        node: me.clone(),
        round: 0,
        version: 0,
        metrics: vec![
            EvalMetrics {
                task,
                accuracy: 1.0,
                loss: 0.0,
                samples: 1,
            };
            n
        ],
    };
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        Request::Report(report("x".repeat(10_000), 1)),
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    // Its own task twice.
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        Request::Report(report("digits".into(), 2)),
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::Malformed));
    // A well-formed report that nobody asked for.
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        Request::Report(report("digits".into(), 1)),
    )
    .await;
    assert_eq!(refused(&r), Some(RefusalCode::NotSampled));
    refusals += 3;

    // Still serving, and the model never moved.
    let r = ask(
        &mut client,
        aggregator,
        &fed,
        get_model(vec!["backbone", "head/digits"]),
    )
    .await;
    match r {
        Response::Model(p) => {
            assert_eq!(p.version, 0);
            let w = p.to_groups(&layout).expect("weights");
            assert_eq!(
                w.get("backbone"),
                spec.init(cohort_aggregator::experiment::init_seed(3))
                    .get("backbone")
            );
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logged = agg.proc.err().matches("request refused").count();
    assert!(
        logged >= refusals,
        "each refusal is logged with its reason: {logged} of {refusals}"
    );
    drop(agg);
}
