//! `ringfeed-bench`: runs the docs/benchmarks.md scenarios side by side — ringfeed, the seed
//! reference (Node.js `ws` + `ioredis` behind Redis) and the calibration (bare tokio TCP
//! and tokio-tungstenite fan-outs; for P2 also the same-hop floor, a chain of bare
//! relays in front of one, `p2.rs`); for P9's documents the y-websocket server and
//! Hocuspocus (`docs.rs`) — alternating runs in one invocation, and writes
//! `bench/results/P*.json`, a plot per scenario, and the README's table.
//!
//! `scripts/bench` is the way in (it builds release binaries and installs the peers).

mod docs;
mod moves;
mod p2;
mod procs;
mod quic;
mod report;
mod security;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use ringfeed_cluster_tests::Cluster;
use serde_json::{json, Value};

use procs::{Loadgen, NodePeer, Peer};
use report::median;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringfeed-bench",
    about = "ringfeed's benchmarks against its peers"
)]
struct Args {
    /// P1 … P5, P7 … P10, or `table` (rewrite the README table from the JSON).
    scenario: String,
    /// Where the JSON files and plots go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The peers' directory (bench/peers, with node_modules installed).
    #[arg(long, default_value = "bench/peers")]
    peers: PathBuf,
    /// The README whose table `table` rewrites.
    #[arg(long, default_value = "README.md")]
    readme: PathBuf,
    /// Alternating runs per system (medians are quoted); at least 1. P2 makes at least
    /// 5 (its bar is on medians of 5), except with `--smoke`.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    runs: usize,
    /// Seconds measured per throughput run (after a warm-up).
    #[arg(long, default_value_t = 8)]
    window_secs: u64,
    /// P2 only: measure at this rate (publishes/s) instead of half of ringfeed's
    /// measured maximum (1,000/s is measured as well), e.g. to see where the latency
    /// goes at another load. The JSON records that the rate was given, and its `met`
    /// is then null: the bar is for half the maximum.
    #[arg(long)]
    p2_rate: Option<u64>,
    /// P2 only: relays in front of the fan-out server in the same-hop floor. 3 gives
    /// ringfeed's path through the router its five process hops (p2.rs).
    #[arg(long, default_value_t = p2::RELAYS)]
    p2_relays: usize,
    /// A seconds-long run with tiny sizes: does the harness still work?
    #[arg(long)]
    smoke: bool,
    /// P10's one idle-memory measurement in a process of its own (`P10-idle`, started
    /// by P10): how many connections.
    #[arg(long, hide = true, default_value_t = 0)]
    idle_connections: usize,
    /// `P10-idle`: a secure cluster (wss://, tickets), else a plain one.
    #[arg(long, hide = true)]
    idle_secure: bool,
    /// `P10-idle`: the run's number, for distinct keys.
    #[arg(long, hide = true, default_value_t = 0)]
    idle_run: usize,
}

/// Source addresses the subscribers use. One, with no explicit bind: connect() then
/// picks ports itself and reuses those left in TIME_WAIT by earlier runs (loopback
/// `tcp_tw_reuse`), where bind(port 0) to 127.0.0.x runs out after a few runs' churn
/// (no IP_BIND_ADDRESS_NO_PORT without unsafe code). No scenario needs more than
/// ~17k connections per destination; the load generator can spread over more sources
/// (`--sources`) when one does.
const SOURCES: &str = "127.0.0.1";

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if std::env::var_os("RINGFEED_BIN_DIR").is_none() {
        // The node, router and load generator are built next to this binary.
        let exe = std::env::current_exe()?;
        let dir = exe.parent().expect("a directory").to_path_buf();
        std::env::set_var("RINGFEED_BIN_DIR", dir);
    }
    if std::env::var_os("RINGFEED_LOG").is_none() {
        std::env::set_var("RINGFEED_LOG", "warn");
    }
    if args.smoke {
        args.runs = 1;
        args.window_secs = 2;
    }
    let sizes = Sizes::new(args.smoke);
    match args.scenario.as_str() {
        "P1" => p1(&args, &sizes).await,
        "P2" => p2::p2(&args, &sizes).await,
        "P3" => p3(&args, &sizes).await,
        "P4" => p4(&args).await,
        "P5" => p5(&args, &sizes).await,
        "P7" => moves::p7(&args).await,
        "P8" => moves::p8(&args).await,
        "P9" => docs::p9(&args).await,
        "P10" => security::p10(&args, &sizes).await,
        "P10-idle" => security::idle_child(&args, &sizes).await,
        "P11" => quic::p11(&args, &sizes).await,
        "table" => report::readme_table(&args.out, &args.readme),
        other => {
            bail!("unknown scenario {other} (P1–P5, P7–P10, table; P6 is scripts/bench P6)")
        }
    }
}

/// Scenario sizes: docs/benchmarks.md's, or tiny for `--smoke`.
struct Sizes {
    keys: usize,
    per_key: usize,
    idle: Vec<usize>,
    hot: usize,
    sub_procs: usize,
}

impl Sizes {
    fn new(smoke: bool) -> Sizes {
        if smoke {
            Sizes {
                keys: 50,
                per_key: 2,
                idle: vec![200],
                hot: 200,
                sub_procs: 1,
            }
        } else {
            Sizes {
                keys: 1000,
                per_key: 10,
                idle: vec![10_000, 17_000],
                hot: 10_000,
                sub_procs: 2,
            }
        }
    }
}

