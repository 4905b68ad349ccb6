//! Nodes on their own hosts: each `cohort-node` runs in its own network
//! namespace, joined to the aggregator's by a veth pair with its own
//! addresses. One node's link goes down mid-run; the federation carries on
//! without it. Needs root and iproute2 (`ip netns`), as CI has.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cohort_tests::net::{bin, node_config, peer_id, tail, wait_for, Aggregator, Proc, TestDir};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces and veth pairs of one test run, removed on drop.
struct Hosts {
    names: Vec<String>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.names {
            // Deleting the namespace deletes the veth pair too.
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn can_run() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let ip = Command::new("ip").arg("-V").output().is_ok();
    root && ip
}

#[test]
fn a_node_whose_link_goes_down_is_left_behind_and_the_federation_finishes() {
    if !can_run() {
        eprintln!("SKIPPED: this test needs root and iproute2 (`ip netns`); CI runs it as root");
        return;
    }
    let tag = std::process::id() % 10_000;
    let net = 100 + (std::process::id() % 100);
    let count = 4;
    let mut hosts = Hosts { names: Vec::new() };
    let mut links = Vec::new();
    for i in 0..count {
        let ns = format!("cohort{tag}n{i}");
        let host_if = format!("ch{tag}n{i}");
        ip(&["netns", "add", &ns]);
        hosts.names.push(ns.clone());
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("10.{net}.{i}.1/24"),
            "dev",
            &host_if,
        ]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.{net}.{i}.2/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        links.push(host_if);
    }

    let root = TestDir::new();
    let port = cohort_tests::net::free_port();
    let mut agg = Aggregator::start(
        &root.path().join("agg"),
        &format!("/ip4/0.0.0.0/tcp/{port}"),
        &[
            "--open",
            "--linger-s",
            "3",
            "--rounds",
            "8",
            "--deadline-ms",
            "4000",
        ],
    );
    let aggregator_peer = peer_of(&agg.connect_file());
    let victim = peer_id(&root.path().join("node3"));
    let mut nodes: Vec<Proc> = (0..count)
        .map(|i| {
            let dir = root.path().join(format!("node{i}"));
            // Each node dials the aggregator on its own link's address.
            let addr =
                format!("aggregator = \"/ip4/10.{net}.{i}.1/tcp/{port}/p2p/{aggregator_peer}\"");
            node_config(&dir, i, count, &addr);
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &hosts.names[i]])
                .arg(bin("cohort-node"))
                .arg("--config")
                .arg(dir.join("node.toml"))
                .arg("--connect")
                .arg(agg.connect_file());
            Proc::spawn(&format!("node{i}"), cmd, &dir)
        })
        .collect();

    wait_for(Duration::from_secs(120), "round 2", || {
        (agg.last_round() >= 2).then_some(())
    });
    // Cut node 3's cable.
    ip(&["link", "set", &links[3], "down"]);
    let cut_after = agg.last_round();

    let status = agg.proc.expect_exit(Duration::from_secs(180));
    assert!(
        status.success(),
        "aggregator:\n{}",
        tail(&agg.proc.err(), 40)
    );
    for n in nodes.iter_mut().take(3) {
        let s = n.expect_exit(Duration::from_secs(30));
        assert!(s.success(), "{}:\n{}", n.name, tail(&n.err(), 30));
    }
    let rounds = agg.rounds();
    assert_eq!(rounds.len(), 8, "the federation finished its rounds");
    let has = |r: &serde_json::Value, key: &str| r[key].to_string().contains(&victim);
    // The round it was cut from waited for the deadline and closed without it.
    let timed_out = rounds
        .iter()
        .find(|r| r["round"].as_u64() > Some(cut_after) && has(r, "failures"))
        .unwrap_or_else(|| panic!("no round recorded the cut-off node's failure: {rounds:?}"));
    assert!(
        timed_out["failures"].to_string().contains("Timeout"),
        "{timed_out}"
    );
    assert_eq!(timed_out["quorum_met"], true);
    let cut_round = timed_out["round"].as_u64().unwrap_or(0);
    let accepted: Vec<String> = rounds.iter().map(|r| r["accepted"].to_string()).collect();
    println!(
        "link cut after round {cut_after}; round {cut_round} timed out on it; accepted per round: {}",
        accepted.join(" ")
    );
    // Later rounds go on with the other three, without waiting for it.
    for r in rounds
        .iter()
        .filter(|r| r["round"].as_u64() > Some(cut_round))
    {
        assert!(!has(r, "accepted_nodes") && !has(r, "failures"), "{r}");
        assert_eq!(r["accepted"], 3, "{r}");
    }
    assert!(
        agg.accuracy("digits") >= 0.9,
        "accuracy {}",
        agg.accuracy("digits")
    );
    nodes[3].kill();
    drop(hosts);
}

fn peer_of(connect: &Path) -> String {
    let text = cohort_tests::net::read(connect);
    text.lines()
        .find_map(|l| l.strip_prefix("peer_id = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("peer_id in connect.toml")
        .to_string()
}
