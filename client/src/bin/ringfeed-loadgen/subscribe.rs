//! `sub`: many subscriber connections, each reading frames and recording the publish →
//! receive latency of every stamped one.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use futures_util::StreamExt;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::{emit, now_ns, stamp, stopped};

/// Latencies are recorded in microseconds, up to a minute.
const MAX_LATENCY_US: u64 = 60_000_000;
const SHARDS: usize = 16;

#[derive(clap::Args, Debug)]
pub struct SubArgs {
    /// `ws` (WebSocket frames) or `tcp` (newline-delimited frames after sending the
    /// key and a newline: the calibration's raw TCP server).
    #[arg(long, default_value = "ws")]
    target: String,
    /// Where to connect, comma-separated (connections are spread over them); `{key}` is
    /// replaced by the key: `ws://127.0.0.1:8001/v1/connect?key={key}`, `tcp://127.0.0.1:9000`.
    #[arg(long, value_delimiter = ',')]
    url: Vec<String>,
    /// The keys, as PREFIX*COUNT.
    #[arg(long)]
    keys: String,
    /// Subscribers per key.
    #[arg(long, default_value_t = 1)]
    per_key: usize,
    /// This process takes connection c when c % n == i (as `i/n`).
    #[arg(long, default_value = "0/1")]
    shard: String,
    /// Local source addresses, comma-separated (each gives ~28k ports per destination).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Stop after this long (0: when stdin says `stop` or closes).
    #[arg(long, default_value_t = 0)]
    duration_secs: u64,
}

/// What the connections share.
struct Shared {
    received: AtomicU64,
    /// Connections that received at least one stamped frame.
    receiving: AtomicU64,
    closed: AtomicU64,
    hist: Vec<Mutex<Histogram<u64>>>,
}

impl Shared {
    fn record(&self, conn: usize, latency_us: u64) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut h = self.hist[conn % SHARDS].lock().expect("histogram lock");
        h.saturating_record(latency_us.clamp(1, MAX_LATENCY_US));
    }
}

pub async fn run(args: SubArgs) -> anyhow::Result<()> {
    let keys = crate::keys(&args.keys)?;
    let (index, of) = args
        .shard
        .split_once('/')
        .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
        .filter(|(i, n)| *n > 0 && i < n)
        .ok_or_else(|| anyhow!("--shard wants i/n"))?;
    if args.url.is_empty() || args.sources.is_empty() {
        bail!("--url and --sources need at least one entry");
    }
    let tcp = match args.target.as_str() {
        "ws" => false,
        "tcp" => true,
        other => bail!("--target {other}: ws or tcp"),
    };
    let shared = Arc::new(Shared {
        received: AtomicU64::new(0),
        receiving: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        hist: (0..SHARDS)
            .map(|_| Mutex::new(Histogram::new_with_max(MAX_LATENCY_US, 3).expect("bounds")))
            .collect(),
    });
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut connecting = tokio::task::JoinSet::new();
    let total = keys.len() * args.per_key;
    for conn in (0..total).filter(|c| c % of == index) {
        let key = keys[conn / args.per_key].clone();
        let url = args.url[conn % args.url.len()].replace("{key}", &key);
        let source = args.sources[conn % args.sources.len()];
        let gate = gate.clone();
        let shared = shared.clone();
        connecting.spawn(async move {
            let permit = gate.acquire_owned().await.expect("gate open");
            let attempt = tokio::time::timeout(Duration::from_secs(30), async {
                if tcp {
                    connect_tcp(&url, &key, source).await.map(Conn::Tcp)
                } else {
                    connect_ws(&url, source).await.map(Conn::Ws)
                }
            })
            .await
            .map_err(|_| anyhow!("connect timed out"))
            .and_then(|r| r);
            drop(permit);
            let conn_stream = attempt?;
            tokio::spawn(read(conn_stream, conn, shared));
            anyhow::Ok(())
        });
    }
    let (mut connected, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    while let Some(done) = connecting.join_next().await {
        match done {
            Ok(Ok(())) => connected += 1,
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    emit(json!({
        "ev": "connected",
        "n": connected,
        "failed": failed,
        "error": first_error,
        "ms": started.elapsed().as_millis() as u64,
    }));

    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                emit(json!({
                    "ev": "tick",
                    "at_ns": now_ns(),
                    "received": shared.received.load(Ordering::Relaxed),
                    "receiving": shared.receiving.load(Ordering::Relaxed),
                }));
            }
        })
    };
    stopped(args.duration_secs).await;
    ticker.abort();
    let mut merged = Histogram::<u64>::new_with_max(MAX_LATENCY_US, 3).expect("bounds");
    for h in &shared.hist {
        merged.add(&*h.lock().expect("histogram lock"))?;
    }
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(&merged, &mut bytes)
        .map_err(|e| anyhow!("histogram: {e:?}"))?;
    emit(json!({
        "ev": "done",
        "connected": connected,
        "received": shared.received.load(Ordering::Relaxed),
        "receiving": shared.receiving.load(Ordering::Relaxed),
        "closed": shared.closed.load(Ordering::Relaxed),
        "p50_us": merged.value_at_quantile(0.5),
        "p99_us": merged.value_at_quantile(0.99),
        "max_us": merged.max(),
        "hist": base64::engine::general_purpose::STANDARD.encode(&bytes),
    }));
    // Closing 10k sockets one by one is not worth waiting for.
    std::process::exit(0);
}

