//! A Rust client for ringfeed.
//!
//! * [`Subscription`] — a WebSocket subscriber to one key that follows `redirect`
//!   frames (at most [`MAX_REDIRECTS`] hops, as docs/protocol.md asks of every client).
//! * [`Frame`] — the server frames, parsed.
//! * [`publisher`] — a `Router` gRPC client for publishing.
//!
//! * [`direct`] — [`direct::Publisher`], publishing straight to each key's owner
//!   (every node serves the public `Router`), with idempotency keys and retries.
//! * [`follow`] — [`follow::Follower`], a subscriber that reconnects by itself
//!   (full-jitter back-off, every close code honoured), resuming gap-free, over
//!   WebSocket or QUIC, optionally straight to the owner.
//! * [`quic`] — a QUIC subscriber (ALPN `ringfeed/1`), trusting a CA or the
//!   certificate digests the ring publishes.
//! * [`routing`] — the ring as any node publishes it: who owns a key, computed here
//!   (so a client connects straight to the owner), each member's share, and what a
//!   change of members would move.
//!
//! The `ringfeed` CLI (`src/main.rs`) is built on them.

pub mod direct;
pub mod follow;
pub mod quic;
pub mod routing;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 3;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("bad url: {0}")]
    Url(String),
    #[error("server closed the connection with {code}: {reason}")]
    Closed { code: u16, reason: String },
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    #[error("timed out")]
    Timeout,
}

/// A server frame (docs/protocol.md *WebSocket frames*).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Frame {
    Welcome {
        key: String,
        node: String,
        epoch: String,
        seq: u64,
        heartbeat_ms: u64,
        /// With authentication on: what to reconnect and follow redirects with,
        /// instead of the ticket.
        #[serde(default)]
        resume: Option<String>,
    },
    Update {
        key: String,
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
    },
    Reset {
        key: String,
        epoch: String,
        seq: u64,
        reason: String,
    },
    Redirect {
        url: String,
        node: String,
        ring_version: u64,
        /// The owner's QUIC address (host:port), when it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic: Option<String>,
    },
    Ack {
        id: serde_json::Value,
        seq: u64,
    },
    Nack {
        id: serde_json::Value,
        code: String,
        message: String,
    },
    Presence {
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        members: Option<Vec<serde_json::Value>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        joined: Option<Vec<serde_json::Value>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        left: Option<Vec<serde_json::Value>>,
    },
    Pong,
    Error {
        code: String,
        message: String,
    },
}

/// What a read from the socket produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Frame(Frame),
    /// The server closed the connection (code 1005 when it gave none).
    Closed {
        code: u16,
        reason: String,
    },
    /// A text frame this client cannot decode (too deep for its JSON parser, say). It
    /// is reported, not fatal: the connection goes on. `seq` is the frame's, when it
    /// names one, so a subscriber still knows where it is.
    Unreadable {
        error: String,
        seq: Option<u64>,
    },
}

/// The `"seq":N` of a frame that could not be decoded, read without a parser.
fn seq_of_unreadable(text: &str) -> Option<u64> {
    const SEQ: &str = "\"seq\":";
    let at = text.find(SEQ)? + SEQ.len();
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The WebSocket URL of `/v1/connect` on `base` (`http://…`, `ws://…` or `host:port`).
pub fn connect_url(base: &str, key: &str, since: Option<(u64, Option<&str>)>) -> String {
    let base = base.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        format!("ws://{base}")
    };
    let mut url = url::Url::parse(&format!("{base}/v1/connect")).expect("a ws url");
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("key", key);
        if let Some((seq, epoch)) = since {
            q.append_pair("since", &seq.to_string());
            if let Some(epoch) = epoch {
                q.append_pair("epoch", epoch);
            }
        }
    }
    url.to_string()
}

/// A live subscription to one key on its owner.
pub struct Subscription {
    socket: Socket,
    /// The welcome the owner sent.
    pub welcome: Frame,
    /// The URL the subscription finally connected to.
    pub url: String,
    /// How many redirects were followed to get here.
    pub redirects: usize,
}

