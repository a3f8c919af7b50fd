//! `ringfeed-loadgen`: the benchmark load generator (docs/benchmarks.md).
//!
//! * `sub` — holds many subscriber connections (WebSocket, or raw TCP for the
//!   calibration), spread over several 127.0.0.x source addresses, and records the
//!   publish → receive latency of every update in an HDR histogram.
//! * `pub` — publishes stamped 64-byte payloads at a target rate or flat out, through
//!   the router (`Publish` / `PublishBatch`), straight to each key's owner node
//!   (`--direct-node`), as pipelined Redis `PUBLISH`es (the seed reference), or as
//!   length-prefixed frames to the first relay of P2's same-hop floor (`--relay`).
//! * `fanout` — the calibration: a bare tokio TCP or tokio-tungstenite server that
//!   fans messages out to its sockets, one write per message, nothing else; with
//!   `--input`, the last hop of the same-hop floor.
//! * `relay` — one link of the same-hop floor: passes length-prefixed frames on to the
//!   next process over one persistent TCP connection.
//!
//! Every mode speaks JSON lines on stdout (`{"ev":…}`): progress once a second and a
//! final `done` with the figures; it stops at `--duration-secs` or when stdin says
//! `stop` (or closes). The orchestrator is `ringfeed-bench` in `cluster-tests`.

mod fanout;
mod publish;
mod relay;
mod subscribe;

use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ringfeed-loadgen",
    version,
    about = "ringfeed's benchmark load generator"
)]
struct Args {
    /// Tokio worker threads (0: one per core). P4 runs seven fan-out processes on
    /// this box's cores and gives each one, as it does ringfeed's seven nodes.
    #[arg(long, global = true, default_value_t = 0)]
    worker_threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Hold subscriber connections and record what they receive.
    Sub(subscribe::SubArgs),
    /// Publish stamped payloads.
    Pub(publish::PubArgs),
    /// The calibration fan-out server.
    Fanout(fanout::FanoutArgs),
    /// One link of P2's same-hop floor: forward length-prefixed frames to the next hop.
    Relay(relay::RelayArgs),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        runtime.worker_threads(args.worker_threads);
    }
    let runtime = runtime.enable_all().build()?;
    match args.mode {
        Mode::Sub(a) => runtime.block_on(subscribe::run(a)),
        Mode::Pub(a) => runtime.block_on(publish::run(a)),
        Mode::Fanout(a) => runtime.block_on(fanout::run(a)),
        Mode::Relay(a) => runtime.block_on(relay::run(a)),
    }
}

/// Nanoseconds since the Unix epoch: the stamp in every payload. All processes of a
/// run share this box's clock.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The keys `{prefix}{i}` for `i` in `0..count`, given as `PREFIX*COUNT`, or one per
/// line of a file given as `@path`.
pub fn keys(spec: &str) -> anyhow::Result<Vec<String>> {
    if let Some(path) = spec.strip_prefix('@') {
        let text = std::fs::read_to_string(path)?;
        return Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect());
    }
    // `bench:1000` → bench:0 … bench:999
    let (prefix, count) = spec
        .rsplit_once('*')
        .ok_or_else(|| anyhow::anyhow!("--keys wants PREFIX*COUNT, e.g. bench:*1000"))?;
    let count: usize = count.parse()?;
    Ok((0..count).map(|i| format!("{prefix}{i}")).collect())
}

/// A 64-byte (or `size`) JSON payload `{"ts":…,"p":"…"}` stamped now.
pub fn payload(size: usize) -> String {
    let mut p = format!("{{\"ts\":{},\"p\":\"", now_ns());
    while p.len() + 2 < size {
        p.push('x');
    }
    p.push_str("\"}");
    p
}

/// The stamp in a frame or payload: the digits after the first `"ts":`.
pub fn stamp(text: &[u8]) -> Option<u64> {
    const TAG: &[u8] = b"\"ts\":";
    let at = text.windows(TAG.len()).position(|w| w == TAG)? + TAG.len();
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in &text[at..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
        digits += 1;
    }
    (digits > 0).then_some(n)
}

/// Prints one JSON line on stdout.
pub fn emit(value: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Resolves when stdin says `stop`, or `secs` pass; with no limit (0), also when stdin
/// closes.
pub async fn stopped(secs: u64) {
    use tokio::io::AsyncBufReadExt;
    // true: asked to stop; false: stdin closed.
    let stdin = async {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "stop" {
                return true;
            }
        }
        false
    };
    if secs == 0 {
        stdin.await;
    } else {
        // With a time limit, a closed stdin (a background process) is no reason to stop.
        tokio::select! {
            _ = async {
                if !stdin.await {
                    std::future::pending::<()>().await
                }
            } => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(secs)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_stamped_and_sized() {
        let p = payload(64);
        assert_eq!(p.len(), 64, "{p}");
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["ts"].as_u64(), stamp(p.as_bytes()));
        let frame = format!("{{\"type\":\"update\",\"key\":\"k\",\"seq\":3,\"data\":{p}}}");
        assert_eq!(stamp(frame.as_bytes()), v["ts"].as_u64());
        assert_eq!(stamp(b"{\"no\":1}"), None);
        assert_eq!(keys("b:*3").unwrap(), ["b:0", "b:1", "b:2"]);
    }
}
