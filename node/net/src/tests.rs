//! In-process swarms on 127.0.0.1: allow-list, private network, Kademlia,
//! large shares over announce + pull.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fd_protocol::transfer::{CHUNK_BYTES, MAX_SHARE_BYTES, ShareAnnouncement, chunk_count};
use fd_protocol::{Digest, MAX_MESSAGE_BYTES, Message, ProtocolError, SigningKey};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::{Client, NetConfig, new_with};

/// A running node: its event loop and a responder that answers every
/// request the program sees with `Ack` and records who asked.
struct Node {
    key: SigningKey,
    client: Client,
    peer: PeerId,
    addr: Multiaddr,
    announcements: mpsc::Receiver<(PeerId, ShareAnnouncement)>,
    asked_by: Arc<Mutex<Vec<PeerId>>>,
}

impl Node {
    /// The listen address with `/p2p/<peer id>`.
    fn p2p_addr(&self) -> Multiaddr {
        self.addr.clone().with(Protocol::P2p(self.peer))
    }

    fn asked_by(&self) -> Vec<PeerId> {
        self.asked_by.lock().unwrap().clone()
    }
}

async fn node(seed: u8, config: NetConfig) -> Node {
    let key = SigningKey::from_seed([seed; 32]);
    let network = new_with(&key, &config).expect("swarm builds");
    tokio::spawn(network.event_loop.run());
    let client = network.client;
    let addr = client
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .await
        .expect("listens on 127.0.0.1");
    let asked_by = Arc::new(Mutex::new(Vec::new()));
    let mut requests = network.requests;
    let (responder, record) = (client.clone(), asked_by.clone());
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            record.lock().unwrap().push(request.peer);
            let _ = responder.respond(request.channel, Message::Ack).await;
        }
    });
    Node {
        key,
        peer: client.local_peer_id(),
        client,
        addr,
        announcements: network.announcements,
        asked_by,
    }
}

fn ping() -> Message {
    Message::Ack
}