enum Conn {
    Ws(tokio_tungstenite::WebSocketStream<TcpStream>),
    Tcp(tokio::io::BufReader<TcpStream>),
}

async fn dial(addr: &str, source: IpAddr) -> anyhow::Result<TcpStream> {
    let target: SocketAddr = tokio::net::lookup_host(addr)
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .ok_or_else(|| anyhow!("cannot resolve {addr}"))?;
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Small buffers: 100k connections in a few processes must fit in memory.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// Connects and follows `redirect` frames (at most 3) until a non-redirect frame or
/// none is pending.
async fn connect_ws(
    url: &str,
    source: IpAddr,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<TcpStream>> {
    let mut url = url.to_owned();
    for _ in 0..4 {
        let parsed = url::Url::parse(&url).with_context(|| format!("bad url {url}"))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| anyhow!("no host in {url}"))?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        let stream = dial(&format!("{host}:{port}"), source).await?;
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(ws_config()))
                .await?;
        // Every server (ringfeed, the peers, the calibration) sends `welcome` or
        // `redirect` first.
        let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        match first {
            Ok(Some(Ok(Message::Text(text)))) if text.as_str().contains("\"redirect\"") => {
                let frame: serde_json::Value = serde_json::from_str(text.as_str())?;
                url = frame["url"]
                    .as_str()
                    .ok_or_else(|| anyhow!("redirect without url"))?
                    .to_owned();
                continue;
            }
            Ok(Some(Ok(Message::Close(c)))) => bail!("closed at once: {c:?}"),
            Ok(Some(Err(e))) => return Err(e.into()),
            _ => return Ok(ws),
        }
    }
    bail!("too many redirects")
}

async fn connect_tcp(
    url: &str,
    key: &str,
    source: IpAddr,
) -> anyhow::Result<tokio::io::BufReader<TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let addr = url.strip_prefix("tcp://").unwrap_or(url);
    let mut stream = dial(addr, source).await?;
    stream.write_all(format!("{key}\n").as_bytes()).await?;
    Ok(tokio::io::BufReader::with_capacity(4 * 1024, stream))
}

async fn read(conn: Conn, id: usize, shared: Arc<Shared>) {
    let mut first = true;
    let mut seen = |text: &[u8]| {
        if let Some(ts) = stamp(text) {
            shared.record(id, now_ns().saturating_sub(ts) / 1000);
            if first {
                first = false;
                shared.receiving.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    match conn {
        Conn::Ws(mut ws) => {
            while let Some(message) = ws.next().await {
                match message {
                    Ok(Message::Text(text)) => seen(text.as_bytes()),
                    Ok(Message::Binary(bytes)) => seen(&bytes),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        Conn::Tcp(mut reader) => {
            let mut line = Vec::with_capacity(256);
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => seen(&line),
                }
            }
        }
    }
    shared.closed.fetch_add(1, Ordering::Relaxed);
}
