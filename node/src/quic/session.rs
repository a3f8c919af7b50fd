//! One QUIC client, from its handshake to its close: the `hello`, then the live
//! session (updates out, client frames in, kicks). Placement, admission, the start and
//! the answers are [`crate::session`]'s, as on WebSocket.

use std::future::poll_fn;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::Instrument;

use super::frame::{self, ReadError, Reader};
use super::ALPN;
use crate::node::{Node, Violation};
use crate::protocol::close::CloseCode;
use crate::protocol::frames::ServerFrame;
use crate::protocol::params::ClientQuery;
use crate::session::{self, Subscription};
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
pub(super) async fn serve(
    node: Arc<Node>,
    incoming: Incoming,
    permit: OwnedSemaphorePermit,
    span: tracing::Span,
) {
    let _permit = permit;
    let source = incoming.remote_address().ip();
    let connection = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            tracing::debug!(parent: &span, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => return,
    };
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if alpn.as_deref() != Some(ALPN) {
        close(&connection, PROTOCOL_ERROR, "ALPN ringfeed/1 required");
        return;
    }
    let opened = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await;
    let Ok(Ok((send, recv))) = opened else {
        close(&connection, CloseCode::GoingAway, "no stream opened");
        return;
    };
    let mut session = Session {
        reader: Reader::new(node.config.max_frame),
        node,
        connection,
        send,
        recv,
        out: Vec::new(),
    };
    async move {
        let Some(sub) = session.start(source).await else {
            return;
        };
        session.live(&sub).await;
    }
    .instrument(span)
    .await
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

    /// The live session: updates and kicks from the key, frames from the client.
    async fn live(&mut self, sub: &Subscription) {
        let control = sub.control().clone();
        let mut message_by: Option<tokio::time::Instant> = None;
        loop {
            let step = tokio::select! {
                biased;
                ready = poll_fn(|cx| control.poll_ready(cx)) => match ready {
                    Ready::Kicked(kick) => {
                        self.kicked(kick).await;
                        ControlFlow::Break(())
                    }
                    Ready::Frame(Some(first)) => self.write_frames(first, &control).await,
                    Ready::Frame(None) => ControlFlow::Break(()),
                    // The QUIC connection keeps its own clock (keep-alive, idle timeout).
                    Ready::Due => ControlFlow::Continue(()),
                },
                read = poll_fn(|cx| {
                    let read = self.reader.poll_frame(&mut self.recv, cx);
                    // A frame begun: come back to start its clock.
                    if read.is_pending() && self.reader.open() && message_by.is_none() {
                        return std::task::Poll::Ready(None);
                    }
                    read.map(Some)
                }) => match read {
                    Some(read) => {
                        message_by = None;
                        self.client_frame(&control, read).await
                    }
                    None => ControlFlow::Continue(()),
                },
                second = self.connection.accept_bi() => match second {
                    Ok(_) => self.end(PROTOCOL_ERROR, "one stream per connection").await,
                    Err(_) => ControlFlow::Break(()),
                },
                _ = sleep_until(message_by) => {
                    message_by = None;
                    self.violated(Violation::MessageTimeout).await
                }
            };
            if step.is_break() {
                return;
            }
            // A frame the client has begun must be whole within the message timeout.
            if self.reader.open() && message_by.is_none() {
                let timeout = self.node.config.client_message_timeout_ms;
                message_by = Some(tokio::time::Instant::now() + Duration::from_millis(timeout));
            }
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
        if let Some(violation) = session::flood(count, &self.node.config) {
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

/// Waits until `at`, or forever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