/// TLS for `wss://`, `https://` and gRPC over TLS: the CA that signed the servers'
/// certificates (a cluster's own CA, `.cluster/tls/ca.pem` for `scripts/cluster
/// --secure`).
#[derive(Clone, Debug)]
pub struct Tls {
    config: std::sync::Arc<rustls::ClientConfig>,
    ca_pem: Vec<u8>,
}

impl Tls {
    /// Trusts the CA certificates in the PEM file at `path`.
    pub fn from_ca_file(path: &std::path::Path) -> Result<Tls, ClientError> {
        let pem = std::fs::read(path)
            .map_err(|e| ClientError::Unexpected(format!("CA file {}: {e}", path.display())))?;
        Tls::from_ca_pem(&pem)
    }

    /// Trusts the CA certificates in `pem`.
    pub fn from_ca_pem(pem: &[u8]) -> Result<Tls, ClientError> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let bad = |e: String| ClientError::Unexpected(format!("CA: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        #[allow(deprecated)] // ring, as everywhere in ringfeed (see docs/design.md)
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            config: std::sync::Arc::new(config),
            ca_pem: pem.to_vec(),
        })
    }

    /// The rustls configuration (WebSocket: HTTP/1.1, no ALPN).
    pub fn config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// The CA as PEM, for tonic's TLS.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }
}

impl Subscription {
    /// Connects to `url` and follows redirects until a `welcome`.
    pub async fn connect(url: &str) -> Result<Subscription, ClientError> {
        Subscription::connect_with(url, None).await
    }

    /// [`connect`](Self::connect), trusting `tls`'s CA for `wss://` URLs.
    pub async fn connect_with(url: &str, tls: Option<&Tls>) -> Result<Subscription, ClientError> {
        let mut url = url.to_owned();
        for redirects in 0..=MAX_REDIRECTS {
            let connector = tls.map(|tls| tokio_tungstenite::Connector::Rustls(tls.config.clone()));
            let (mut socket, _) = tokio_tungstenite::connect_async_tls_with_config(
                url.as_str(),
                None,
                true,
                connector,
            )
            .await?;
            match read_event(&mut socket).await? {
                Event::Frame(welcome @ Frame::Welcome { .. }) => {
                    return Ok(Subscription {
                        socket,
                        welcome,
                        url,
                        redirects,
                    });
                }
                Event::Frame(Frame::Redirect { url: next, .. }) => {
                    let _ = socket.close(None).await;
                    url = next;
                }
                Event::Frame(Frame::Error { code, message }) => {
                    let closed = read_event(&mut socket).await;
                    return Err(match closed {
                        Ok(Event::Closed { code, reason }) => ClientError::Closed { code, reason },
                        _ => ClientError::Unexpected(format!("error {code}: {message}")),
                    });
                }
                Event::Frame(other) => return Err(ClientError::Unexpected(format!("{other:?}"))),
                Event::Unreadable { error, .. } => return Err(ClientError::Unexpected(error)),
                Event::Closed { code, reason } => return Err(ClientError::Closed { code, reason }),
            }
        }
        Err(ClientError::TooManyRedirects)
    }

    /// The owner's node id, from the welcome.
    pub fn node(&self) -> &str {
        match &self.welcome {
            Frame::Welcome { node, .. } => node,
            _ => "",
        }
    }

    /// The next frame or close.
    pub async fn next(&mut self) -> Result<Event, ClientError> {
        read_event(&mut self.socket).await
    }

