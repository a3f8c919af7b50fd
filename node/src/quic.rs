//! QUIC clients (docs/protocol.md *QUIC*): quinn on rustls (ring), ALPN `ringfeed/1`,
//! one bidirectional stream per connection carrying JSON frames, each prefixed with its
//! length (u32, big-endian): the client's `hello`, then the WebSocket frames.
//!
//! This module is the wire only. What a client may do, where it belongs and what it is
//! sent is [`crate::session`]'s, as for WebSocket: one session core for every
//! transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, EndpointConfig, IdleTimeout, ServerConfig, TransportConfig, VarInt};
use ringfeed_router::tls::{provider, Tls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::node::Node;

mod frame;
mod session;

/// The one application protocol a node speaks over QUIC.
pub const ALPN: &[u8] = b"ringfeed/1";

/// Incoming connections still in their handshake, at most: past it, new ones are
/// refused at once (the connection limit counts only those admitted).
const MAX_HANDSHAKES: usize = 4096;

/// The UDP socket's kernel buffers: a burst of reconnecting clients (a failover moves
/// thousands at once) must not overflow the default 208 KiB.
const SOCKET_BUFFER: usize = 4 << 20;

/// A bound QUIC listener and what the member record says of it.
pub struct Listener {
    pub endpoint: Endpoint,
    /// The host:port clients reach it at.
    pub advertised: String,
    /// The SHA-256 of its certificate, lowercase hex.
    pub sha256: String,
}

/// Binds the QUIC listener on `socket`: its certificate is `--quic-cert`, else the
/// node's TLS identity, else one made now (self-signed, naming `localhost` and the
/// advertised host).
pub fn bind(config: &Config, tls: &Tls, socket: std::net::UdpSocket) -> anyhow::Result<Listener> {
    let bound = socket.local_addr()?;
    let advertised = config
        .quic
        .advertise_quic
        .clone()
        .unwrap_or_else(|| bound.to_string());
    let (crypto, sha256) =
        server_crypto(config, tls, &advertised).map_err(|e| anyhow::anyhow!("QUIC: {e}"))?;
    let crypto = QuicServerConfig::try_from(crypto)
        .map_err(|e| anyhow::anyhow!("QUIC: the TLS configuration cannot serve QUIC: {e}"))?;
    let mut server = ServerConfig::with_crypto(Arc::new(crypto));
    server
        .transport_config(Arc::new(transport(config)))
        .migration(true)
        .max_incoming(MAX_HANDSHAKES);
    let socket = socket2::Socket::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    let endpoint = Endpoint::new(
        EndpointConfig::default(),
        Some(server),
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok(Listener {
        endpoint,
        advertised,
        sha256,
    })
}

/// Binds the UDP socket of `--quic-listen`: `auto` takes the HTTP listener's port
/// (`http`, as bound) when it is free over UDP, else any free port.
pub fn socket(config: &Config, http: SocketAddr) -> anyhow::Result<Option<std::net::UdpSocket>> {
    use crate::config::QuicListen;
    match config
        .quic
        .listen(config.http_listen)
        .map_err(anyhow::Error::msg)?
    {
        QuicListen::Off => Ok(None),
        QuicListen::At(_) if config.quic.quic_listen == "auto" => {
            let socket = std::net::UdpSocket::bind(http)
                .or_else(|_| std::net::UdpSocket::bind(SocketAddr::new(http.ip(), 0)))
                .map_err(|e| anyhow::anyhow!("cannot bind --quic-listen auto ({http}): {e}"))?;
            Ok(Some(socket))
        }
        QuicListen::At(addr) => std::net::UdpSocket::bind(addr)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("cannot bind --quic-listen {addr}: {e}")),
    }
}

/// The transport settings, explicit and small: an idle connection holds windows it
/// does not fill, and one stream each way.
///
/// - One bidirectional stream (two may be opened, so that a second is refused with
///   4400 rather than left waiting for credit), no unidirectional ones, no datagrams.
/// - Receive windows of one largest client frame: a client sends little.
/// - Keep-alive every heartbeat: the client's acknowledgements are its pongs, and
///   1.5 heartbeats without a packet from it end the connection, as on WebSocket.
fn transport(config: &Config) -> TransportConfig {
    let mut t = TransportConfig::default();
    let window = VarInt::from_u64((config.max_frame + 4) as u64).unwrap_or(VarInt::MAX);
    let heartbeat = Duration::from_millis(config.heartbeat_ms);
    t.max_concurrent_bidi_streams(VarInt::from_u32(2))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .stream_receive_window(window)
        .receive_window(window)
        .send_window(256 * 1024)
        .keep_alive_interval(Some(heartbeat))
        // One datagram per transmit: with segmentation offload each connection keeps a
        // send buffer of up to ten datagrams (~14 KiB) for its life, and a session's
        // frames are small.
        .enable_segmentation_offload(false)
        // No path MTU probing: 1,200-byte datagrams (what every QUIC path carries), and
        // no probe state or larger send buffer per connection.
        .mtu_discovery_config(None)
        .max_idle_timeout(IdleTimeout::try_from(heartbeat * 3 / 2).ok());
    t
}

/// The rustls configuration of the listener and the SHA-256 of its certificate.
fn server_crypto(
    config: &Config,
    tls: &Tls,
    advertised: &str,
) -> Result<(rustls::ServerConfig, String), String> {
    let certified = match (&config.quic.quic_cert, &config.quic.quic_key, &tls.identity) {
        (Some(cert), Some(key), _) => Arc::new(ringfeed_router::tls::load_identity(cert, key)?),
        (_, _, Some(identity)) => identity.get(),
        _ => Arc::new(self_signed(advertised)?),
    };
    let sha256 = certified
        .cert
        .first()
        .map(|leaf| hex(&Sha256::digest(leaf)))
        .ok_or("the certificate chain is empty")?;
    // ChaCha20-Poly1305 first, in the server's order: a connection holds four packet
    // keys (this phase's and the next's, each way) and two header keys for its life;
    // ChaCha20's are 32 bytes where an AES-GCM key schedule is hundreds.
    let mut provider = (*provider()).clone();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(certified)));
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.ignore_client_order = true;
    server.max_early_data_size = 0;
    // No resumption: a client reconnects with a full handshake (its `resume` token is
    // ringfeed's, not TLS's), and no ticket or session is kept per connection.
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok((server, sha256))
}

