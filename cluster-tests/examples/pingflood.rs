//! Measures what a ping flood does to a node: `--conns` WebSocket connections send
//! masked ping frames as fast as they can for `--seconds` (reconnecting whenever the
//! node closes one, as an attacker would), while `/healthz` is probed every 100 ms on a
//! fresh connection. Prints the probes' latency, the node's CPU over the flood (from
//! `/proc/{pid}/stat`), and how often the node closed a flooder.
//!
//! `cargo run --release -p ringfeed-cluster-tests --example pingflood -- --node URL --key K --pid PID`

use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::StreamExt;

#[derive(Parser)]
struct Args {
    /// The node's HTTP base URL (it must own `--key`).
    #[arg(long)]
    node: String,
    /// A key the node owns.
    #[arg(long, default_value = "flood:1")]
    key: String,
    /// The node's process id, for its CPU time.
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 4)]
    conns: usize,
    #[arg(long, default_value_t = 8)]
    seconds: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let url = ringfeed_client::connect_url(&args.node, &args.key, None);
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let cpu_before = cpu_ticks(args.pid)?;
    let started = Instant::now();
    let floods: Vec<_> = (0..args.conns)
        .map(|_| tokio::spawn(flood(url.clone(), until)))
        .collect();
    let probe = tokio::spawn(probe(format!("{}/healthz", args.node), until));
    let mut closed = 0;
    for flood in floods {
        closed += flood.await??;
    }
    let latencies = probe.await??;
    let cpu = (cpu_ticks(args.pid)? - cpu_before) as f64 / 100.0;
    let wall = started.elapsed().as_secs_f64();
    let answered: Vec<f64> = latencies.iter().filter_map(|l| *l).collect();
    let max = answered.iter().cloned().fold(0.0, f64::max);
    let mut sorted = answered.clone();
    sorted.sort_by(f64::total_cmp);
    let p50 = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "ping flood: {} connections for {:.1} s; node CPU {:.2} s ({:.0}% of one core); \
         /healthz {} probes, {} unanswered within 1 s, p50 {:.1} ms, max {:.1} ms; \
         flooders closed by the node {closed} times",
        args.conns,
        wall,
        cpu,
        100.0 * cpu / wall,
        latencies.len(),
        latencies.len() - answered.len(),
        p50,
        max,
    );
    Ok(())
}

/// Floods pings until `until`, reconnecting when closed; how many times it was closed.
async fn flood(url: String, until: Instant) -> Result<usize> {
    let mut closed = 0;
    while Instant::now() < until {
        let Ok((ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (mut write, mut read) = ws.split();
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = read.next().await {} });
        let left = until.saturating_duration_since(Instant::now());
        ringfeed_cluster_tests::flood_pings(&mut write, left).await;
        drain.abort();
        if Instant::now() < until {
            closed += 1;
        }
    }
    Ok(closed)
}

/// `/healthz` every 100 ms until `until`: each probe's latency in ms, `None` past 1 s.
async fn probe(url: String, until: Instant) -> Result<Vec<Option<f64>>> {
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(1),
            ringfeed_cluster_tests::http_get(&url),
        )
        .await;
        latencies.push(match answer {
            Ok(Ok((200, _))) => Some(started.elapsed().as_secs_f64() * 1000.0),
            _ => None,
        });
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(started.elapsed())).await;
    }
    Ok(latencies)
}

/// The process's user + system CPU time, in clock ticks (100 a second).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("no process {pid}"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| -> Result<u64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<u64>()?)
    };
    // After the command: state is field 0, utime 11, stime 12.
    Ok(field(11)? + field(12)?)
}
