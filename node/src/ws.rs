//! One WebSocket client: `welcome`, live updates, client frames, heartbeats, kicks.
//!
//! The session owns its socket. Updates reach it through a bounded queue filled by the
//! key (see [`crate::state`]); whatever is queued is written in one flush. Someone else
//! can end the session only through its [`Control`] (slow consumer, redirect).

use std::future::poll_fn;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::task::Poll;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::node::{Node, Transport, Violation};
use crate::protocol::close::CloseCode;
use crate::protocol::frames::ServerFrame;
use crate::protocol::params::ClientQuery;
use crate::session::{self, Subscription};
use crate::state::{Control, Kick, Ready};
use tracing::Instrument;

mod socket;

use socket::Socket;

/// The most client messages read while waiting for the answer to our close frame: a
/// client that keeps sending instead of closing is not waited for.
const CLOSE_DRAIN_MESSAGES: usize = 64;

/// How long a close waits for the client to take the close frame and answer.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long one write to a client may take before the client is given up on (the
/// fan-out path has its own bound: a full queue is a slow consumer).
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most queued frames written in one flush.
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// What woke a live session: its control, or its client (`None` once it has gone).
enum Wake {
    Control(Ready),
    Client(Option<Result<Message, WsError>>),
}

/// One thing a live session does after waking: write, answer, ping, close.
type Step<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ControlFlow<()>> + Send + 'a>>;

/// The tungstenite settings of every server-side socket: no buffers kept and explicit
/// frame limits (the defaults are a 128 KiB read buffer and 64 MiB messages). Clients
/// send little (pings, the odd publish). The read buffer is held for the life of the
/// connection, so it starts empty and grows only to the largest frame the client has
/// sent (reads from the kernel are chunked by [`socket`], not by tungstenite).
/// tungstenite writes only pongs and close frames, at once; the session's own frames
/// never pass through its write buffer.
pub fn socket_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(0)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// What a WebSocket session starts from: the handshake's request, answered with 101.
pub struct Connect {
    pub node: Arc<Node>,
    /// The client's address: failed authentications are counted against it.
    pub source: Option<std::net::IpAddr>,
    pub on_upgrade: OnUpgrade,
    pub query: Result<ClientQuery, String>,
    /// The connection's place under the node's connection limit.
    pub permit: OwnedSemaphorePermit,
    /// The connection's span (transport, node, key; the peer is its parent's), entered
    /// while it is set up. The live loop keeps no span: an idle connection's task has
    /// no room for one (see the size test below).
    pub span: tracing::Span,
}

/// Runs one client connection, from the upgrade until it ends. This future is the
/// connection's task: what it holds while the client idles is what an idle connection
/// costs. So its one input is a box that set-up consumes (an async fn keeps its
/// arguments for its whole life), set-up runs in a box of its own that is dropped
/// before the live loop starts, and the live loop runs inline, here: its state is the
/// [`Live`] session and one pointer into it while waiting, or a boxed step while
/// acting. (A separate async fn for the loop would keep its arguments twice.)
pub async fn serve(connect: Box<Connect>) {
    let span = connect.span.clone();
    let Some(mut live) = Box::pin(set_up(connect).instrument(span)).await else {
        return;
    };
    loop {
        let wake = live.wake().await;
        if let Some(step) = live.decide(wake) {
            if step.await.is_break() {
                return;
            }
        }
    }
}

/// A session that went live: the socket, the subscription's control (its key and
/// queue) and the two deadlines of its heartbeat.
///
/// It unsubscribes when dropped, with the node the session holds (a guard would hold
/// the node a second time). It also holds the connection's place under the node's
/// limit, as a permit forgotten when it went live and given back when it is dropped:
/// an `OwnedSemaphorePermit` would cost every idle connection 16 bytes.
///
/// The deadlines are in ms of the node's clock rather than in a timer of our own (a
/// `Sleep` is 112 bytes and a place in the timer wheel): the next ping, and the end of
/// the client's silence. The control's clock is set to the earlier one; a client
/// frame only moves `dead_at` later, so the clock never goes off late for it, and it
/// is set again each time it goes off.
struct Live {
    session: Session,
    control: Arc<Control>,
    ping_at: u64,
    dead_at: u64,
}

