//! Proxying a client to its key's owner: always for `/v1/doc` (stock y-websocket
//! clients follow no redirect), and for `/v1/connect`, `/v1/sse` and `/v1/poll` with
//! `--non-owner proxy` (clients that reach the cluster through one address).
//!
//! The proxying node connects to the owner — over TLS with the cluster's CA when the
//! owner serves https — and passes everything through, one message (WebSocket) or one
//! body chunk (HTTP, hyper's flow control) at a time: no buffer grows. A proxied
//! client holds one of the proxying node's connection permits. Where the owner would
//! send the client elsewhere, the proxy keeps it here: a `redirect` frame's URL is
//! rewritten to the address the client used (it reconnects here, resuming, and is
//! proxied to the new owner), and a 307 is followed by the proxy itself.

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use ringfeed_router::ring::Member;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::{refused, unavailable};
use crate::node::Node;
use crate::peers::Peers;
use crate::protocol::close::CloseCode;

/// How long connecting to the owner (TCP, TLS, the WebSocket or HTTP handshake) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Most redirects a proxied request follows before giving up.
const MAX_HOPS: usize = 3;
/// Request headers passed on to the owner.
const PASSED: [header::HeaderName; 4] = [
    header::AUTHORIZATION,
    header::ACCEPT,
    header::ORIGIN,
    header::USER_AGENT,
];
/// Response headers passed back to the client.
const RETURNED: [header::HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CACHE_CONTROL,
    header::RETRY_AFTER,
    header::WWW_AUTHENTICATE,
];

