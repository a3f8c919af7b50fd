//! `relay`: one link of P2's same-hop floor (docs/benchmarks.md). A minimal tokio
//! process that accepts TCP connections and passes every length-prefixed frame
//! (a big-endian `u32` length, then that many bytes) on to `--next`, unchanged, over
//! one persistent connection without Nagle. It reads what has arrived, forwards every
//! complete frame in it with one write, and never waits to gather more: no routing, no
//! parsing beyond the lengths, no replication, no gRPC. A chain of them in front of
//! the calibration's fan-out server (`fanout --input`) has as many process hops as
//! ringfeed's path and does nothing else, which is the floor for that many hops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::BytesMut;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::{emit, stopped};

/// The largest frame a relay (or the fan-out server's input) accepts.
pub(crate) const MAX_FRAME: usize = 16 << 20;

#[derive(clap::Args, Debug)]
pub(crate) struct RelayArgs {
    /// Where to accept the publisher's (or the previous relay's) connections.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The next relay's `--listen`, or the fan-out server's `--input` (host:port):
    /// connected once, at the start, and kept.
    #[arg(long)]
    next: String,
}

pub(crate) async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let next = TcpStream::connect(&args.next)
        .await
        .with_context(|| format!("cannot reach the next hop at {}", args.next))?;
    next.set_nodelay(true)?;
    // Every inbound connection writes its complete frames under this lock, so frames
    // from different connections never interleave.
    let next = Arc::new(Mutex::new(next));
    let forwarded = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    emit(json!({"ev": "listening", "addr": listener.local_addr()?.to_string()}));
    {
        let (next, forwarded, errors) = (next.clone(), forwarded.clone(), errors.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let (next, forwarded, errors) = (next.clone(), forwarded.clone(), errors.clone());
                tokio::spawn(async move {
                    if let Err(e) = relay(stream, &next, &forwarded).await {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("relay: {e:#}");
                    }
                });
            }
        });
    }
    stopped(0).await;
    emit(json!({
        "ev": "done",
        "forwarded": forwarded.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
    }));
    std::process::exit(0);
}

/// Forwards the complete frames of `stream` to `next` as they arrive.
async fn relay(
    mut stream: TcpStream,
    next: &Mutex<TcpStream>,
    forwarded: &AtomicU64,
) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        buf.reserve(16 * 1024);
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let (end, frames) = complete_frames(&buf)?;
        if frames == 0 {
            continue;
        }
        let chunk = buf.split_to(end);
        next.lock().await.write_all(&chunk).await?;
        forwarded.fetch_add(frames, Ordering::Relaxed);
    }
}

/// The length in bytes of the complete frames at the start of `buf`, and how many
/// there are.
fn complete_frames(buf: &[u8]) -> anyhow::Result<(usize, u64)> {
    let (mut at, mut frames) = (0, 0);
    while let Some(prefix) = buf.get(at..at + 4) {
        let len = u32::from_be_bytes(prefix.try_into().expect("four bytes")) as usize;
        if len > MAX_FRAME {
            bail!("a frame of {len} bytes (at most {MAX_FRAME})");
        }
        if buf.len() < at + 4 + len {
            break;
        }
        at += 4 + len;
        frames += 1;
    }
    Ok((at, frames))
}

/// `body` as a frame: its length (big-endian `u32`), then itself.
pub(crate) fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_frames_are_forwarded() {
        let mut buf = frame(b"k\nabc");
        buf.extend(frame(b""));
        let whole = buf.len();
        buf.extend(&frame(b"k\nlonger")[..7]);
        assert_eq!(complete_frames(&buf).unwrap(), (whole, 2));
        assert_eq!(complete_frames(&buf[..3]).unwrap(), (0, 0));
        assert!(complete_frames(&u32::MAX.to_be_bytes()).is_err());
    }

    #[tokio::test]
    async fn a_relay_passes_frames_on_unchanged() {
        let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let next = TcpStream::connect(sink.local_addr().unwrap())
            .await
            .unwrap();
        let (mut downstream, _) = sink.accept().await.unwrap();
        let next = Mutex::new(next);
        let source = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut upstream = TcpStream::connect(source.local_addr().unwrap())
            .await
            .unwrap();
        let (inbound, _) = source.accept().await.unwrap();
        let forwarded = AtomicU64::new(0);
        let sent = [frame(b"k:1\n{\"ts\":1}"), frame(b"k:2\n{\"ts\":2}")].concat();
        // Split mid-frame: the relay must wait for the rest of the second one.
        upstream.write_all(&sent[..9]).await.unwrap();
        upstream.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        upstream.write_all(&sent[9..]).await.unwrap();
        drop(upstream);
        relay(inbound, &next, &forwarded).await.unwrap();
        drop(next);
        let mut got = Vec::new();
        downstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(forwarded.load(Ordering::Relaxed), 2);
    }
}