    /// The next frame or close, or `Timeout` after `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Result<Event, ClientError> {
        tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.socket.send(Message::text(text)).await?;
        Ok(())
    }

    /// Publishes `data` on the subscription's key.
    pub async fn publish(&mut self, data: &serde_json::Value, id: &str) -> Result<(), ClientError> {
        let frame = serde_json::json!({"type": "publish", "data": data, "id": id});
        self.send_text(&frame.to_string()).await
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// Reads until a frame or a close; pings and pongs are answered by tungstenite.
pub async fn read_event<S>(socket: &mut WebSocketStream<S>) -> Result<Event, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                return Ok(match serde_json::from_str::<Frame>(text.as_str()) {
                    Ok(frame) => Event::Frame(frame),
                    Err(e) => Event::Unreadable {
                        error: e.to_string(),
                        seq: seq_of_unreadable(text.as_str()),
                    },
                });
            }
            Some(Ok(Message::Close(close))) => {
                let (code, reason) = close.map_or((1005, String::new()), |c| {
                    (u16::from(c.code), c.reason.to_string())
                });
                return Ok(Event::Closed { code, reason });
            }
            Some(Ok(_)) => continue,
            Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)))
            | Some(Err(WsError::Io(_)))
            | Some(Err(WsError::ConnectionClosed))
            | Some(Err(WsError::AlreadyClosed))
            | None => {
                return Ok(Event::Closed {
                    code: 1006,
                    reason: "connection dropped".into(),
                })
            }
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Asks the node at `base` (`http://…` or `https://…`) for a ticket for `key` with the
/// API token `api_token` (`POST /v1/tickets`), for subject `sub`, valid `ttl_s`
/// seconds, with every right; over TLS trusting `tls`'s CA.
pub async fn request_ticket(
    base: &str,
    api_token: &str,
    key: &str,
    sub: &str,
    ttl_s: u64,
    tls: Option<&Tls>,
) -> Result<String, ClientError> {
    let body = serde_json::json!({
        "sub": sub, "key": key, "ttl_s": ttl_s, "publish": true, "presence": true,
    })
    .to_string();
    let bearer = format!("Bearer {api_token}");
    let call = Call {
        method: "POST",
        path: "/v1/tickets",
        headers: &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        body: &body,
    };
    let answer = http_json(base, call, tls).await?;
    answer["ticket"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| ClientError::Unexpected("POST /v1/tickets: no ticket in the answer".into()))
}

/// One HTTP/1.1 request to a node.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a str,
}

impl<'a> Call<'a> {
    /// `GET path`.
    pub fn get(path: &'a str) -> Call<'a> {
        Call {
            method: "GET",
            path,
            headers: &[],
            body: "",
        }
    }
}

/// `call` to the node at `base` (`http://…` or `https://…`, TLS trusting `tls`'s CA),
/// within 10 s; a 200's body as JSON, anything else an error.
pub async fn http_json(
    base: &str,
    call: Call<'_>,
    tls: Option<&Tls>,
) -> Result<serde_json::Value, ClientError> {
    let text = http_text(base, call, tls).await?;
    serde_json::from_str(text.trim())
        .map_err(|e| ClientError::Unexpected(format!("{} {}: {e}", call.method, call.path)))
}

/// [`http_json`]'s request, answering a 200's body as text.
pub async fn http_text(
    base: &str,
    call: Call<'_>,
    tls: Option<&Tls>,
) -> Result<String, ClientError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Call {
        method,
        path,
        headers,
        body,
    } = call;
    let bad = |e: String| ClientError::Unexpected(format!("{method} {path}: {e}"));
    let (https, rest) = match (base.strip_prefix("https://"), base.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        _ => (false, base),
    };
    let host = rest.trim_end_matches('/');
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let mut raw = Vec::new();
    let exchange = async {
        let tcp = TcpStream::connect(host)
            .await
            .map_err(|e| bad(e.to_string()))?;
        if https {
            let tls = tls.ok_or_else(|| bad("https needs a CA".into()))?;
            let name = host.rsplit_once(':').map_or(host, |(h, _)| h).to_owned();
            let name =
                rustls::pki_types::ServerName::try_from(name).map_err(|e| bad(e.to_string()))?;
            let mut stream = tokio_rustls::TlsConnector::from(tls.config())
                .connect(name, tcp)
                .await
                .map_err(|e| bad(e.to_string()))?;
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| bad(e.to_string()))?;
            // A TLS peer may close without close_notify: what arrived is the answer.
            let _ = stream.read_to_end(&mut raw).await;
        } else {
            let mut stream = tcp;
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| bad(e.to_string()))?;
            stream
                .read_to_end(&mut raw)
                .await
                .map_err(|e| bad(e.to_string()))?;
        }
        Ok::<_, ClientError>(())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| bad("timed out".into()))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, answer) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no answer".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(bad(head.lines().next().unwrap_or("").to_owned()
            + " "
            + answer.trim()));
    }
    Ok(answer.to_owned())
}

