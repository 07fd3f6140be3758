//! A members-only federation under attack: two honest `fd-node` processes,
//! a coordinator, and an in-process member (speaking the real protocol over
//! libp2p) that, every round, sends each honest node a share with a flipped
//! payload byte, a share that names the *other* honest node as sender but is
//! signed with its own key, a share whose payload holds a NaN, an oversize
//! share (payload longer than the round's shape), and from round 2 on a
//! replay of its round-1 share, before its honest share. Each must be
//! refused with its own reason, counted, and never aggregated. A stranger
//! (a key not in `federation.members`) can neither join the coordinator nor
//! reach a member: the allow-list refuses its connections.

use std::time::Duration;

use fd_node::config::FederationConfig;
use fd_data::DataSource;
use fd_node::inbox::subset_for;
use fd_net as net;
use fd_net::{request_with_retry, split_peer_addr};
use fd_protocol::{
    Control, JoinRequest, LogitShare, Member, Message, PayloadEncoding, RoundMetrics,
    SignedControl, SigningKey,
};
use fd_tests::*;

const ROUNDS: u64 = 2;

/// The tamperer's key; the honest nodes' keys are seeded by index.
const TAMPERER_SEED: [u8; 32] = [42; 32];

#[test]
fn tampered_forged_replayed_oversize_and_nan_shares_are_rejected_and_strangers_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let members: Vec<String> = (0..2)
        .map(|i| member_key_file(dir, i))
        .chain([peer_id(&SigningKey::from_seed(TAMPERER_SEED))])
        .collect();
    let federation = federation_toml_with("tamper", ROUNDS, &members_line(&members));
    let coordinator_config = coordinator_toml(dir, 3, 120, &federation);
    let (mut coordinator, address) = Proc::coordinator("coordinator", &coordinator_config, dir);

    let configs = node_configs(dir, 2, 0.5, Some(&address), "honest", &federation);
    let mut honest = start_nodes(&configs, dir);

    let rt = tokio::runtime::Runtime::new().unwrap();
    // Before the honest nodes start: a stranger cannot join.
    let stranger = rt.block_on(stranger_join(&address));
    assert!(
        stranger.is_err(),
        "a non-member joined the coordinator: {stranger:?}"
    );
    let (verdicts, stranger_share) = rt.block_on(tampering_member(&address));
    assert!(
        stranger_share.is_err(),
        "a non-member reached a member: {stranger_share:?}"
    );
    for node in &mut honest {
        node.wait_success(Duration::from_secs(600));
    }
    coordinator.wait_success(Duration::from_secs(60));

    // Every bad share got its own reason back; every honest one was accepted.
    let per_round = 5 * 2;
    assert_eq!(verdicts.len() as u64, ROUNDS * per_round + (ROUNDS - 1) * 2);
    for (what, answer) in &verdicts {
        let expected = match what.as_str() {
            "flipped" | "forged" => "bad_signature",
            "nan" => "non_finite",
            "oversize" => "too_large",
            "replayed" => "wrong_round",
            _ => {
                assert_eq!(answer, &Message::ShareAccepted, "{what}");
                continue;
            }
        };
        assert!(
            matches!(answer, Message::ShareRejected { code, .. } if code == expected),
            "{what} share answered {answer:?}, expected {expected}"
        );
    }
    for i in 0..2 {
        let metrics = read_metrics(&dir.join(format!("honest-{i}.jsonl")));
        assert_eq!(metrics.len() as u64, ROUNDS);
        for m in &metrics {
            // The other honest node and the tamperer's honest share; the bad ones are out.
            assert_eq!(m.shares_aggregated, 2, "node {i} round {}", m.round);
            let replays = u32::from(m.round > 1);
            assert_eq!(m.shares_rejected, 4 + replays, "node {i} round {}", m.round);
        }
        let last = metrics.last().unwrap();
        let mut counted = last.rejections.clone();
        counted.sort();
        assert_eq!(
            counted,
            vec![
                ("bad_signature".to_string(), 2 * ROUNDS),
                ("non_finite".to_string(), ROUNDS),
                ("too_large".to_string(), ROUNDS),
                ("wrong_round".to_string(), ROUNDS - 1),
            ]
        );
    }
}

/// Writes honest node `index`'s key file (seeded) and returns its PeerId.
fn member_key_file(dir: &std::path::Path, index: usize) -> String {
    let key = SigningKey::from_seed([index as u8 + 1; 32]);
    fd_net::keyfile::write(&dir.join(format!("node-{index}.key")), &key).unwrap();
    peer_id(&key)
}

fn peer_id(key: &SigningKey) -> String {
    net::peer_id_of(&key.public_key()).unwrap().to_string()
}

