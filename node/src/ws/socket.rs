//! A server-side WebSocket on a tokio `TcpStream` that holds no buffer while idle.
//!
//! Over TLS, the stream's rustls connection is driven here, without an async wrapper:
//! its reads and writes are the same non-blocking calls, through rustls's buffers.
//!
//! tungstenite does the protocol: it reads and checks the client's frames, answers its
//! pings, and runs the close handshake. The session's own frames (updates, replies,
//! heartbeat pings) are framed here with tungstenite's `FrameHeader` into a buffer that
//! lives only until it is written. tokio-tungstenite would keep, per connection, a read
//! buffer, a write buffer as large as the largest batch ever sent, and two waker
//! proxies; an idle connection here keeps its socket and two empty `Vec`s.
//!
//! Reads are cooperative: every message handed to the session spends one unit of
//! tokio's task budget, so a client that never stops sending (a ping flood) cannot
//! keep its task from yielding — `try_read` alone would bypass the budget.
//!
//! The bytes read are also scanned for WebSocket frame headers ([`Scan`]), so that the
//! session can tell whether a data message has begun and not yet ended: tungstenite
//! keeps an unfinished message to itself, and a client that starts one and never ends
//! it must not hold the node's memory for as long as it answers pings.
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
/// [`Extra::spill`] until it is asked for.
const READ_CHUNK: usize = 4096;

/// One client's WebSocket.
pub(super) struct Socket {
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
    pub(super) fn new(
        stream: TcpStream,
        tls: Option<rustls::ServerConnection>,
        read: Bytes,
        config: WebSocketConfig,
    ) -> Self {
        let mut scan = Scan::default();
        scan.feed(&read);
        // A copy: `read` is a view of hyper's 8 KiB read buffer, kept alive by it.
        let spill = Bytes::copy_from_slice(&read);
        let extra = (tls.is_some() || !spill.is_empty()).then(|| Box::new(Extra { spill, tls }));
        let tcp = Tcp {
            stream,
            extra,
            scan,
        };
        Socket {
            ws: WebSocket::from_raw_socket(tcp, Role::Server, Some(config)),
            out: None,
        }
    }

