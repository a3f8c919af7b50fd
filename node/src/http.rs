//! The HTTP listener: WebSocket upgrades, route/ring/health endpoints.
//!
//! Connections are accepted by our own loop (bounded, with a header-read timeout and a
//! graceful stop) and served by hyper with an axum router.
//!
//! Health does not share the connection budget. Past it (the connection limit plus
//! [`ACCEPT_SLACK`]), a connection is still accepted, into a small [`Reserve`] whose
//! connections get one request, a [`RESERVE_HEADER_TIMEOUT`] to send it, and only
//! `/healthz`, `/readyz` and `/metrics` answered (anything else: 503 + `Retry-After`).
//! When the reserve is full the oldest connection in it is closed for the newcomer, so
//! a flood of idle connections cannot keep a liveness probe out: it is answered within
//! a second however many connections are open.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use http::{header, HeaderValue, Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use ringfeed_router::key::{self, Key};
use ringfeed_router::ring::Member;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;

use crate::node::{redirect_url, Node};
use crate::protocol::params::ClientQuery;
use crate::session::{self, Placement};
use crate::ws;

/// Raw TCP connections accepted beyond the client-connection limit, so that a node at
/// its limit can still answer 503 and serve health checks.
const ACCEPT_SLACK: usize = 512;

/// Connections accepted past the budget, for health checks (see the module's doc).
const RESERVE: usize = 64;

/// How long a connection in the reserve has to send its request…
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// …and to be answered (a `/metrics` reader that stops reading is not waited for).
const RESERVE_LIFETIME: Duration = Duration::from_secs(5);

/// An error answer: `{"error": "…"}` with a status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// The axum router of every node.
pub fn router(node: Arc<Node>) -> axum::Router {
    axum::Router::new()
        .route("/v1/connect", get(connect))
        .route("/v1/sse", get(crate::sse::sse))
        .route("/v1/poll", get(crate::poll::poll))
        .route("/v1/route", get(route))
        .route("/v1/ring", get(ring))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(node.clone(), cors))
        .with_state(node)
}

/// What a connection in the reserve is answered: health, readiness and metrics.
fn reserve_router(node: Arc<Node>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { unavailable("connection limit reached", 1) })
        .with_state(node)
}

/// The connections accepted past the budget, oldest first; each can be told to close.
#[derive(Default)]
struct Reserve {
    slots: std::sync::Mutex<VecDeque<(u64, CancellationToken)>>,
    next: AtomicU64,
}

impl Reserve {
    /// A place for a new connection, closing the oldest one if the reserve is full.
    fn admit(&self) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut slots = self.slots.lock().expect("reserve lock poisoned");
        if slots.len() >= RESERVE {
            if let Some((_, oldest)) = slots.pop_front() {
                oldest.cancel();
            }
        }
        slots.push_back((id, token.clone()));
        (id, token)
    }

    /// Gives back connection `id`'s place.
    fn leave(&self, id: u64) {
        let mut slots = self.slots.lock().expect("reserve lock poisoned");
        if let Some(at) = slots.iter().position(|(slot, _)| *slot == id) {
            slots.remove(at);
        }
    }
}

/// Accepts connections until shutdown, then lets open requests finish.
pub async fn serve(node: Arc<Node>, listener: TcpListener) {
    let app = router(node.clone());
    let reserve_app = reserve_router(node.clone());
    let reserve = Arc::new(Reserve::default());
    let accepted = Arc::new(Semaphore::new(node.config.max_connections + ACCEPT_SLACK));
    loop {
        let (stream, peer) = tokio::select! {
            _ = node.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = accepted.clone().try_acquire_owned() else {
            serve_reserved(&node, &reserve, &reserve_app, stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        if node.config.socket_send_buffer > 0 {
            let _ = socket2::SockRef::from(&stream)
                .set_send_buffer_size(node.config.socket_send_buffer);
        }
        let service = TowerToHyperService::new(app.clone());
        let shutdown = node.shutdown.clone();
        let handshake_timeout = node.config.handshake_timeout();
        node.tasks.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
            drop(permit);
        });
    }
}

/// Serves one connection accepted past the budget: one request, health only.
fn serve_reserved(
    node: &Arc<Node>,
    reserve: &Arc<Reserve>,
    app: &axum::Router,
    stream: tokio::net::TcpStream,
) {
    let (id, evicted) = reserve.admit();
    let service = TowerToHyperService::new(app.clone());
    let reserve = reserve.clone();
    let shutdown = node.shutdown.clone();
    node.tasks.spawn(async move {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(RESERVE_HEADER_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), service);
        let _ = tokio::time::timeout(RESERVE_LIFETIME, async {
            tokio::select! {
                _ = conn => {}
                _ = evicted.cancelled() => {}
                _ = shutdown.cancelled() => {}
            }
        })
        .await;
        reserve.leave(id);
    });
}

/// CORS for browsers on other origins (docs/protocol.md *Browsers*).
async fn cors(
    State(node): State<Arc<Node>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let allowed = match &origin {
        None => None,
        Some(_) if node.config.allowed_origins.iter().any(|o| o == "*") => {
            Some(HeaderValue::from_static("*"))
        }
        Some(o) => o
            .to_str()
            .ok()
            .filter(|o| node.config.origin_allowed(o))
            .map(|_| o.clone()),
    };
    if let Some(value) = allowed {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("ETag, Retry-After"),
        );
        if preflight {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(
                    "Authorization, Content-Type, Last-Event-ID, If-None-Match",
                ),
            );
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }
    response
}

