//! `sub`: many subscriber connections, each reading frames and recording the publish →
//! receive latency of every stamped one. Over `wss://` (trusting `--ca`), with a ticket
//! per key asked of the nodes first (`--api-token`), for a secure cluster (P10).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::{emit, now_ns, stamp, stopped};

/// Latencies are recorded in microseconds, up to a minute.
const MAX_LATENCY_US: u64 = 60_000_000;
const SHARDS: usize = 16;
/// How long the tickets asked for stay valid: the most a node grants by default
/// (`--max-ticket-ttl-s`), longer than any run.
const TICKET_TTL_S: u64 = 3600;
/// The subject of every ticket.
const TICKET_SUBJECT: &str = "ringfeed-loadgen";

#[derive(clap::Args, Debug)]
pub(crate) struct SubArgs {
    /// `ws` (WebSocket frames), `tcp` (newline-delimited frames after sending the
    /// key and a newline: the calibration's raw TCP server) or `socketio` (Engine.IO 4
    /// over WebSocket: the namespace CONNECT after the open packet, pongs to pings).
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
    /// Follow every move like a real client: on `redirect` go to its URL, on a close
    /// reconnect (to the next `--url`) — both with `since`/`epoch` — and account for
    /// every seq: gaps, duplicates, resets, and how long each connection was without
    /// updates (ringfeed only: its frames carry seqs).
    #[arg(long)]
    follow: bool,
    /// Trust the CA certificates in this PEM file: for `wss://` URLs (TLS by rustls,
    /// the name checked against the URL's host) and `https://` ticket requests.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Present a ticket on every connection (`&ticket=…`): one per key this process
    /// connects, asked of a node (`POST /v1/tickets` with this API token, at the
    /// `https://` or `http://` base of one of the `--url`s) before the first
    /// connection, valid an hour. A ticket admits any number of connections unless
    /// the nodes run `--single-use-tickets`.
    #[arg(long)]
    api_token: Option<String>,
    /// Ticket requests in flight at once.
    #[arg(long, default_value_t = 32)]
    ticket_concurrency: usize,
    /// Before connecting (and after the tickets), say `holding` and wait until stdin
    /// says `connect`: the orchestrator reads a node's resident set in between.
    #[arg(long)]
    hold: bool,
}

/// What the connections share.
struct Shared {
    follow: Follow,
    received: AtomicU64,
    last_receipt_ns: AtomicU64,
    /// Connections that received at least one stamped frame.
    receiving: AtomicU64,
    closed: AtomicU64,
    hist: Vec<Mutex<Histogram<u64>>>,
    /// The largest latency (µs) since the last tick, and how many exceeded 2 ms: where
    /// in a run the tail happens (a stall every few seconds, or spread evenly).
    tick_max_us: AtomicU64,
    tick_over_2ms: AtomicU64,
}

impl Shared {
    /// Records a frame stamped `ts` received at `now` (both ns since the epoch).
    fn record(&self, conn: usize, ts: u64, now: u64) {
        let latency_us = now.saturating_sub(ts) / 1000;
        self.received.fetch_add(1, Ordering::Relaxed);
        self.last_receipt_ns.fetch_max(now, Ordering::Relaxed);
        self.tick_max_us.fetch_max(latency_us, Ordering::Relaxed);
        if latency_us > 2_000 {
            self.tick_over_2ms.fetch_add(1, Ordering::Relaxed);
        }
        let mut h = self.hist[conn % SHARDS].lock().expect("histogram lock");
        h.saturating_record(latency_us.clamp(1, MAX_LATENCY_US));
    }
}

