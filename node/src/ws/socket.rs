//! A server-side WebSocket on a tokio `TcpStream` that holds no buffer while idle.
//!
//! tungstenite does the protocol: it reads and checks the client's frames, answers its
//! pings, and runs the close handshake. The session's own frames (updates, replies,
//! heartbeat pings) are framed here with tungstenite's `FrameHeader` into a buffer that
//! lives only until it is written. tokio-tungstenite would keep, per connection, a read
//! buffer, a write buffer as large as the largest batch ever sent, and two waker
//! proxies; an idle connection here keeps its socket and two empty `Vec`s.
//!
//! The two writers never interleave: tungstenite's queued bytes (a pong, a close) go
//! out before the session's are formatted behind them, and tungstenite is not asked to
//! read or write while the session's bytes are half written.

use std::future::{poll_fn, Future};
use std::io::{self, Read, Write};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

/// The most read from the kernel at once. tungstenite asks for a few bytes at a time
/// (its read buffer is kept at its 14-byte minimum); the rest of a read waits in
/// [`Tcp::spill`] until it is asked for.
const READ_CHUNK: usize = 4096;

/// One client's WebSocket.
pub struct Socket {
    ws: WebSocket<Tcp>,
    /// The session's frames not yet written: `None`, with no allocation, while idle
    /// (one pointer, where a `Vec` and its count would take 32 bytes).
    out: Option<Box<Out>>,
}

/// Frames being written.
#[derive(Default)]
struct Out {
    bytes: Vec<u8>,
    /// How much of `bytes` the kernel has taken.
    written: usize,
}

impl Socket {
    /// A WebSocket on `stream`, whose handshake is done; `read` is what was read past
    /// the handshake (a client may send frames right behind its request).
    pub fn new(stream: TcpStream, read: Bytes, config: WebSocketConfig) -> Self {
        let tcp = Tcp {
            stream,
            // A copy: `read` is a view of hyper's 8 KiB read buffer, kept alive by it.
            spill: (!read.is_empty()).then(|| Box::new(Bytes::copy_from_slice(&read))),
            write_blocked: false,
            ended: false,
        };
        Socket {
            ws: WebSocket::from_raw_socket(tcp, Role::Server, Some(config)),
            out: None,
        }
    }

    /// The client's next message; `None` once the connection has ended. tungstenite
    /// answers pings and close frames as it reads. A `poll_fn` rather than an async
    /// fn: an idle connection waits in it, and this is one pointer.
    pub fn next(&mut self) -> impl Future<Output = Option<Result<Message, WsError>>> + '_ {
        poll_fn(|cx| self.poll_next(cx))
    }

    /// [`next`](Self::next) as a poll, for a caller that polls its socket together
    /// with something else.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>> {
        if self.ws.get_ref().ended {
            return Poll::Ready(None);
        }
        // Reading may make tungstenite write a pong: never into half a frame of ours.
        if let Err(e) = ready!(self.poll_write_own(cx)) {
            self.ws.get_mut().ended = true;
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match self.ws.read() {
                Ok(message) => return Poll::Ready(Some(Ok(message))),
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A pong that could not be written is retried by the next read:
                    // wake for room to write it as well as for more to read.
                    let tcp = self.ws.get_ref();
                    let writable = tcp.write_blocked && tcp.stream.poll_write_ready(cx).is_ready();
                    if !writable {
                        if let Err(e) = ready!(tcp.stream.poll_read_ready(cx)) {
                            self.ws.get_mut().ended = true;
                            return Poll::Ready(Some(Err(WsError::Io(e))));
                        }
                    }
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                    self.ws.get_mut().ended = true;
                    return Poll::Ready(None);
                }
                Err(e) => {
                    self.ws.get_mut().ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    /// Frames `text` as one text message behind whatever is queued; [`flush`](Self::flush)
    /// writes it.
    pub fn queue_text(&mut self, text: &Utf8Bytes) {
        self.queue(OpCode::Data(Data::Text), text.as_bytes());
    }

    /// Queues a heartbeat ping (empty payload).
    pub fn queue_ping(&mut self) {
        self.queue(OpCode::Control(Control::Ping), &[]);
    }

    fn queue(&mut self, opcode: OpCode, payload: &[u8]) {
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let length = payload.len() as u64;
        let out = &mut self.out.get_or_insert_with(Box::default).bytes;
        out.reserve(header.len(length) + payload.len());
        header
            .format(length, out)
            .expect("formatting into a Vec cannot fail");
        out.extend_from_slice(payload);
    }

    /// Writes everything queued, tungstenite's first; afterwards the session's buffer
    /// is freed.
    pub async fn flush(&mut self) -> Result<(), WsError> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.out.as_ref().is_none_or(|out| out.written == 0) {
            // Nothing of ours is on the wire yet: tungstenite's bytes go first.
            ready!(self.poll_flush_tungstenite(cx))?;
        }
        self.poll_write_own(cx)
    }

    /// Writes what tungstenite has queued (a pong, a close frame).
    fn poll_flush_tungstenite(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        loop {
            match self.ws.flush() {
                Ok(()) | Err(WsError::ConnectionClosed) => return Poll::Ready(Ok(())),
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.ws.get_ref().stream.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes the rest of `out`, then frees it.
    fn poll_write_own(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if let Some(out) = &mut self.out {
            let stream = &self.ws.get_ref().stream;
            while out.written < out.bytes.len() {
                match stream.try_write(&out.bytes[out.written..]) {
                    Ok(n) => out.written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(stream.poll_write_ready(cx))?;
                    }
                    Err(e) => return Poll::Ready(Err(WsError::Io(e))),
                }
            }
        }
        self.out = None;
        Poll::Ready(Ok(()))
    }

    /// Starts the close handshake with `frame` and writes it; the client's answer is
    /// read by [`next`](Self::next), which then ends.
    pub async fn close(&mut self, frame: CloseFrame) -> Result<(), WsError> {
        self.flush().await?;
        match self.ws.close(Some(frame)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        self.flush().await
    }
}

/// The TCP stream as tungstenite sees it: non-blocking reads and writes that say
/// `WouldBlock` when the kernel has nothing or no room.
struct Tcp {
    stream: TcpStream,
    /// What a read took from the kernel beyond what tungstenite asked for; `None` once
    /// it has been handed over. Boxed: it is rare, and every idle connection holds
    /// the slot (8 bytes rather than a `Bytes`' 32).
    spill: Option<Box<Bytes>>,
    /// The last write found no room; cleared by the next one that made progress.
    write_blocked: bool,
    /// The client's side has ended (closed, reset, or broke the protocol). The
    /// [`Socket`]'s state, kept here where it takes no room of its own.
    ended: bool,
}

impl Read for Tcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let spill = match &mut self.spill {
            Some(spill) => spill,
            None => {
                if buf.len() >= READ_CHUNK {
                    return self.stream.try_read(buf);
                }
                let mut chunk = [0u8; READ_CHUNK];
                let n = self.stream.try_read(&mut chunk)?;
                if n <= buf.len() {
                    buf[..n].copy_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                self.spill
                    .insert(Box::new(Bytes::copy_from_slice(&chunk[..n])))
            }
        };
        let n = buf.len().min(spill.len());
        buf[..n].copy_from_slice(&spill[..n]);
        spill.advance(n);
        if spill.is_empty() {
            self.spill = None;
        }
        Ok(n)
    }
}

impl Write for Tcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.stream.try_write(buf);
        self.write_blocked = matches!(&written, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
