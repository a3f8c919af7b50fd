//! One QUIC client, from its handshake to its close: the `hello`, then the live
//! session (updates out, client frames in, kicks). Placement, admission, the start and
//! the answers are [`crate::session`]'s, as on WebSocket.

use std::future::poll_fn;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::Instrument;

use super::frame::{self, ReadError, Reader};
use super::ALPN;
use crate::node::{Held, Node, Transport, Violation};
use crate::protocol::close::CloseCode;
use crate::protocol::frames::ServerFrame;
use crate::protocol::params::ClientQuery;
use crate::session::{self, Subscription, SubscriptionGuard};
use crate::state::{Control, Kick, Ready};

/// How long a client has to finish its handshake, open its stream and send `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one write to a client may take before the client is given up on.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a close waits for the client to acknowledge what was written before it
/// (the `redirect` frame before 4300 above all).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Most queued frames written in one write.
const MAX_FRAMES_PER_WRITE: usize = 256;

/// The application code of a connection closed for breaking the QUIC framing rules
/// (wrong ALPN, a second stream, a bad `hello`): as WebSocket's 4400.
const PROTOCOL_ERROR: CloseCode = CloseCode::BadRequest;

/// Serves one incoming QUIC connection, holding `permit` (its place under the node's
/// connection limit) until it ends.
///
/// This future is the connection's task, held for as long as the client stays: set-up
/// (handshake, `hello`, subscription, start) runs in a box of its own that is dropped
/// before the live loop, and the live loop boxes each step it takes, so what an idle
/// connection's task holds is the session and what it waits in (a test bounds it).
pub(super) async fn serve(accepted: Box<Accepted>) {
    let Some((mut session, control, _permit)) = Box::pin(set_up(accepted)).await else {
        return;
    };
    let _guard = SubscriptionGuard::new(session.node.clone(), control.clone());
    let _held = Held::new(&session.node, Transport::Quic);
    let mut message_by: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let wake = session.wake(&control, &mut message_by).await;
        let step: Step<'_> = match wake {
            Wake::Control(Ready::Kicked(kick)) => Box::pin(async {
                session.kicked(kick).await;
                ControlFlow::Break(())
            }),
            Wake::Control(Ready::Frame(Some(first))) => {
                Box::pin(session.write_frames(first, &control))
            }
            Wake::Control(Ready::Frame(None)) => return,
            // The QUIC connection keeps its own clock (keep-alive, idle timeout).
            Wake::Control(Ready::Due) => continue,
            Wake::Begun => {
                // A frame the client has begun must be whole within the message timeout.
                let timeout = session.node.config.client_message_timeout_ms;
                message_by = Some(Box::pin(tokio::time::sleep(Duration::from_millis(timeout))));
                continue;
            }
            Wake::Frame(read) => {
                message_by = None;
                Box::pin(session.client_frame(&control, read))
            }
            Wake::Stream(true) => {
                Box::pin(session.end(PROTOCOL_ERROR, "one stream per connection"))
            }
            Wake::Stream(false) => return,
            Wake::Late => Box::pin(session.violated(Violation::MessageTimeout)),
        };
        if step.await.is_break() {
            return;
        }
    }
}

/// One thing a live session does after waking, boxed: what it binds stays out of the
/// state an idle connection waits in.
type Step<'a> = Pin<Box<dyn std::future::Future<Output = ControlFlow<()>> + Send + 'a>>;

/// What woke a live session.
enum Wake {
    Control(Ready),
    /// The client began a frame (its clock starts).
    Begun,
    Frame(Result<Option<Vec<u8>>, ReadError>),
    /// The client opened another stream (`true`), or the connection ended.
    Stream(bool),
    /// A begun frame was not finished in time.
    Late,
}

/// A connection accepted under the node's limit, before its handshake.
pub(super) struct Accepted {
    pub(super) node: Arc<Node>,
    pub(super) incoming: Incoming,
    /// Its place under the node's connection limit, held until it ends.
    pub(super) permit: OwnedSemaphorePermit,
    /// Its span (transport, node, peer, key), entered while it is set up.
    pub(super) span: tracing::Span,
}

