//! TLS for every listener and every call between ringfeed processes: rustls on the
//! `ring` provider only.
//!
//! * `--tls-cert` / `--tls-key` (PEM): what a process presents — as a server on its
//!   listeners, and as a client (its identity) on calls to nodes. Both files are read
//!   again when they change (or on `SIGHUP`): new connections get the new certificate,
//!   open ones keep theirs.
//! * `--tls-ca` (PEM): the cluster's CA. With it, calls between processes are mutual
//!   TLS: a node's internal port asks every caller for a certificate the CA signed
//!   (without one the handshake fails: no RPC is answered, not even `Status`), and
//!   callers check each node's certificate against it.
//!
//! Identity: a node's certificate names it as the DNS name `{id}.node.ringfeed`
//! ([`node_name`]) beside the host names clients use, so a node checks that a peer
//! claiming to be node `id` (the `from` of replication and hand-off) holds that node's
//! certificate ([`names_node`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::watch::{watch, Watched};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once on one listener; more wait to be accepted.
const HANDSHAKES: usize = 256;

/// The TLS flags every ringfeed binary shares.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// A PEM certificate chain this process presents: on its listeners (https://,
    /// wss://, gRPC over TLS) and as its identity on calls to nodes. Needs --tls-key.
    /// Read again when it changes.
    #[arg(long, env = "RINGFEED_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "RINGFEED_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM). With it, calls between processes are mutual TLS: a node's
    /// internal port admits only callers with a certificate it signed, and nodes'
    /// certificates are checked against it. Needs --tls-cert and --tls-key.
    #[arg(long, env = "RINGFEED_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// Checks the flags together; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
            _ => {}
        }
        if self.tls_ca.is_some() && self.tls_cert.is_none() {
            return Err("--tls-ca needs --tls-cert and --tls-key (this process's identity)".into());
        }
        Ok(())
    }

    /// Reads the files (errors name the flag), and watches the certificate and key.
    pub fn load(&self, tasks: &TaskTracker, stop: CancellationToken) -> Result<Tls, String> {
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let (c, k) = (cert.clone(), key.clone());
                Some(watch(
                    "TLS certificate",
                    vec![cert.clone(), key.clone()],
                    move || load_identity(&c, &k),
                    tasks,
                    stop,
                )?)
            }
            _ => None,
        };
        let roots = match &self.tls_ca {
            Some(ca) => Some(load_roots(ca)?),
            None => None,
        };
        Ok(Tls { identity, roots })
    }
}

/// A process's TLS material.
#[derive(Clone, Default)]
pub struct Tls {
    /// Its certificate and key, current.
    pub identity: Option<Arc<Watched<CertifiedKey>>>,
    /// The cluster CA.
    pub roots: Option<Arc<RootCertStore>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("identity", &self.identity.is_some())
            .field("ca", &self.roots.is_some())
            .finish()
    }
}

/// The one crypto provider: ring. (rustls 0.23.48 deprecates it for lacking
/// post-quantum key exchange; aws-lc-rs, which has it, is not built here — see
/// docs/design.md *Security*.)
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DNS name a node's certificate carries to name node `id`.
pub fn node_name(id: &str) -> String {
    format!("{id}.node.ringfeed")
}

/// Whether `cert` (a peer's leaf certificate, already verified against the CA) names
/// node `id`.
pub fn names_node(cert: &CertificateDer<'_>, id: &str) -> bool {
    let Ok(name) = ServerName::try_from(node_name(id)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|leaf| leaf.verify_is_valid_for_subject_name(&name).is_ok())
}

/// A certificate chain and its key from PEM files; the error names the file.
pub fn load_identity(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("--tls-key {} does not match --tls-cert: {e}", key.display()))?;
    Ok(certified)
}

/// The CA certificates in a PEM file; the error names the file.
pub fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>, String> {
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "--tls-ca {}: no CA certificate in it",
            ca.display()
        ));
    }
    Ok(Arc::new(roots))
}

/// Presents the current certificate, as server and as client.
#[derive(Debug)]
struct Current(Arc<Watched<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

impl ResolvesClientCert for Current {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl Tls {
    /// A server config presenting the identity (none without one), offering `alpn`;
    /// with `mutual`, callers must present a certificate the CA signed.
    pub fn server(
        &self,
        alpn: &[&[u8]],
        mutual: bool,
    ) -> Result<Option<Arc<ServerConfig>>, String> {
        let Some(identity) = &self.identity else {
            return Ok(None);
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match (&self.roots, mutual) {
            (Some(roots), true) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                    .build()
                    .map_err(|e| format!("--tls-ca: {e}"))?,
            ),
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Current(identity.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Some(Arc::new(config)))
    }

    /// A client config for calls to nodes (HTTP/2 by ALPN): checks their certificates
    /// against the CA and presents the identity. `None` without a CA: calls are plain.
    pub fn client(&self) -> Result<Option<Arc<ClientConfig>>, String> {
        let Some(roots) = &self.roots else {
            return Ok(None);
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots.clone());
        let mut config = match &self.identity {
            Some(identity) => {
                builder.with_client_cert_resolver(Arc::new(Current(identity.clone())))
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// The TLS connections accepted on `listener`, handshakes done (at most
/// [`HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]); failed ones are dropped
/// and logged. For tonic's `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    let spawner = tasks.clone();
    tasks.spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            spawner.spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                drop(permit);
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazy gRPC channel through `endpoint` (an `http://` URI: HTTP/2 runs inside the
/// TLS this makes) to `addr` (host:port), over TLS with `config` when it is given.
pub fn channel(
    endpoint: tonic::transport::Endpoint,
    addr: &str,
    config: Option<&Arc<ClientConfig>>,
) -> tonic::transport::Channel {
    let Some(config) = config else {
        return endpoint.connect_lazy();
    };
    let connector = TlsConnector::from(config.clone());
    let addr = addr.to_owned();
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
        let (connector, addr) = (connector.clone(), addr.clone());
        async move {
            let name = server_name(&addr)?;
            let connect = async {
                let tcp = TcpStream::connect(&addr).await?;
                let _ = tcp.set_nodelay(true);
                connector.connect(name, tcp).await
            };
            tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS connect timed out"))?
                .map(hyper_util::rt::TokioIo::new)
        }
    }))
}

/// The name a certificate must carry for `addr` (host:port): its IP or DNS name.
pub fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))
}
