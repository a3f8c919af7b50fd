//! The router's own figures, for its `/metrics` (docs/configuration.md lists them):
//! publish latency by outcome, retries, `NOT_OWNER` catch-ups, and per owner the calls
//! in flight and the groups queued in its lane. Labelled families are kept by
//! `prometheus-client`, which writes the text format: hand-written label sets are
//! where exposition goes wrong.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `outcome`: `ok`, or the gRPC code of the failure (`unavailable`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// `node`: an owner's gRPC address.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

/// The publish latency buckets, in seconds: 0.25 ms to 10 s.
const BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

fn publish_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Every figure the router keeps.
pub struct RouterStats {
    registry: Registry,
    /// Publish and PublishBatch calls, by outcome: seconds from arrival to answer.
    pub publish_seconds: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
    /// The `ok` member of `publish_seconds`, found once: the common case builds no label.
    publish_ok: Histogram,
    /// Rounds retried after a transport failure (an owner unreachable).
    pub retries: Counter,
    /// `NOT_OWNER` answers caught up with (the ring had moved).
    pub not_owner: Counter,
    /// Deliver calls in flight, per owner.
    pub in_flight: Family<NodeLabel, Gauge<i64, AtomicI64>>,
    /// Groups waiting in each owner's lane (set when scraped).
    pub lane_queued: Family<NodeLabel, Gauge<i64, AtomicI64>>,
}

impl Default for RouterStats {
    fn default() -> Self {
        RouterStats::new()
    }
}

impl std::fmt::Debug for RouterStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterStats")
    }
}

impl RouterStats {
    pub fn new() -> RouterStats {
        let mut registry = Registry::with_prefix("ringfeed_router");
        let publish_seconds =
            Family::<OutcomeLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                publish_histogram,
            );
        let retries = Counter::default();
        let not_owner = Counter::default();
        let in_flight = Family::<NodeLabel, Gauge<i64, AtomicI64>>::default();
        let lane_queued = Family::<NodeLabel, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "publish_seconds",
            "Publish and PublishBatch calls, arrival to answer, by outcome (ok or the gRPC code)",
            publish_seconds.clone(),
        );
        registry.register(
            "retries",
            "Forwarding rounds retried after an owner could not be reached",
            retries.clone(),
        );
        registry.register(
            "not_owner",
            "NOT_OWNER answers caught up with (the ring had moved)",
            not_owner.clone(),
        );
        registry.register(
            "calls_in_flight",
            "Deliver calls in flight, per owner",
            in_flight.clone(),
        );
        registry.register(
            "lane_queued",
            "Groups waiting in each owner's lane",
            lane_queued.clone(),
        );
        let publish_ok = publish_seconds
            .get_or_create(&OutcomeLabel {
                outcome: "ok".to_owned(),
            })
            .clone();
        RouterStats {
            registry,
            publish_ok,
            publish_seconds,
            retries,
            not_owner,
            in_flight,
            lane_queued,
        }
    }

    /// Counts a finished publish call that ended with `code`.
    pub fn publish_done(&self, code: tonic::Code, seconds: f64) {
        if code == tonic::Code::Ok {
            self.publish_ok.observe(seconds);
            return;
        }
        self.publish_seconds
            .get_or_create(&OutcomeLabel {
                outcome: outcome(code),
            })
            .observe(seconds);
    }

    /// The figures in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The `outcome` label of a gRPC status code: `ok`, or its snake-case name.
pub fn outcome(code: tonic::Code) -> String {
    if code == tonic::Code::Ok {
        return "ok".to_owned();
    }
    let name = format!("{code:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_carries_every_family_with_its_labels() {
        let stats = RouterStats::new();
        stats.publish_done(tonic::Code::Ok, 0.001);
        stats.publish_done(tonic::Code::DeadlineExceeded, 10.0);
        stats.retries.inc();
        stats
            .in_flight
            .get_or_create(&NodeLabel {
                node: "127.0.0.1:7001".into(),
            })
            .set(2);
        let text = stats.encode();
        assert!(
            text.contains(r#"ringfeed_router_publish_seconds_count{outcome="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"outcome="deadline_exceeded""#), "{text}");
        assert!(text.contains("ringfeed_router_retries_total 1"), "{text}");
        assert!(
            text.contains(r#"ringfeed_router_calls_in_flight{node="127.0.0.1:7001"} 2"#),
            "{text}"
        );
    }
}