pub(crate) async fn run(args: SubArgs) -> anyhow::Result<()> {
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
    let (tcp, socketio) = match args.target.as_str() {
        "ws" => (false, false),
        "tcp" => (true, false),
        "socketio" => (false, true),
        other => bail!("--target {other}: ws, tcp or socketio"),
    };
    let tls = match &args.ca {
        Some(path) => Some(ringfeed_client::Tls::from_ca_file(path)?),
        None => None,
    };
    if args.follow && tls.is_some() {
        bail!("--follow speaks ws:// only (no --ca)");
    }
    let connector = tls.as_ref().map(|t| TlsConnector::from(t.config()));
    let shared = Arc::new(Shared {
        follow: Follow::default(),
        last_receipt_ns: AtomicU64::new(0),
        received: AtomicU64::new(0),
        receiving: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        tick_max_us: AtomicU64::new(0),
        tick_over_2ms: AtomicU64::new(0),
        hist: (0..SHARDS)
            .map(|_| Mutex::new(Histogram::new_with_max(MAX_LATENCY_US, 3).expect("bounds")))
            .collect(),
    });
    let total = keys.len() * args.per_key;
    let mine: Vec<usize> = (0..total).filter(|c| c % of == index).collect();
    let tickets = match &args.api_token {
        Some(token) => {
            let asked = Instant::now();
            let mut needed: Vec<usize> = mine.iter().map(|c| c / args.per_key).collect();
            needed.dedup();
            let tickets = fetch_tickets(
                &keys,
                needed,
                &args.url,
                token,
                tls.as_ref(),
                args.ticket_concurrency,
            )
            .await?;
            emit(json!({
                "ev": "tickets",
                "n": tickets.len(),
                "ms": asked.elapsed().as_millis() as u64,
            }));
            tickets
        }
        None => HashMap::new(),
    };
    if args.hold {
        emit(json!({"ev": "holding"}));
        wait_for_line("connect").await?;
    }
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut connecting = tokio::task::JoinSet::new();
    let urls = Arc::new(args.url.clone());
    let follow = args.follow && !tcp && !socketio;
    for conn in mine {
        let key = keys[conn / args.per_key].clone();
        let mut url = args.url[conn % args.url.len()].replace("{key}", &key);
        if let Some(ticket) = tickets.get(&(conn / args.per_key)) {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("ticket=");
            url.push_str(ticket);
        }
        let source = args.sources[conn % args.sources.len()];
        let gate = gate.clone();
        let shared = shared.clone();
        let urls = urls.clone();
        let connector = connector.clone();
        connecting.spawn(async move {
            let permit = gate.acquire_owned().await.expect("gate open");
            let attempt = tokio::time::timeout(Duration::from_secs(30), async {
                if tcp {
                    connect_tcp(&url, &key, source).await.map(Conn::Tcp)
                } else if url.starts_with("wss://") {
                    let connector = connector
                        .as_ref()
                        .ok_or_else(|| anyhow!("wss:// needs --ca"))?;
                    let (mut ws, first) = connect_wss(&url, source, connector).await?;
                    if socketio {
                        socketio_connect(&mut ws, first).await?;
                    }
                    Ok(Conn::Wss(Box::new(ws)))
                } else if socketio {
                    let (mut ws, first) = connect_ws(&url, source).await?;
                    socketio_connect(&mut ws, first).await?;
                    Ok(Conn::Ws(Box::new(ws), None))
                } else {
                    connect_ws(&url, source)
                        .await
                        .map(|(ws, first)| Conn::Ws(Box::new(ws), first))
                }
            })
            .await
            .map_err(|_| anyhow!("connect timed out"))
            .and_then(|r| r);
            drop(permit);
            let conn_stream = attempt?;
            match conn_stream {
                Conn::Ws(ws, first) if follow => {
                    tokio::spawn(follow_moves(*ws, first, conn, key, urls, source, shared));
                }
                other => {
                    tokio::spawn(read(other, conn, shared));
                }
            }
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

    let tick_ms = if args.follow { 100 } else { 1000 };
    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(tick_ms));
            loop {
                every.tick().await;
                emit(json!({
                    "ev": "tick",
                    "at_ns": now_ns(),
                    "received": shared.received.load(Ordering::Relaxed),
                    "receiving": shared.receiving.load(Ordering::Relaxed),
                    "interrupted": shared.follow.interrupted.load(Ordering::Relaxed),
                    "down": shared.follow.down.load(Ordering::Relaxed),
                    "max_us": shared.tick_max_us.swap(0, Ordering::Relaxed),
                    "over_2ms": shared.tick_over_2ms.swap(0, Ordering::Relaxed),
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
    // The histogram as [value, count] pairs, one per recorded bucket.
    let hist: Vec<[u64; 2]> = merged
        .iter_recorded()
        .map(|v| [v.value_iterated_to(), v.count_at_value()])
        .collect();
    let f = &shared.follow;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    emit(json!({
        "ev": "done",
        "last_receipt_ns": load(&shared.last_receipt_ns),
        "interrupted": load(&f.interrupted),
        "resumed": load(&f.resumed),
        "still_down": f.down.load(Ordering::Relaxed),
        "last_resumed_ns": load(&f.last_resumed_ns),
        "first_down_ns": load(&f.first_down_ns),
        "max_outage_us": load(&f.max_outage_us),
        "gaps": load(&f.gaps),
        "duplicates": load(&f.duplicates),
        "resets": load(&f.resets),
        "connected": connected,
        "received": shared.received.load(Ordering::Relaxed),
        "receiving": shared.receiving.load(Ordering::Relaxed),
        "closed": shared.closed.load(Ordering::Relaxed),
        "p50_us": merged.value_at_quantile(0.5),
        "p99_us": merged.value_at_quantile(0.99),
        "max_us": merged.max(),
        "hist": hist,
    }));
    // Closing 10k sockets one by one is not worth waiting for.
    std::process::exit(0);
}

enum Conn {
    /// With the first text frame the server sent (its `welcome`).
    Ws(Box<Ws>, Option<String>),
    /// The same over TLS (`wss://`; `--follow` is plain only, so no first frame).
    Wss(Box<Wss>),
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
    // bind(port 0) searches the port range linearly per socket; connect() picks a port
    // far faster. Bind only to reach beyond 127.0.0.1's ~28k ports per destination.
    if source != IpAddr::from([127, 0, 0, 1]) {
        socket.bind(SocketAddr::new(source, 0))?;
    }
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

type Ws = WebSocketStream<TcpStream>;
type Wss = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// `(host, port)` of a URL.
fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let parsed = url::Url::parse(url).with_context(|| format!("bad url {url}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow!("no host in {url}"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    Ok((host.to_owned(), port))
}

/// What a server said first after the upgrade.
enum First {
    /// A `redirect` to this URL.
    Redirect(String),
    /// Anything else: the first text frame (the `welcome`), or none within 10 s.
    Frame(Option<String>),
}

/// Reads the first frame. Every server (ringfeed, the peers, the calibration) sends
/// `welcome` or `redirect` first.
async fn first_frame<S>(ws: &mut WebSocketStream<S>) -> anyhow::Result<First>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    match first {
        Ok(Some(Ok(Message::Text(text)))) if text.as_str().contains("\"redirect\"") => {
            let frame: serde_json::Value = serde_json::from_str(text.as_str())?;
            Ok(First::Redirect(
                frame["url"]
                    .as_str()
                    .ok_or_else(|| anyhow!("redirect without url"))?
                    .to_owned(),
            ))
        }
        Ok(Some(Ok(Message::Close(c)))) => bail!("closed at once: {c:?}"),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(Some(Ok(Message::Text(text)))) => Ok(First::Frame(Some(text.as_str().to_owned()))),
        _ => Ok(First::Frame(None)),
    }
}

/// Connects and follows `redirect` frames (at most 3) until another first frame (the
/// `welcome`, returned with the socket) or none within 10 s.
async fn connect_ws(url: &str, source: IpAddr) -> anyhow::Result<(Ws, Option<String>)> {
    connect_through(url, |host, port| async move {
        dial(&format!("{host}:{port}"), source).await
    })
    .await
}

/// [`connect_ws`] over TLS: `wss://` URLs, redirects included, the server's
/// certificate checked against the URL's host.
async fn connect_wss(
    url: &str,
    source: IpAddr,
    tls: &TlsConnector,
) -> anyhow::Result<(Wss, Option<String>)> {
    connect_through(url, |host, port| async move {
        let stream = dial(&format!("{host}:{port}"), source).await?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host)?;
        tls.connect(name, stream).await.context("TLS handshake")
    })
    .await
}

/// Connects over what `open(host, port)` returns and follows `redirect` frames (at
/// most 3) until another first frame, as [`connect_ws`] says.
async fn connect_through<S, F, Fut>(
    url: &str,
    open: F,
) -> anyhow::Result<(WebSocketStream<S>, Option<String>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: Fn(String, u16) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    let mut url = url.to_owned();
    for _ in 0..4 {
        let (host, port) = host_port(&url)?;
        let stream = open(host, port).await?;
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(ws_config()))
                .await?;
        match first_frame(&mut ws).await? {
            First::Redirect(next) => url = next,
            First::Frame(first) => return Ok((ws, first)),
        }
    }
    bail!("too many redirects")
}

/// `https://host:port` (or `http://`) of a `wss://` (`ws://`) URL: where its node
/// answers `POST /v1/tickets`.
fn http_base(url: &str) -> anyhow::Result<String> {
    let (host, port) = host_port(url)?;
    let scheme = if url.starts_with("wss://") {
        "https"
    } else {
        "http"
    };
    Ok(format!("{scheme}://{host}:{port}"))
}

/// A ticket for each of the keys `needed` (indices into `keys`), asked of the node at
/// `urls[k % urls.len()]`, `concurrency` requests at a time, each tried up to 3 times.
async fn fetch_tickets(
    keys: &[String],
    needed: Vec<usize>,
    urls: &[String],
    api_token: &str,
    tls: Option<&ringfeed_client::Tls>,
    concurrency: usize,
) -> anyhow::Result<HashMap<usize, String>> {
    use futures_util::TryStreamExt;
    futures_util::stream::iter(needed)
        .map(|k| async move {
            let base = http_base(&urls[k % urls.len()])?;
            let mut tries = 0;
            loop {
                tries += 1;
                match ringfeed_client::request_ticket(
                    &base,
                    api_token,
                    &keys[k],
                    TICKET_SUBJECT,
                    TICKET_TTL_S,
                    tls,
                )
                .await
                {
                    Ok(ticket) => return anyhow::Ok((k, ticket)),
                    Err(e) if tries >= 3 => {
                        return Err(anyhow!("a ticket for {} from {base}: {e}", keys[k]))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await
}

/// Waits until stdin says `line`, reading a byte at a time: whatever follows stays
/// unread for [`stopped`].
async fn wait_for_line(line: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut got = Vec::new();
    loop {
        match stdin.read_u8().await {
            Ok(b'\n') => {
                if got.trim_ascii() == line.as_bytes() {
                    return Ok(());
                }
                got.clear();
            }
            Ok(b) => got.push(b),
            Err(e) => bail!("stdin closed before {line:?}: {e}"),
        }
    }
}

/// Engine.IO 4 / Socket.IO 5 after the WebSocket upgrade: the server's open packet
/// (`0{…}`) came first; the client sends the namespace CONNECT (`40`) and the server
/// confirms it (`40{"sid":…}`).
async fn socketio_connect<S>(
    ws: &mut WebSocketStream<S>,
    first: Option<String>,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if !first.as_deref().is_some_and(|f| f.starts_with('0')) {
        bail!("no Engine.IO open packet: {first:?}");
    }
    ws.send(Message::Text("40".into())).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str().starts_with("40") => return Ok(()),
            Ok(Some(Ok(Message::Text(t)))) if t.as_str().starts_with("44") => {
                bail!("namespace CONNECT refused: {}", t.as_str())
            }
            Ok(Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_)))) => {}
            other => bail!("no namespace CONNECT reply: {other:?}"),
        }
    }
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
            shared.record(id, ts, now_ns());
            if first {
                first = false;
                shared.receiving.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    match conn {
        Conn::Ws(mut ws, _) => read_ws(&mut ws, &mut seen).await,
        Conn::Wss(mut ws) => read_ws(&mut ws, &mut seen).await,
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

/// Reads a WebSocket until it closes, handing every text or binary frame to `seen`.
async fn read_ws<S>(ws: &mut WebSocketStream<S>, seen: &mut impl FnMut(&[u8]))
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = ws.next().await {
        match message {
            // An Engine.IO ping (only the Socket.IO peer sends one).
            Ok(Message::Text(text)) if text.as_str() == "2" => {
                if ws.send(Message::Text("3".into())).await.is_err() {
                    break;
                }
            }
            Ok(Message::Text(text)) => seen(text.as_bytes()),
            Ok(Message::Binary(bytes)) => seen(&bytes),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// What `--follow` accounts for, over all connections.
#[derive(Default)]
struct Follow {
    /// Connections that lost their socket (moved or dropped) at least once.
    interrupted: AtomicU64,
    /// Times a connection received an update again after losing its socket.
    resumed: AtomicU64,
    /// Connections without their socket, or reconnected but without an update yet.
    down: std::sync::atomic::AtomicI64,
    first_down_ns: AtomicU64,
    last_resumed_ns: AtomicU64,
    max_outage_us: AtomicU64,
    /// Seqs skipped in a key's sequence, without a `reset` saying why.
    gaps: AtomicU64,
    duplicates: AtomicU64,
    resets: AtomicU64,
}

/// One connection's position in its key.
#[derive(Default)]
struct Position {
    epoch: Option<String>,
    last: u64,
    ever_down: bool,
    got_any: bool,
    down_since: Option<u64>,
}

/// Reads like [`read`], and follows every move with `since`/`epoch`.
async fn follow_moves(
    mut ws: Ws,
    mut first: Option<String>,
    conn: usize,
    key: String,
    urls: Arc<Vec<String>>,
    source: IpAddr,
    shared: Arc<Shared>,
) {
    let f = &shared.follow;
    let mut at = Position::default();
    let mut attempt = 0usize;
    // Failed reconnects in a row: the pause doubles from 50 ms up to 250 ms, jittered,
    // as docs/protocol.md asks of clients (a dead owner stays on the ring until its lease
    // expires, and hammering the survivors meanwhile helps nobody).
    let mut failures = 0u32;
    loop {
        let mut redirect = None;
        loop {
            let text = match first.take() {
                Some(t) => t,
                None => match ws.next().await {
                    Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                },
            };
            redirect = on_frame(&text, &mut at, conn, &shared);
            if redirect.is_some() {
                break;
            }
        }
        let now = now_ns();
        if at.down_since.is_none() {
            at.down_since = Some(now);
            f.down.fetch_add(1, Ordering::Relaxed);
            let _ = f
                .first_down_ns
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
            if !at.ever_down {
                at.ever_down = true;
                f.interrupted.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Reconnect: where the redirect says, else the next URL, with our position.
        loop {
            let url = match redirect.take() {
                Some(u) => u,
                None => {
                    attempt += 1;
                    urls[(conn + attempt) % urls.len()].replace("{key}", &key)
                }
            };
            let url = with_position(&url, &at);
            match tokio::time::timeout(Duration::from_secs(5), connect_ws(&url, source)).await {
                Ok(Ok((socket, welcome))) => {
                    ws = socket;
                    first = welcome;
                    failures = 0;
                    break;
                }
                _ => {
                    let base = (50u64 << failures.min(3)).min(250);
                    failures += 1;
                    let pause = base / 2 + now_ns() % (base / 2 + 1);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
    }
}

/// Accounts for one frame; returns a redirect's URL.
fn on_frame(text: &str, at: &mut Position, conn: usize, shared: &Shared) -> Option<String> {
    let f = &shared.follow;
    let Ok(frame) = serde_json::from_str::<serde_json::Value>(text) else {
        return None;
    };
    match frame["type"].as_str() {
        Some("welcome") => {
            if let Some(e) = frame["epoch"].as_str() {
                at.epoch = Some(e.to_owned());
            }
        }
        Some("update") => {
            let seq = frame["seq"].as_u64().unwrap_or(0);
            if at.last > 0 && seq <= at.last {
                f.duplicates.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            if at.last > 0 && seq > at.last + 1 {
                f.gaps.fetch_add(seq - at.last - 1, Ordering::Relaxed);
            }
            at.last = seq;
            let now = now_ns();
            if let Some(ts) = stamp(text.as_bytes()) {
                shared.record(conn, ts, now);
            }
            if !at.got_any {
                at.got_any = true;
                shared.receiving.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(down) = at.down_since.take() {
                f.down.fetch_sub(1, Ordering::Relaxed);
                f.resumed.fetch_add(1, Ordering::Relaxed);
                f.last_resumed_ns.fetch_max(now, Ordering::Relaxed);
                f.max_outage_us
                    .fetch_max(now.saturating_sub(down) / 1000, Ordering::Relaxed);
            }
        }
        Some("reset") => {
            f.resets.fetch_add(1, Ordering::Relaxed);
            at.last = frame["seq"].as_u64().unwrap_or(0);
            at.epoch = frame["epoch"].as_str().map(str::to_owned);
        }
        Some("redirect") => return frame["url"].as_str().map(str::to_owned),
        _ => {}
    }
    None
}

/// `url` with `since` and `epoch` set to this connection's position.
fn with_position(url: &str, at: &Position) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| k != "since" && k != "epoch")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    {
        let mut q = parsed.query_pairs_mut();
        q.clear();
        for (k, v) in &kept {
            q.append_pair(k, v);
        }
        if let Some(epoch) = &at.epoch {
            q.append_pair("since", &at.last.to_string());
            q.append_pair("epoch", epoch);
        }
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_asked_of_the_url_s_node_over_the_same_transport() {
        let wss = "wss://127.0.0.1:8443/v1/connect?key={key}";
        assert_eq!(http_base(wss).unwrap(), "https://127.0.0.1:8443");
        let ws = "ws://127.0.0.1:8001/v1/connect?key=k";
        assert_eq!(http_base(ws).unwrap(), "http://127.0.0.1:8001");
        assert_eq!(
            host_port("wss://localhost/v1/connect").unwrap(),
            ("localhost".to_owned(), 443)
        );
    }
}
