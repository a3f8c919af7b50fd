//! `fanout`: the calibration (docs/benchmarks.md). A bare server — plain tokio TCP, or
//! tokio-tungstenite — that sends the same `update` frames ringfeed would to the same
//! sockets, one write per message per socket: no routing, no JSON work beyond the
//! stamp, no replication, no gRPC. Whatever the box can do for this stack.
//!
//! With `--input` it generates nothing: after `go` it takes its messages from the
//! connections made to that address (length-prefixed `key\nframe`, see `relay`) and
//! fans each out to its key's sockets. That is the last hop of P2's same-hop floor.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::{emit, payload};

/// Frames queued per socket: the generator waits for the slowest socket.
const QUEUE: usize = 64;

#[derive(clap::Args, Debug)]
pub(crate) struct FanoutArgs {
    /// `tcp` (newline-delimited frames) or `ws` (one text frame per message).
    #[arg(long, default_value = "ws")]
    mode: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Say `ready` once this many sockets are connected.
    #[arg(long)]
    expect: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages to send in all after `go` (0: until `stop`).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Messages per second, each to every socket of its key, paced as `pub --rate`
    /// paces publishes (0: flat out).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Generate nothing: after `go`, fan out the messages that arrive on connections
    /// to this address instead, each a big-endian `u32` length and then `key\nframe`
    /// (from the last `relay` of P2's same-hop floor, or a `pub --relay`). Its address
    /// is `input` in the `listening` event. `--count` and `--rate` do not apply.
    #[arg(long, conflicts_with_all = ["count", "rate"])]
    input: Option<SocketAddr>,
}

type Subscribers = Arc<Mutex<BTreeMap<String, Vec<mpsc::Sender<Bytes>>>>>;

pub(crate) async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    let ws = match args.mode.as_str() {
        "ws" => true,
        "tcp" => false,
        other => bail!("--mode {other}: tcp or ws"),
    };
    let listener = TcpListener::bind(args.listen).await?;
    let input = match args.input {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let input_addr = match &input {
        Some(l) => Some(l.local_addr()?.to_string()),
        None => None,
    };
    emit(
        json!({"ev": "listening", "addr": listener.local_addr()?.to_string(), "input": input_addr}),
    );
    let subscribers: Subscribers = Arc::default();
    let connected = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready) = mpsc::channel::<()>(1);
    {
        let (subscribers, connected) = (subscribers.clone(), connected.clone());
        let expect = args.expect as u64;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let (subscribers, connected, ready_tx) =
                    (subscribers.clone(), connected.clone(), ready_tx.clone());
                tokio::spawn(async move {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    let registered = |key: String| {
                        subscribers
                            .lock()
                            .expect("subscribers lock")
                            .entry(key)
                            .or_default()
                            .push(tx.clone());
                        if connected.fetch_add(1, Ordering::Relaxed) + 1 == expect {
                            let _ = ready_tx.try_send(());
                        }
                    };
                    if ws {
                        serve_ws(stream, rx, registered).await;
                    } else {
                        serve_tcp(stream, rx, registered).await;
                    }
                });
            }
        });
    }
    let mut commands = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    if args.expect > 0 {
        ready.recv().await;
    }
    emit(json!({"ev": "ready", "connections": connected.load(Ordering::Relaxed)}));
    // Wait for `go`.
    loop {
        match commands.next_line().await? {
            Some(line) if line.trim() == "go" => break,
            Some(line) if line.trim() == "stop" => return Ok(()),
            Some(_) => continue,
            None => return Ok(()),
        }
    }
    let targets: Vec<(String, Vec<mpsc::Sender<Bytes>>)> = subscribers
        .lock()
        .expect("subscribers lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if targets.is_empty() {
        bail!("nobody connected");
    }
    let sent = Arc::new(AtomicU64::new(0));
    let generator = if let Some(input) = input {
        let targets: Arc<HashMap<String, Vec<mpsc::Sender<Bytes>>>> =
            Arc::new(targets.into_iter().collect());
        let sent = sent.clone();
        // Connections made before `go` wait in the backlog until now.
        tokio::spawn(async move {
            while let Ok((stream, _)) = input.accept().await {
                let _ = stream.set_nodelay(true);
                let (targets, sent) = (targets.clone(), sent.clone());
                tokio::spawn(async move {
                    if let Err(e) = fan_out_input(stream, &targets, ws, &sent).await {
                        eprintln!("fanout input: {e:#}");
                    }
                });
            }
        })
    } else {
        let sent = sent.clone();
        let (count, size, rate) = (args.count, args.payload, args.rate);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut i: u64 = 0;
            loop {
                if count > 0 && i >= count {
                    return;
                }
                if rate > 0 {
                    // Stamped when due, as a paced publisher stamps its payloads.
                    tokio::time::sleep_until(
                        started + Duration::from_secs_f64(i as f64 / rate as f64),
                    )
                    .await;
                }
                let (key, senders) = &targets[(i % targets.len() as u64) as usize];
                let end = if ws { "" } else { "\n" };
                let frame = Bytes::from(format!(
                    "{{\"type\":\"update\",\"key\":\"{key}\",\"seq\":{},\"data\":{}}}{end}",
                    i / targets.len() as u64 + 1,
                    payload(size)
                ));
                for tx in senders {
                    if tx.send(frame.clone()).await.is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        })
    };
    loop {
        match commands.next_line().await {
            Ok(Some(line)) if line.trim() == "stop" => break,
            Ok(Some(_)) => continue,
            _ => break,
        }
    }
    generator.abort();
    emit(json!({"ev": "done", "sent": sent.load(Ordering::Relaxed)}));
    std::process::exit(0);
}