impl Drop for Live {
    fn drop(&mut self) {
        let node = &self.session.node;
        node.keys.unsubscribe(&self.control);
        node.connections.add_permits(1);
        node.counters.open.closed(Transport::Ws);
    }
}

impl Live {
    /// A session whose start has been sent, its clock set.
    fn new(session: Session, control: Arc<Control>) -> Live {
        let now = session.now_ms();
        session.node.counters.open.opened(Transport::Ws);
        let live = Live {
            ping_at: now + session.heartbeat_ms(),
            dead_at: now + session.silence_ms(),
            session,
            control,
        };
        live.control.set_due(live.ping_at.min(live.dead_at));
        live
    }

    /// After a read that found no whole message: a message the client has begun must
    /// be complete within the message timeout. Its deadline is the end of the
    /// client's silence, brought forward: what the client sends meanwhile (pongs) does
    /// not move it later, only a whole message does. No field of its own: what an idle
    /// connection waits in is what it costs.
    fn watch_message(&mut self) {
        if self.session.socket.message_open() {
            let by = self.session.now_ms() + self.session.node.config.client_message_timeout_ms;
            if by < self.dead_at {
                self.dead_at = by;
                self.control.set_due(self.ping_at.min(self.dead_at));
            }
        }
    }

    /// Waits for the control (the kick, the clock and the queue, behind one waker) or
    /// the client: what an idle connection waits in, one pointer.
    fn wake(&mut self) -> impl std::future::Future<Output = Wake> + '_ {
        poll_fn(|cx| match self.control.poll_ready(cx) {
            Poll::Ready(ready) => Poll::Ready(Wake::Control(ready)),
            Poll::Pending => {
                let next = self.session.socket.poll_next(cx).map(Wake::Client);
                if next.is_pending() {
                    self.watch_message();
                }
                next
            }
        })
    }

    /// What to do about `wake`, as a boxed step: what it binds (a client message, a
    /// kick) goes into the step, not into the state an idle connection waits in.
    fn decide(&mut self, wake: Wake) -> Option<Step<'_>> {
        let session = &mut self.session;
        match wake {
            Wake::Control(Ready::Kicked(kick)) => Some(Box::pin(session.end_kicked(kick))),
            Wake::Control(Ready::Due) => {
                let now = session.now_ms();
                if now >= self.dead_at && session.socket.message_open() {
                    return Some(Box::pin(session.violated(Violation::MessageTimeout)));
                }
                if now >= self.dead_at {
                    tracing::debug!("nothing from the client for 1.5 heartbeats; closing");
                    return Some(Box::pin(
                        session.end(CloseCode::GoingAway, "heartbeat timeout"),
                    ));
                }
                let ping = now >= self.ping_at;
                if ping {
                    self.ping_at = now + session.heartbeat_ms();
                }
                self.control.set_due(self.ping_at.min(self.dead_at));
                ping.then(|| Box::pin(session.ping()) as Step<'_>)
            }
            Wake::Control(Ready::Frame(Some(frame))) => {
                Some(Box::pin(session.write_frames(frame, &self.control)))
            }
            Wake::Control(Ready::Frame(None)) => {
                Some(Box::pin(std::future::ready(ControlFlow::Break(()))))
            }
            Wake::Client(msg) => {
                let now = session.now_ms();
                // While a message is under way, only its end moves the deadline on.
                if !session.socket.message_open() {
                    self.dead_at = now + session.silence_ms();
                }
                if let Some(Ok(message)) = &msg {
                    let control = matches!(
                        message,
                        Message::Ping(_) | Message::Pong(_) | Message::Close(_)
                    );
                    let count = self.control.count_from_client(now / 1000, control);
                    if let Some(violation) = session::flood(count, &session.node) {
                        return Some(Box::pin(session.violated(violation)));
                    }
                }
                Some(Box::pin(session.client_message(&self.control, msg)))
            }
        }
    }
}