/// What a fan-out run drives.
#[derive(Clone)]
enum System {
    Ringfeed {
        urls: Vec<String>,
        router: String,
        /// Each subscriber process straight to one owner: (its URL, a `@file` of the
        /// keys it owns) — no redirects (P4's 100k connections).
        direct: Option<Vec<(String, String)>>,
        /// A secure cluster's client credentials (P10): `wss://` and gRPC over TLS
        /// trusting its CA, tickets and the API token. `None`: plain.
        secure: Option<Secure>,
    },
    /// ringfeed with each update published straight to its key's owner node (every
    /// node serves the public `Router` on its gRPC port), the ring read from `node`
    /// (an `http://` base URL): the router's hop saved. Subscribers as for `Ringfeed`.
    RingfeedDirect { urls: Vec<String>, node: String },
    /// A Node.js peer behind Redis.
    Peer {
        peer: Peer,
        urls: Vec<String>,
        redis: String,
    },
    /// `tcp` or `ws`, from `servers` fan-out processes (the fd limit is per process:
    /// P4's 100k sockets need several); subscriber connection `c` reads server
    /// `c % servers`; each with `workers` tokio worker threads (0: one per core).
    Calibration {
        mode: &'static str,
        servers: usize,
        workers: usize,
    },
    /// P2's same-hop floor: `relays` bare relay processes (`loadgen relay`) in a line
    /// in front of one calibration fan-out server (`ws`, `fanout --input`); the
    /// publisher (`pub --relay`) sends each update to the first relay at the same
    /// rate as the others publish. See `p2.rs` for how its hops match ringfeed's.
    RelayChain { relays: usize },
}

impl System {
    fn name(&self) -> String {
        match self {
            System::Ringfeed { .. } => "ringfeed".into(),
            System::RingfeedDirect { .. } => "ringfeed-direct".into(),
            System::RelayChain { .. } => "relay-chain".into(),
            System::Peer { peer, .. } => peer.name().into(),
            System::Calibration { mode, .. } => format!("calibration-{mode}"),
        }
    }
}

/// How the load generators reach a secure cluster ([`Cluster::builder`]`.secure()`).
#[derive(Clone)]
struct Secure {
    /// The cluster's CA (`ca.pem` in its `tls_dir`).
    ca: PathBuf,
    /// The API token of the router and of `POST /v1/tickets`.
    api_token: String,
}

impl Secure {
    /// The credentials of `cluster`, if it is a secure one.
    fn of(cluster: &Cluster) -> Option<Secure> {
        cluster.tls_dir().map(|dir| Secure {
            ca: dir.join("ca.pem"),
            api_token: ringfeed_cluster_tests::SECURE_TOKEN.to_owned(),
        })
    }

    /// The load generator's arguments: `--ca PATH --api-token TOKEN` (for `sub` a
    /// ticket per key, for `pub` the token on every call).
    fn loadgen_args(&self) -> [String; 4] {
        [
            "--ca".into(),
            self.ca.display().to_string(),
            "--api-token".into(),
            self.api_token.clone(),
        ]
    }
}

/// How updates are published in a run.
#[derive(Clone, Copy)]
struct Publishing {
    /// Updates per call; 0: unary.
    batch: usize,
    /// Updates/s; 0: flat out.
    rate: u64,
    concurrency: usize,
    /// Updates in all; 0: until the window ends.
    count: u64,
    /// ringfeed's `ack` (docs/benchmarks.md: `replicated` unless a scenario says otherwise;
    /// `owner` is reported beside it where it differs). The peers have no such choice.
    ack_owner: bool,
}

/// What one run measured.
struct RunResult {
    /// Delivered messages/s over the window (throughput runs).
    rate: f64,
    /// (seconds, msg/s) over the whole run.
    series: Vec<(f64, f64)>,
    hist: Histogram<u64>,
    connected: u64,
    receiving: u64,
    /// Subscriber connections the server closed during the run (e.g. 4408).
    closed: u64,
    published: u64,
    /// From the publisher's (or the calibration's `go`) start to the last receipt.
    last_receipt_ms: f64,
    /// The box's busy CPU time (every process, the kernel's network work included)
    /// from the start until every subscriber received (count runs), or over the
    /// window (throughput runs), in ms over all cores.
    box_cpu_ms: f64,
    /// The publisher's call round trips (sent → acked), p50/p99/p999 in ms; `None`
    /// for the calibration, which has no publisher.
    calls_ms: Option<[f64; 3]>,
    /// The part of `box_cpu_ms` the load generators (subscribers and publisher) used
    /// themselves, over the same span, in ms.
    loadgen_cpu_ms: f64,
}

fn ringfeed_urls(cluster: &Cluster) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            format!(
                "{}/v1/connect?key={{key}}",
                n.http
                    .replace("https://", "wss://")
                    .replace("http://", "ws://")
            )
        })
        .collect()
}

async fn start_ringfeed(nodes: usize) -> Result<Cluster> {
    start_ringfeed_with(nodes, &[]).await
}

/// As [`start_ringfeed`], each node also given `args`.
async fn start_ringfeed_with(nodes: usize, args: &[&str]) -> Result<Cluster> {
    start_ringfeed_as(nodes, args, false).await
}

/// As [`start_ringfeed_with`], in secure mode when `secure` ([`Cluster::builder`]
/// `.secure()`: TLS everywhere, tickets, API tokens).
async fn start_ringfeed_as(nodes: usize, args: &[&str], secure: bool) -> Result<Cluster> {
    let mut node_args = vec!["--max-connections", "19000"];
    node_args.extend_from_slice(args);
    let mut builder = Cluster::builder()
        .nodes(nodes)
        .lease_ttl(5)
        .node_args(&node_args);
    if secure {
        builder = builder.secure();
    }
    let cluster = builder.start().await?;
    Ok(cluster)
}

