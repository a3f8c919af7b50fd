//! A QUIC subscriber (docs/protocol.md *QUIC*): ALPN `ringfeed/1`, one bidirectional
//! stream, JSON frames each prefixed with its length (u32, big-endian); `hello` first,
//! then the frames of the WebSocket protocol. A redirect is the `redirect` frame with
//! the owner's `quic` address, then the connection closed with 4300.
//!
//! Servers are trusted by a CA ([`Tls`]) or by the SHA-256 of their certificates, as
//! the nodes publish them in their member records ([`Trust::Pins`]: a node that made
//! its own certificate at start).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::routing::RingView;
use crate::{ClientError, Event, Frame, Tls, MAX_REDIRECTS};

/// The application protocol.
pub const ALPN: &[u8] = b"ringfeed/1";

/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest frame this client reads.
const MAX_FRAME: usize = 16 << 20;

/// How a QUIC client trusts a node's certificate.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Signed by this CA (a cluster with `--tls-cert`).
    Ca(Tls),
    /// One of these SHA-256 digests (lowercase hex): the members' `quic_sha256`.
    Pins(BTreeSet<String>),
}

impl Trust {
    /// Pins every member's published certificate digest.
    pub fn pins_of(ring: &RingView) -> Trust {
        Trust::Pins(
            ring.ring
                .members()
                .iter()
                .filter_map(|m| m.quic_sha256.clone())
                .collect(),
        )
    }

    /// The quinn client configuration offering `alpn` (a client offers [`ALPN`]).
    pub fn client_config(&self, alpn: &[u8]) -> Result<quinn::ClientConfig, ClientError> {
        #[allow(deprecated)] // ring, as everywhere in ringfeed (see docs/design.md)
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let bad = |e: String| ClientError::Unexpected(format!("QUIC TLS: {e}"));
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(e.to_string()))?;
        let mut config = match self {
            Trust::Ca(tls) => {
                let mut config = (*tls.config()).clone();
                config.alpn_protocols.clear();
                config
            }
            Trust::Pins(pins) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    pins: pins.clone(),
                    provider,
                }))
                .with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        let crypto = QuicClientConfig::try_from(config).map_err(|e| bad(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(10)));
        client.transport_config(Arc::new(transport));
        Ok(client)
    }
}

