//! A quick fan-out measurement against a running cluster (`scripts/cluster`): one key,
//! N WebSocket subscribers, updates through the router.
//!
//! 1. throughput: `PublishBatch` (100 per call, 4 calls in flight) flat out, until every
//!    subscriber has every update: updates/s into the key, deliveries/s out of it;
//! 2. latency: unbatched `Publish` at a fixed rate; publish → frame received,
//!    p50/p99/p999 over every (update, subscriber) pair.
//!
//! `cargo run --release -p ringfeed-cluster-tests --example fanout -- --router HOST:PORT --node URL`
//! (the full benchmark suite, with peers and calibration, is `scripts/bench`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use anyhow::{bail, Result};
use futures_util::StreamExt;
use rand::RngExt;
use ringfeed_client::{connect_url, publisher, Event, Frame, Subscription};
use ringfeed_proto::v1::PublishBatchRequest;
use serde_json::json;

struct Args {
    router: String,
    node: String,
    subscribers: usize,
    updates: u64,
    rate: u64,
}

fn args() -> Result<Args> {
    let mut a = Args {
        router: String::new(),
        node: String::new(),
        subscribers: 100,
        updates: 20_000,
        rate: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--router" => a.router = value,
            "--node" => a.node = value,
            "--subscribers" => a.subscribers = value.parse()?,
            "--updates" => a.updates = value.parse()?,
            "--rate" => a.rate = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.router.is_empty() || a.node.is_empty() {
        bail!("usage: fanout --router HOST:PORT --node URL [--subscribers N] [--updates N] [--rate PER_S]");
    }
    Ok(a)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Subscribes `n` clients and returns a task per client that reads `count` updates and
/// returns (latencies in µs, time of the last receipt).
async fn subscribers(
    node: &str,
    key: &str,
    n: usize,
    count: u64,
) -> Result<Vec<tokio::task::JoinHandle<Result<(Vec<u64>, Instant)>>>> {
    let url = connect_url(node, key, None);
    let subs: Vec<Subscription> = futures_util::stream::iter(0..n)
        .map(|_| Subscription::connect(&url))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok(subs
        .into_iter()
        .map(|mut sub| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(count as usize);
                let mut last = Instant::now();
                while (latencies.len() as u64) < count {
                    match sub.next_within(Duration::from_secs(30)).await? {
                        Event::Frame(Frame::Update {
                            data: Some(data), ..
                        }) => {
                            let sent = data["t"].as_u64().unwrap_or(0);
                            latencies.push(now_ns().saturating_sub(sent) / 1000);
                            last = Instant::now();
                        }
                        Event::Frame(_) | Event::Unreadable { .. } => {}
                        Event::Closed { code, reason } => bail!("closed {code} {reason}"),
                    }
                }
                Ok((latencies, last))
            })
        })
        .collect())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let tag: u32 = rand::rng().random();
    let router = publisher::connect(&a.router).await?;

    // 1. Throughput.
    let key = format!("bench:fanout:{tag:x}:t");
    let readers = subscribers(&a.node, &key, a.subscribers, a.updates).await?;
    let started = Instant::now();
    let batches: Vec<u64> = (0..a.updates.div_ceil(100)).collect();
    futures_util::stream::iter(batches)
        .map(|b| {
            let mut router = router.clone();
            let key = key.clone();
            let n = a.updates;
            async move {
                let items = (b * 100..((b + 1) * 100).min(n))
                    .map(|_| publisher::json(&key, &json!({"t": now_ns()})))
                    .collect();
                router
                    .publish_batch(PublishBatchRequest { items })
                    .await
                    .map(|_| ())
            }
        })
        .buffered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    let mut last = started;
    for r in readers {
        last = last.max(r.await??.1);
    }
    let secs = last.duration_since(started).as_secs_f64();
    println!(
        "throughput: {} updates to 1 key × {} subscribers in {secs:.2} s = {:.0} updates/s in, {:.0} deliveries/s out",
        a.updates,
        a.subscribers,
        a.updates as f64 / secs,
        (a.updates * a.subscribers as u64) as f64 / secs
    );

    // 2. Latency at a fixed rate, unbatched.
    let key = format!("bench:fanout:{tag:x}:l");
    let count = (a.rate * 5).min(a.updates);
    let readers = subscribers(&a.node, &key, a.subscribers, count).await?;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate as f64));
    let mut r = router.clone();
    for _ in 0..count {
        ticks.tick().await;
        r.publish(publisher::json(&key, &json!({"t": now_ns()})))
            .await?;
    }
    let mut all = Vec::new();
    for r in readers {
        all.extend(r.await??.0);
    }
    all.sort_unstable();
    println!(
        "latency: {count} unbatched publishes at {}/s to {} subscribers: p50 {} µs, p99 {} µs, p999 {} µs, max {} µs",
        a.rate,
        a.subscribers,
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
        all.last().copied().unwrap_or(0)
    );
    Ok(())
}