    /// The client's next message; `None` once the connection has ended. tungstenite
    /// answers pings and close frames as it reads. A `poll_fn` rather than an async
    /// fn: an idle connection waits in it, and this is one pointer.
    pub(super) fn next(&mut self) -> impl Future<Output = Option<Result<Message, WsError>>> + '_ {
        poll_fn(|cx| self.poll_next(cx))
    }

    /// [`next`](Self::next) as a poll, for a caller that polls its socket together
    /// with something else.
    pub(super) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, WsError>>> {
        if self.ws.get_ref().scan.flag(Scan::ENDED) {
            return Poll::Ready(None);
        }
        // One unit of the task's budget per message: past it, the task yields (and is
        // woken at once), whatever the client keeps sending.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        // Reading may make tungstenite write a pong: never into half a frame of ours.
        if let Err(e) = ready!(self.poll_write_own(cx)) {
            self.ws.get_mut().scan.set_flag(Scan::ENDED, true);
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match self.ws.read() {
                Ok(message) => {
                    coop.made_progress();
                    return Poll::Ready(Some(Ok(message)));
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A pong that could not be written is retried by the next read:
                    // wake for room to write it as well as for more to read.
                    let tcp = self.ws.get_ref();
                    let writable = tcp.scan.flag(Scan::WRITE_BLOCKED)
                        && tcp.stream.poll_write_ready(cx).is_ready();
                    if !writable {
                        if let Err(e) = ready!(tcp.stream.poll_read_ready(cx)) {
                            self.ws.get_mut().scan.set_flag(Scan::ENDED, true);
                            return Poll::Ready(Some(Err(WsError::Io(e))));
                        }
                    }
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                    self.ws.get_mut().scan.set_flag(Scan::ENDED, true);
                    return Poll::Ready(None);
                }
                Err(e) => {
                    self.ws.get_mut().scan.set_flag(Scan::ENDED, true);
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    /// Whether the client has begun a data message (a text or binary frame, or the
    /// first fragment of one) whose last byte has not arrived yet.
    pub(super) fn message_open(&self) -> bool {
        self.ws.get_ref().scan.open()
    }

    /// Frames `text` as one text message behind whatever is queued; [`flush`](Self::flush)
    /// writes it.
    pub(super) fn queue_text(&mut self, text: &Utf8Bytes) {
        self.queue(OpCode::Data(Data::Text), text.as_bytes());
    }

    /// Queues a heartbeat ping (empty payload).
    pub(super) fn queue_ping(&mut self) {
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
    pub(super) async fn flush(&mut self) -> Result<(), WsError> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.out.as_ref().is_none_or(|out| out.written == 0) {
            // Nothing of ours is on the wire yet: tungstenite's bytes go first.
            ready!(self.poll_flush_tungstenite(cx))?;
        }
        ready!(self.poll_write_own(cx))?;
        // Over TLS, what rustls holds encrypted goes out too.
        let tcp = self.ws.get_mut();
        loop {
            match tcp.flush_tls() {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(tcp.stream.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(WsError::Io(e))),
            }
        }
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
            let tcp = self.ws.get_mut();
            while out.written < out.bytes.len() {
                match tcp.send(&out.bytes[out.written..]) {
                    Ok(n) => out.written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(tcp.stream.poll_write_ready(cx))?;
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
    pub(super) async fn close(&mut self, frame: CloseFrame) -> Result<(), WsError> {
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
    /// What is rare, or only for TLS, boxed: every idle connection holds the slot, and
    /// a plain one that has handed over what it read holds `None` (8 bytes, where a
    /// `Bytes` and a TLS connection's pointer would take 40).
    extra: Option<Box<Extra>>,
    /// Where the bytes read so far leave the client's frames, and two flags: the last
    /// write found no room, and the client's side has ended (the [`Socket`]'s state,
    /// kept here where it takes no room of its own).
    scan: Scan,
}

/// [`Tcp`]'s rare parts.
struct Extra {
    /// What a read took beyond what tungstenite asked for (empty once handed over).
    spill: Bytes,
    /// The TLS connection, for a `wss://` client.
    tls: Option<rustls::ServerConnection>,
}

impl Read for Tcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(extra) = self.extra.as_mut().filter(|e| !e.spill.is_empty()) {
            let n = buf.len().min(extra.spill.len());
            buf[..n].copy_from_slice(&extra.spill[..n]);
            extra.spill.advance(n);
            if extra.spill.is_empty() && extra.tls.is_none() {
                self.extra = None;
            }
            return Ok(n);
        }
        if buf.len() >= READ_CHUNK {
            let n = self.recv(buf)?;
            self.scan.feed(&buf[..n]);
            return Ok(n);
        }
        let mut chunk = [0u8; READ_CHUNK];
        let n = self.recv(&mut chunk)?;
        self.scan.feed(&chunk[..n]);
        let n_buf = n.min(buf.len());
        buf[..n_buf].copy_from_slice(&chunk[..n_buf]);
        if n > n_buf {
            let rest = Bytes::copy_from_slice(&chunk[n_buf..n]);
            match &mut self.extra {
                Some(extra) => extra.spill = rest,
                None => {
                    self.extra = Some(Box::new(Extra {
                        spill: rest,
                        tls: None,
                    }))
                }
            }
        }
        Ok(n_buf)
    }
}

/// Follows the client's frame headers through the bytes read, to know whether a data
/// message is under way. It only counts: tungstenite checks and decodes the frames, and
/// a stream it finds malformed ends the connection whatever the scan thinks.
///
/// Eight bytes, with the socket's two flags packed in: every idle connection holds one,
/// and its task must stay within tokio's 512-byte cell (see `ws`'s size test).
#[derive(Debug, Default)]
struct Scan {
    /// In a header, its extended payload length as the bytes arrive; in a payload, the
    /// bytes still to come (saturating: tungstenite refuses frames past the limit).
    count: u32,
    /// Header bytes seen of the current frame (0: a new frame starts)…
    seen: u8,
    /// …and how many it has, once its second byte says (0 until then).
    need: u8,
    /// [`Scan::FIN`], [`Scan::MASKED`], [`Scan::PAYLOAD`], the frame's kind, and
    /// [`Scan::OPEN`].
    bits: u8,
    /// The socket's flags: [`Scan::ENDED`], [`Scan::WRITE_BLOCKED`].
    io: u8,
}

impl Scan {
    const FIN: u8 = 0x80;
    /// A data message has begun and its final frame has not ended.
    const OPEN: u8 = 0x40;
    const MASKED: u8 = 0x20;
    /// The header is done; `count` is the payload left.
    const PAYLOAD: u8 = 0x10;
    /// The current frame's kind: a continuation, text or binary, or control.
    const KIND: u8 = 0x03;
    const CONTINUATION: u8 = 0;
    const DATA: u8 = 1;
    const CONTROL: u8 = 2;

    /// The client's side has ended (closed, reset, or broke the protocol).
    const ENDED: u8 = 0x01;
    /// The last write found no room; cleared by the next one that made progress.
    const WRITE_BLOCKED: u8 = 0x02;

    fn open(&self) -> bool {
        self.bits & Self::OPEN != 0
    }

    fn flag(&self, flag: u8) -> bool {
        self.io & flag != 0
    }

    fn set_flag(&mut self, flag: u8, on: bool) {
        if on {
            self.io |= flag;
        } else {
            self.io &= !flag;
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.bits & Self::PAYLOAD != 0 {
                let n = bytes.len().min(self.count as usize);
                self.count -= n as u32;
                bytes = &bytes[n..];
                if self.count == 0 {
                    self.end_frame();
                }
                continue;
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            match self.seen {
                0 => {
                    let kind = match b & 0x0f {
                        0 => Self::CONTINUATION,
                        1 | 2 => Self::DATA,
                        _ => Self::CONTROL,
                    };
                    let open = self.bits & Self::OPEN;
                    self.bits = (b & Self::FIN) | kind | open;
                    // Text or binary: a message begins (a continuation keeps it open).
                    if kind == Self::DATA {
                        self.bits |= Self::OPEN;
                    }
                }
                1 => {
                    let extended = match b & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    self.count = if extended == 0 {
                        u32::from(b & 0x7f)
                    } else {
                        0
                    };
                    let mask = if b & 0x80 != 0 {
                        self.bits |= Self::MASKED;
                        4
                    } else {
                        0
                    };
                    self.need = 2 + extended + mask;
                }
                n if n < self.need - if self.bits & Self::MASKED != 0 { 4 } else { 0 } => {
                    self.count = self
                        .count
                        .checked_mul(256)
                        .map_or(u32::MAX, |c| c | u32::from(b));
                }
                _ => {}
            }
            self.seen += 1;
            if self.seen >= 2 && self.seen == self.need {
                self.seen = 0;
                self.need = 0;
                self.bits |= Self::PAYLOAD;
                if self.count == 0 {
                    self.end_frame();
                }
            }
        }
    }

    /// The current frame's payload has all arrived.
    fn end_frame(&mut self) {
        let kind = self.bits & Self::KIND;
        if self.bits & Self::FIN != 0 && kind != Self::CONTROL {
            self.bits &= !Self::OPEN;
        }
        self.bits &= Self::OPEN;
    }
}

impl Write for Tcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.send(buf);
        let blocked = matches!(&written, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        self.scan.set_flag(Scan::WRITE_BLOCKED, blocked);
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}

/// The socket as rustls reads and writes it: non-blocking.
struct Raw<'a>(&'a TcpStream);

impl Read for Raw<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Raw<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Tcp {
    /// Reads what the client sent, decrypted over TLS; `WouldBlock` when nothing is
    /// there yet, 0 at its end.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.extra.as_mut().and_then(|e| e.tls.as_mut()) else {
            return self.stream.try_read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut Raw(&self.stream))? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                // Tell the client why (an alert), as far as the socket takes it.
                let _ = tls.write_tls(&mut Raw(&self.stream));
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // What reading made rustls say (a key update): out now if there is room.
            match Self::push(&self.stream, tls) {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }

    /// Writes `buf` to the client, encrypted over TLS; `WouldBlock` when there is no
    /// room. Over TLS, bytes are taken only once rustls has written out all it held,
    /// so it never holds more than one write's worth.
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.extra.as_mut().and_then(|e| e.tls.as_mut()) else {
            return self.stream.try_write(buf);
        };
        Self::push(&self.stream, tls)?;
        let n = tls.writer().write(buf)?;
        match Self::push(&self.stream, tls) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            // Taken: the rest goes out with the next write or flush.
            _ => Ok(n),
        }
    }

    /// Writes out what rustls holds; `WouldBlock` while some of it is left.
    fn flush_tls(&mut self) -> io::Result<()> {
        match self.extra.as_mut().and_then(|e| e.tls.as_mut()) {
            Some(tls) => Self::push(&self.stream, tls),
            None => Ok(()),
        }
    }

    fn push(stream: &TcpStream, tls: &mut rustls::ServerConnection) -> io::Result<()> {
        while tls.wants_write() {
            tls.write_tls(&mut Raw(stream))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Scan;

    /// A client frame: FIN + opcode, masked, with `len` payload bytes.
    fn frame(first: u8, len: usize) -> Vec<u8> {
        let mut out = vec![first];
        match len {
            0..=125 => out.push(0x80 | len as u8),
            126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend(std::iter::repeat_n(b'x', len));
        out
    }

    #[test]
    fn a_whole_message_closes_what_it_opened() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let mut scan = Scan::default();
            let bytes = frame(0x81, len);
            let (head, tail) = bytes.split_at(bytes.len() - 1);
            scan.feed(head);
            assert!(scan.open(), "{len}: open before its last byte");
            scan.feed(tail);
            assert!(!scan.open(), "{len}: still open after its last byte");
        }
    }

    #[test]
    fn fragments_stay_open_through_pings_until_the_final_one() {
        let mut scan = Scan::default();
        scan.feed(&frame(0x01, 60_000)); // text, not final
        assert!(scan.open());
        for _ in 0..3 {
            scan.feed(&frame(0x89, 4)); // ping
            scan.feed(&frame(0x8a, 0)); // pong
            assert!(scan.open(), "control frames do not end a message");
        }
        scan.feed(&frame(0x00, 10)); // continuation, not final
        assert!(scan.open());
        scan.feed(&frame(0x80, 10)); // final continuation
        assert!(!scan.open());
    }

    #[test]
    fn the_scan_and_the_socket_flags_keep_out_of_each_other() {
        let mut scan = Scan::default();
        scan.set_flag(Scan::WRITE_BLOCKED, true);
        scan.feed(&frame(0x01, 10));
        assert!(scan.open() && scan.flag(Scan::WRITE_BLOCKED) && !scan.flag(Scan::ENDED));
        scan.set_flag(Scan::WRITE_BLOCKED, false);
        scan.set_flag(Scan::ENDED, true);
        scan.feed(&frame(0x80, 3));
        assert!(!scan.open() && scan.flag(Scan::ENDED));
        assert_eq!(std::mem::size_of::<Scan>(), 8);
    }

    #[test]
    fn bytes_arriving_one_at_a_time_are_followed() {
        let mut scan = Scan::default();
        let mut bytes = frame(0x89, 3);
        bytes.extend(frame(0x82, 200));
        bytes.extend(frame(0x88, 2));
        let mut opened = false;
        for b in &bytes {
            scan.feed(std::slice::from_ref(b));
            opened |= scan.open();
        }
        assert!(opened);
        assert!(!scan.open());
    }
}