/// Publishing through a router.
pub mod publisher {
    use ringfeed_proto::v1::router_client::RouterClient;
    use ringfeed_proto::v1::PublishRequest;
    use tonic::transport::Channel;

    /// Connects a `Router` client to `addr` (`host:port` or `http://host:port`).
    pub async fn connect(addr: &str) -> Result<RouterClient<Channel>, tonic::transport::Error> {
        connect_with(addr, None).await
    }

    /// [`connect`], over TLS trusting `tls`'s CA when it is given (`addr` may then be
    /// `host:port` or `https://host:port`).
    pub async fn connect_with(
        addr: &str,
        tls: Option<&super::Tls>,
    ) -> Result<RouterClient<Channel>, tonic::transport::Error> {
        let bare = addr
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        let scheme = if tls.is_some() { "https" } else { "http" };
        // No Nagle: a request larger than a segment would otherwise wait for the
        // peer's delayed ACK (~40 ms) before its last part goes out.
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{bare}"))?
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            let host = bare.rsplit_once(':').map_or(bare, |(h, _)| h);
            endpoint = endpoint.tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(tls.ca_pem()))
                    .domain_name(host.trim_start_matches('[').trim_end_matches(']')),
            )?;
        }
        Ok(RouterClient::new(endpoint.connect().await?))
    }

    /// A JSON publish of `data` to `key`.
    pub fn json(key: &str, data: &serde_json::Value) -> PublishRequest {
        PublishRequest {
            key: key.to_owned(),
            data: data.to_string().into_bytes(),
            content_type: "application/json".into(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame too deep for serde_json is reported with its seq, not an error.
    #[tokio::test]
    async fn an_unreadable_frame_is_reported_and_the_connection_goes_on() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut server = WebSocketStream::from_raw_socket(
            a,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let mut client = WebSocketStream::from_raw_socket(
            b,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let deep = format!(
            r#"{{"type":"update","key":"k","seq":7,"data":{}1{}}}"#,
            "[".repeat(300),
            "]".repeat(300)
        );
        server.send(Message::text(deep)).await.unwrap();
        server
            .send(Message::text(r#"{"type":"pong"}"#))
            .await
            .unwrap();
        match read_event(&mut client).await.unwrap() {
            Event::Unreadable { seq, .. } => assert_eq!(seq, Some(7)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read_event(&mut client).await.unwrap(),
            Event::Frame(Frame::Pong)
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            connect_url("http://h:1", "user:1", None),
            "ws://h:1/v1/connect?key=user%3A1"
        );
        assert_eq!(
            connect_url("h:1/", "k", Some((4, Some("E")))),
            "ws://h:1/v1/connect?key=k&since=4&epoch=E"
        );
    }

    #[test]
    fn frames_parse() {
        let f: Frame =
            serde_json::from_str(r#"{"type":"update","key":"k","seq":3,"data":{"a":1}}"#).unwrap();
        assert!(matches!(f, Frame::Update { seq: 3, .. }));
        let f: Frame = serde_json::from_str(
            r#"{"type":"redirect","url":"ws://x","node":"n2","ring_version":9}"#,
        )
        .unwrap();
        assert!(matches!(
            f,
            Frame::Redirect {
                ring_version: 9,
                ..
            }
        ));
    }
}
