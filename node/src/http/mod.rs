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

mod ops;
use ops::{metrics, readyz, ring, route};
mod dashboard;
mod doc;
pub mod poll;
mod proxy;
mod reply;
pub mod sse;
mod tickets;

pub use reply::{client_request, elsewhere, redirect_307, refused, unavailable, ApiError};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{header, HeaderValue, Method, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::NonOwner;
use crate::node::Node;
use crate::protocol::close::CloseCode;
use crate::protocol::params::ClientQuery;
use crate::session;
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

/// The address a request came from, put in its extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// The address `request` came from, if the accept loop said.
pub fn source(request: &Request) -> Option<std::net::IpAddr> {
    request.extensions().get::<Peer>().map(|p| p.0.ip())
}

/// The axum router of every node.
pub fn router(node: Arc<Node>) -> axum::Router {
    axum::Router::new()
        .route("/v1/connect", get(connect))
        .route("/v1/sse", get(sse::sse))
        .route("/v1/poll", get(poll::poll))
        .route("/v1/route", get(route))
        .route("/v1/ring", get(ring))
        .route("/v1/hot", get(ops::hot_keys))
        .route(
            "/client.js",
            get(|| async { script(CLIENT_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/client.d.ts",
            get(|| async { script(CLIENT_D_TS, "application/typescript; charset=utf-8") }),
        )
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::module))
        .route("/v1/dashboard", get(dashboard::stream))
        .route("/v1/cluster", get(dashboard::once))
        .route("/v1/tickets", axum::routing::post(tickets::issue))
        .route("/v1/doc/{*name}", get(doc::doc))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(node.clone(), cors))
        .layer(axum::Extension(crate::cluster::figures::Dashboard::new(
            node.clone(),
        )))
        .with_state(node)
}

/// The browser client (docs/protocol.md), an ES module with no dependencies.
const CLIENT_JS: &str = include_str!("client.js");
/// Its TypeScript declarations.
const CLIENT_D_TS: &str = include_str!("client.d.ts");

/// A static text file with its content type; revalidated on each use (it changes with
/// the node's version).
fn script(body: &'static str, content_type: &'static str) -> axum::response::Response {
    (
        [
            (http::header::CONTENT_TYPE, content_type),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
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

/// Accepts connections until shutdown, then lets open requests finish. With `tls`,
/// every connection is TLS first, then HTTP/2 or HTTP/1.1 as ALPN chose (WebSocket
/// upgrades are HTTP/1.1).
pub async fn serve(node: Arc<Node>, listener: TcpListener, tls: Option<Arc<ServerConfig>>) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
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
        let app = TowerToHyperService::new(app.clone());
        let service = hyper::service::service_fn(move |mut request: http::Request<_>| {
            request.extensions_mut().insert(Peer(peer));
            hyper::service::Service::call(&app, request)
        });
        let shutdown = node.shutdown.clone();
        let handshake_timeout = node.config.handshake_timeout();
        let span = tracing::debug_span!("http", %peer);
        let acceptor = acceptor.clone();
        let conn = async move {
            match acceptor {
                None => {
                    serve_http1(TokioIo::new(stream), service, handshake_timeout, shutdown).await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    };
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let io = TokioIo::new(stream);
                    if h2 {
                        serve_http2(io, service, shutdown).await;
                    } else {
                        serve_http1(io, service, handshake_timeout, shutdown).await;
                    }
                }
            }
            drop(permit);
        };
        node.tasks.spawn(conn.instrument(span));
    }
}

/// Serves HTTP/1.1 (with WebSocket upgrades) on one connection until it ends; at
/// shutdown, open requests finish.
async fn serve_http1<I, S>(io: I, service: S, header_timeout: Duration, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + 'static,
    S::Future: Send + 'static,
    S::ResBody: 'static + Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    <S::ResBody as hyper::body::Body>::Data: Send,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service)
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
        tracing::debug!(error = %e, "http connection ended");
    }
}

