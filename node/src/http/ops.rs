//! What operators and routing clients ask a node: `/v1/route`, `/v1/ring`,
//! `/readyz`, `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderValue, StatusCode};
use ringfeed_router::key::{self};
use ringfeed_router::ring::Member;
use serde_json::json;

use crate::node::Node;
use crate::protocol::params::ClientQuery;

use super::reply::ApiError;

/// The owner's record as `/v1/route` shows it.
fn owner_json(m: &Member) -> serde_json::Value {
    json!({ "id": m.id.0, "http": m.http, "ws": m.ws_base(), "quic": m.quic,
        "quic_sha256": m.quic_sha256, "grpc": m.grpc })
}

/// `GET /v1/route?key=K`.
pub(super) async fn route(
    State(node): State<Arc<Node>>,
    request: Request,
) -> Result<Response, ApiError> {
    let query = ClientQuery::parse(request.uri().query()).map_err(ApiError::bad_request)?;
    let key = query
        .key
        .ok_or_else(|| ApiError::bad_request("missing key"))?;
    key::validate(&key).map_err(|e| ApiError::bad_request(format!("invalid key: {e}")))?;
    let view = node.view_for(query.rv, None).await;
    let owner = view.ring.owner(&key).ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the ring has no active members".into(),
        )
    })?;
    Ok(Json(json!({
        "key": key,
        "ring_version": view.version,
        "ring_id": view.ring.id().0,
        "owner": owner_json(owner),
    }))
    .into_response())
}

/// `GET /v1/ring`.
pub(super) async fn ring(State(node): State<Arc<Node>>) -> Response {
    let view = node.membership.view();
    Json(json!({
        "cluster": node.membership.cluster(),
        "ring_version": view.version,
        "ring_id": view.ring.id().0,
        "members": view.ring.members(),
    }))
    .into_response()
}

