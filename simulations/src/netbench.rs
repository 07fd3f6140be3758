//! `fd-sim bench` section 9: share transfer time over TCP, QUIC and a
//! relayed circuit (issue 17).
//!
//! Four swarms in this process, on 127.0.0.1: a relay (circuit relay v2
//! server, limits raised so a measurement is never cut), a receiver that
//! listens on TCP and QUIC, a receiver that listens nowhere and is reachable
//! only at its circuit address through the relay (so neither a direct dial
//! nor hole punching can take over), and one sender per transport, so each
//! measurement has a connection of its own. The connection is made first;
//! then a signed share of each size is pushed `repeats` times and the
//! median time from request to answer is reported, with the throughput it
//! implies. The receivers answer at once without validating: this is the
//! network's cost, not the member's.
//!
//! Shares up to one frame (4 MiB) are pushed whole, as members push them;
//! larger ones travel as announced, pulled chunks: the 10 MB column times a
//! receiver pulling an offered share of that size chunk by chunk (1 MiB
//! each, one request per chunk, digest checked at the end), as members do.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fd_net::{NetConfig, RelayLimits, RelayMode, RelayUse, relay_use::circuit_addr};
use std::sync::Arc;

use fd_protocol::transfer::ShareAnnouncement;
use fd_protocol::{Message, PayloadEncoding, SigningKey};
use libp2p::Multiaddr;

use crate::bench::{random_logits, share};

/// Share sizes pushed (bytes of f32 logits, 10 classes).
pub const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];

/// Size of the share pulled in chunks (bytes of f32 logits, 10 classes).
pub const PULLED: usize = 10_000_000;