/// The handshake, the ALPN, the stream, `hello` and the session's start: the session,
/// its subscriber's control and its permit, or `None` once the connection has ended.
async fn set_up(accepted: Box<Accepted>) -> Option<(Session, Arc<Control>, OwnedSemaphorePermit)> {
    let Accepted {
        node,
        incoming,
        permit,
        span,
    } = *accepted;
    let set_up = open_session(node, incoming, span.clone()).instrument(span);
    let (session, control) = set_up.await?;
    Some((session, control, permit))
}

async fn open_session(
    node: Arc<Node>,
    incoming: Incoming,
    span: tracing::Span,
) -> Option<(Session, Arc<Control>)> {
    let source = incoming.remote_address().ip();
    let connection = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            tracing::debug!(parent: &span, error = %e, "QUIC handshake failed");
            return None;
        }
        Err(_) => return None,
    };
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if alpn.as_deref() != Some(ALPN) {
        close(&connection, PROTOCOL_ERROR, "ALPN ringfeed/1 required");
        return None;
    }
    let opened = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await;
    let Ok(Ok((send, recv))) = opened else {
        close(&connection, CloseCode::GoingAway, "no stream opened");
        return None;
    };
    let mut session = Session {
        reader: Reader::new(node.config.max_frame),
        node,
        connection,
        send,
        recv,
        out: Vec::new(),
    };
    let sub = session.start(source).await?;
    Some((session, sub.release()))
}

struct Session {
    node: Arc<Node>,
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
    reader: Reader,
    /// Frames waiting for the next write.
    out: Vec<u8>,
}

impl Session {
    /// Reads `hello`, opens the session ([`session::open`]) and sends its start: the
    /// subscription, or `None` once the connection has been ended.
    async fn start(&mut self, source: std::net::IpAddr) -> Option<Subscription> {
        let hello = tokio::time::timeout(HELLO_TIMEOUT, self.next_frame()).await;
        let hello = match hello {
            Ok(Ok(Some(hello))) => hello,
            Ok(Err(e)) => {
                let _ = self.refused(e).await;
                return None;
            }
            Ok(Ok(None)) | Err(_) => {
                let _ = self.end(PROTOCOL_ERROR, "a hello frame first").await;
                return None;
            }
        };
        let query = match ClientQuery::from_hello(&hello) {
            Ok(query) => query,
            Err(message) => {
                let _ = self.end(PROTOCOL_ERROR, &message).await;
                return None;
            }
        };
        let sub = match Box::pin(session::open(&self.node, &query, Some(source))).await {
            Ok(sub) => sub,
            Err(kick) => {
                self.kicked(kick).await;
                return None;
            }
        };
        let out = &mut self.out;
        session::start_frames(&self.node, &sub, |f| frame::put(out, f.as_bytes()));
        self.flush().await.is_continue().then_some(sub)
    }

    /// Waits for the control (kick, queue), the client's stream, a second stream, or
    /// the clock of a begun frame.
    async fn wake(
        &mut self,
        control: &Control,
        message_by: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    ) -> Wake {
        let timing = message_by.is_some();
        tokio::select! {
            biased;
            ready = poll_fn(|cx| control.poll_ready(cx)) => Wake::Control(ready),
            read = poll_fn(|cx| {
                let read = self.reader.poll_frame(&mut self.recv, cx);
                if read.is_pending() && self.reader.open() && !timing {
                    return Poll::Ready(Wake::Begun);
                }
                read.map(Wake::Frame)
            }) => read,
            second = self.connection.accept_bi() => Wake::Stream(second.is_ok()),
            _ = async { message_by.as_mut().expect("a clock when timing").await }, if timing => Wake::Late,
        }
    }

    /// Handles what the client sent.
    async fn client_frame(
        &mut self,
        control: &Control,
        read: Result<Option<Vec<u8>>, ReadError>,
    ) -> ControlFlow<()> {
        let frame = match read {
            Ok(Some(frame)) => frame,
            // The client finished its side: it is leaving.
            Ok(None) => return self.end(CloseCode::GoingAway, "stream finished").await,
            Err(e) => return self.refused(e).await,
        };
        let now = self.node.clock_ms(tokio::time::Instant::now());
        let count = control.count_from_client(now / 1000, false);
        if let Some(violation) = session::flood(count, &self.node) {
            return self.violated(violation).await;
        }
        let reply = match std::str::from_utf8(&frame) {
            Ok(text) => session::answer(&self.node, control, text).await,
            Err(_) => Err(("bad_frame", "a frame must be UTF-8 JSON".to_owned())),
        };
        match reply {
            Ok(reply) => {
                frame::put(&mut self.out, reply.as_bytes());
                self.flush().await
            }
            Err((code, message)) => {
                let error = ServerFrame::Error {
                    code,
                    message: &message,
                }
                .encode();
                frame::put(&mut self.out, error.as_bytes());
                self.end(CloseCode::BadRequest, &message).await
            }
        }
    }

