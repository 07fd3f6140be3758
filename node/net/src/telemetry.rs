//! Operational counters of a node or coordinator, served for Prometheus.
//!
//! Operators watch a running federation (rounds completed, shares accepted
//! and rejected by reason, bytes on the wire, last accuracy, members) without
//! reading logs. [`Telemetry`] holds `prometheus-client` metrics in a
//! registry and is shared as `Arc<Telemetry>` by whoever counts;
//! [`Telemetry::render`] encodes them in the OpenMetrics text format (which
//! Prometheus scrapes), and [`serve`] answers `GET /metrics` with it over a
//! deliberately tiny HTTP/1.1 server (one connection at a time, bounded
//! reads, timeouts). Counts by reason code, including the requests the event
//! loop answered `busy`, are read at scrape time by a collector.
//!
//! Why not hyper for the server: hyper's `http1` feature turns on
//! futures-core's `default` feature, which changes the build hash of
//! futures-core and so of everything above it (libp2p, tokio users, burn):
//! adding it rebuilt most of the dependency tree (measured, issue 19). The
//! endpoint answers one fixed path to a scraper; 60 lines do that.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::TrafficCounters;

/// The `Content-Type` of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The most bytes of a request read before answering: a scrape is one short line.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How long a client may take to send its request or read the answer, so a
/// stalled client cannot hold the one-connection-at-a-time server.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters and gauges of one process; every method takes `&self`.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    rounds_completed: Counter,
    last_round: Gauge,
    /// NaN until a round completes.
    last_accuracy: Gauge<f64, AtomicU64>,
    shares_accepted: Counter,
    metrics_received: Counter,
    bytes_sent: Counter,
    bytes_received: Counter,
    members: Gauge,
    /// Distillations undone by fd-node's rollback (validation accuracy fell).
    rollbacks: Counter,
    /// The last round's validation accuracy; NaN when unknown.
    validation_accuracy: Gauge<f64, AtomicU64>,
    by_reason: Arc<ByReason>,
}

/// Counts keyed by a reason code, encoded at each scrape.
#[derive(Debug, Default)]
struct ByReason {
    shares_rejected: Mutex<BTreeMap<String, u64>>,
    /// Requests other than shares refused, by reason code.
    refusals: Mutex<BTreeMap<String, u64>>,
    /// Where requests refused as busy (by the event loop) are counted.
    busy: OnceLock<Arc<TrafficCounters>>,
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
        let mut registry = Registry::default();
        let mut labels = vec![("role".to_string(), Escaped(role.to_string()))];
        if !name.is_empty() {
            labels.push(("name".to_string(), Escaped(name.to_string())));
        }
        registry.register("fd", "Role and name of this process.", Info::new(labels));
        fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
            registry.register(name, help, metric.clone());
            metric
        }
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            register(registry, name, help, Counter::default())
        };
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            register(registry, name, help, Gauge::default())
        };
        let ratio = |registry: &mut Registry, name: &str, help: &str| {
            let metric = Gauge::<f64, AtomicU64>::default();
            metric.set(f64::NAN);
            register(registry, name, help, metric)
        };
        let rounds_completed = counter(&mut registry, "fd_rounds_completed", "Rounds completed.");
        let last_round = gauge(&mut registry, "fd_last_round", "The last round completed.");
        let last_accuracy = ratio(
            &mut registry,
            "fd_last_test_accuracy",
            "Test accuracy after the last completed round (mean over reports on the coordinator).",
        );
        let shares_accepted = counter(
            &mut registry,
            "fd_shares_accepted",
            "Peer logit shares accepted.",
        );
        let metrics_received = counter(
            &mut registry,
            "fd_metrics_received",
            "Round metrics reports received from members.",
        );
        let bytes_sent = counter(
            &mut registry,
            "fd_bytes_sent",
            "Bytes written to the network.",
        );
        let bytes_received = counter(
            &mut registry,
            "fd_bytes_received",
            "Bytes read from the network.",
        );
        let members = gauge(
            &mut registry,
            "fd_members",
            "Members of the federation known to this process.",
        );
        let rollbacks = counter(
            &mut registry,
            "fd_rollbacks",
            "Distillations undone because validation accuracy fell beyond rollback_tolerance.",
        );
        let validation_accuracy = ratio(
            &mut registry,
            "fd_validation_accuracy",
            "Validation accuracy of the student kept in the last round (NaN: no validation split).",
        );
        let by_reason = Arc::new(ByReason::default());
        registry.register_collector(Box::new(ByReasonCollector(by_reason.clone())));
        Telemetry {
            registry,
            rounds_completed,
            last_round,
            last_accuracy,
            shares_accepted,
            metrics_received,
            bytes_sent,
            bytes_received,
            members,
            rollbacks,
            validation_accuracy,
            by_reason,
        }
    }

    /// A round finished with this test accuracy (NaN when unknown).
    pub fn round_completed(&self, round: u64, accuracy: f64) {
        self.rounds_completed.inc();
        self.last_round.set(round as i64);
        self.last_accuracy.set(accuracy);
    }

    pub fn share_accepted(&self) {
        self.shares_accepted.inc();
    }

    /// A share was refused; `reason` is a [`fd_protocol::RejectReason`] code.
    pub fn share_rejected(&self, reason: &str) {
        count_by_reason(&self.by_reason.shares_rejected, reason);
    }

    /// A request that is not a share was refused (control message, report,
    /// unexpected kind); `reason` is a [`fd_protocol::RejectReason`] code.
    pub fn refused(&self, reason: &str) {
        count_by_reason(&self.by_reason.refusals, reason);
    }

    /// Reports the requests the network refused as busy
    /// ([`TrafficCounters::requests_busy`]) among the refusals.
    pub fn count_busy_from(&self, counters: Arc<TrafficCounters>) {
        let _ = self.by_reason.busy.set(counters);
    }

    /// The coordinator received a member's round metrics.
    pub fn metrics_received(&self) {
        self.metrics_received.inc();
    }

    /// Adds bytes written to and read from the network.
    pub fn bytes(&self, sent: u64, received: u64) {
        self.bytes_sent.inc_by(sent);
        self.bytes_received.inc_by(received);
    }

    /// A round's distillation was rolled back (fd-node's rollback).
    pub fn rolled_back(&self) {
        self.rollbacks.inc();
    }

    /// The validation accuracy of the student kept in the last round.
    pub fn set_validation_accuracy(&self, accuracy: Option<f64>) {
        self.validation_accuracy.set(accuracy.unwrap_or(f64::NAN));
    }

    pub fn set_members(&self, n: usize) {
        self.members.set(n as i64);
    }

    /// Everything in the OpenMetrics text format (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
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