struct Peer {
    client: fd_net::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An open network that never reserves on a relay.
fn no_relay() -> NetConfig {
    NetConfig {
        relay: RelayUse {
            mode: RelayMode::Off,
            ..Default::default()
        },
        ..NetConfig::open()
    }
}

/// Starts a swarm for `seed`'s key with `config`; answers every request
/// with `ShareAccepted` (a receiver) or nothing (others never get one).
fn start(seed: u8, config: &NetConfig) -> anyhow::Result<Peer> {
    let key = SigningKey::from_seed([seed; 32]);
    let network = fd_net::new_with(&key, config)?;
    let client = network.client.clone();
    let mut requests = network.requests;
    let answering = client.clone();
    let tasks = vec![
        tokio::spawn(network.event_loop.run()),
        tokio::spawn(async move {
            while let Some(request) = requests.recv().await {
                let _ = answering
                    .respond(request.channel, Message::ShareAccepted)
                    .await;
            }
        }),
    ];
    Ok(Peer { client, tasks })
}

/// The [`PULLED`]-byte share every receiver offers, and its announcement.
fn large_share() -> anyhow::Result<(ShareAnnouncement, Arc<Vec<u8>>)> {
    let key = SigningKey::from_seed([200; 32]);
    let rows = PULLED / (10 * 4);
    let share = share(&key, rows, 10, PayloadEncoding::F32Le, &random_logits(rows, 10, 9))?;
    let bytes = fd_protocol::encode_share(&share)?;
    let announcement = ShareAnnouncement::describe("bench", 1, key.public_key(), &bytes);
    Ok((announcement, Arc::new(bytes)))
}

/// Median seconds to push each of [`SIZES`] over a fresh connection to
/// `target` at `addr`, then to pull the offered share of `large`.
async fn measure(
    sender_seed: u8,
    target: libp2p::PeerId,
    addr: Multiaddr,
    repeats: usize,
    large: &ShareAnnouncement,
) -> anyhow::Result<Vec<f64>> {
    // Allowed to move shares of any size over a relay: measuring that is
    // the point (members default to 1 MiB, `max_relayed_share_bytes`).
    let sender = start(
        sender_seed,
        &NetConfig {
            relay: RelayUse {
                mode: RelayMode::Off,
                max_relayed_share_bytes: u64::MAX,
                ..Default::default()
            },
            ..NetConfig::open()
        },
    )?;
    let connected = tokio::time::timeout(
        Duration::from_secs(20),
        sender.client.dial(target, vec![addr.clone()]),
    )
    .await
    .with_context(|| format!("no connection to {addr} within 20 s"))??;
    let key = SigningKey::from_seed([sender_seed; 32]);
    let mut medians = Vec::new();
    for size in SIZES {
        let rows = size / (10 * 4);
        let logits = random_logits(rows, 10, size as u64);
        let share = share(&key, rows, 10, PayloadEncoding::F32Le, &logits)?;
        let mut times = Vec::new();
        for _ in 0..repeats.max(1) {
            let started = Instant::now();
            let answer = sender
                .client
                .request(target, Message::Share(share.clone()))
                .await?;
            anyhow::ensure!(
                matches!(answer, Message::ShareAccepted),
                "unexpected answer {answer:?}"
            );
            times.push(started.elapsed().as_secs_f64());
        }
        medians.push(crate::bench::median(times));
    }
    let mut times = Vec::new();
    for _ in 0..repeats.clamp(1, 3) {
        let started = Instant::now();
        let bytes = sender.client.fetch_share(target, large).await?;
        times.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(bytes.len() as u64 == large.bytes, "pulled {} bytes", bytes.len());
    }
    medians.push(crate::bench::median(times));
    anyhow::ensure!(
        connected.relayed == fd_net::relay_use::is_circuit(&addr),
        "connected {} to {addr}",
        if connected.relayed { "relayed" } else { "direct" }
    );
    Ok(medians)
}

/// The markdown table of section 9.
pub fn transfer_table(repeats: usize) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let big = RelayLimits {
            max_circuit_bytes: 1 << 32,
            ..RelayLimits::default()
        };
        let relay = start(
            201,
            &NetConfig {
                relay_service: Some(big),
                ..no_relay()
            },
        )?;
        let relay_addr = relay
            .client
            .listen("/ip4/127.0.0.1/tcp/0".parse()?)
            .await?;
        let relay_id = relay.client.local_peer_id();
        let direct = start(
            202,
            &no_relay(),
        )?;
        let tcp = direct.client.listen("/ip4/127.0.0.1/tcp/0".parse()?).await?;
        let quic = direct
            .client
            .listen("/ip4/127.0.0.1/udp/0/quic-v1".parse()?)
            .await?;
        // Listens nowhere: reachable only through its reservation.
        let hidden = start(
            203,
            &NetConfig {
                relay: RelayUse {
                    mode: RelayMode::Always,
                    relays: vec![(relay_id, relay_addr.clone())],
                    ..Default::default()
                },
                ..NetConfig::open()
            },
        )?;
        let hidden_id = hidden.client.local_peer_id();
        let (large, large_bytes) = large_share()?;
        for receiver in [&direct, &hidden] {
            receiver
                .client
                .offer_share(&large, large_bytes.clone())
                .await?;
        }
        // Wait for the reservation: the relay answers a circuit request only then.
        let circuit = circuit_addr(relay_id, &relay_addr);
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = start(
            204,
            &no_relay(),
        )?;
        while probe
            .client
            .dial(hidden_id, vec![circuit.clone()])
            .await
            .is_err()
        {
            anyhow::ensure!(Instant::now() < deadline, "no reservation on the relay within 20 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(probe);
        let direct_id = direct.client.local_peer_id();
        let rows = [
            ("TCP + Noise + Yamux", measure(205, direct_id, tcp, repeats, &large).await?),
            ("QUIC", measure(206, direct_id, quic, repeats, &large).await?),
            (
                "relayed (TCP to the relay, Noise + Yamux inside)",
                measure(207, hidden_id, circuit, repeats, &large).await?,
            ),
        ];
        let mut out = String::new();
        writeln!(
            out,
            "Median of {repeats} pushes of one signed f32 share (10 classes) from request to answer, \
             and of up to 3 pulls of a 10 MB share in 1 MiB chunks, \
             on 127.0.0.1, one connection per transport made beforehand; throughput = share bytes ÷ time.\n"
        )?;
        write!(out, "| transport |")?;
        for size in SIZES {
            write!(out, " {} kB |", size / 1000)?;
        }
        writeln!(out, " {} MB (pulled) |", PULLED / 1_000_000)?;
        writeln!(out, "|---|{}", "---:|".repeat(SIZES.len() + 1))?;
        for (name, medians) in rows {
            write!(out, "| {name} |")?;
            for (size, seconds) in SIZES.iter().chain([&PULLED]).zip(medians) {
                write!(
                    out,
                    " {:.2} ms ({:.0} MB/s) |",
                    seconds * 1e3,
                    *size as f64 / seconds / 1e6
                )?;
            }
            writeln!(out)?;
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn shares_cross_tcp_quic_and_a_relay_and_the_table_has_a_row_each() {
        // `measure` checks each connection is relayed exactly when dialled
        // at a circuit address, and that every push is answered.
        let table = super::transfer_table(1).unwrap();
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 4, "header and three transports:\n{table}");
        assert!(rows[3].starts_with("| relayed"), "{table}");
        for row in &rows[1..] {
            assert_eq!(row.matches(" ms (").count(), super::SIZES.len() + 1, "{row}");
        }
    }
}
