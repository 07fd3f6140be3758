//! Operational counters of a node or coordinator, served as Prometheus text.
//!
//! Operators watch a running federation (rounds completed, shares accepted
//! and rejected by reason, bytes on the wire, last accuracy, members) without
//! reading logs. [`Telemetry`] is a set of atomics shared as
//! `Arc<Telemetry>` by whoever counts; [`Telemetry::render`] writes the
//! Prometheus text exposition format (version 0.0.4), and [`serve`] answers
//! `GET /metrics` with it over a deliberately tiny HTTP/1.1 server (one
//! connection at a time, bounded reads, timeouts): the endpoint is optional
//! and scraped every few seconds, so it needs no HTTP framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::net::TrafficCounters;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The `Content-Type` of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The most bytes of a request read before answering: a scrape is one short line.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How long a client may take to send its request or read the answer, so a
/// stalled client cannot hold the one-connection-at-a-time server.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters and gauges of one process; every method takes `&self`.
#[derive(Debug)]
pub struct Telemetry {
    role: String,
    name: String,
    rounds_completed: AtomicU64,
    last_round: AtomicU64,
    /// `f64` bits; NaN until a round completes.
    last_accuracy: AtomicU64,
    shares_accepted: AtomicU64,
    shares_rejected: Mutex<BTreeMap<String, u64>>,
    /// Requests other than shares refused, by reason code.
    refusals: Mutex<BTreeMap<String, u64>>,
    /// Where requests refused as busy (by the event loop) are counted.
    busy: OnceLock<Arc<TrafficCounters>>,
    metrics_received: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    members: AtomicU64,
    /// Distillations undone by [`crate::rollback`].
    rollbacks: AtomicU64,
    /// `f64` bits of the last round's validation accuracy; NaN when unknown.
    validation_accuracy: AtomicU64,
}

impl Default for Telemetry {
    /// A node's telemetry with no name in `fd_info`.
    fn default() -> Self {
        Telemetry::new("node", "")
    }
}

impl Telemetry {
    /// `role` ("node", "coordinator") and `name` appear in the `fd_info` series.
    pub fn new(role: &str, name: &str) -> Self {
        Telemetry {
            role: role.to_string(),
            name: name.to_string(),
            rounds_completed: AtomicU64::new(0),
            last_round: AtomicU64::new(0),
            last_accuracy: AtomicU64::new(f64::NAN.to_bits()),
            shares_accepted: AtomicU64::new(0),
            shares_rejected: Mutex::new(BTreeMap::new()),
            refusals: Mutex::new(BTreeMap::new()),
            busy: OnceLock::new(),
            metrics_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            members: AtomicU64::new(0),
            rollbacks: AtomicU64::new(0),
            validation_accuracy: AtomicU64::new(f64::NAN.to_bits()),
        }
    }

    /// A round finished with this test accuracy (NaN when unknown).
    pub fn round_completed(&self, round: u64, accuracy: f64) {
        self.rounds_completed.fetch_add(1, Ordering::Relaxed);
        self.last_round.store(round, Ordering::Relaxed);
        self.last_accuracy
            .store(accuracy.to_bits(), Ordering::Relaxed);
    }