/// `GET /v1/hot`: this node's hottest keys, by update rate and by subscribers.
pub(super) async fn hot_keys(State(node): State<Arc<Node>>) -> Response {
    let hot = node.hot_keys();
    Json(json!({
        "node": node.id.0,
        "window_ms": hot.window_ms,
        "by_rate": hot.by_rate.iter().map(|(k, r)| json!({"key": k, "per_s": r})).collect::<Vec<_>>(),
        "by_subscribers": hot.by_subscribers.iter().map(|(k, n)| json!({"key": k, "subscribers": n})).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// `GET /readyz`: 200 when registered, on the last known ring, not fenced, not
/// draining ([`Node::not_ready`]).
pub(super) async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let view = node.membership.view();
    let lease_ok = node.registration().is_some_and(|r| r.lease_healthy());
    let successor = view
        .ring
        .members()
        .iter()
        .filter(|m| m.state == ringfeed_router::ring::MemberState::Active)
        .count()
        > 1;
    let body = |ready: bool, reason: Option<&str>| {
        json!({
            "ready": ready,
            "reason": reason,
            "node": node.id.0,
            "ring_version": view.version,
            "ring_id": view.ring.id().0,
            "etcd_lease_ok": lease_ok,
            "replicated": successor,
            "keys": node.keys.len(),
            "connections": node.config.max_connections - node.connections.available_permits(),
        })
    };
    match node.not_ready() {
        None => Json(body(true, None)).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(body(false, Some(reason))),
        )
            .into_response(),
    }
}

/// `GET /metrics`: the node's gauges in the Prometheus text format, read at request
/// time.
pub(super) async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let mut body = String::new();
    let typed = gauges(&node)
        .into_iter()
        .map(|g| (g, "gauge"))
        .chain(counted(&node).into_iter().map(|c| (c, "counter")));
    for ((name, help, value), kind) in typed {
        body.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    labelled_and_histograms(&node, &mut body);
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// The process's own figures, under the names Prometheus's client libraries use:
/// CPU seconds, resident memory, open file descriptors, threads (Linux `/proc`).
fn process_metrics(body: &mut String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    // utime and stime, the 14th and 15th fields of /proc/self/stat, in clock ticks
    // (100 a second on Linux); the command name may hold spaces, so count after ')'.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    body.push_str(&format!(
        "# HELP process_cpu_seconds_total CPU time of the process, user and system\n\
         # TYPE process_cpu_seconds_total counter\n\
         process_cpu_seconds_total {:.2}\n\
         # HELP process_resident_memory_bytes resident memory of the process\n\
         # TYPE process_resident_memory_bytes gauge\n\
         process_resident_memory_bytes {}\n\
         # HELP process_open_fds open file descriptors\n\
         # TYPE process_open_fds gauge\n\
         process_open_fds {fds}\n\
         # HELP process_threads threads of the process\n\
         # TYPE process_threads gauge\n\
         process_threads {}\n",
        ticks as f64 / 100.0,
        field("VmRSS:").unwrap_or(0) * 1024,
        field("Threads:").unwrap_or(0),
    ));
}

/// `value` as a Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric: name, help, value.
type Metric = (&'static str, &'static str, u64);

/// The node's gauges, as of now.
fn gauges(node: &Node) -> [Metric; 12] {
    let view = node.membership.view();
    let active = view
        .ring
        .members()
        .iter()
        .filter(|m| m.state == ringfeed_router::ring::MemberState::Active)
        .count();
    let connections = node.config.max_connections - node.connections.available_permits();
    [
        (
            "ringfeed_memory_resident_bytes",
            "resident memory of the node at the last sample",
            node.budget.rss(),
        ),
        (
            "ringfeed_memory_budget_bytes",
            "resident memory past which new keys and connections are refused",
            node.budget.limit(),
        ),
        (
            "ringfeed_memory_over_budget",
            "1 while new keys and connections are refused for memory",
            u64::from(node.budget.over()),
        ),
        (
            "ringfeed_ready",
            "1 when the node is registered, on the ring, not fenced and not draining",
            u64::from(node.not_ready().is_none()),
        ),
        (
            "ringfeed_connections",
            "client connections held (WebSocket, SSE, waiting polls)",
            connections as u64,
        ),
        (
            "ringfeed_keys",
            "keys whose state this node holds as their owner",
            node.keys.len() as u64,
        ),
        (
            "ringfeed_replicas",
            "keys this node holds a replica of, as a successor",
            node.replicas.len() as u64,
        ),
        (
            "ringfeed_documents",
            "documents this node holds open as their owner",
            node.docs.count() as u64,
        ),
        (
            "ringfeed_ring_version",
            "the etcd revision of this node's view of the ring",
            view.version,
        ),
        (
            "ringfeed_ring_members",
            "active members on this node's view of the ring",
            active as u64,
        ),
        (
            "ringfeed_replicated",
            "1 when keys have a successor to replicate to (0 on a one-node cluster)",
            u64::from(active > 1),
        ),
        (
            "ringfeed_etcd_lease_ok",
            "1 when the last lease keep-alive reached etcd",
            u64::from(node.registration().is_some_and(|r| r.lease_healthy())),
        ),
    ]
}

/// The node's counters (totals since it started).
fn counted(node: &Node) -> [Metric; 8] {
    let counters = &node.counters;
    let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
    [
        (
            "ringfeed_published_total",
            "updates this node assigned a seq to as their owner",
            read(&counters.published),
        ),
        (
            "ringfeed_unreplicated_total",
            "updates assigned a seq with no successor to replicate to",
            read(&counters.unreplicated),
        ),
        (
            "ringfeed_refused_connections_total",
            "new client connections refused at the connection limit",
            read(&counters.refused_connections),
        ),
        (
            "ringfeed_refused_memory_total",
            "new keys and connections refused past the memory budget",
            read(&counters.refused_memory),
        ),
        (
            "ringfeed_fenced_total",
            "times this node fenced itself (paused with its lease in doubt, or found itself off the ring)",
            read(&counters.fenced),
        ),
        (
            "ringfeed_ring_fresh_reads_total",
            "reads of the ring from etcd made on demand (a request carried a ring version not seen yet); at most one a second",
            node.membership.fresh_reads(),
        ),
        (
            "ringfeed_doc_snapshots_total",
            "document snapshots this node wrote to the store",
            read(&counters.doc_snapshots),
        ),
        (
            "ringfeed_doc_refused_total",
            "document editors closed for a malformed message, an update over the limit or an awareness flood",
            read(&counters.doc_refused),
        ),
    ]
}

/// The labelled counters and the latency histograms.
fn labelled_and_histograms(node: &Node, body: &mut String) {
    let counters = &node.counters;
    body.push_str(
        "# HELP ringfeed_connections_open client connections open, by transport (ws, sse, poll: waiting polls, quic, doc: document editors)\n\
         # TYPE ringfeed_connections_open gauge\n",
    );
    for transport in crate::node::Transport::ALL {
        body.push_str(&format!(
            "ringfeed_connections_open{{transport=\"{}\"}} {}\n",
            transport.name(),
            counters.open.get(transport)
        ));
    }
    process_metrics(body);
    let hot = node.hot_keys();
    body.push_str(
        "# HELP ringfeed_hot_key_updates_per_second the hottest keys' update rates (top 20, between the last two samples)\n\
         # TYPE ringfeed_hot_key_updates_per_second gauge\n",
    );
    for (key, rate) in &hot.by_rate {
        body.push_str(&format!(
            "ringfeed_hot_key_updates_per_second{{key=\"{}\"}} {rate:.2}\n",
            label(key)
        ));
    }
    body.push_str(
        "# HELP ringfeed_hot_key_subscribers the keys with the most subscribers (top 20)\n\
         # TYPE ringfeed_hot_key_subscribers gauge\n",
    );
    for (key, n) in &hot.by_subscribers {
        body.push_str(&format!(
            "ringfeed_hot_key_subscribers{{key=\"{}\"}} {n}\n",
            label(key)
        ));
    }
    body.push_str(
        "# HELP ringfeed_tickets_refused_total client tickets refused (401 / close 4401), by reason\n\
         # TYPE ringfeed_tickets_refused_total counter\n",
    );
    for (reason, count) in counters.tickets_refused.read() {
        body.push_str(&format!(
            "ringfeed_tickets_refused_total{{reason=\"{reason}\"}} {count}\n"
        ));
    }
    body.push_str(&format!(
        "# HELP ringfeed_api_tokens_refused_total requests refused for a missing or wrong API token\n\
         # TYPE ringfeed_api_tokens_refused_total counter\n\
         ringfeed_api_tokens_refused_total {}\n",
        counters.tokens_refused.load(Ordering::Relaxed)
    ));
    body.push_str(&format!(
        "# HELP ringfeed_auth_throttled_total authentications refused unread (429 / close 4429): their address was past its failures\n\
         # TYPE ringfeed_auth_throttled_total counter\n\
         ringfeed_auth_throttled_total {}\n",
        counters.auth_throttled.load(Ordering::Relaxed)
    ));
    body.push_str(&format!(
        "# HELP ringfeed_peer_input_refused_total replicated or handed-off key states refused for being malformed (not stored)\n\
         # TYPE ringfeed_peer_input_refused_total counter\n\
         ringfeed_peer_input_refused_total {}\n",
        counters.peer_input_refused.load(Ordering::Relaxed)
    ));
    body.push_str(
        "# HELP ringfeed_client_violations_total WebSocket clients closed (1008) for breaking a per-connection bound\n\
         # TYPE ringfeed_client_violations_total counter\n",
    );
    for (bound, count) in counters.violations.read() {
        body.push_str(&format!(
            "ringfeed_client_violations_total{{bound=\"{bound}\"}} {count}\n"
        ));
    }
    counters.deliver.render(
        "ringfeed_deliver_seconds",
        "a Deliver request from a router, from its arrival to its answer (replication included)",
        body,
    );
    counters.replication.render(
        "ringfeed_replication_seconds",
        "a replication batch, from being sent to the successor to its answer (retries included)",
        body,
    );
}