/// Serves HTTP/2 (TLS with ALPN `h2`) on one connection: many SSE streams and polls at
/// once on one connection, past browsers' six-connections-per-host limit.
async fn serve_http2<I, S>(io: I, service: S, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + 'static,
    S::Future: Send + 'static,
    S::ResBody: 'static + Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    <S::ResBody as hyper::body::Body>::Data: Send,
{
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http/2 connection ended");
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
    // The dashboard is for this node's own page: other origins may not read it.
    if matches!(
        request.uri().path(),
        "/" | "/dashboard.js" | "/v1/dashboard" | "/v1/cluster"
    ) {
        return next.run(request).await;
    }
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
    if let Some(refusal) = refuse_upgrade(&node, &request) {
        return refusal;
    }
    // A draining node says so on the socket (docs/protocol.md keeps an HTTP 503 for the
    // connection limit): a redirect (4300) for a key the ring gives another node, else
    // 4503, so the client asks /v1/route elsewhere rather than retrying here.
    let permit = match node.admit() {
        Ok(permit) => permit,
        Err(e) => return refused(&e),
    };
    // With --non-owner proxy, a key another node owns is proxied there.
    let upstream = match &query {
        Ok(q) if node.config.non_owner == NonOwner::Proxy => proxied(&node, q).await,
        _ => None,
    };
    let here = proxy::here(&node, request.headers());
    let (on_upgrade, switching) = match switch_protocols(&mut request) {
        Ok(switched) => switched,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some((base, url)) = upstream {
        node.tasks.spawn(proxy_connect(
            node.clone(),
            on_upgrade,
            base,
            url,
            here,
            permit,
        ));
        return switching;
    }
    let span = tracing::debug_span!("connection", transport = "ws", node = %node.id, key = tracing::field::Empty);
    node.tasks.spawn(ws::serve(Box::new(ws::Connect {
        node: node.clone(),
        source: source(&request),
        on_upgrade,
        query,
        permit,
        span,
    })));
    switching
}

/// Where a `/v1/connect` client is proxied to (`--non-owner proxy`): the owner's base
/// URL and the same request there, when another node owns the key.
async fn proxied(node: &Node, query: &ClientQuery) -> Option<(String, String)> {
    let key = ringfeed_router::key::Key::parse(query.key.as_deref()?).ok()?;
    match session::place(node, &key, query.rv).await {
        session::Placement::Moved { owner, .. } => Some((
            owner.http.clone(),
            format!("{}/v1/connect?{}", owner.ws_base(), query.raw),
        )),
        _ => None,
    }
}

/// A `/v1/connect` client proxied to the owner.
async fn proxy_connect(
    node: Arc<Node>,
    on_upgrade: OnUpgrade,
    base: String,
    url: String,
    here: Option<String>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let config = proxy::relay_config(&node);
    let mut client = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        Some(config),
    )
    .await;
    match proxy::dial_ws(&node, &base, &url, config).await {
        Ok(owner) => proxy::relay(client, owner, here.as_deref(), node.shutdown.clone()).await,
        Err(e) => {
            tracing::debug!(url = %crate::protocol::redirect::redacted(&url), error = %e, "the key's owner cannot be reached");
            let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Unavailable.code().into(),
                reason: "the key's owner cannot be reached; reconnect".into(),
            };
            let _ = client.close(Some(frame)).await;
        }
    }
    drop(permit);
}

/// What every WebSocket upgrade refuses before anything else: a request that is not an
/// upgrade (426), or one from an origin not allowed (403).
fn refuse_upgrade(node: &Node, request: &Request) -> Option<Response> {
    if !is_upgrade(request) {
        return Some(
            ApiError(
                StatusCode::UPGRADE_REQUIRED,
                "expected a WebSocket upgrade (version 13)".into(),
            )
            .into_response(),
        );
    }
    let origin = request.headers().get(header::ORIGIN)?;
    (!origin.to_str().is_ok_and(|o| node.config.origin_allowed(o)))
        .then(|| ApiError(StatusCode::FORBIDDEN, "origin not allowed".into()).into_response())
}

/// Takes the upgrade: the connection once hyper hands it over, and the 101 answer to
/// send now (400 without a `Sec-WebSocket-Key`).
fn switch_protocols(request: &mut Request) -> Result<(OnUpgrade, Response), ApiError> {
    let Some(accept) = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return Err(ApiError::bad_request("missing Sec-WebSocket-Key"));
    };
    let on_upgrade = hyper::upgrade::on(request);
    let switching = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("a valid 101 response");
    Ok((on_upgrade, switching))
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
