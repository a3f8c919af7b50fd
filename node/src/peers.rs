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
    /// Mutual TLS over TCP to `host:port`: the peer's certificate checked against the
    /// cluster CA, this node's presented.
    Tls(std::sync::Arc<rustls::ClientConfig>),
    /// An in-memory network (tests).
    #[cfg(test)]
    Memory(memory::Net),
}

impl Peers {
    /// A client for the peer at `grpc`, connected lazily (on first call), giving up a
    /// connection attempt after `connect_timeout`. `None` for an address that cannot be
    /// one.
    pub fn client(&self, grpc: &str, connect_timeout: Duration) -> Option<NodeClient<Channel>> {
        let endpoint = || {
            Some(
                Endpoint::from_shared(format!("http://{grpc}"))
                    .ok()?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5)),
            )
        };
        match self {
            Peers::Tcp => Some(NodeClient::new(endpoint()?.connect_lazy())),
            Peers::Tls(config) => Some(NodeClient::new(ringfeed_router::tls::channel(
                endpoint()?,
                grpc,
                Some(config),
            ))),
            #[cfg(test)]
            Peers::Memory(net) => Some(NodeClient::new(net.channel(grpc))),
        }
    }
}

#[cfg(test)]
pub mod memory {
    //! An in-memory network of named listeners: a connection is a `tokio::io::duplex`
    //! pair, handed to the listener of the address dialled. An address can be cut off,
    //! like a process killed: new connections to it are refused and the ones its
    //! listener took are severed.

    use std::collections::HashMap;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
    use tonic::transport::server::Connected;
    use tonic::transport::{Channel, Endpoint, Uri};

    /// Bytes buffered each way on one connection.
    const PIPE: usize = 1 << 20;

    /// A listener: where its new connections go, and the switch that severs them.
    struct Listener {
        accept: mpsc::UnboundedSender<Result<Conn, std::io::Error>>,
        cut: CancellationToken,
    }

    /// The network: every listening address.
    #[derive(Clone, Default)]
    pub struct Net {
        listeners: Arc<Mutex<HashMap<String, Listener>>>,
    }

    impl Net {
        /// Starts listening at `addr`: the stream of connections made to it, for
        /// `Server::serve_with_incoming`. Replaces any earlier listener there.
        pub fn listen(&self, addr: &str) -> UnboundedReceiverStream<Result<Conn, std::io::Error>> {
            let (accept, rx) = mpsc::unbounded_channel();
            let listener = Listener {
                accept,
                cut: CancellationToken::new(),
            };
            if let Some(old) = self
                .listeners
                .lock()
                .expect("net lock poisoned")
                .insert(addr.to_owned(), listener)
            {
                old.cut.cancel();
            }
            UnboundedReceiverStream::new(rx)
        }

        /// Cuts `addr` off: connections to it are refused from now on, and those it
        /// took end (reads see the end, writes fail).
        pub fn cut(&self, addr: &str) {
            if let Some(listener) = self
                .listeners
                .lock()
                .expect("net lock poisoned")
                .remove(addr)
            {
                listener.cut.cancel();
            }
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

        fn dial(&self, addr: &str) -> std::io::Result<Conn> {
            let listeners = self.listeners.lock().expect("net lock poisoned");
            let listener = listeners.get(addr).ok_or_else(refused)?;
            let (client, server) = tokio::io::duplex(PIPE);
            let ours = Conn::new(client, listener.cut.clone());
            let theirs = Conn::new(server, listener.cut.clone());
            listener.accept.send(Ok(theirs)).map_err(|_| refused())?;
            Ok(ours)
        }
    }

    fn refused() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    /// One end of a connection, severed when its listener is cut.
    pub struct Conn {
        io: DuplexStream,
        cut: Pin<Box<WaitForCancellationFutureOwned>>,
    }

    impl Conn {
        fn new(io: DuplexStream, cut: CancellationToken) -> Conn {
            Conn {
                io,
                cut: Box::pin(cut.cancelled_owned()),
            }
        }

        fn is_cut(&mut self, cx: &mut Context<'_>) -> bool {
            self.cut.as_mut().poll(cx).is_ready()
        }
    }

    impl Connected for Conn {
        type ConnectInfo = ();

        fn connect_info(&self) -> Self::ConnectInfo {}
    }

    impl AsyncRead for Conn {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.is_cut(cx) {
                return Poll::Ready(Ok(()));
            }
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            if self.is_cut(cx) {
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }
}
