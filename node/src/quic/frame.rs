//! The framing on a QUIC stream: each frame is its length in bytes (u32, big-endian),
//! then that many bytes of JSON.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Bytes of the length prefix.
const PREFIX: usize = 4;

/// Why no frame could be read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadError {
    /// The prefix announced more than the frame limit.
    TooLarge { len: usize, max: usize },
    /// The stream ended inside a frame.
    Truncated,
    /// The stream failed (reset, connection lost).
    Io(String),
}

/// Reads frames from a stream, one at a time, keeping what it has of a frame between
/// polls: a read may be dropped (in a `select!`) and taken up again.
#[derive(Debug)]
pub(super) struct Reader {
    max: usize,
    prefix: [u8; PREFIX],
    /// Bytes of the prefix read so far.
    got: usize,
    /// The body, once the prefix is whole.
    body: Option<Vec<u8>>,
    filled: usize,
}

impl Reader {
    /// A reader of frames of at most `max` bytes.
    pub(super) fn new(max: usize) -> Reader {
        Reader {
            max,
            prefix: [0; PREFIX],
            got: 0,
            body: None,
            filled: 0,
        }
    }

    /// Whether a frame has begun and not ended.
    pub(super) fn open(&self) -> bool {
        self.got > 0
    }

    /// The next frame; `Ok(None)` once the stream has ended between frames.
    pub(super) fn poll_frame<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Vec<u8>>, ReadError>> {
        loop {
            if self.got < PREFIX {
                let mut buf = ReadBuf::new(&mut self.prefix[self.got..]);
                match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(ReadError::Io(e.to_string()))),
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                        return Poll::Ready(if self.got == 0 {
                            Ok(None)
                        } else {
                            Err(ReadError::Truncated)
                        });
                    }
                    Poll::Ready(Ok(())) => self.got += buf.filled().len(),
                }
                if self.got == PREFIX {
                    let len = u32::from_be_bytes(self.prefix) as usize;
                    if len > self.max {
                        return Poll::Ready(Err(ReadError::TooLarge { len, max: self.max }));
                    }
                    self.body = Some(vec![0; len]);
                    self.filled = 0;
                }
                continue;
            }
            let body = self.body.as_mut().expect("a body once the prefix is whole");
            if self.filled == body.len() {
                self.got = 0;
                return Poll::Ready(Ok(self.body.take()));
            }
            let mut buf = ReadBuf::new(&mut body[self.filled..]);
            match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ReadError::Io(e.to_string()))),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Err(ReadError::Truncated))
                }
                Poll::Ready(Ok(())) => self.filled += buf.filled().len(),
            }
        }
    }
}

/// Appends `frame`, length-prefixed, to `out`.
pub(super) fn put(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn frames_split_anywhere_read_whole() {
        let mut wire = Vec::new();
        put(&mut wire, br#"{"type":"hello"}"#);
        put(&mut wire, b"");
        put(&mut wire, b"[1]");
        // Byte by byte: every split of prefix and body.
        let (mut tx, mut rx) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&wire).await.unwrap();
        });
        let mut reader = Reader::new(64);
        let mut got = Vec::new();
        while let Some(frame) = poll_fn(|cx| reader.poll_frame(&mut rx, cx)).await.unwrap() {
            got.push(frame);
        }
        writer.await.unwrap();
        assert_eq!(
            got,
            vec![br#"{"type":"hello"}"#.to_vec(), Vec::new(), b"[1]".to_vec()]
        );
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let mut reader = Reader::new(8);
        let mut wire: &[u8] = &[0, 0, 0, 9, 1];
        let read = poll_fn(|cx| reader.poll_frame(&mut wire, cx)).await;
        assert_eq!(read, Err(ReadError::TooLarge { len: 9, max: 8 }));
        let mut reader = Reader::new(8);
        let mut wire: &[u8] = &[0, 0, 0, 4, 1];
        let read = poll_fn(|cx| reader.poll_frame(&mut wire, cx)).await;
        assert_eq!(read, Err(ReadError::Truncated));
        let mut reader = Reader::new(8);
        let mut wire: &[u8] = &[0, 0];
        let read = poll_fn(|cx| reader.poll_frame(&mut wire, cx)).await;
        assert_eq!(read, Err(ReadError::Truncated));
    }
}