/// The upgrade, the handshake's checks, the subscription and the start: a `Live`
/// session, or `None` once the connection has been ended.
async fn set_up(connect: Box<Connect>) -> Option<Live> {
    let Connect {
        node,
        source,
        on_upgrade,
        query,
        permit,
        span: _,
    } = *connect;
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    // The stream comes back whole, plain or TLS: the session reads and writes it
    // without hyper's box around it (over TLS, driving rustls itself).
    let config = socket_config(node.config.max_frame);
    let socket = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Socket::new(parts.io.into_inner(), None, parts.read_buf, config),
        Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            Ok(parts) => {
                let (stream, tls) = parts.io.into_inner().into_inner();
                Socket::new(stream, Some(tls), parts.read_buf, config)
            }
            Err(_) => {
                tracing::error!("an upgraded connection is neither TCP nor TLS over TCP");
                return None;
            }
        },
    };
    let mut session = Session { node, socket };
    match query {
        Ok(query) => {
            let sub = session.run(query, source).await?;
            permit.forget();
            Some(Live::new(session, sub.release()))
        }
        Err(message) => {
            session.close(CloseCode::BadRequest, &message).await;
            None
        }
    }
}

struct Session {
    node: Arc<Node>,
    socket: Socket,
}

impl Session {
    /// Places and subscribes the client ([`session::open`]), and sends it where it
    /// starts: the subscription to go live with, or `None` once the connection has
    /// been ended. Its state is dropped before the connection goes live (the live loop
    /// is not nested in it), so an idle connection does not keep it.
    async fn run(
        &mut self,
        query: ClientQuery,
        source: Option<std::net::IpAddr>,
    ) -> Option<Subscription> {
        let sub = match Box::pin(session::open(&self.node, &query, source)).await {
            Ok(sub) => sub,
            Err(kick) => {
                Box::pin(self.kicked(kick)).await;
                return None;
            }
        };
        match tokio::time::timeout(WRITE_TIMEOUT, Box::pin(self.send_start(&sub))).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
        Some(sub)
    }

    /// Sends `welcome`, the reset if any, the replay and the presence list, in one flush.
    async fn send_start(&mut self, sub: &Subscription) -> Result<(), WsError> {
        let socket = &mut self.socket;
        session::start_frames(&self.node, sub, |frame| socket.queue_text(frame));
        self.socket.flush().await
    }

    /// Now, in ms of the node's clock.
    fn now_ms(&self) -> u64 {
        self.node.clock_ms(tokio::time::Instant::now())
    }

    /// How often the client is pinged, in ms. Read from the config when needed rather
    /// than kept: the state an idle connection waits in is what it costs.
    fn heartbeat_ms(&self) -> u64 {
        self.node.config.heartbeat_ms
    }

    /// How long the client may send nothing (not even a pong) before it is dropped.
    fn silence_ms(&self) -> u64 {
        self.heartbeat_ms() * 3 / 2
    }

    /// Writes `first` and whatever else is queued. A client that stops reading must
    /// not keep its session from noticing the kick that its full queue causes.
    async fn write_frames(&mut self, first: Utf8Bytes, control: &Control) -> ControlFlow<()> {
        tokio::select! {
            written = self.write_batch(first, control) => match written {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            },
            kick = control.kicked() => self.end_kicked(kick).await,
        }
    }

    /// Sends a heartbeat ping.
    async fn ping(&mut self) -> ControlFlow<()> {
        self.socket.queue_ping();
        match tokio::time::timeout(WRITE_TIMEOUT, self.socket.flush()).await {
            Ok(Ok(())) => ControlFlow::Continue(()),
            _ => ControlFlow::Break(()),
        }
    }

    /// Ends the session as `kick` asks (a redirect frame first, if any).
    async fn end_kicked(&mut self, kick: Kick) -> ControlFlow<()> {
        self.kicked(kick).await;
        ControlFlow::Break(())
    }

    /// Ends the session of a client past a per-connection bound (1008), and counts it.
    async fn violated(&mut self, violation: Violation) -> ControlFlow<()> {
        self.node.counters.violations.count(violation);
        tracing::debug!(?violation, "client past a per-connection bound; closing");
        self.end(CloseCode::Policy, violation.reason()).await
    }

