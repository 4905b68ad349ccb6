//! Helpers of the tests that talk to a real aggregator as a raw libp2p peer.

use cohort_tests::net::{read, Aggregator};
use libp2p::{Multiaddr, PeerId};

/// The aggregator's peer id, TCP address, sealing key (as printed) and
/// federation, from the `connect.toml` it wrote.
pub fn connect_info(agg: &Aggregator) -> (PeerId, Multiaddr, String, String) {
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
        field("aggregator_key"),
        field("federation"),
    )
}
