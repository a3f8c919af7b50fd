//! P11, QUIC beside WebSocket in one run:
//! (a) memory per idle connection, P3's method (the node's RSS growth ÷ idle
//!     connections, each on its own key, in a fresh one-node cluster per measurement);
//! (b) publish → receive latency: 100 keys, each with one QUIC and one WebSocket
//!     subscriber on the same node, unary `Publish` through the router at 1,000/s;
//!     both transports receive every update, so one run compares them under the same
//!     load.
//!
//! The connections are made by this process: QUIC ones over one client endpoint (one
//! UDP socket), as a client library multiplexing many connections would.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use ringfeed_client::quic::{Hello, QuicSubscription, Trust, ALPN};
use ringfeed_client::routing::RingView;
use ringfeed_client::{publisher, Event, Frame, Subscription};
use serde_json::json;
use tokio::time::Instant;

use crate::report::{self, median};
use crate::{settled_rss, start_ringfeed, Args, Sizes};

/// The bar: KiB per idle QUIC connection, at most (goal: [`GOAL_KIB`]).
const BAR_KIB: f64 = 32.0;
const GOAL_KIB: f64 = 16.0;
/// The bar: QUIC's publish → receive p99 within this factor of WebSocket's.
const BAR_LATENCY: f64 = 1.2;

/// Connections opened at once while setting up the idle ones.
const OPENING: usize = 64;

