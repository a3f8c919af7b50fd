//! How a node reaches its peers' internal service: over TCP to each member's `grpc`
//! address, or — in the in-process tests — over an in-memory network, so several nodes
//! run in one process under paused time.

use std::time::Duration;

use ringfeed_proto::v1::node_client::NodeClient;
use tonic::transport::{Channel, Endpoint};

/// The way to peers.
#[derive(Clone, Default)]
pub enum Peers {
    /// TCP to `host:port`.
    #[default]
    Tcp,
    /// An in-memory network (tests).
    #[cfg(test)]
    Memory(memory::Net),
}

impl Peers {
    /// A client for the peer at `grpc`, connected lazily (on first call), giving up a
    /// connection attempt after `connect_timeout`. `None` for an address that cannot be
    /// one.
    pub fn client(&self, grpc: &str, connect_timeout: Duration) -> Option<NodeClient<Channel>> {
        match self {
            Peers::Tcp => {
                let endpoint = Endpoint::from_shared(format!("http://{grpc}")).ok()?;
                Some(NodeClient::new(
                    endpoint
                        .connect_timeout(connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(5))
                        .connect_lazy(),
                ))
            }
            #[cfg(test)]
            Peers::Memory(net) => Some(NodeClient::new(net.channel(grpc))),
        }
    }
}

#[cfg(test)]
pub mod memory {
    //! An in-memory network of named listeners: a connection is a `tokio::io::duplex`
    //! pair, handed to the listener of the address dialled. An address can be cut
    //! off: its listener stops taking connections and the ones it has are closed.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use hyper_util::rt::TokioIo;
    use tokio::io::DuplexStream;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use tonic::transport::{Channel, Endpoint, Uri};

    /// Bytes buffered each way on one connection.
    const PIPE: usize = 1 << 20;

    /// The network: every listening address's queue of new connections.
    #[derive(Clone, Default)]
    pub struct Net {
        listeners: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<DuplexStream>>>>,
    }

    impl Net {
        /// Starts listening at `addr`: the stream of connections made to it, for
        /// `Server::serve_with_incoming`. Replaces any earlier listener there.
        pub fn listen(
            &self,
            addr: &str,
        ) -> UnboundedReceiverStream<Result<DuplexStream, std::io::Error>> {
            let (tx, rx) = mpsc::unbounded_channel();
            let (conns_tx, conns_rx) = mpsc::unbounded_channel();
            self.listeners
                .lock()
                .expect("net lock poisoned")
                .insert(addr.to_owned(), tx);
            tokio::spawn(forward(rx, conns_tx));
            UnboundedReceiverStream::new(conns_rx)
        }

        /// Cuts `addr` off: connections to it fail from now on.
        pub fn cut(&self, addr: &str) {
            self.listeners
                .lock()
                .expect("net lock poisoned")
                .remove(addr);
        }

        /// A lazy channel to `addr`: each connection it makes is a new duplex pair,
        /// refused while nothing listens at `addr`.
        pub fn channel(&self, addr: &str) -> Channel {
            let net = self.clone();
            let addr = addr.to_owned();
            Endpoint::from_static("http://in-memory").connect_with_connector_lazy(
                tower::service_fn(move |_: Uri| {
                    let dialled = net.dial(&addr);
                    async move { dialled.map(TokioIo::new) }
                }),
            )
        }

        fn dial(&self, addr: &str) -> std::io::Result<DuplexStream> {
            let listeners = self.listeners.lock().expect("net lock poisoned");
            let listener = listeners.get(addr).ok_or_else(refused)?;
            let (client, server) = tokio::io::duplex(PIPE);
            listener.send(server).map_err(|_| refused())?;
            Ok(client)
        }
    }

    fn refused() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    async fn forward(
        mut rx: mpsc::UnboundedReceiver<DuplexStream>,
        tx: mpsc::UnboundedSender<Result<DuplexStream, std::io::Error>>,
    ) {
        while let Some(conn) = rx.recv().await {
            if tx.send(Ok(conn)).is_err() {
                return;
            }
        }
    }
}