/// A key the federation does not list tries to join.
async fn stranger_join(coordinator: &str) -> anyhow::Result<Message> {
    let key = SigningKey::from_seed([99; 32]);
    let (client, _requests, event_loop) = net::new(&key)?;
    tokio::spawn(event_loop.run());
    let (peer, addr) = split_peer_addr(&coordinator.parse()?)?;
    client.add_address(peer, addr).await?;
    let manifest = toml_federation().manifest(&synthetic().load()?)?;
    let join = Message::Join(JoinRequest {
        federation_id: manifest.federation_id.clone(),
        member: Member {
            key: key.public_key(),
            name: "stranger".into(),
            addrs: vec![],
        },
        public_set_digest: manifest.public_set.digest,
        train_samples: 0,
    });
    // Any answer, even a refusal, means the connection got through the allow-list.
    request_with_retry(&client, peer, join, 3).await
}

fn synthetic() -> DataSource {
    DataSource::Synthetic {
        seed: 5,
        train: 12000,
        test: 2000,
    }
}

/// Re-signs `share` after its payload was changed, as a malicious member can.
fn resign(share: &mut LogitShare, key: &SigningKey) {
    share.signature = key.sign(&share.signing_bytes().unwrap());
}

/// Joins as a member, then tampers every round. Returns (kind, answer) per
/// share sent, and what a stranger got when it tried to push a share to an
/// honest member during round 1.
async fn tampering_member(coordinator: &str) -> (Vec<(String, Message)>, anyhow::Result<Message>) {
    let key = SigningKey::from_seed(TAMPERER_SEED);
    let federation: FederationConfig = toml_federation();
    let data = synthetic().load().unwrap();
    let manifest = federation.manifest(&data).unwrap();
    let mut stranger_share = Err(anyhow::anyhow!("not tried"));
    let mut first_shares: Vec<(Member, LogitShare)> = Vec::new();

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
            Message::Control(SignedControl {
                control: Control::Round(round),
                ..
            }) => {
                client.respond(request.channel, Message::Ack).await.unwrap();
                // The honest members open the round when the same broadcast
                // reaches them; a share that gets there first is refused as
                // `future_round` (tested in trust.rs), so let it arrive.
                tokio::time::sleep(Duration::from_millis(500)).await;
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
                    let mut nan = share(&vec![0.25; rows]);
                    nan.payload[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
                    resign(&mut nan, &key);
                    let mut oversize = share(&vec![0.25; rows]);
                    oversize.payload.extend_from_slice(&[0; 4 * 64]);
                    resign(&mut oversize, &key);
                    let honest = share(&vec![0.0; rows]);
                    let mut sends = vec![
                        ("flipped", flipped),
                        ("forged", forged),
                        ("nan", nan),
                        ("oversize", oversize),
                    ];
                    // An accepted share of round 1, sent again in a later round.
                    if let Some((_, old)) = first_shares.iter().find(|(m, _)| m.key == target.key) {
                        sends.push(("replayed", old.clone()));
                    }
                    sends.push(("honest", honest.clone()));
                    for (what, s) in sends {
                        let answer = request_with_retry(&client, peer, Message::Share(s), 5)
                            .await
                            .unwrap();
                        verdicts.push((what.to_string(), answer));
                    }
                    if round.round == 1 {
                        first_shares.push(((*target).clone(), honest.clone()));
                        if stranger_share
                            .as_ref()
                            .is_err_and(|e| e.to_string() == "not tried")
                        {
                            stranger_share = stranger_push(target, honest).await;
                        }
                    }
                }
                let metrics = RoundMetrics::new(
                    &manifest.federation_id,
                    round.round,
                    key.public_key(),
                    "tamperer",
                );
                request_with_retry(&client, coordinator_peer, Message::Metrics(metrics), 3)
                    .await
                    .unwrap();
            }
            Message::Control(SignedControl {
                control: Control::Done { .. },
                ..
            }) => {
                client.respond(request.channel, Message::Ack).await.unwrap();
                break;
            }
            _ => client.respond(request.channel, Message::Ack).await.unwrap(),
        }
    }
    (verdicts, stranger_share)
}

/// A key the federation does not list pushes a (validly signed, by itself) share to a member.
async fn stranger_push(target: &Member, share: LogitShare) -> anyhow::Result<Message> {
    let key = SigningKey::from_seed([99; 32]);
    let (client, _requests, event_loop) = net::new(&key)?;
    tokio::spawn(event_loop.run());
    let peer = net::peer_id_of(&target.key)?;
    for addr in &target.addrs {
        client.add_address(peer, addr.parse()?).await?;
    }
    request_with_retry(&client, peer, Message::Share(share), 2).await
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