/// One idle connection of either transport, kept open.
enum Idle {
    Quic(#[allow(dead_code)] (quinn::Connection, quinn::SendStream, quinn::RecvStream)),
    Ws(#[allow(dead_code)] Box<Subscription>),
}

/// Opens an idle QUIC connection for `key` on `endpoint`: handshake, stream, `hello`,
/// the `welcome` read.
async fn quic_idle(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    key: &str,
) -> Result<Idle> {
    let connection = endpoint.connect(addr, "localhost")?.await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let hello = serde_json::to_vec(&json!({"type": "hello", "key": key}))?;
    let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&hello);
    send.write_all(&frame).await?;
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    recv.read_exact(&mut body).await?;
    ensure!(
        body.starts_with(br#"{"type":"welcome""#),
        "no welcome: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(Idle::Quic((connection, send, recv)))
}

/// (a) for one transport, in a fresh one-node cluster: KiB per idle connection.
async fn idle_kib(quic: bool, n: usize, run: usize) -> Result<f64> {
    let cluster = start_ringfeed(1).await?;
    let node = &cluster.nodes[0];
    let pid = node.pid().context("node running")?;
    let ring = RingView::fetch(&node.http, None).await?;
    let addr: std::net::SocketAddr = node.quic.as_deref().context("QUIC")?.parse()?;
    let before = settled_rss(pid).await?;
    let endpoint = if quic {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(
            Trust::pins_of(&ring)
                .client_config(ALPN)
                .map_err(|e| anyhow!("{e}"))?,
        );
        Some(endpoint)
    } else {
        None
    };
    let keys: Vec<String> = (0..n).map(|i| format!("p11-{run}:{i}")).collect();
    let opened = futures_util::stream::iter(keys.iter().map(|key| {
        let (endpoint, http) = (endpoint.clone(), node.http.clone());
        async move {
            match endpoint {
                Some(endpoint) => quic_idle(&endpoint, addr, key).await,
                None => {
                    let url = ringfeed_client::connect_url(&http, key, None);
                    Ok(Idle::Ws(Box::new(Subscription::connect(&url).await?)))
                }
            }
        }
    }))
    .buffer_unordered(OPENING)
    .collect::<Vec<_>>()
    .await;
    let idle: Vec<Idle> = opened.into_iter().collect::<Result<_>>()?;
    ensure!(idle.len() == n, "{} of {n} connected", idle.len());
    let after = settled_rss(pid).await?;
    let kib = after.saturating_sub(before) as f64 / n as f64 / 1024.0;
    println!(
        "P11 run {} {:>9}: {n} idle connections: RSS {:.1} → {:.1} MiB = {kib:.2} KiB per connection",
        run + 1,
        if quic { "QUIC" } else { "WebSocket" },
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    drop(idle);
    if let Some(endpoint) = endpoint {
        endpoint.close(0u32.into(), b"done");
    }
    drop(cluster);
    Ok(kib)
}

/// Microseconds since `base`.
fn micros(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

/// (b): one run's publish → receive latencies, (WebSocket, QUIC).
async fn latency(
    keys: usize,
    rate: u64,
    window: Duration,
) -> Result<(Histogram<u64>, Histogram<u64>)> {
    let cluster = start_ringfeed(3).await?;
    let http = cluster.nodes[0].http.clone();
    let ring = RingView::fetch(&http, None).await?;
    let trust = Trust::pins_of(&ring);
    let names: Vec<String> = (0..keys).map(|i| format!("p11-lat:{i}")).collect();
    let base = Instant::now();
    let hists: [Arc<Mutex<Histogram<u64>>>; 2] =
        std::array::from_fn(|_| Arc::new(Mutex::new(Histogram::new(3).expect("a histogram"))));
    let mut readers = Vec::new();
    for key in &names {
        // Each subscriber on its key's owner (found by the ring), so neither pays a redirect.
        let owner = ring.owner(key).context("an owner")?;
        let url = ringfeed_client::connect_url(&owner.http, key, None);
        let mut ws = Subscription::connect(&url).await?;
        let hello = Hello {
            key: key.clone(),
            ..Hello::default()
        };
        let mut quic =
            QuicSubscription::connect(owner.quic.as_deref().context("QUIC")?, &hello, &trust)
                .await?;
        let (ws_hist, quic_hist) = (hists[0].clone(), hists[1].clone());
        readers.push(tokio::spawn(async move {
            while let Ok(Event::Frame(Frame::Update { data: Some(d), .. })) = ws.next().await {
                let sent = d["t"].as_u64().unwrap_or(0);
                let _ = ws_hist
                    .lock()
                    .expect("hist")
                    .record(micros(base).saturating_sub(sent).max(1));
            }
        }));
        readers.push(tokio::spawn(async move {
            while let Ok(Event::Frame(Frame::Update { data: Some(d), .. })) = quic.next().await {
                let sent = d["t"].as_u64().unwrap_or(0);
                let _ = quic_hist
                    .lock()
                    .expect("hist")
                    .record(micros(base).saturating_sub(sent).max(1));
            }
        }));
    }
    // Unary publishes at `rate`, each on its own task (calls overlap as they would
    // from many callers), warm-up first.
    let router = publisher::connect(&cluster.router_grpc()).await?;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let warmup = Duration::from_secs(1);
    let start = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0usize;
    let mut calls = Vec::new();
    while start.elapsed() < warmup + window {
        tick.tick().await;
        if start.elapsed() < warmup {
            for h in &hists {
                h.lock().expect("hist").reset();
            }
        }
        let key = names[n % names.len()].clone();
        n += 1;
        let mut router = router.clone();
        calls.push(tokio::spawn(async move {
            router
                .publish(publisher::json(&key, &json!({"t": micros(base)})))
                .await
                .is_ok()
        }));
    }
    let mut failed = 0;
    for call in calls {
        failed += usize::from(!call.await.unwrap_or(false));
    }
    ensure!(failed == 0, "{failed} publishes failed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in readers {
        r.abort();
    }
    let [ws, quic] = hists.map(|h| h.lock().expect("hist").clone());
    drop(cluster);
    Ok((ws, quic))
}

/// P11: (a) then (b), `args.runs` times, alternating the transports in (a).
pub(crate) async fn p11(args: &Args, sizes: &Sizes) -> Result<()> {
    let n = if args.smoke { 200 } else { 10_000 };
    let keys = if args.smoke { 10 } else { 100 };
    let rate = if args.smoke { 200 } else { 1000 };
    let window = Duration::from_secs(args.window_secs);
    let mut kib: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p50: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p99: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p999: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let _ = sizes;
    for run in 0..args.runs {
        for (i, quic) in [false, true].into_iter().enumerate() {
            kib[i].push(idle_kib(quic, n, run).await?);
        }
        let (ws, quic) = latency(keys, rate, window).await?;
        for (i, h) in [ws, quic].iter().enumerate() {
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "P11 run {}/{} {:>9}: publish → receive p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms over {} receipts at {rate}/s",
                run + 1,
                args.runs,
                ["WebSocket", "QUIC"][i],
                ms(0.5),
                ms(0.99),
                ms(0.999),
                h.len()
            );
            ensure!(
                !h.is_empty(),
                "no receipts over {}",
                ["WebSocket", "QUIC"][i]
            );
            p50[i].push(ms(0.5));
            p99[i].push(ms(0.99));
            p999[i].push(ms(0.999));
        }
    }
    let (ws_kib, quic_kib) = (median(&kib[0]), median(&kib[1]));
    let (ws99, quic99) = (median(&p99[0]), median(&p99[1]));
    let memory_met = quic_kib <= BAR_KIB;
    let latency_met = quic99 <= ws99 * BAR_LATENCY;
    let met = memory_met && latency_met;
    let summary = format!(
        "QUIC: {quic_kib:.1} KiB per idle connection, p99 {quic99:.2} ms (WebSocket {ws_kib:.1} KiB, p99 {ws99:.2} ms)"
    );
    println!(
        "P11 medians: {summary}; bar ≤ {BAR_KIB} KiB {} and p99 ≤ {BAR_LATENCY}× WebSocket's {}",
        if memory_met { "met" } else { "not met" },
        if latency_met { "met" } else { "not met" }
    );
    let result = json!({
        "id": "P11",
        "what": format!("QUIC beside WebSocket: memory per idle connection ({n}, each on its own key, one node) and publish → receive at {rate}/s ({keys} keys, one subscriber of each transport per key, 3 nodes)"),
        "setup": {"idle_connections": n, "keys": keys, "rate_publishes_per_s": rate, "window_secs": args.window_secs, "runs": args.runs, "ack": "replicated"},
        "ringfeed": {
            "quic": {"kib_per_idle_connection": kib[1], "median_kib": quic_kib, "p50_ms": p50[1], "p99_ms": p99[1], "p999_ms": p999[1], "median_p99_ms": quic99},
            "websocket": {"kib_per_idle_connection": kib[0], "median_kib": ws_kib, "p50_ms": p50[0], "p99_ms": p99[0], "p999_ms": p999[0], "median_p99_ms": ws99},
        },
        "bar": format!("an idle QUIC connection ≤ {BAR_KIB} KiB (goal {GOAL_KIB}); QUIC p99 ≤ {BAR_LATENCY}× WebSocket's"),
        "memory_met": memory_met,
        "memory_goal_met": quic_kib <= GOAL_KIB,
        "latency_met": latency_met,
        "met": met,
        "summary_ringfeed": summary,
        "summary_peers": "—",
        "summary_calibration": format!("WebSocket in the same run: {ws_kib:.1} KiB, p99 {ws99:.2} ms"),
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P11", &result)?;
    Ok(())
}