/// Accepts a server whose certificate's SHA-256 is pinned; its handshake signatures
/// are checked as usual.
#[derive(Debug)]
struct Pinned {
    pins: BTreeSet<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: String = Sha256::digest(end_entity)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if self.pins.contains(&digest) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate {digest} is not one the ring publishes"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("QUIC is TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a QUIC client says first: the same fields as the WebSocket query.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Hello {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub presence: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rv: Option<u64>,
}

/// A QUIC subscription to one key, once welcomed.
pub struct QuicSubscription {
    endpoint: Endpoint,
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
    pub welcome: Frame,
    /// Where it ended up (host:port).
    pub addr: String,
    /// How many redirects were followed to get here.
    pub redirects: usize,
}

impl QuicSubscription {
    /// Connects to the node at `addr` (host:port), says `hello` and follows redirects
    /// (at most [`MAX_REDIRECTS`]) until a `welcome`.
    pub async fn connect(
        addr: &str,
        hello: &Hello,
        trust: &Trust,
    ) -> Result<QuicSubscription, ClientError> {
        let mut addr = addr.to_owned();
        let mut hello = hello.clone();
        for redirects in 0..=MAX_REDIRECTS {
            let (endpoint, connection) = dial(&addr, trust, ALPN).await?;
            let (mut send, recv) = connection
                .open_bi()
                .await
                .map_err(|e| closed_or(e, "QUIC stream"))?;
            let text = serde_json::to_string(&HelloFrame {
                kind: "hello",
                hello: &hello,
            })
            .expect("a hello serialises");
            write_frame(&mut send, text.as_bytes()).await?;
            let mut sub = QuicSubscription {
                endpoint,
                connection,
                send,
                recv,
                welcome: Frame::Pong,
                addr: addr.clone(),
                redirects,
            };
            match sub.next().await? {
                Event::Frame(welcome @ Frame::Welcome { .. }) => {
                    sub.welcome = welcome;
                    return Ok(sub);
                }
                Event::Frame(Frame::Redirect {
                    quic: Some(next),
                    ring_version,
                    ..
                }) => {
                    sub.close().await;
                    addr = next;
                    hello.rv = Some(ring_version);
                }
                Event::Frame(Frame::Redirect { node, .. }) => {
                    return Err(ClientError::Unexpected(format!(
                        "redirected to {node}, which has no QUIC address"
                    )))
                }
                Event::Frame(Frame::Error { .. }) => {
                    return Err(match sub.next().await {
                        Ok(Event::Closed { code, reason }) => ClientError::Closed { code, reason },
                        other => ClientError::Unexpected(format!("{other:?}")),
                    })
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

    /// The next frame, or the close (its application code and reason).
    pub async fn next(&mut self) -> Result<Event, ClientError> {
        let mut prefix = [0u8; 4];
        if let Err(e) = self.recv.read_exact(&mut prefix).await {
            return Ok(self.closed(e).await);
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME {
            return Err(ClientError::Unexpected(format!("a frame of {len} bytes")));
        }
        let mut body = vec![0; len];
        if let Err(e) = self.recv.read_exact(&mut body).await {
            return Ok(self.closed(e).await);
        }
        Ok(match serde_json::from_slice::<Frame>(&body) {
            Ok(frame) => Event::Frame(frame),
            Err(e) => Event::Unreadable {
                error: e.to_string(),
                seq: None,
            },
        })
    }

    /// The next frame or close, or `Timeout` after `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Result<Event, ClientError> {
        tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Sends a frame as is (its length prefix added).
    pub async fn send_frame(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        write_frame(&mut self.send, frame).await
    }

    /// Publishes `data` on the subscription's key.
    pub async fn publish(&mut self, data: &serde_json::Value, id: &str) -> Result<(), ClientError> {
        let frame = serde_json::json!({"type": "publish", "data": data, "id": id});
        self.send_frame(frame.to_string().as_bytes()).await
    }

    /// Moves the connection to a new local UDP socket (a client whose address
    /// changed): the session goes on (QUIC connection migration).
    pub fn rebind(&self, socket: std::net::UdpSocket) -> Result<(), ClientError> {
        self.endpoint.rebind(socket).map_err(io)
    }

    /// The connection, for tests that break the rules on purpose.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Closes the connection (code 1000).
    pub async fn close(self) {
        self.connection.close(1000u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// What a failed read means: the connection's close, as an event. A node finishes
    /// its stream before it closes the connection: the close is waited for (briefly).
    async fn closed(&self, e: impl std::fmt::Display) -> Event {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.connection.closed()).await;
        match self.connection.close_reason() {
            Some(ConnectionError::ApplicationClosed(close)) => Event::Closed {
                code: u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            Some(e) => Event::Closed {
                code: 1006,
                reason: e.to_string(),
            },
            None => Event::Closed {
                code: 1006,
                reason: e.to_string(),
            },
        }
    }
}

/// A QUIC connection to the node at `addr` (host:port) offering application protocol
/// `alpn` (a client uses [`ALPN`]; tests offer others to see them refused), on an
/// endpoint of its own.
pub async fn dial(
    addr: &str,
    trust: &Trust,
    alpn: &[u8],
) -> Result<(Endpoint, Connection), ClientError> {
    let target = resolve(addr).await?;
    let bind: SocketAddr = if target.is_ipv6() {
        "[::1]:0".parse().expect("an address")
    } else {
        "127.0.0.1:0".parse().expect("an address")
    };
    let bind = if target.ip().is_loopback() {
        bind
    } else {
        SocketAddr::new(
            if target.is_ipv6() {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            },
            0,
        )
    };
    let mut endpoint = Endpoint::client(bind).map_err(io)?;
    endpoint.set_default_client_config(trust.client_config(alpn)?);
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let connecting = endpoint
        .connect(target, host)
        .map_err(|e| ClientError::Unexpected(format!("QUIC connect: {e}")))?;
    // Nothing answers a dead node's UDP port: give up long before the idle timeout.
    let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(|e| closed_or(e, "QUIC handshake"))?;
    Ok((endpoint, connection))
}

#[derive(serde::Serialize)]
struct HelloFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    hello: &'a Hello,
}

/// Writes one length-prefixed frame.
pub async fn write_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), ClientError> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    send.write_all(&out)
        .await
        .map_err(|e| ClientError::Unexpected(format!("QUIC write: {e}")))
}

async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(io)?
        .next()
        .ok_or_else(|| ClientError::Url(format!("{addr}: no address")))
}

fn io(e: std::io::Error) -> ClientError {
    ClientError::Unexpected(format!("QUIC: {e}"))
}

/// A connection error: the server's application close as `Closed`, else a message.
fn closed_or(e: ConnectionError, what: &str) -> ClientError {
    match e {
        ConnectionError::ApplicationClosed(close) => ClientError::Closed {
            code: u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        e => ClientError::Unexpected(format!("{what}: {e}")),
    }
}