/// A request from `from` to `to`, given only `to`'s address, bounded in time.
async fn request(from: &Node, to: &Node) -> anyhow::Result<Message> {
    from.client.add_address(to.peer, to.addr.clone()).await?;
    match timeout(Duration::from_secs(8), from.client.request(to.peer, ping())).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("request timed out")),
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_allow_list_refuses_other_peers_both_ways() {
    let b = node(2, NetConfig::open()).await;
    let c = node(3, NetConfig::open()).await;
    let a = node(
        1,
        NetConfig {
            allowed: Some(vec![b.peer]),
            ..NetConfig::open()
        },
    )
    .await;

    assert_eq!(request(&b, &a).await.unwrap(), Message::Ack);
    let refused = request(&c, &a).await;
    assert!(refused.is_err(), "C is not allowed: {refused:?}");
    assert_eq!(a.asked_by(), vec![b.peer], "only B's request reached A");
    let c_peer = c.peer;
    eventually("A holds no connection to C", async || {
        !a.client.connected_peers().await.unwrap().contains(&c_peer)
    })
    .await;
    assert!(a.client.connected_peers().await.unwrap().contains(&b.peer));

    // Outbound too: A does not dial a peer off its list.
    assert!(a.client.dial(c.peer, vec![c.addr.clone()]).await.is_err());
    // Until it is allowed.
    a.client.allow_peer(c.peer, true).await.unwrap();
    a.client.dial(c.peer, vec![c.addr.clone()]).await.unwrap();
    assert_eq!(request(&c, &a).await.unwrap(), Message::Ack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_private_network_needs_the_same_key() {
    let psk = PreSharedKey::new([42; 32]);
    let closed = |psk| NetConfig {
        psk: Some(psk),
        ..NetConfig::open()
    };
    let a = node(1, closed(psk)).await;
    let b = node(2, closed(psk)).await;
    let c = node(3, closed(PreSharedKey::new([43; 32]))).await;
    let d = node(4, NetConfig::open()).await;

    assert_eq!(request(&b, &a).await.unwrap(), Message::Ack);
    let (from_c, from_d, to_d) = tokio::join!(
        request(&c, &a),
        request(&d, &a),
        timeout(
            Duration::from_secs(8),
            a.client.dial(d.peer, vec![d.addr.clone()])
        ),
    );
    assert!(from_c.is_err(), "another key: {from_c:?}");
    assert!(from_d.is_err(), "no key: {from_d:?}");
    assert!(!matches!(to_d, Ok(Ok(_))), "A cannot reach D either");
    assert_eq!(a.asked_by(), vec![b.peer], "only B's request reached A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_kademlia_finds_a_peer_known_only_to_the_bootstrap_node() {
    let kad = || NetConfig {
        kademlia: true,
        ..NetConfig::open()
    };
    let b = node(2, kad()).await;
    let a = node(1, kad()).await;
    let c = node(3, kad()).await;
    a.client.bootstrap(vec![b.p2p_addr()]).await.unwrap();
    // B learns A's listen address through identify once A has connected.
    tokio::time::sleep(Duration::from_millis(300)).await;
    timeout(
        Duration::from_secs(10),
        c.client.bootstrap(vec![b.p2p_addr()]),
    )
    .await
    .expect("bootstrap finishes")
    .unwrap();

    let mut found = Vec::new();
    for _ in 0..10 {
        match c.client.find_peer(a.peer).await {
            Ok(addrs) => {
                found = addrs;
                break;
            }
            Err(e) => {
                tracing::debug!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    assert!(
        found.contains(&a.addr),
        "C found {found:?}, A listens on {}",
        a.addr
    );
    let answer = timeout(Duration::from_secs(8), c.client.request(a.peer, ping()))
        .await
        .expect("in time")
        .unwrap();
    assert_eq!(answer, Message::Ack);
    assert!(a.asked_by().contains(&c.peer));

    // Without Kademlia there is nothing to ask.
    let plain = node(4, NetConfig::open()).await;
    assert!(plain.client.find_peer(a.peer).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_large_share_is_announced_on_gossip_and_pulled_in_chunks() {
    let fed = || NetConfig {
        federation_id: "fed".into(),
        ..NetConfig::open()
    };
    let a = node(1, fed()).await;
    let mut b = node(2, fed()).await;
    let mut c = node(3, fed()).await;
    let blob: Vec<u8> = (0..20_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let announcement = ShareAnnouncement::describe("fed", 1, a.key.public_key(), &blob);
    assert!(announcement.bytes as usize > MAX_MESSAGE_BYTES);
    let blob = Arc::new(blob);
    a.client
        .offer_share(&announcement, blob.clone())
        .await
        .unwrap();

    // A dials B and C itself (they only know nothing of A yet).
    a.client.add_address(b.peer, b.addr.clone()).await.unwrap();
    a.client.add_address(c.peer, c.addr.clone()).await.unwrap();
    let before = a.client.traffic();
    a.client
        .announce(&announcement, vec![b.peer, c.peer], Duration::from_secs(10))
        .await
        .unwrap();
    for receiver in [&mut b, &mut c] {
        let (from, got) = timeout(Duration::from_secs(10), receiver.announcements.recv())
            .await
            .expect("announcement in time")
            .expect("channel open");
        assert_eq!(from, a.peer);
        assert_eq!(got, announcement);
    }
    // Gossip carried only the small announcement.
    let sent = a.client.traffic().since(&before);
    assert_eq!(sent.announcements_sent, 2);
    assert!(sent.announcement_bytes_sent > 0 && sent.announcement_bytes_sent < 2 * 1024);
    let got = b.client.traffic();
    assert_eq!(got.announcements_received, 1);
    assert!(got.announcement_bytes_received < 1024);
    assert!(
        got.share_bytes_received < 1024,
        "nothing but the announcement yet"
    );

    let (from_b, from_c) = tokio::join!(
        b.client.fetch_share(a.peer, &announcement),
        c.client.fetch_share(a.peer, &announcement),
    );
    assert!(from_b.unwrap() == *blob, "B got the announced bytes");
    assert!(from_c.unwrap() == *blob, "C got the announced bytes");

    let chunks = chunk_count(announcement.bytes) as u64;
    assert_eq!(chunks, 20);
    for receiver in [&b, &c] {
        let t = receiver.client.traffic();
        assert_eq!(t.chunks_received, chunks);
        assert!(t.largest_frame_received <= MAX_MESSAGE_BYTES as u64 + 4);
        assert!(t.largest_frame_received >= CHUNK_BYTES as u64);
        assert!(
            t.share_bytes_received > announcement.bytes,
            "chunk frames are counted"
        );
        assert!(t.share_bytes_sent > 0, "chunk requests are counted");
        assert!(
            receiver.asked_by().is_empty(),
            "the program never saw a request"
        );
    }
    let t = a.client.traffic();
    assert_eq!(t.chunks_sent, 2 * chunks);
    assert!(t.largest_frame_sent <= MAX_MESSAGE_BYTES as u64 + 4);
    assert!(t.share_bytes_sent > 2 * announcement.bytes);
    assert!(
        a.asked_by().is_empty(),
        "chunk requests are answered by the event loop"
    );
    let client = a.client.clone();
    eventually("both pulled shares count as sent", async || {
        client.traffic().shares_sent == 2
    })
    .await;

    // A digest that does not match the bytes served: refused, naming it.
    let mut lying = announcement.clone();
    lying.round = 2;
    lying.digest = Digest([0xAB; 32]);
    a.client
        .offer_share_unchecked(&lying, blob.clone())
        .await
        .unwrap();
    let error = b.client.fetch_share(a.peer, &lying).await.unwrap_err();
    assert!(format!("{error:#}").contains("digest"), "{error:#}");

    // A digest nobody offered: the sender says so.
    let mut unknown = announcement.clone();
    unknown.digest = Digest([0xCD; 32]);
    let error = b.client.fetch_share(a.peer, &unknown).await.unwrap_err();
    assert!(format!("{error:#}").contains("cannot serve"), "{error:#}");

    // Too large to accept: refused by `check` and never fetched.
    let mut huge = announcement.clone();
    huge.bytes = MAX_SHARE_BYTES as u64 + 1;
    assert!(matches!(
        huge.check("fed"),
        Err(ProtocolError::TooLarge { .. })
    ));
    let before = b.client.traffic();
    assert!(b.client.fetch_share(a.peer, &huge).await.is_err());
    assert_eq!(b.client.traffic().since(&before).share_bytes_sent, 0);

    // An announcement pushed by someone who is not its sender is refused.
    c.client.add_address(b.peer, b.addr.clone()).await.unwrap();
    let answer = c
        .client
        .request(b.peer, Message::ShareAvailable(announcement.clone()))
        .await
        .unwrap();
    assert!(
        matches!(&answer, Message::ShareRejected { code, .. } if code == "unknown_sender"),
        "{answer:?}"
    );
    // From its sender it is accepted and delivered.
    let answer = a
        .client
        .request(b.peer, Message::ShareAvailable(announcement.clone()))
        .await
        .unwrap();
    assert_eq!(answer, Message::Ack);
    let (from, got) = timeout(Duration::from_secs(5), b.announcements.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((from, got), (a.peer, announcement));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_announce_waits_for_subscribers_and_fails_without_any() {
    let a = node(
        1,
        NetConfig {
            federation_id: "fed".into(),
            ..NetConfig::open()
        },
    )
    .await;
    // Subscribed to another federation's topic.
    let b = node(
        2,
        NetConfig {
            federation_id: "other".into(),
            ..NetConfig::open()
        },
    )
    .await;
    let blob = vec![1u8; 100];
    let announcement = ShareAnnouncement::describe("fed", 1, a.key.public_key(), &blob);
    a.client.add_address(b.peer, b.addr.clone()).await.unwrap();
    let error = a
        .client
        .announce(&announcement, vec![b.peer], Duration::from_millis(800))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("nobody subscribed"), "{error:#}");
    assert!(
        a.client.connected_peers().await.unwrap().contains(&b.peer),
        "it was dialled"
    );
    // Once B joins the federation the same announcement goes through.
    b.client.set_federation("fed").await.unwrap();
    a.client
        .announce(&announcement, vec![b.peer], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(a.client.traffic().announcements_sent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_in_flight_limit_is_answered_busy_while_others_are_served() {
    use super::MAX_IN_FLIGHT_PER_PEER;
    // The victim's program holds the flooder's requests unanswered (as a
    // slow verification would) and answers everyone else at once.
    let key = SigningKey::from_seed([30; 32]);
    let network = new_with(&key, &NetConfig::open()).unwrap();
    tokio::spawn(network.event_loop.run());
    let victim = network.client;
    let addr = victim
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .await
        .unwrap();
    let flooder = node(31, NetConfig::open()).await;
    let honest = node(32, NetConfig::open()).await;
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let mut requests = network.requests;
    let (responder, flooder_peer) = (victim.clone(), flooder.peer);
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut release = Some(release_rx);
        loop {
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return };
                    if request.peer == flooder_peer && release.is_some() {
                        held.push(request.channel);
                    } else {
                        let _ = responder.respond(request.channel, Message::Ack).await;
                    }
                }
                _ = async { release.as_mut().unwrap().await }, if release.is_some() => {
                    release = None;
                    for channel in held.drain(..) {
                        let _ = responder.respond(channel, Message::Ack).await;
                    }
                }
            }
        }
    });

    let victim_peer = victim.local_peer_id();
    flooder
        .client
        .add_address(victim_peer, addr.clone())
        .await
        .unwrap();
    honest.client.add_address(victim_peer, addr).await.unwrap();
    let extra = 5;
    let sends = (0..MAX_IN_FLIGHT_PER_PEER + extra).map(|_| {
        let client = flooder.client.clone();
        tokio::spawn(async move { client.request(victim_peer, ping()).await })
    });
    let sends: Vec<_> = sends.collect();
    // The refused ones come back at once; the held ones wait.
    eventually("the flooder's extra requests are refused", async || {
        victim.traffic().requests_busy == extra as u64
    })
    .await;
    let answer = timeout(
        Duration::from_secs(8),
        honest.client.request(victim_peer, ping()),
    )
    .await
    .expect("the honest peer is answered during the flood")
    .unwrap();
    assert_eq!(answer, Message::Ack);
    release_tx.send(()).unwrap();
    let mut busy = 0;
    for send in sends {
        match send.await.unwrap().unwrap() {
            Message::Ack => {}
            Message::Refused { code, .. } if code == "busy" => busy += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(busy, extra);
    // Answered requests no longer count: the flooder is served again.
    let answer = timeout(
        Duration::from_secs(8),
        flooder.client.request(victim_peer, ping()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(answer, Message::Ack);
}

/// A share over `max_relayed_share_bytes` is not pulled from a peer reached
/// only through a relay (the pull fails with `RelayedOnly`, to be retried);
/// with the limit raised it crosses the relay whole.
#[tokio::test]
async fn large_shares_are_pulled_over_a_relay_only_when_the_limit_allows() {
    use super::{RelayLimits, RelayMode, RelayUse, RelayedOnly, relay_use::circuit_addr};
    let open = |mode, max| NetConfig {
        relay: RelayUse {
            mode,
            max_relayed_share_bytes: max,
            ..RelayUse::default()
        },
        ..NetConfig::open()
    };
    let relay = node(
        40,
        NetConfig {
            relay_service: Some(RelayLimits {
                max_circuit_bytes: 64 << 20,
                ..RelayLimits::default()
            }),
            ..open(RelayMode::Off, 1 << 20)
        },
    )
    .await;
    // Listens nowhere: reachable only at its circuit address.
    let key = SigningKey::from_seed([41; 32]);
    let hidden = new_with(
        &key,
        &NetConfig {
            relay: RelayUse {
                mode: RelayMode::Always,
                relays: vec![(relay.peer, relay.addr.clone())],
                ..RelayUse::default()
            },
            ..NetConfig::open()
        },
    )
    .unwrap();
    tokio::spawn(hidden.event_loop.run());
    let hidden_id = hidden.client.local_peer_id();
    let bytes = Arc::new(vec![7u8; 2 * CHUNK_BYTES + 5]);
    let announcement = ShareAnnouncement::describe("relay", 1, key.public_key(), &bytes);
    hidden
        .client
        .offer_share(&announcement, bytes.clone())
        .await
        .unwrap();
    let circuit = circuit_addr(relay.peer, &relay.addr);

    // Pullers listen nowhere either, so neither side can dial the other
    // directly and no hole punch can replace the relayed connection.
    let unlisted = |seed: u8, config: NetConfig| {
        let network = new_with(&SigningKey::from_seed([seed; 32]), &config).unwrap();
        tokio::spawn(network.event_loop.run());
        network.client
    };
    let strict = unlisted(42, open(RelayMode::Off, 1 << 20));
    let generous = unlisted(43, open(RelayMode::Off, 64 << 20));
    for puller in [&strict, &generous] {
        // The reservation may still be on its way: dial until it answers.
        eventually("the hidden peer is reached through the relay", async || {
            matches!(
                timeout(
                    Duration::from_secs(5),
                    puller.dial(hidden_id, vec![circuit.clone()])
                )
                .await,
                Ok(Ok(c)) if c.relayed
            )
        })
        .await;
    }
    let refused = strict
        .fetch_share(hidden_id, &announcement)
        .await
        .map(|pulled| pulled.len())
        .unwrap_err();
    let relayed_only = refused
        .downcast_ref::<RelayedOnly>()
        .unwrap_or_else(|| panic!("not a RelayedOnly error: {refused:#}"));
    assert_eq!(relayed_only.bytes, bytes.len() as u64);
    let pulled = timeout(
        Duration::from_secs(30),
        generous.fetch_share(hidden_id, &announcement),
    )
    .await
    .expect("pulled within 30 s")
    .unwrap();
    assert_eq!(pulled, *bytes);
}
