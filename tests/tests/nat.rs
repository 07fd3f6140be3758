//! Members behind NATs that drop unsolicited inbound traffic (Linux
//! network namespaces, [`fd_tests::netns::NatLab`]): the coordinator (the
//! relay) and member 0 on the public side; members 1 and 2 each behind a
//! port-preserving NAT, member 3 behind a symmetric one. Nobody can dial
//! members 1–3; they can dial out.
//!
//! - Member 1 runs `relay.mode = "auto"`: AutoNAT (the coordinator dialling
//!   it back) must find it unreachable, after which it reserves a slot on
//!   the coordinator. Members 2 and 3 run `mode = "always"`. The public
//!   member runs `auto`, must be found reachable, and never reserves.
//! - The federation completes its rounds and every member aggregates every
//!   other member's share in every round.
//! - Members 1 and 2 first reach each other through the relay, then hole
//!   punching (DCUtR) gives them a direct connection. Member 3's NAT
//!   changes ports per connection, so hole punching to it fails and its
//!   shares to and from members 1 and 2 stay relayed: from round 2 on,
//!   `shares_relayed` is exactly 0 (member 0), 1 (members 1, 2: to member 3)
//!   and 2 (member 3).
//!
//! Needs root (CI runs as root) and `iptables`. Where namespaces cannot be
//! created the test fails saying why; `FD_SKIP_NETNS=1` skips it explicitly.

use std::time::Duration;

use fd_tests::netns::{Nat, NatLab};
use fd_tests::*;

const ROUNDS: u64 = 4;
const NODES: usize = 4;

#[test]
fn members_behind_nats_reach_each_other_through_the_relay_and_hole_punching() {
    let nats = [Nat::PortPreserving, Nat::PortPreserving, Nat::Symmetric];
    let lab = match NatLab::create(&nats) {
        Ok(lab) => lab,
        Err(e) if std::env::var_os("FD_SKIP_NETNS").is_some() => {
            eprintln!("SKIPPED (FD_SKIP_NETNS is set): network namespaces unavailable: {e}");
            return;
        }
        Err(e) => panic!(
            "cannot create the test's network namespaces (root and iptables needed): {e}\n\
             set FD_SKIP_NETNS=1 to skip this test explicitly"
        ),
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let federation = federation_toml("behind-nats", ROUNDS);

    let coordinator_config = coordinator_toml(dir, NODES, 180, &federation);
    add_top_level(
        &coordinator_config,
        &format!("listen = \"/ip4/{}/tcp/0\"", NatLab::PUBLIC_IP),
    );
    let (mut coordinator, address) =
        Proc::coordinator_in(Some(&lab.public()), "coordinator", &coordinator_config, dir);

    let configs = node_configs(dir, NODES, 0.5, Some(&address), "nat", &federation);
    let modes = ["auto", "auto", "always", "always"];
    for (i, config) in configs.iter().enumerate() {
        let ip = match i {
            0 => NatLab::PUBLIC_IP.to_string(),
            i => NatLab::member_ip(i as u8),
        };
        add_top_level(
            config,
            &format!("listen = [\"/ip4/{ip}/tcp/0\", \"/ip4/{ip}/udp/0/quic-v1\"]"),
        );
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(config, format!("{text}\n[relay]\nmode = \"{}\"\n", modes[i])).unwrap();
    }
    let start = |i: usize| {
        let netns = match i {
            0 => lab.public(),
            i => lab.behind_nat(i as u8),
        };
        Proc::start_in(
            &netns,
            &format!("node-{i}"),
            "fd-node",
            &["run", "--config", configs[i].to_str().unwrap()],
            dir,
        )
    };
    // The public member and member 1 first: member 1 must learn from
    // AutoNAT that it cannot be dialled, and reserve, before round 1
    // (which waits for every member).
    let mut public = start(0);
    let mut nat1 = start(1);
    let verdict = Duration::from_secs(120);
    wait_for_log(&mut public, &["AutoNAT", "new=Public"], verdict);
    wait_for_log(&mut nat1, &["AutoNAT", "new=Private"], verdict);
    wait_for_log(&mut nat1, &["reachable through the relay"], verdict);
    let mut nodes = vec![public, nat1, start(2), start(3)];
    for node in &mut nodes {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(60));

    assert!(
        log_lines(&nodes[0], "reachable through the relay").is_empty(),
        "the public member never needed a relay"
    );
    for i in [2, 3] {
        assert!(
            !log_lines(&nodes[i], "reachable through the relay").is_empty(),
            "member {i} (mode always) reserved a slot; log:\n{}",
            nodes[i].log_tail()
        );
    }
    let peers = NODES as u32 - 1;
    let mut relayed = vec![vec![0u32; ROUNDS as usize]; NODES];
    for (i, relayed) in relayed.iter_mut().enumerate() {
        let metrics = read_metrics(&dir.join(format!("nat-{i}.jsonl")));
        assert_eq!(metrics.len() as u64, ROUNDS, "node {i} completed every round");
        for m in &metrics {
            assert_eq!(m.shares_sent, peers, "node {i} round {}: sent to every peer", m.round);
            assert_eq!(
                m.shares_aggregated, peers,
                "node {i} round {}: every peer's share arrived",
                m.round
            );
            relayed[m.round as usize - 1] = m.shares_relayed;
        }
    }
    eprintln!("shares relayed, per member and round: {relayed:?}");
    // What hole punching did, for the failure messages below.
    let punching: Vec<String> = (0..NODES)
        .flat_map(|i| {
            log_lines(&nodes[i], "hole punching")
                .into_iter()
                .map(move |l| format!("node-{i}: {l}"))
        })
        .collect();
    let punching = punching.join("\n");
    eprintln!("hole punching:\n{punching}");
    // Member 3 reaches members 1 and 2 through the relay only, in every
    // round (in round 1 the public member may be reached relayed too,
    // before the direct connection is up).
    assert!(relayed[3][0] >= 2, "member 3, round 1: to members 1 and 2 ({relayed:?})");
    for round in 1..ROUNDS as usize {
        let expected = [0, 1, 1, 2];
        for i in 0..NODES {
            assert_eq!(
                relayed[i][round], expected[i],
                "member {i}, round {}: relayed shares once direct connections exist ({relayed:?}); \
                 hole punching:\n{punching}",
                round + 1
            );
        }
    }
    let punched = |i: usize, peer: usize| {
        let peer_id = log_lines(&nodes[peer], "listening")
            .iter()
            .find_map(|l| log_field(l, "peer"))
            .expect("peer id in the log");
        log_lines(&nodes[i], "direct connection by hole punching")
            .iter()
            .any(|l| l.contains(&peer_id))
    };
    assert!(
        punched(1, 2) || punched(2, 1),
        "members 1 and 2 got a direct connection by hole punching"
    );
    let csv = std::fs::read_to_string(dir.join("coordinator-metrics.csv")).unwrap();
    assert!(
        csv.lines().next().unwrap().contains("shares_relayed"),
        "the coordinator's metrics say how many shares were relayed:\n{csv}"
    );
}