/// Subscribers connect, updates flow, the window is measured, everything stops.
async fn fanout_run(
    system: &System,
    keys: &str,
    per_key: usize,
    sub_procs: usize,
    publishing: Publishing,
    warmup: Duration,
    window: Duration,
) -> Result<RunResult> {
    procs::quiet_box(Duration::from_secs(30)).await?;
    let expected = keys_count(keys) * per_key;
    // The same-hop floor's relays, and the first one's address (the publisher's).
    let mut relays = Vec::new();
    let mut first_relay = String::new();
    let (mut fanout, urls, target) = match system {
        System::Calibration {
            mode,
            servers,
            workers,
        } => {
            let mut fanout = Vec::new();
            let mut urls = Vec::new();
            for i in 0..*servers {
                let share = share_of(expected, *servers, i);
                let mut args = vec![
                    "--worker-threads".to_owned(),
                    workers.to_string(),
                    "fanout".into(),
                    "--mode".into(),
                    mode.to_string(),
                    "--expect".into(),
                    share.to_string(),
                ];
                if publishing.count > 0 {
                    let count = share_of(publishing.count as usize, *servers, i);
                    args.extend(["--count".into(), count.to_string()]);
                }
                if publishing.rate > 0 {
                    let rate = share_of(publishing.rate as usize, *servers, i);
                    args.extend(["--rate".into(), rate.to_string()]);
                }
                let mut f = Loadgen::spawn(&format!("{} {i}", system.name()), &args)?;
                let listening = f.wait("listening", Duration::from_secs(10)).await?;
                let addr = listening["addr"].as_str().unwrap_or_default().to_owned();
                urls.push(if *mode == "tcp" {
                    format!("tcp://{addr}")
                } else {
                    format!("ws://{addr}/v1/connect?key={{key}}")
                });
                fanout.push(f);
            }
            (fanout, urls, *mode)
        }
        System::RelayChain { relays: n } => {
            let args: Vec<String> = [
                "fanout",
                "--mode",
                "ws",
                "--expect",
                &expected.to_string(),
                "--input",
                "127.0.0.1:0",
            ]
            .map(String::from)
            .into();
            let mut f = Loadgen::spawn(&format!("{} fan-out", system.name()), &args)?;
            let listening = f.wait("listening", Duration::from_secs(10)).await?;
            let addr = listening["addr"].as_str().unwrap_or_default().to_owned();
            // From the last relay back to the first, each connecting to the one after.
            let mut next = listening["input"].as_str().unwrap_or_default().to_owned();
            for i in (1..=*n).rev() {
                let args: Vec<String> = ["relay", "--next", &next].map(String::from).into();
                let mut r = Loadgen::spawn(&format!("{} relay {i}", system.name()), &args)?;
                next = r.wait("listening", Duration::from_secs(10)).await?["addr"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                relays.push(r);
            }
            first_relay = next;
            let url = format!("ws://{addr}/v1/connect?key={{key}}");
            (vec![f], vec![url], "ws")
        }
        System::Ringfeed { urls, .. } | System::RingfeedDirect { urls, .. } => {
            (Vec::new(), urls.clone(), "ws")
        }
        System::Peer { peer, urls, .. } => (Vec::new(), urls.clone(), peer.target()),
    };
    // (url, keys, shard, sources) per subscriber process.
    let plan: Vec<(String, String, String, String)> = match system {
        System::Ringfeed {
            direct: Some(parts),
            ..
        } => parts
            .iter()
            .map(|(u, k)| {
                (
                    u.clone(),
                    k.clone(),
                    "0/1".to_owned(),
                    "127.0.0.1".to_owned(),
                )
            })
            .collect(),
        _ => (0..sub_procs)
            .map(|i| {
                (
                    urls.join(","),
                    keys.to_owned(),
                    format!("{i}/{sub_procs}"),
                    SOURCES.to_owned(),
                )
            })
            .collect(),
    };
    let secure = match system {
        System::Ringfeed { secure, .. } => secure.clone(),
        _ => None,
    };
    let mut subs = Vec::new();
    for (i, (url, keys, shard, sources)) in plan.into_iter().enumerate() {
        let mut args = vec![
            "sub".into(),
            "--target".into(),
            target.into(),
            "--url".into(),
            url,
            "--keys".into(),
            keys,
            "--per-key".into(),
            per_key.to_string(),
            "--shard".into(),
            shard,
            "--sources".into(),
            sources,
            "--connect-concurrency".into(),
            "64".into(),
        ];
        if let Some(secure) = &secure {
            args.extend(secure.loadgen_args());
        }
        subs.push(Loadgen::spawn(
            &format!("{} subscribers {i}", system.name()),
            &args,
        )?);
    }
    let mut connected = 0;
    for s in &mut subs {
        let c = s.wait("connected", Duration::from_secs(180)).await?;
        connected += c["n"].as_u64().unwrap_or(0);
        if c["failed"].as_u64().unwrap_or(0) > 0 {
            eprintln!(
                "  {}: {} connections failed: {}",
                s.name, c["failed"], c["error"]
            );
        }
    }
    ensure!(
        connected as usize == expected,
        "{}: {connected} of {expected} subscribers connected",
        system.name()
    );
    for f in &mut fanout {
        f.wait("ready", Duration::from_secs(30)).await?;
    }
    let busy_at_start = procs::busy_ms()?;
    let started_ns = now_ns();
    let mut publisher = match system {
        System::Calibration { .. } => {
            for f in &mut fanout {
                f.say("go").await?;
            }
            None
        }
        System::Ringfeed { router, .. } => {
            let mut args = publish_args("--grpc", router, keys, publishing);
            if let Some(secure) = &secure {
                args.extend(secure.loadgen_args());
            }
            Some(Loadgen::spawn("ringfeed publisher", &args)?)
        }
        System::RingfeedDirect { node, .. } => {
            let args = publish_args("--direct-node", node, keys, publishing);
            Some(Loadgen::spawn("ringfeed-direct publisher", &args)?)
        }
        System::RelayChain { .. } => {
            for f in &mut fanout {
                f.say("go").await?;
            }
            let args = publish_args("--relay", &first_relay, keys, publishing);
            Some(Loadgen::spawn("relay-chain publisher", &args)?)
        }
        System::Peer { peer, redis, .. } => {
            let mut args = publish_args("--redis", redis, keys, publishing);
            args.extend(peer.publish_args().iter().map(|a| a.to_string()));
            Some(Loadgen::spawn(
                &format!("{} publisher", peer.name()),
                &args,
            )?)
        }
    };
    // The load generators' own CPU over the same span as the box's.
    let loadgen_pids: Vec<u32> = subs
        .iter()
        .chain(publisher.as_ref())
        .filter_map(Loadgen::pid)
        .collect();
    let loadgen_cpu = || loadgen_pids.iter().map(|&p| procs::cpu_ms(p)).sum::<f64>();
    let rate;
    let box_cpu_ms;
    let loadgen_cpu_ms;
    if publishing.count > 0 {
        let loadgen_at_start = loadgen_cpu();
        // Until every subscriber got its update(s), or the window ends.
        let deadline = tokio::time::Instant::now() + window.max(Duration::from_secs(30));
        loop {
            let receiving: u64 = subs
                .iter_mut()
                .filter_map(|s| s.poll_ticks().and_then(|t| t["receiving"].as_u64()))
                .sum();
            if receiving as usize >= expected || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        box_cpu_ms = procs::busy_ms()? - busy_at_start;
        loadgen_cpu_ms = loadgen_cpu() - loadgen_at_start;
        rate = f64::NAN;
    } else {
        tokio::time::sleep(warmup).await;
        let before = snapshot(&mut subs);
        let busy_before = procs::busy_ms()?;
        let loadgen_before = loadgen_cpu();
        tokio::time::sleep(window).await;
        let after = snapshot(&mut subs);
        box_cpu_ms = procs::busy_ms()? - busy_before;
        loadgen_cpu_ms = loadgen_cpu() - loadgen_before;
        rate = before
            .iter()
            .zip(&after)
            .map(|((r0, t0), (r1, t1))| {
                if t1 > t0 {
                    (r1 - r0) as f64 / ((t1 - t0) as f64 / 1e9)
                } else {
                    0.0
                }
            })
            .sum();
    }
    let mut calls_ms = None;
    let mut published = match publisher.as_mut() {
        Some(p) => {
            let done = p.finish(Duration::from_secs(30)).await?;
            if done["errors"].as_u64().unwrap_or(0) > 0 {
                eprintln!(
                    "  {}: {} publish errors: {}",
                    p.name, done["errors"], done["error"]
                );
            }
            let ms = |field: &str| done[field].as_f64().unwrap_or(f64::NAN) / 1000.0;
            // None when nothing answers the calls (the same-hop floor's relays).
            if done["call_p99_us"].is_number() {
                calls_ms = Some([ms("call_p50_us"), ms("call_p99_us"), ms("call_p999_us")]);
            }
            done["published"].as_u64().unwrap_or(0)
        }
        None => 0,
    };
    let mut hist = Histogram::<u64>::new_with_max(60_000_000, 3)?;
    let mut receiving = 0;
    let mut closed = 0;
    let mut last_receipt = 0;
    let mut series: std::collections::BTreeMap<u64, f64> = Default::default();
    for s in &mut subs {
        let done = s.finish(Duration::from_secs(30)).await?;
        receiving += done["receiving"].as_u64().unwrap_or(0);
        closed += done["closed"].as_u64().unwrap_or(0);
        last_receipt = last_receipt.max(done["last_receipt_ns"].as_u64().unwrap_or(0));
        // [value, count] pairs, one per bucket the subscriber recorded.
        for pair in done["hist"].as_array().into_iter().flatten() {
            let (value, count) = (pair[0].as_u64(), pair[1].as_u64());
            if let (Some(value), Some(count)) = (value, count) {
                hist.record_n(value, count)?;
            }
        }
        for pair in s.ticks.windows(2) {
            let (t0, t1) = (tick_at(&pair[0]), tick_at(&pair[1]));
            let (r0, r1) = (tick_received(&pair[0]), tick_received(&pair[1]));
            if t1 > t0 && t1 > started_ns {
                let second = (t1 - started_ns) / 1_000_000_000;
                *series.entry(second).or_default() += (r1 - r0) as f64 / ((t1 - t0) as f64 / 1e9);
            }
        }
    }
    // The calibration server stops after its subscribers (it would close them). The
    // same-hop floor's publisher counted its own publishes; its relays stop last.
    for f in &mut fanout {
        let sent = f.finish(Duration::from_secs(10)).await?["sent"]
            .as_u64()
            .unwrap_or(0);
        if matches!(system, System::Calibration { .. }) {
            published += sent;
        }
    }
    for r in &mut relays {
        let done = r.finish(Duration::from_secs(10)).await?;
        if done["errors"].as_u64().unwrap_or(0) > 0 {
            eprintln!("  {}: {} connections failed", r.name, done["errors"]);
        }
    }
    Ok(RunResult {
        rate,
        series: series.into_iter().map(|(s, r)| (s as f64, r)).collect(),
        hist,
        connected,
        receiving,
        closed,
        published,
        last_receipt_ms: last_receipt.saturating_sub(started_ns) as f64 / 1e6,
        box_cpu_ms,
        calls_ms,
        loadgen_cpu_ms,
    })
}

/// How many of `0..n` fall to part `i` of `parts` when `c` goes to part `c % parts`.
fn share_of(n: usize, parts: usize, i: usize) -> usize {
    n / parts + usize::from(i < n % parts)
}

fn publish_args(flag: &str, addr: &str, keys: &str, p: Publishing) -> Vec<String> {
    vec![
        "pub".into(),
        flag.into(),
        addr.into(),
        "--keys".into(),
        keys.into(),
        "--batch".into(),
        p.batch.to_string(),
        "--rate".into(),
        p.rate.to_string(),
        "--concurrency".into(),
        p.concurrency.to_string(),
        "--count".into(),
        p.count.to_string(),
        "--ack".into(),
        if p.ack_owner { "owner" } else { "replicated" }.into(),
    ]
}

fn tick_at(t: &Value) -> u64 {
    t["at_ns"].as_u64().unwrap_or(0)
}

fn tick_received(t: &Value) -> u64 {
    t["received"].as_u64().unwrap_or(0)
}

/// (received, at_ns) of every subscriber process's latest tick.
fn snapshot(subs: &mut [Loadgen]) -> Vec<(u64, u64)> {
    subs.iter_mut()
        .map(|s| {
            s.poll_ticks()
                .map_or((0, 0), |t| (tick_received(t), tick_at(t)))
        })
        .collect()
}

fn keys_count(spec: &str) -> usize {
    spec.rsplit_once('*')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn fmt_rate(r: f64) -> String {
    if r >= 1000.0 {
        format!("{:.1}k msg/s", r / 1000.0)
    } else {
        format!("{r:.0} msg/s")
    }
}

impl NodePeer {
    fn system(&self) -> System {
        System::Peer {
            peer: self.peer,
            urls: self.urls.clone(),
            redis: self.redis_addr.clone(),
        }
    }
}

/// Ringfeed, the seed reference, both calibrations and Socket.IO, in the order runs
/// alternate.
fn side_by_side(cluster: &Cluster, seed: &NodePeer, socketio: &NodePeer) -> [System; 5] {
    let [tcp, ws] = calibrations(1, 0);
    [
        System::Ringfeed {
            urls: ringfeed_urls(cluster),
            router: cluster.router_grpc(),
            direct: None,
            secure: None,
        },
        seed.system(),
        tcp,
        ws,
        socketio.system(),
    ]
}

/// The two calibrations (docs/benchmarks.md), bare tokio TCP and bare tokio-tungstenite, each
/// from `servers` fan-out processes of `workers` worker threads each (0: one per core).
fn calibrations(servers: usize, workers: usize) -> [System; 2] {
    ["tcp", "ws"].map(|mode| System::Calibration {
        mode,
        servers,
        workers,
    })
}

/// How P1 publishes (and P10 beside it): every publisher keeps 64 calls of 100 in
/// flight. ringfeed answers each only once its updates are replicated and shown
/// (ack=replicated), so its window must hold a throughput's worth of them: with 4 in
/// flight it was measured latency-bound, one socket write per message, while the
/// peers' publishers are answered as soon as Redis has forwarded, and their queues grow
/// without bound.
fn p1_publishing() -> Publishing {
    Publishing {
        batch: 100,
        rate: 0,
        concurrency: 64,
        count: 0,
        ack_owner: false,
    }
}

/// P1: delivered messages/s, batched, 1,000 keys × 10 subscribers on 3 nodes.
async fn p1(args: &Args, sizes: &Sizes) -> Result<()> {
    let keys = format!("p1:*{}", sizes.keys);
    let cluster = start_ringfeed(3).await?;
    let seed = NodePeer::start(&args.peers, Peer::Seed, 2).await?;
    let socketio = NodePeer::start(&args.peers, Peer::SocketIo, 2).await?;
    let systems = side_by_side(&cluster, &seed, &socketio);
    let publishing = p1_publishing();
    // The five systems, then ringfeed again with ack=owner (docs/benchmarks.md: beside the
    // default where it differs; fan-out still waits for the successor's copy, only
    // the publisher's answer does not), and with the 4-call window of earlier runs.
    let owner_publishing = Publishing {
        ack_owner: true,
        ..publishing
    };
    let narrow_publishing = Publishing {
        concurrency: 4,
        ..publishing
    };
    let plan: Vec<(&System, Publishing, String)> = systems
        .iter()
        .map(|s| (s, publishing, s.name()))
        .chain([
            (
                &systems[0],
                owner_publishing,
                "ringfeed ack=owner".to_owned(),
            ),
            (
                &systems[0],
                narrow_publishing,
                "ringfeed window=4".to_owned(),
            ),
        ])
        .collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); plan.len()];
    let mut last: Vec<Option<RunResult>> = plan.iter().map(|_| None).collect();
    for run in 0..args.runs {
        for (i, (system, publishing, name)) in plan.iter().enumerate() {
            let r = fanout_run(
                system,
                &keys,
                sizes.per_key,
                sizes.sub_procs,
                *publishing,
                Duration::from_secs(2),
                Duration::from_secs(args.window_secs),
            )
            .await?;
            println!(
                "P1 run {}/{} {:>18}: {} delivered to {} sockets ({} closed by the server; p99 {:.1} ms)",
                run + 1,
                args.runs,
                name,
                fmt_rate(r.rate),
                r.connected,
                r.closed,
                r.hist.value_at_quantile(0.99) as f64 / 1000.0
            );
            rates[i].push(r.rate);
            last[i] = Some(r);
        }
    }
    let m: Vec<f64> = rates.iter().map(|r| median(r)).collect();
    let (owner, narrow) = (m[5], m[6]);
    let calibration = m[2].max(m[3]);
    let ratio = m[0] / m[1];
    let fraction = m[0] / calibration;
    let met = fraction >= 0.6 && ratio >= 1.5;
    let ratio_socketio = m[0] / m[4];
    let summary = format!(
        "{} = {:.0}% of calibration, {ratio:.2}× the seed reference, {ratio_socketio:.2}× Socket.IO",
        fmt_rate(m[0]),
        fraction * 100.0
    );
    println!("P1 medians: ringfeed {} · seed reference {} · Socket.IO {} · calibration tcp {} / ws {} → {summary}; bar {}", fmt_rate(m[0]), fmt_rate(m[1]), fmt_rate(m[4]), fmt_rate(m[2]), fmt_rate(m[3]), if met { "met" } else { "not met" });
    // The ringfeed runs reported beside the bar's figure.
    let beside = |what: &str, rate: f64| {
        format!(
            "{what}: {} = {:.0}% of calibration, {:.2}× the seed reference",
            fmt_rate(rate),
            rate / calibration * 100.0,
            rate / m[1]
        )
    };
    let owner_summary = beside("ack=owner", owner);
    let narrow_summary = beside("4 calls in flight", narrow);
    println!("P1 {owner_summary}; {narrow_summary}");
    let result = json!({
        "id": "P1",
        "what": "delivered msg/s, PublishBatch, 1,000 keys × 10 subscribers, 3 nodes",
        "setup": {"keys": sizes.keys, "subscribers_per_key": sizes.per_key, "nodes": 3, "payload_bytes": 64, "batch": publishing.batch, "publish_concurrency": publishing.concurrency, "window_secs": args.window_secs, "runs": args.runs, "ack": "replicated", "seed_endpoints": 2},
        "ringfeed": {"runs": rates[0], "median": m[0], "unit": "msg/s", "latency": last[0].as_ref().map(|r| report::percentiles(&r.hist)),
            "ack_owner": {"runs": rates[5], "median": owner, "ratio_vs_seed_reference": owner / m[1], "fraction_of_calibration": owner / calibration},
            "window_4": {"runs": rates[6], "median": narrow, "ratio_vs_seed_reference": narrow / m[1], "fraction_of_calibration": narrow / calibration, "latency": last[6].as_ref().map(|r| report::percentiles(&r.hist))}},
        "peers": {
            "seed-reference": {"runs": rates[1], "median": m[1], "unit": "msg/s", "latency": last[1].as_ref().map(|r| report::percentiles(&r.hist))},
            "socketio": {"runs": rates[4], "median": m[4], "unit": "msg/s", "latency": last[4].as_ref().map(|r| report::percentiles(&r.hist)), "endpoints": 2},
        },
        "calibration": {"tcp": {"runs": rates[2], "median": m[2]}, "ws": {"runs": rates[3], "median": m[3]}, "best": calibration},
        "ratio_vs_seed_reference": ratio,
        "ratio_vs_socketio": ratio_socketio,
        "fraction_of_calibration": fraction,
        "bar": "≥ 60% of calibration and ≥ 1.5× seed reference",
        "met": met,
        "summary_ringfeed": format!("{summary} ({owner_summary}; {narrow_summary})"),
        "summary_peers": format!("seed reference {}, Socket.IO {}", fmt_rate(m[1]), fmt_rate(m[4])),
        "summary_calibration": format!("{} (tcp {}, ws {})", fmt_rate(calibration), fmt_rate(m[2]), fmt_rate(m[3])),
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P1", &result)?;
    // The plot shows the five systems (zip stops there); the other ringfeed runs are in
    // the JSON.
    let names: Vec<String> = systems.iter().map(System::name).collect();
    let throughput: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .zip(&last)
        .filter_map(|(n, r)| Some((n.clone(), r.as_ref()?.series.clone())))
        .collect();
    let latency: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .zip(&last)
        .filter_map(|(n, r)| Some((n.clone(), report::cdf(&r.as_ref()?.hist))))
        .collect();
    report::plot(
        &args.out.join("P1.svg"),
        "P1: batched fan-out, 1,000 keys × 10 subscribers",
        &throughput,
        &latency,
    )?;
    drop((seed, socketio));
    drop(cluster);
    Ok(())
}

/// P3: memory per idle connection, each on its own key, at 10k and 17k connections.
async fn p3(args: &Args, sizes: &Sizes) -> Result<()> {
    // ringfeed, the seed reference, Socket.IO.
    let mut per_conn: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); sizes.idle.len()]; 3];
    for run in 0..args.runs {
        for (si, &n) in sizes.idle.iter().enumerate() {
            for (i, slot) in per_conn.iter_mut().enumerate() {
                // A fresh process per measurement: freed memory is not given back to
                // the kernel, so a second round in one process would measure nothing.
                let (cluster, peer, name, urls, pid, target) = if i == 0 {
                    let cluster = start_ringfeed(1).await?;
                    let pid = cluster.nodes[0].pid().expect("node running");
                    let urls = ringfeed_urls(&cluster);
                    (Some(cluster), None, "ringfeed", urls, pid, "ws")
                } else {
                    let kind = if i == 1 { Peer::Seed } else { Peer::SocketIo };
                    let peer = NodePeer::start(&args.peers, kind, 1).await?;
                    let pid = peer.pids()[0];
                    let urls = peer.urls.clone();
                    (None, Some(peer), kind.name(), urls, pid, kind.target())
                };
                let before = settled_rss(pid).await?;
                let keys = format!("p3-{run}-{n}:*{n}");
                let mut subs = Vec::new();
                for p in 0..sizes.sub_procs {
                    subs.push(Loadgen::spawn(
                        &format!("{name} idle {p}"),
                        &[
                            "sub".into(),
                            "--target".into(),
                            target.into(),
                            "--url".into(),
                            urls.join(","),
                            "--keys".into(),
                            keys.clone(),
                            "--shard".into(),
                            format!("{p}/{}", sizes.sub_procs),
                            "--sources".into(),
                            SOURCES.into(),
                        ],
                    )?);
                }
                let mut connected = 0;
                for s in &mut subs {
                    connected += s.wait("connected", Duration::from_secs(180)).await?["n"]
                        .as_u64()
                        .unwrap_or(0);
                }
                ensure!(
                    connected as usize == n,
                    "{name}: {connected} of {n} connected"
                );
                let after = settled_rss(pid).await?;
                let kib = (after.saturating_sub(before)) as f64 / n as f64 / 1024.0;
                println!(
                    "P3 run {}/{} {name:>15}: {n} idle connections: RSS {:.1} → {:.1} MiB = {kib:.2} KiB per connection",
                    run + 1,
                    args.runs,
                    before as f64 / 1048576.0,
                    after as f64 / 1048576.0
                );
                slot[si].push(kib);
                for s in &mut subs {
                    s.finish(Duration::from_secs(30)).await?;
                }
                drop(peer);
                drop(cluster);
            }
        }
    }
    let worst = |i: usize| per_conn[i].iter().map(|v| median(v)).fold(0.0, f64::max);
    let (r, s, io) = (worst(0), worst(1), worst(2));
    // Against the seed reference at each size, not worst against worst: the bar holds
    // only if it holds at every size measured.
    let ratio_at = |peer: usize| -> Vec<f64> {
        (0..sizes.idle.len())
            .map(|si| median(&per_conn[0][si]) / median(&per_conn[peer][si]))
            .collect()
    };
    let (ratios, ratios_socketio) = (ratio_at(1), ratio_at(2));
    let ratio = ratios.iter().copied().fold(0.0, f64::max);
    let ratio_socketio = ratios_socketio.iter().copied().fold(0.0, f64::max);
    let met = r <= 8.0 && ratio <= 1.0 / 3.0;
    let sizes_text: Vec<String> = sizes
        .idle
        .iter()
        .enumerate()
        .map(|(si, n)| format!("{:.2} KiB at {n}", median(&per_conn[0][si])))
        .collect();
    let text_of = |i: usize| -> Vec<String> {
        sizes
            .idle
            .iter()
            .enumerate()
            .map(|(si, n)| format!("{:.2} KiB at {n}", median(&per_conn[i][si])))
            .collect()
    };
    let (peer_text, socketio_text) = (text_of(1), text_of(2));
    println!(
        "P3 medians: ringfeed {} · seed reference {} · Socket.IO {}; against the seed reference {}; bar {}",
        sizes_text.join(", "),
        peer_text.join(", "),
        socketio_text.join(", "),
        ratios
            .iter()
            .zip(&sizes.idle)
            .map(|(r, n)| format!("{r:.3}× at {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        if met { "met" } else { "not met" }
    );
    let result = json!({
        "id": "P3",
        "what": "RSS per idle WebSocket connection, each on its own key (1 node / 1 endpoint process)",
        "setup": {"connections": sizes.idle, "runs": args.runs},
        "ringfeed": {"kib_per_connection": per_conn[0], "worst_median_kib": r},
        "peers": {
            "seed-reference": {"kib_per_connection": per_conn[1], "worst_median_kib": s},
            "socketio": {"kib_per_connection": per_conn[2], "worst_median_kib": io},
        },
        "ratio_vs_seed_reference": ratio,
        "ratio_vs_seed_reference_at_each_size": ratios,
        "ratio_vs_socketio": ratio_socketio,
        "bar": "≤ 8 KiB per connection (stretch 4) and ≤ 1/3 of the seed reference at each size",
        "met": met,
        "summary_ringfeed": sizes_text.join(", "),
        "summary_peers": format!("seed reference {}; Socket.IO {}", peer_text.join(", "), socketio_text.join(", ")),
        "summary_calibration": "—",
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P3", &result)?;
    Ok(())
}

/// The RSS of `pid` once it stops moving (two samples 500 ms apart within 1%).
async fn settled_rss(pid: u32) -> Result<u64> {
    let mut last = procs::rss(pid)?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = procs::rss(pid)?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// P5: one key, 10k subscribers, one publish: time until the last receipt.
async fn p5(args: &Args, sizes: &Sizes) -> Result<()> {
    let cluster = start_ringfeed(3).await?;
    let seed = NodePeer::start(&args.peers, Peer::Seed, 2).await?;
    let socketio = NodePeer::start(&args.peers, Peer::SocketIo, 2).await?;
    let systems = side_by_side(&cluster, &seed, &socketio);
    let publishing = Publishing {
        batch: 0,
        rate: 0,
        concurrency: 1,
        count: 1,
        ack_owner: false,
    };
    let mut last_ms: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    for run in 0..args.runs {
        for (i, system) in systems.iter().enumerate() {
            let keys = format!("p5-{run}:*1");
            let r = fanout_run(
                system,
                &keys,
                sizes.hot,
                sizes.sub_procs,
                publishing,
                Duration::ZERO,
                Duration::from_secs(30),
            )
            .await?;
            ensure!(
                r.receiving as usize == sizes.hot,
                "{}: {} of {} subscribers received",
                system.name(),
                r.receiving,
                sizes.hot
            );
            let ms = r.hist.max() as f64 / 1000.0;
            println!(
                "P5 run {}/{} {:>18}: the last of {} subscribers received {ms:.1} ms after the publish (first {:.1} ms)",
                run + 1,
                args.runs,
                system.name(),
                r.receiving,
                r.hist.min() as f64 / 1000.0
            );
            last_ms[i].push(ms);
        }
    }
    let m: Vec<f64> = last_ms.iter().map(|v| median(v)).collect();
    let calibration = m[2].min(m[3]);
    let met = m[0] <= 1.5 * calibration;
    let summary = format!("{:.1} ms = {:.2}× calibration", m[0], m[0] / calibration);
    println!("P5 medians: ringfeed {:.1} ms · seed reference {:.1} ms · Socket.IO {:.1} ms · calibration tcp {:.1} / ws {:.1} ms; bar {}", m[0], m[1], m[4], m[2], m[3], if met { "met" } else { "not met" });
    let result = json!({
        "id": "P5",
        "what": "one key, 10k subscribers, one publish: publish → last receipt",
        "setup": {"subscribers": sizes.hot, "nodes": 3, "runs": args.runs},
        "ringfeed": {"last_receipt_ms": last_ms[0], "median_ms": m[0]},
        "peers": {
            "seed-reference": {"last_receipt_ms": last_ms[1], "median_ms": m[1]},
            "socketio": {"last_receipt_ms": last_ms[4], "median_ms": m[4]},
        },
        "calibration": {"tcp": {"last_receipt_ms": last_ms[2], "median_ms": m[2]}, "ws": {"last_receipt_ms": last_ms[3], "median_ms": m[3]}, "best_ms": calibration},
        "ratio_vs_seed_reference": m[0] / m[1],
        "ratio_vs_socketio": m[0] / m[4],
        "fraction_of_calibration": m[0] / calibration,
        "bar": "last receipt within 1.5× the calibration's time",
        "met": met,
        "summary_ringfeed": summary,
        "summary_peers": format!("seed reference {:.1} ms, Socket.IO {:.1} ms", m[1], m[4]),
        "summary_calibration": format!("{calibration:.1} ms (tcp {:.1}, ws {:.1})", m[2], m[3]),
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P5", &result)?;
    Ok(())
}

/// Worker threads of each of P4's seven nodes and seven calibration processes: they
/// share this box's two cores, and one worker each saves the wake-ups of a second
/// (ringfeed's medians 1.39 s → 1.22–1.31 s in three runs; the calibration's did not
/// move beyond its own ±12%).
const P4_WORKERS: usize = 1;

/// A fresh P4 cluster of `nodes`, and how to drive it: one subscriber process per node,
/// holding the keys that node owns (the ring is computed here from the same ids and
/// points), so nobody is redirected. The key lists are written under `dir`.
async fn p4_cluster(
    nodes: usize,
    connections: usize,
    dir: &std::path::Path,
) -> Result<(Cluster, System)> {
    let workers = P4_WORKERS.to_string();
    let cluster = start_ringfeed_with(nodes, &["--worker-threads", &workers]).await?;
    let ring = moves::ring_of(
        &cluster
            .nodes
            .iter()
            .map(|n| n.id.as_str())
            .collect::<Vec<_>>(),
    );
    let mut direct = Vec::new();
    for node in &cluster.nodes {
        let owned: Vec<String> = (0..connections)
            .map(|i| format!("p4:{i}"))
            .filter(|k| ring.owner(k).is_some_and(|o| o.id.0 == node.id))
            .collect();
        let file = dir.join(format!("{}.keys", node.id));
        std::fs::write(&file, owned.join("\n"))?;
        direct.push((
            format!(
                "{}/v1/connect?key={{key}}",
                node.http.replace("http://", "ws://")
            ),
            format!("@{}", file.display()),
        ));
    }
    let ringfeed = System::Ringfeed {
        urls: ringfeed_urls(&cluster),
        router: cluster.router_grpc(),
        direct: Some(direct),
        secure: None,
    };
    Ok((cluster, ringfeed))
}

/// P4: 100k WebSocket connections across 7 nodes, each on its own key, one publish to
/// each key: time from the first publish to the last receipt. The calibration writes
/// once to each of the same number of sockets, from as many fan-out processes as
/// ringfeed has nodes (the fd limit is per process), read by as many subscriber
/// processes.
async fn p4(args: &Args) -> Result<()> {
    let (connections, nodes) = if args.smoke { (500, 3) } else { (100_000, 7) };
    let procs = nodes;
    let keys = format!("p4:*{connections}");
    let publishing = Publishing {
        batch: 500,
        rate: 0,
        concurrency: 8,
        count: connections as u64,
        ack_owner: false,
    };
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); 3];
    // The box's CPU per message, µs (ringfeed, calibration-tcp, calibration-ws): what
    // each system's whole path costs, where the time is a queue on 2 cores.
    let mut cpu_us: Vec<Vec<f64>> = vec![Vec::new(); 3];
    // Alternating runs, medians quoted: one run's ratio ranged from 1.8× to 3.3× on
    // this box (its CPU per message moves by a third from run to run).
    let runs = args.runs;
    let dir = tempfile::tempdir()?;
    for run in 0..runs {
        // A fresh cluster each run, as the calibration's servers are fresh: no run
        // inherits the last one's 100k keys and replicas.
        let (cluster, ringfeed) = p4_cluster(nodes, connections, dir.path()).await?;
        let r = fanout_run(
            &ringfeed,
            &keys,
            1,
            procs,
            publishing,
            Duration::ZERO,
            Duration::from_secs(120),
        )
        .await?;
        ensure!(
            r.receiving as usize == connections,
            "ringfeed: {} of {connections} connections received",
            r.receiving
        );
        let cpu = r.box_cpu_ms * 1000.0 / connections as f64;
        println!(
            "P4 run {}/{runs} ringfeed: {} connections on {nodes} nodes; all received {:.0} ms after the first publish; box CPU {cpu:.1} µs per update",
            run + 1,
            r.connected,
            r.last_receipt_ms,
        );
        times[0].push(r.last_receipt_ms);
        cpu_us[0].push(cpu);
        drop(cluster);
        for (i, calibration) in (1..).zip(calibrations(procs, P4_WORKERS)) {
            let r = fanout_run(
                &calibration,
                &format!("p4c:*{connections}"),
                1,
                procs,
                Publishing {
                    count: connections as u64,
                    ..publishing
                },
                Duration::ZERO,
                Duration::from_secs(60),
            )
            .await?;
            let cpu = r.box_cpu_ms * 1000.0 / connections as f64;
            println!(
                "P4 run {}/{runs} {}: one write to each of {connections} sockets from {procs} processes in {:.0} ms; box CPU {cpu:.1} µs per message",
                run + 1,
                calibration.name(),
                r.last_receipt_ms,
            );
            times[i].push(r.last_receipt_ms);
            cpu_us[i].push(cpu);
        }
    }
    let m: Vec<f64> = times.iter().map(|v| median(v)).collect();
    let calibration = m[1].min(m[2]);
    let met = m[0] <= 2.0 * calibration;
    let cpu: Vec<f64> = cpu_us.iter().map(|v| median(v)).collect();
    let summary = format!(
        "{connections} connections on {nodes} nodes, all received in {:.2} s = {:.2}× calibration; box CPU {:.0} µs per update",
        m[0] / 1000.0,
        m[0] / calibration,
        cpu[0]
    );
    println!("P4: {summary}; bar {}", if met { "met" } else { "not met" });
    let result = json!({
        "id": "P4",
        "what": "100k WebSocket connections across 7 nodes, one publish to each",
        "setup": {"connections": connections, "nodes": nodes, "loadgen_processes": procs, "sources": SOURCES, "batch": 500, "runs": runs, "worker_threads_per_node_and_fanout_process": P4_WORKERS},
        "ringfeed": {"all_received_ms": times[0], "median_ms": m[0]},
        "peers": {"seed-reference": {"measured": false, "why": "P4 is ringfeed against the calibration"}, "socketio": {"measured": false, "why": "P4 is ringfeed against the calibration"}},
        "calibration": {"how": format!("one write to each of {connections} sockets from {procs} fan-out processes (the fd limit is per process), read by {procs} subscriber processes as ringfeed's are"), "tcp_ms": times[1], "ws_ms": times[2], "best_ms": calibration},
        "fraction_of_calibration": m[0] / calibration,
        "box_cpu_us_per_message": {
            "how": "busy CPU of the whole box (/proc/stat, every process and the kernel's network work) from the first publish until every subscriber received, divided by the messages",
            "ringfeed": cpu_us[0], "calibration_tcp": cpu_us[1], "calibration_ws": cpu_us[2],
        },
        "bar": "all 100k received within 2× the calibration's time for 100k writes",
        "met": met,
        "summary_ringfeed": summary,
        "summary_peers": "—",
        "summary_calibration": format!(
            "{:.2} s for {connections} writes; box CPU {:.0} µs (tcp) / {:.0} µs (ws) per message",
            calibration / 1000.0,
            cpu[1],
            cpu[2]
        ),
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P4", &result)?;
    Ok(())
}