/// A connection to an owner, plain or TLS.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to the node at `base` (`http://host:port`, `https://…`, `ws://…`, `wss://…`):
/// TLS for https/wss, with the cluster's CA (a node without one cannot reach them).
pub(super) async fn dial(node: &Node, base: &str) -> io::Result<Box<dyn Io>> {
    let (tls, addr) = match base.split_once("://") {
        Some(("https" | "wss", addr)) => (true, addr),
        Some(("http" | "ws", addr)) => (false, addr),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, base.to_owned())),
    };
    let addr = addr.split('/').next().unwrap_or(addr).to_owned();
    let connect = async {
        let tcp = TcpStream::connect(&addr).await?;
        let _ = tcp.set_nodelay(true);
        if !tls {
            return Ok(Box::new(tcp) as Box<dyn Io>);
        }
        let Peers::Tls(config) = &node.peers else {
            return Err(io::Error::other(
                "the owner serves TLS, and this node has no CA",
            ));
        };
        let mut config = (**config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ringfeed_router::tls::server_name(&addr)?;
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await?;
        Ok(Box::new(stream) as Box<dyn Io>)
    };
    tokio::time::timeout(DIAL_TIMEOUT, connect)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// The tungstenite settings of both sockets of a relayed `/v1/connect` client: small
/// read buffers, each message written at once, and room for the largest frame either
/// side may send (the owner enforces the client's own limit).
pub(super) fn relay_config(node: &Node) -> WebSocketConfig {
    let update = node.config.docs.doc_max_update.max(node.config.max_payload);
    let max = node
        .config
        .max_frame
        .max(update.div_ceil(3) * 4 + 64 * 1024);
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(max)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Why a WebSocket to the owner was not opened.
#[derive(Debug)]
pub(super) enum DialError {
    /// The owner answered the upgrade with this status (a refused ticket, say).
    Refused(StatusCode),
    Io(io::Error),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Refused(status) => write!(f, "the owner answered {status}"),
            DialError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Connects a WebSocket to `url` on the node at `base`.
pub(super) async fn dial_ws(
    node: &Node,
    base: &str,
    url: &str,
    config: WebSocketConfig,
) -> Result<WebSocketStream<Box<dyn Io>>, DialError> {
    let stream = dial(node, base).await.map_err(DialError::Io)?;
    let handshake = tokio_tungstenite::client_async_with_config(url, stream, Some(config));
    match tokio::time::timeout(DIAL_TIMEOUT, handshake).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            Err(DialError::Refused(response.status()))
        }
        Ok(Err(e)) => Err(DialError::Io(io::Error::other(e))),
        Err(_) => Err(DialError::Io(io::Error::from(io::ErrorKind::TimedOut))),
    }
}

/// Relays `client` to `owner`, message for message (one in flight each way), until
/// either side ends; the owner's close is passed on. With `here` (the base URL the
/// client used), a `redirect` frame from the owner is rewritten to point here.
pub(super) async fn relay<S>(
    mut client: WebSocketStream<S>,
    mut owner: WebSocketStream<Box<dyn Io>>,
    here: Option<&str>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            message = client.next() => match message {
                Some(Ok(message @ (Message::Binary(_) | Message::Text(_)))) => {
                    if owner.send(message).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let _ = owner.close(frame).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            message = owner.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let text = match here {
                        Some(here) => rewrite_redirect(text.as_str(), here)
                            .map_or(text, Into::into),
                        None => text,
                    };
                    if client.send(Message::Text(text)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(message @ Message::Binary(_))) => {
                    if client.send(message).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let _ = client.close(frame).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            _ = shutdown.cancelled() => break,
        }
    }
    let frame = CloseFrame {
        code: WsCloseCode::from(CloseCode::Unavailable.code()),
        reason: "the connection to the key's owner ended; reconnect".into(),
    };
    let _ = client.close(Some(frame)).await;
    let _ = owner.close(None).await;
}

/// A `redirect` frame with its URL moved to `here` (same path and query), or `None`
/// for any other frame.
fn rewrite_redirect(text: &str, here: &str) -> Option<String> {
    if !text.starts_with(r#"{"type":"redirect""#) {
        return None;
    }
    let mut frame: serde_json::Value = serde_json::from_str(text).ok()?;
    let url = frame.get("url")?.as_str()?;
    let rest = url.split_once("://")?.1;
    let path = &rest[rest.find('/')?..];
    frame["url"] = format!("{here}{path}").into();
    Some(frame.to_string())
}

/// The base URL (`ws://host` or `wss://host`) a client reached this node at, from its
/// `Host` header.
pub(super) fn here(node: &Node, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let scheme = if node.config.tls.tls_cert.is_some() {
        "wss"
    } else {
        "ws"
    };
    Some(format!("{scheme}://{host}"))
}

/// Answers an HTTP request (`path?query`, the SSE stream or a long poll) with what
/// `owner` answers, following its redirects; the body is streamed as the owner
/// writes it, holding a connection permit.
pub(super) async fn forward(
    node: &Node,
    owner: &Member,
    path_and_query: &str,
    headers: &HeaderMap,
    within: Duration,
) -> Response {
    let permit = match node.admit() {
        Ok(permit) => permit,
        Err(e) => return refused(&e),
    };
    let mut base = owner.http.clone();
    let mut target = path_and_query.to_owned();
    for _ in 0..MAX_HOPS {
        let response = match tokio::time::timeout(within, ask(node, &base, &target, headers)).await
        {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::debug!(%base, error = %e, "the owner cannot be reached");
                return unavailable("the key's owner cannot be reached; retry", 1);
            }
            Err(_) => return unavailable("the key's owner did not answer in time; retry", 1),
        };
        if response.status() == StatusCode::TEMPORARY_REDIRECT {
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| {
                    l.split_once("://")
                        .map(|(s, rest)| (s.to_owned(), rest.to_owned()))
                });
            if let Some((scheme, rest)) = location {
                let split = rest.find('/').unwrap_or(rest.len());
                base = format!("{scheme}://{}", &rest[..split]);
                target = rest[split..].to_owned();
                continue;
            }
        }
        let (parts, body) = response.into_parts();
        let mut answer = Response::builder().status(parts.status);
        for name in RETURNED {
            if let Some(value) = parts.headers.get(&name) {
                answer = answer.header(name, value);
            }
        }
        if parts.headers.get(header::CONTENT_TYPE)
            == Some(&HeaderValue::from_static("text/event-stream"))
        {
            answer = answer.header("x-accel-buffering", "no");
        }
        // The body, chunk by chunk; the permit goes when it ends.
        let chunks =
            futures_util::stream::unfold((body, permit), |(mut body, permit)| async move {
                loop {
                    match body.frame().await? {
                        Ok(frame) => match frame.into_data() {
                            Ok(data) => {
                                return Some((Ok::<Bytes, Infallible>(data), (body, permit)))
                            }
                            Err(_) => continue,
                        },
                        Err(_) => return None,
                    }
                }
            });
        return answer
            .body(Body::from_stream(chunks))
            .unwrap_or_else(|_| unavailable("bad answer from the owner", 1));
    }
    unavailable("the key moved too often; retry", 1)
}

/// One GET of `target` on the node at `base`.
async fn ask(
    node: &Node,
    base: &str,
    target: &str,
    headers: &HeaderMap,
) -> io::Result<http::Response<hyper::body::Incoming>> {
    let stream = dial(node, base).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    node.tasks.spawn(async move {
        let _ = connection.await;
    });
    let host = base.split_once("://").map_or(base, |(_, h)| h);
    let mut request = Request::get(target).header(header::HOST, host);
    for name in PASSED {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    if let Some(value) = headers.get("last-event-id") {
        request = request.header("last-event-id", value);
    }
    let request = request
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(io::Error::other)?;
    sender.send_request(request).await.map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_frame_is_pointed_here_and_other_frames_are_left_alone() {
        let frame = r#"{"type":"redirect","url":"ws://10.0.0.2:8001/v1/connect?key=k&since=4&rv=9","node":"n2","ring_version":9}"#;
        let rewritten = rewrite_redirect(frame, "wss://feeds.example").unwrap();
        let v: serde_json::Value = serde_json::from_str(&rewritten).unwrap();
        assert_eq!(
            v["url"],
            "wss://feeds.example/v1/connect?key=k&since=4&rv=9"
        );
        assert_eq!(v["node"], "n2");
        assert!(
            rewrite_redirect(r#"{"type":"update","key":"k","seq":1,"data":1}"#, "ws://x").is_none()
        );
    }
}