/// Encodes [`ByReason`] as two counter families labelled `reason`.
#[derive(Debug)]
struct ByReasonCollector(Arc<ByReason>);

impl Collector for ByReasonCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = |counts: &Mutex<BTreeMap<String, u64>>| {
            counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
        };
        let rejected = snapshot(&self.0.shares_rejected);
        let mut refusals = snapshot(&self.0.refusals);
        if let Some(counters) = self.0.busy.get() {
            *refusals.entry("busy".to_string()).or_default() +=
                counters.requests_busy.load(Ordering::Relaxed);
            let relay = counters.relay_refused.load(Ordering::Relaxed);
            if relay > 0 {
                *refusals.entry("relay_refused".to_string()).or_default() += relay;
            }
        }
        for (name, help, counts) in [
            (
                "fd_shares_rejected",
                "Peer logit shares rejected, by reason code.",
                rejected,
            ),
            (
                "fd_refusals",
                "Requests other than shares refused (control messages, reports, load), by reason code.",
                refusals,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (reason, count) in counts {
                let labels = [("reason", Escaped(reason))];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A label value escaped as the text format requires (backslash, double
/// quote, newline); prometheus-client 0.23 writes label values verbatim, so
/// a quote in a node's name would otherwise break the exposition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Escaped(String);

impl EncodeLabelValue for Escaped {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// The metrics endpoint's server task; dropping it stops the server.
#[derive(Debug)]
pub struct MetricsServer(tokio::task::JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `GET /metrics` on `addr` until the returned [`MetricsServer`] is
/// dropped. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
) -> anyhow::Result<(SocketAddr, MetricsServer)> {
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
    Ok((local, MetricsServer(task)))
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
    fn counters_render_in_the_openmetrics_text_format() {
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
        t.refused("not_coordinator");
        let busy = Arc::new(TrafficCounters::default());
        busy.requests_busy.store(5, Ordering::Relaxed);
        t.count_busy_from(busy);
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
        assert_eq!(s["fd_refusals_total{reason=\"not_coordinator\"}"], "1");
        assert_eq!(s["fd_refusals_total{reason=\"busy\"}"], "5");
        assert_eq!(s["fd_metrics_received_total"], "1");
        assert_eq!(s["fd_bytes_sent_total"], "101");
        assert_eq!(s["fd_bytes_received_total"], "22");
        assert_eq!(s["fd_members"], "4");

        // Every family has HELP and TYPE before its first sample, exactly
        // once; a sample is named after its family (counters add `_total`,
        // info `_info`); the text ends with `# EOF`.
        let mut declared = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let name = parts.next().unwrap();
                let kind = parts.next().unwrap();
                assert!(matches!(kind, "counter" | "gauge" | "info"), "{line}");
                assert!(
                    declared
                        .insert(name.to_string(), kind.to_string())
                        .is_none(),
                    "{name} declared twice"
                );
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = [("counter", "_total"), ("info", "_info")]
                    .iter()
                    .find_map(|(kind, suffix)| {
                        let base = name.strip_suffix(suffix)?;
                        (declared.get(base).map(String::as_str) == Some(*kind)).then_some(base)
                    })
                    .unwrap_or(name);
                assert!(declared.contains_key(family), "{name} has no TYPE line");
                assert!(name.starts_with("fd_"));
            }
        }
        assert!(text.contains("# HELP fd_shares_rejected "));
        assert!(text.ends_with("# EOF\n"), "{text}");
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
        // Dropping the server stops it: the port no longer answers.
        drop(task);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