    /// Ends the session with a close frame.
    async fn end(&mut self, code: CloseCode, reason: &'static str) -> ControlFlow<()> {
        self.close(code, reason).await;
        ControlFlow::Break(())
    }

    /// Handles what the client sent; `Break` once the session has ended.
    async fn client_message(
        &mut self,
        control: &Control,
        msg: Option<Result<Message, WsError>>,
    ) -> ControlFlow<()> {
        match msg {
            Some(Ok(Message::Text(text))) => {
                if let Err((code, message)) = self.client_frame(control, &text).await {
                    self.error(code, &message).await;
                    return ControlFlow::Break(());
                }
            }
            Some(Ok(Message::Binary(_))) => {
                self.error("binary_frame", "binary frames are not part of the protocol")
                    .await;
                return ControlFlow::Break(());
            }
            Some(Ok(Message::Pong(_))) | Some(Ok(Message::Frame(_))) => {}
            Some(Ok(Message::Ping(_))) => {
                // tungstenite queued the pong; push it out.
                if !matches!(
                    tokio::time::timeout(WRITE_TIMEOUT, self.socket.flush()).await,
                    Ok(Ok(()))
                ) {
                    return ControlFlow::Break(());
                }
            }
            Some(Ok(Message::Close(_))) => {
                // tungstenite queued the answering close frame; push it out.
                let _ = tokio::time::timeout(WRITE_TIMEOUT, self.socket.flush()).await;
                return ControlFlow::Break(());
            }
            None => return ControlFlow::Break(()),
            Some(Err(WsError::Capacity(e))) => {
                self.close(CloseCode::TooLarge, &format!("frame too large: {e}"))
                    .await;
                return ControlFlow::Break(());
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "client connection failed");
                self.close(CloseCode::BadRequest, "protocol error").await;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// Writes `first` and whatever else is queued, then flushes once.
    async fn write_batch(&mut self, first: Utf8Bytes, control: &Control) -> Result<(), WsError> {
        self.socket.queue_text(&first);
        for _ in 1..MAX_FRAMES_PER_FLUSH {
            match control.try_recv() {
                Some(frame) => self.socket.queue_text(&frame),
                None => break,
            }
        }
        self.socket.flush().await
    }

    /// Handles one text frame from the client ([`session::answer`]); an `Err` ends
    /// the session.
    async fn client_frame(
        &mut self,
        control: &Control,
        text: &str,
    ) -> Result<(), (&'static str, String)> {
        let reply = session::answer(&self.node, control, text).await?;
        self.socket.queue_text(&reply);
        match tokio::time::timeout(WRITE_TIMEOUT, self.socket.flush()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(("io", String::new())),
        }
    }

    async fn kicked(&mut self, kick: Kick) {
        if let Some(frame) = kick.frame {
            self.socket.queue_text(&frame);
        }
        self.close(kick.code, &kick.reason).await;
    }

    async fn error(&mut self, code: &str, message: &str) {
        let frame = ServerFrame::Error { code, message }.encode();
        self.socket.queue_text(&frame);
        self.close(CloseCode::BadRequest, message).await;
    }

    /// Sends a close frame with `code` and waits briefly for the client's close.
    async fn close(&mut self, code: CloseCode, reason: &str) {
        // Close reasons are limited to 123 bytes.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame {
            code: WireCloseCode::from(code.code()),
            reason: Utf8Bytes::from(&reason[..end]),
        };
        // A client that does not read, or keeps sending, cannot be waited for forever.
        let goodbye = async {
            if self.socket.close(frame).await.is_ok() {
                for _ in 0..CLOSE_DRAIN_MESSAGES {
                    if !matches!(self.socket.next().await, Some(Ok(_))) {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `serve` returns, without making one.
    fn future_size<A, F: std::future::Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle connection's task is tokio's cell around this future: 112 bytes of
    /// header and trailer, 24 of core and the task tracker's token, rounded up to 128
    /// (the cell is cache-aligned). Up to 400 bytes, the cell is 512; past it, 640.
    #[test]
    fn an_idle_connection_task_fits_in_512_bytes() {
        let size = future_size(serve);
        assert!(size <= 400, "the connection future is {size} bytes");
    }
}