    /// Writes `first` and whatever else is queued. A client that stops reading must
    /// not keep its session from noticing the kick that its full queue causes.
    async fn write_frames(&mut self, first: Utf8Bytes, control: &Control) -> ControlFlow<()> {
        frame::put(&mut self.out, first.as_bytes());
        for _ in 1..MAX_FRAMES_PER_WRITE {
            match control.try_recv() {
                Some(queued) => frame::put(&mut self.out, queued.as_bytes()),
                None => break,
            }
        }
        tokio::select! {
            written = self.flush() => written,
            kick = control.kicked() => {
                self.out.clear();
                self.kicked(kick).await;
                ControlFlow::Break(())
            }
        }
    }

    /// Writes what is waiting (bounded by [`WRITE_TIMEOUT`]).
    async fn flush(&mut self) -> ControlFlow<()> {
        let out = std::mem::take(&mut self.out);
        match tokio::time::timeout(WRITE_TIMEOUT, self.send.write_all(&out)).await {
            Ok(Ok(())) => {
                // Keep the allocation for the next write unless it grew large.
                if out.capacity() <= 64 * 1024 {
                    self.out = out;
                    self.out.clear();
                }
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Break(()),
        }
    }

    /// The next frame of the client's stream.
    async fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        poll_fn(|cx| self.reader.poll_frame(&mut self.recv, cx)).await
    }

    /// Ends a session whose client broke the framing.
    async fn refused(&mut self, e: ReadError) -> ControlFlow<()> {
        match e {
            ReadError::TooLarge { len, max } => {
                let reason = format!("frame of {len} bytes; at most {max}");
                self.end(CloseCode::TooLarge, &reason).await
            }
            ReadError::Truncated => {
                self.end(PROTOCOL_ERROR, "stream ended inside a frame")
                    .await
            }
            ReadError::Io(e) => {
                tracing::debug!(error = %e, "QUIC stream failed");
                ControlFlow::Break(())
            }
        }
    }

    /// Ends the session of a client past a per-connection bound (1008), and counts it.
    async fn violated(&mut self, violation: Violation) -> ControlFlow<()> {
        self.node.counters.violations.count(violation);
        tracing::debug!(?violation, "client past a per-connection bound; closing");
        self.end(CloseCode::Policy, violation.reason()).await
    }

    /// Ends the session as `kick` asks (a redirect frame first, if any).
    async fn kicked(&mut self, kick: Kick) {
        if let Some(frame) = &kick.frame {
            frame::put(&mut self.out, frame.as_bytes());
        }
        let _ = self.end(kick.code, &kick.reason).await;
    }

    /// Sends what is waiting, finishes the stream, waits (bounded) until the client
    /// has it, and closes the connection with `code`.
    async fn end(&mut self, code: CloseCode, reason: &str) -> ControlFlow<()> {
        let graceful = async {
            if self.flush().await.is_continue() && self.send.finish().is_ok() {
                let _ = self.send.stopped().await;
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, graceful).await;
        close(&self.connection, code, reason);
        ControlFlow::Break(())
    }
}

/// Closes `connection` with application code `code` and `reason` (at most 123 bytes,
/// as a WebSocket close reason).
fn close(connection: &Connection, code: CloseCode, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    connection.close(
        VarInt::from_u32(code.code().into()),
        &reason.as_bytes()[..end],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, F: std::future::Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle QUIC connection's task stays small: set-up and each step are boxed.
    #[test]
    fn an_idle_quic_session_task_is_small() {
        let size = future_size(serve);
        println!("the QUIC session future is {size} bytes");
        assert!(size <= 512, "the QUIC session future is {size} bytes");
    }
}
