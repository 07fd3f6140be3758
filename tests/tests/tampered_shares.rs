//! A member that tampers with shares: two honest `fd-node` processes and an
//! in-process member (speaking the real protocol over libp2p) that, every
//! round, sends each honest node a share with a flipped payload byte and a
//! share that names the *other* honest node as sender but is signed with its
//! own key, before its honest share. Both must be refused with
//! `bad_signature`, counted, and never aggregated.

use std::time::Duration;

use fd_node::config::FederationConfig;
use fd_node::data::DataSource;
use fd_node::inbox::subset_for;
use fd_node::net;
use fd_node::runtime::{request_with_retry, split_peer_addr};
use fd_protocol::{
    JoinRequest, LogitShare, Member, Message, PayloadEncoding, RoundMetrics, SigningKey,
};
use fd_tests::*;

const ROUNDS: u64 = 2;

#[test]
fn flipped_and_forged_shares_are_rejected_and_never_aggregated() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let federation = federation_toml("tamper", ROUNDS);
    let coordinator_config = coordinator_toml(dir, 3, 120, &federation);
    let mut coordinator = Proc::start(
        "coordinator",
        "fd-coordinator",
        &["--config", coordinator_config.to_str().unwrap()],
        dir,
    );
    let address = wait_for_line(
        &dir.join("coordinator.addr"),
        Duration::from_secs(120),
        &mut coordinator,
    );

    let mut honest: Vec<Proc> = (0..2)
        .map(|i| {
            let config = node_toml(
                dir,
                i,
                2,
                0.5,
                Some(&address),
                &format!("honest-{i}"),
                &federation,
            );
            Proc::start(
                &format!("node-{i}"),
                "fd-node",
                &["run", "--config", config.to_str().unwrap()],
                dir,
            )
        })
        .collect();

    let verdicts = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(tampering_member(&address));
    for node in &mut honest {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(60));

    // Every tampered share got `bad_signature` back; every honest one was accepted.
    assert_eq!(verdicts.len() as u64, ROUNDS * 2 * 3);
    for (what, answer) in &verdicts {
        match (what.as_str(), answer) {
            ("honest", Message::ShareAccepted) => {}
            ("flipped" | "forged", Message::ShareRejected { code, .. })
                if code == "bad_signature" => {}
            _ => panic!("{what} share answered {answer:?}"),
        }
    }
    for i in 0..2 {
        let metrics = read_metrics(&dir.join(format!("honest-{i}.jsonl")));
        assert_eq!(metrics.len() as u64, ROUNDS);
        for m in &metrics {
            // The other honest node and the tamperer's honest share; the two tampered ones are out.
            assert_eq!(m.shares_aggregated, 2, "node {i} round {}", m.round);
            assert_eq!(m.shares_rejected, 2, "node {i} round {}", m.round);
        }
        let last = metrics.last().unwrap();
        assert_eq!(
            last.rejections,
            vec![("bad_signature".to_string(), 2 * ROUNDS)]
        );
    }
}

/// Joins as a member, then tampers every round. Returns (kind, answer) per share sent.
async fn tampering_member(coordinator: &str) -> Vec<(String, Message)> {
    let key = SigningKey::from_seed([42; 32]);
    let federation: FederationConfig = toml_federation();
    let data = DataSource::Synthetic {
        seed: 5,
        train: 12000,
        test: 2000,
    }
    .load()
    .unwrap();
    let manifest = federation.manifest(&data).unwrap();

    let (client, mut requests, event_loop) = net::new(&key).unwrap();
    tokio::spawn(event_loop.run());
    let listen = client
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .await
        .unwrap();
    let (coordinator_peer, coordinator_addr) =
        split_peer_addr(&coordinator.parse().unwrap()).unwrap();
    client
        .add_address(coordinator_peer, coordinator_addr)
        .await
        .unwrap();
    let me = Member {
        key: key.public_key(),
        name: "tamperer".into(),
        addrs: vec![listen.to_string()],
    };
    let join = Message::Join(JoinRequest {
        federation_id: manifest.federation_id.clone(),
        member: me.clone(),
        public_set_digest: manifest.public_set.digest,
        train_samples: 0,
    });
    let answer = request_with_retry(&client, coordinator_peer, join, 20)
        .await
        .unwrap();
    assert!(
        matches!(answer, Message::Welcome { .. }),
        "join answered {answer:?}"
    );

    let mut verdicts = Vec::new();
    let rows = manifest.subset_size as usize * manifest.classes as usize;
    while let Some(request) = requests.recv().await {
        match request.message {
            Message::Round(round) => {
                client.respond(request.channel, Message::Ack).await.unwrap();
                let subset = subset_for(&manifest, round.round);
                let share = |logits: &[f32]| {
                    LogitShare::new_signed(
                        &key,
                        &manifest.federation_id,
                        subset,
                        manifest.classes,
                        0,
                        PayloadEncoding::F32Le,
                        logits,
                    )
                    .unwrap()
                };
                let others: Vec<&Member> =
                    round.members.iter().filter(|m| m.key != me.key).collect();
                for target in &others {
                    let peer = net::peer_id_of(&target.key).unwrap();
                    for addr in &target.addrs {
                        client
                            .add_address(peer, addr.parse().unwrap())
                            .await
                            .unwrap();
                    }
                    let mut flipped = share(&vec![0.5; rows]);
                    flipped.payload[17] ^= 0x10;
                    // Claims to come from the other honest member, signed with our key.
                    let mut forged = share(&vec![9.0; rows]);
                    forged.sender = others.iter().find(|m| m.key != target.key).unwrap().key;
                    let honest = share(&vec![0.0; rows]);
                    for (what, s) in [("flipped", flipped), ("forged", forged), ("honest", honest)]
                    {
                        let answer = request_with_retry(&client, peer, Message::Share(s), 5)
                            .await
                            .unwrap();
                        verdicts.push((what.to_string(), answer));
                    }
                }
                let metrics = RoundMetrics {
                    federation_id: manifest.federation_id.clone(),
                    round: round.round,
                    node: key.public_key(),
                    name: "tamperer".into(),
                    test_accuracy: 0.0,
                    local_accuracy: 0.0,
                    bytes_sent: 0,
                    bytes_received: 0,
                    share_bytes: 0,
                    shares_sent: 0,
                    shares_aggregated: 0,
                    shares_rejected: 0,
                    rejections: vec![],
                    train_loss: 0.0,
                    distill_loss: 0.0,
                    train_seconds: 0.0,
                    predict_seconds: 0.0,
                    encode_seconds: 0.0,
                    network_seconds: 0.0,
                    verify_seconds: 0.0,
                    aggregate_seconds: 0.0,
                    distill_seconds: 0.0,
                };
                request_with_retry(&client, coordinator_peer, Message::Metrics(metrics), 3)
                    .await
                    .unwrap();
            }
            Message::Done { .. } => {
                client.respond(request.channel, Message::Ack).await.unwrap();
                break;
            }
            _ => client.respond(request.channel, Message::Ack).await.unwrap(),
        }
    }
    verdicts
}

fn toml_federation() -> FederationConfig {
    #[derive(serde::Deserialize)]
    struct Wrapper {
        federation: FederationConfig,
    }
    let text = federation_toml("tamper", ROUNDS);
    let w: Wrapper = toml::from_str(text.split("[data]").next().unwrap()).unwrap();
    w.federation
}