    pub fn share_accepted(&self) {
        self.shares_accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// A share was refused; `reason` is a [`fd_protocol::RejectReason`] code.
    pub fn share_rejected(&self, reason: &str) {
        count_by_reason(&self.shares_rejected, reason);
    }

    /// A request that is not a share was refused (control message, report,
    /// unexpected kind); `reason` is a [`fd_protocol::RejectReason`] code.
    pub fn refused(&self, reason: &str) {
        count_by_reason(&self.refusals, reason);
    }

    /// Reports the requests the network refused as busy
    /// ([`TrafficCounters::requests_busy`]) among the refusals.
    pub fn count_busy_from(&self, counters: Arc<TrafficCounters>) {
        let _ = self.busy.set(counters);
    }

    /// The coordinator received a member's round metrics.
    pub fn metrics_received(&self) {
        self.metrics_received.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds bytes written to and read from the network.
    pub fn bytes(&self, sent: u64, received: u64) {
        self.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        self.bytes_received.fetch_add(received, Ordering::Relaxed);
    }

    /// A round's distillation was rolled back ([`crate::rollback`]).
    pub fn rolled_back(&self) {
        self.rollbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// The validation accuracy of the student kept in the last round.
    pub fn set_validation_accuracy(&self, accuracy: Option<f64>) {
        self.validation_accuracy
            .store(accuracy.unwrap_or(f64::NAN).to_bits(), Ordering::Relaxed);
    }

    pub fn set_members(&self, n: usize) {
        self.members.store(n as u64, Ordering::Relaxed);
    }

    /// Everything in the Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        header(
            &mut out,
            "fd_info",
            "gauge",
            "Role and name of this process.",
        );
        let _ = write!(out, "fd_info{{role=\"{}\"", escape(&self.role));
        if !self.name.is_empty() {
            let _ = write!(out, ",name=\"{}\"", escape(&self.name));
        }
        let _ = writeln!(out, "}} 1");
        let simple: [(&str, &str, &str, f64); 10] = [
            (
                "fd_rounds_completed_total",
                "counter",
                "Rounds completed.",
                load(&self.rounds_completed) as f64,
            ),
            (
                "fd_last_round",
                "gauge",
                "The last round completed.",
                load(&self.last_round) as f64,
            ),
            (
                "fd_last_test_accuracy",
                "gauge",
                "Test accuracy after the last completed round (mean over reports on the coordinator).",
                f64::from_bits(load(&self.last_accuracy)),
            ),
            (
                "fd_shares_accepted_total",
                "counter",
                "Peer logit shares accepted.",
                load(&self.shares_accepted) as f64,
            ),
            (
                "fd_metrics_received_total",
                "counter",
                "Round metrics reports received from members.",
                load(&self.metrics_received) as f64,
            ),
            (
                "fd_bytes_sent_total",
                "counter",
                "Bytes written to the network.",
                load(&self.bytes_sent) as f64,
            ),
            (
                "fd_bytes_received_total",
                "counter",
                "Bytes read from the network.",
                load(&self.bytes_received) as f64,
            ),
            (
                "fd_members",
                "gauge",
                "Members of the federation known to this process.",
                load(&self.members) as f64,
            ),
            (
                "fd_rollbacks_total",
                "counter",
                "Distillations undone because validation accuracy fell beyond rollback_tolerance.",
                load(&self.rollbacks) as f64,
            ),
            (
                "fd_validation_accuracy",
                "gauge",
                "Validation accuracy of the student kept in the last round (NaN: no validation split).",
                f64::from_bits(load(&self.validation_accuracy)),
            ),
        ];
        for (name, kind, help, value) in simple {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {}", number(value));
        }
        header(
            &mut out,
            "fd_shares_rejected_total",
            "counter",
            "Peer logit shares rejected, by reason code.",
        );
        let rejected = self
            .shares_rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (reason, count) in rejected {
            let _ = writeln!(
                out,
                "fd_shares_rejected_total{{reason=\"{}\"}} {count}",
                escape(&reason)
            );
        }
        header(
            &mut out,
            "fd_refusals_total",
            "counter",
            "Requests other than shares refused (control messages, reports, load), by reason code.",
        );
        let mut refusals = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(counters) = self.busy.get() {
            *refusals.entry("busy".to_string()).or_default() +=
                counters.requests_busy.load(Ordering::Relaxed);
        }
        for (reason, count) in refusals {
            let _ = writeln!(
                out,
                "fd_refusals_total{{reason=\"{}\"}} {count}",
                escape(&reason)
            );
        }
        out
    }
}

/// Adds one to `reason`'s count.
fn count_by_reason(counts: &Mutex<BTreeMap<String, u64>>, reason: &str) {
    *counts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(reason.to_string())
        .or_default() += 1;
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Prometheus spells the special values `NaN`, `+Inf`, `-Inf`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` on `addr` until the returned task is aborted.
/// Returns the bound address (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for the metrics endpoint on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // E.g. out of file descriptors: pause rather than spin.
                    tracing::debug!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = answer(stream, &telemetry).await {
                tracing::debug!("metrics endpoint: {e}");
            }
        }
    });
    Ok((local, task))
}

async fn answer(mut stream: TcpStream, telemetry: &Telemetry) -> std::io::Result<()> {
    let request = tokio::time::timeout(CLIENT_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    let response = match request_target(&request) {
        Some("/metrics") => {
            let body = telemetry.render();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        _ => "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n".to_string(),
    };
    tokio::time::timeout(CLIENT_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response timed out"))?
}

/// Reads until the end of the request head, the peer closing, or [`MAX_REQUEST_BYTES`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while buf.len() < MAX_REQUEST_BYTES && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let room = MAX_REQUEST_BYTES - buf.len();
        buf.extend_from_slice(&chunk[..n.min(room)]);
    }
    Ok(buf)
}

/// The path of a `GET` request line, query string dropped; None for anything else.
fn request_target(head: &[u8]) -> Option<&str> {
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if method != "GET" || !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    Some(target.split('?').next().unwrap_or(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `name{labels}` → value, for every sample line.
    fn samples(text: &str) -> BTreeMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("a sample is `series value`");
                (series.to_string(), value.to_string())
            })
            .collect()
    }

    #[test]
    fn counters_render_in_the_prometheus_text_format() {
        let t = Telemetry::new("node", "node-\"0\"");
        let before = samples(&t.render());
        assert_eq!(before["fd_rounds_completed_total"], "0");
        assert_eq!(before["fd_last_test_accuracy"], "NaN");
        assert!(
            !before
                .keys()
                .any(|k| k.starts_with("fd_shares_rejected_total"))
        );

        t.round_completed(1, 0.5);
        t.round_completed(2, 0.75);
        t.share_accepted();
        t.share_accepted();
        t.share_accepted();
        t.share_rejected("bad_signature");
        t.share_rejected("bad_signature");
        t.share_rejected("late");
        t.metrics_received();
        t.bytes(100, 20);
        t.bytes(1, 2);
        t.set_members(4);
        assert_eq!(before["fd_rollbacks_total"], "0");
        assert_eq!(before["fd_validation_accuracy"], "NaN");
        t.rolled_back();
        t.set_validation_accuracy(Some(0.625));
        let text = t.render();
        let s = samples(&text);
        assert_eq!(s["fd_rollbacks_total"], "1");
        assert_eq!(s["fd_validation_accuracy"], "0.625");
        assert_eq!(s["fd_info{role=\"node\",name=\"node-\\\"0\\\"\"}"], "1");
        assert_eq!(s["fd_rounds_completed_total"], "2");
        assert_eq!(s["fd_last_round"], "2");
        assert_eq!(s["fd_last_test_accuracy"], "0.75");
        assert_eq!(s["fd_shares_accepted_total"], "3");
        assert_eq!(s["fd_shares_rejected_total{reason=\"bad_signature\"}"], "2");
        assert_eq!(s["fd_shares_rejected_total{reason=\"late\"}"], "1");
        assert_eq!(s["fd_metrics_received_total"], "1");
        assert_eq!(s["fd_bytes_sent_total"], "101");
        assert_eq!(s["fd_bytes_received_total"], "22");
        assert_eq!(s["fd_members"], "4");

        // Every family has HELP and TYPE before its first sample, exactly once.
        let mut declared = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().unwrap();
                assert!(matches!(parts.next(), Some("counter" | "gauge")), "{line}");
                assert!(declared.insert(name.to_string()), "{name} declared twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} has no TYPE line");
                assert!(name.starts_with("fd_"));
            }
        }
        assert!(text.contains("# HELP fd_shares_rejected_total "));
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        assert_eq!(
            request_target(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(
            request_target(b"GET /metrics?x=1 HTTP/1.0\r\n"),
            Some("/metrics")
        );
        assert_eq!(request_target(b"POST /metrics HTTP/1.1\r\n"), None);
        assert_eq!(request_target(b"GET /metrics\r\n"), None);
        assert_eq!(request_target(b"\xff\xfe GET\r\n"), None);
        assert_eq!(request_target(b"GET /metrics HTTP/1.1"), None);
        assert_eq!(request_target(b""), None);
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        // Half-close, so a request without a blank line still ends.
        stream.shutdown().await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8(response).unwrap()
    }

    #[tokio::test]
    async fn serves_metrics_over_http_and_404_for_anything_else() {
        let telemetry = Arc::new(Telemetry::new("coordinator", "c"));
        telemetry.round_completed(3, 0.25);
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), telemetry.clone())
            .await
            .unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0);

        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Type: {CONTENT_TYPE}")));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(samples(body)["fd_last_round"], "3");
        assert_eq!(body, telemetry.render());

        assert!(
            Telemetry::default()
                .render()
                .contains("fd_info{role=\"node\"} 1\n")
        );

        let missing = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        // Garbage and an over-long request get an answer, and the server lives on.
        let garbage = exchange(addr, &[0xffu8; 100]).await;
        assert!(garbage.starts_with("HTTP/1.1 404 "));
        let mut huge = b"GET /metrics".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 3 * MAX_REQUEST_BYTES));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(&huge).await;
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        drop(stream);
        let again = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(again.starts_with("HTTP/1.1 200 OK"));
        task.abort();
    }
}