/// `GET /v1/connect`: the WebSocket upgrade. Refusals that need no socket (not an
/// upgrade, a foreign origin, the connection limit) are HTTP answers; everything about
/// the key and this node's state is said on the socket (close 4400, redirect + 4300,
/// 4503 while draining).
async fn connect(State(node): State<Arc<Node>>, mut request: Request) -> Response {
    // A bad parameter is said on the socket (4400) once upgraded.
    let query = ClientQuery::parse(request.uri().query());
    if !is_upgrade(&request) {
        return ApiError(
            StatusCode::UPGRADE_REQUIRED,
            "expected a WebSocket upgrade (version 13)".into(),
        )
        .into_response();
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        if !origin.to_str().is_ok_and(|o| node.config.origin_allowed(o)) {
            return ApiError(StatusCode::FORBIDDEN, "origin not allowed".into()).into_response();
        }
    }
    // A draining node says so on the socket (docs/protocol.md keeps an HTTP 503 for the
    // connection limit): a redirect (4300) for a key the ring gives another node, else
    // 4503, so the client asks /v1/route elsewhere rather than retrying here.
    let permit = match node.admit() {
        Ok(permit) => permit,
        Err(why) => return unavailable(why, 1),
    };
    let Some(accept) = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return ApiError::bad_request("missing Sec-WebSocket-Key").into_response();
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    node.tasks.spawn(ws::serve(Box::new(ws::Connect {
        node: node.clone(),
        on_upgrade,
        query,
        permit,
    })));
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("a valid 101 response")
}

fn is_upgrade(request: &Request) -> bool {
    let headers = request.headers();
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    request.method() == Method::GET
        && has(header::CONNECTION, "upgrade")
        && has(header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13")
}

/// 503 with `Retry-After`.
pub fn unavailable(message: &str, retry_after_s: u32) -> Response {
    let mut response = ApiError(StatusCode::SERVICE_UNAVAILABLE, message.into()).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    response
}

/// 307 to the same `path` and query on `base` (the owner's HTTP URL), with `rv` set.
pub fn redirect_307(base: &str, path: &str, query: &str, ring_version: u64) -> Response {
    let location = redirect_url(base, path, query, ring_version);
    let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The query and key of a plain-HTTP client request (`/v1/sse`, `/v1/poll`); a bad
/// one is a 400 naming the problem.
pub fn client_request(request: &Request) -> Result<(ClientQuery, Key), ApiError> {
    let query = ClientQuery::parse(request.uri().query()).map_err(ApiError::bad_request)?;
    let raw = query
        .key
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("missing key"))?;
    let key = Key::parse(raw).map_err(|e| ApiError::bad_request(format!("invalid key: {e}")))?;
    Ok((query, key))
}

/// `None` when this node owns `key`; otherwise the answer that sends the client on:
/// a 307 to the same `path` on the owner, or a 503 when no owner is known.
pub async fn elsewhere(
    node: &Node,
    key: &Key,
    query: &ClientQuery,
    path: &str,
) -> Option<Response> {
    match session::place(node, key, query.rv).await {
        Placement::Here => None,
        Placement::Moved { owner, version } => {
            Some(redirect_307(&owner.http, path, &query.raw, version))
        }
        Placement::Unknown => Some(unavailable("no owner known for this key", 1)),
    }
}

/// The owner's record as `/v1/route` shows it.
fn owner_json(m: &Member) -> serde_json::Value {
    json!({ "id": m.id.0, "http": m.http, "ws": m.ws_base(), "quic": m.quic, "grpc": m.grpc })
}

/// `GET /v1/route?key=K`.
async fn route(State(node): State<Arc<Node>>, request: Request) -> Result<Response, ApiError> {
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
async fn ring(State(node): State<Arc<Node>>) -> Response {
    let view = node.membership.view();
    Json(json!({
        "cluster": node.membership.cluster(),
        "ring_version": view.version,
        "ring_id": view.ring.id().0,
        "members": view.ring.members(),
    }))
    .into_response()
}

/// `GET /readyz`: 200 when registered, on the last known ring, not draining.
async fn readyz(State(node): State<Arc<Node>>) -> Response {
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
async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let view = node.membership.view();
    let active = view
        .ring
        .members()
        .iter()
        .filter(|m| m.state == ringfeed_router::ring::MemberState::Active)
        .count();
    let connections = node.config.max_connections - node.connections.available_permits();
    let gauges: [(&str, &str, u64); 11] = [
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
            "1 when the node is registered, on the ring and not draining",
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
    ];
    let counters = &node.counters;
    let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let counted: [(&str, &str, u64); 6] = [
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
    ];
    let mut body = String::new();
    let typed = gauges
        .into_iter()
        .map(|g| (g, "gauge"))
        .chain(counted.into_iter().map(|c| (c, "counter")));
    for ((name, help, value), kind) in typed {
        body.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
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
        &mut body,
    );
    counters.replication.render(
        "ringfeed_replication_seconds",
        "a replication batch, from being sent to the successor to its answer (retries included)",
        &mut body,
    );
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