/// A certificate made at start, naming `localhost` and the advertised host.
fn self_signed(advertised: &str) -> Result<CertifiedKey, String> {
    let host = advertised
        .rsplit_once(':')
        .map_or(advertised, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let mut names = vec!["localhost".to_owned()];
    if host != "localhost" {
        names.push(host.to_owned());
    }
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())?;
    let cert: CertificateDer<'static> = made.cert.der().clone();
    Ok(CertifiedKey::new(vec![cert], signing))
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One certificate for every client.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Accepts QUIC clients until the node shuts down, each under the node's connection
/// limit (refused before its handshake when there is no room), then waits (bounded by
/// the grace period) for their connections to close.
pub async fn serve(node: Arc<Node>, endpoint: Endpoint) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            _ = node.shutdown.cancelled() => break,
        };
        match node.admit() {
            Ok(permit) => {
                let span = tracing::debug_span!("connection", transport = "quic", node = %node.id,
                    peer = %incoming.remote_address(), key = tracing::field::Empty);
                node.tasks.spawn(session::serve(Box::new(session::Accepted {
                    node: node.clone(),
                    incoming,
                    permit,
                    span,
                })));
            }
            Err(e) => {
                tracing::debug!(error = %e, "QUIC connection refused");
                incoming.refuse();
            }
        }
    }
    endpoint.set_server_config(None);
    let grace = node.config.shutdown_grace();
    if tokio::time::timeout(grace, endpoint.wait_idle())
        .await
        .is_err()
    {
        endpoint.close(VarInt::from_u32(1001), b"node shutting down");
    }
}