/// Fans out every message that arrives on `stream` (a big-endian `u32` length, then
/// `key\nframe`) to the sockets of its key, as the generator does: one write per
/// message per socket (a newline after each for `tcp`).
async fn fan_out_input(
    stream: TcpStream,
    targets: &HashMap<String, Vec<mpsc::Sender<Bytes>>>,
    ws: bool,
    sent: &AtomicU64,
) -> anyhow::Result<()> {
    let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, stream);
    let mut body = Vec::new();
    loop {
        let len = match reader.read_u32().await {
            Ok(len) => len as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if len > crate::relay::MAX_FRAME {
            bail!("a message of {len} bytes");
        }
        body.resize(len, 0);
        reader.read_exact(&mut body).await?;
        let Some(newline) = body.iter().position(|&b| b == b'\n') else {
            bail!("a message without a key line");
        };
        let Some(senders) = std::str::from_utf8(&body[..newline])
            .ok()
            .and_then(|key| targets.get(key))
        else {
            continue;
        };
        let mut frame = Vec::with_capacity(len - newline);
        frame.extend_from_slice(&body[newline + 1..]);
        if !ws {
            frame.push(b'\n');
        }
        let frame = Bytes::from(frame);
        for tx in senders {
            if tx.send(frame.clone()).await.is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// The handshake callback's error type is tungstenite's, large or not.
#[allow(clippy::result_large_err)]
async fn serve_ws(
    stream: TcpStream,
    mut rx: mpsc::Receiver<Bytes>,
    registered: impl FnOnce(String),
) {
    let mut key = None;
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let callback = |request: &Request, response: Response| {
        key = request.uri().query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "key")
                .map(|(_, v)| v.into_owned())
        });
        Ok(response)
    };
    let Ok(mut socket) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let key = key.unwrap_or_default();
    let welcome = format!("{{\"type\":\"welcome\",\"key\":\"{key}\",\"seq\":0}}");
    if socket.send(Message::text(welcome)).await.is_err() {
        return;
    }
    registered(key);
    while let Some(frame) = rx.recv().await {
        let Ok(text) = Utf8Bytes::try_from(frame) else {
            return;
        };
        if socket.send(Message::Text(text)).await.is_err() {
            return;
        }
    }
}

async fn serve_tcp(
    stream: TcpStream,
    mut rx: mpsc::Receiver<Bytes>,
    registered: impl FnOnce(String),
) {
    let mut reader = tokio::io::BufReader::new(stream);
    let mut key = String::new();
    if reader.read_line(&mut key).await.is_err() {
        return;
    }
    registered(key.trim().to_owned());
    let mut stream = reader.into_inner();
    while let Some(frame) = rx.recv().await {
        if stream.write_all(&frame).await.is_err() {
            return;
        }
    }
}
