//! P10, the price of security: P1 and P3 with a secure cluster (`Cluster::builder()
//! .secure()`: TLS on every listener, `wss://` with a ticket per key, gRPC to the router
//! over TLS with the API token, mutual TLS between processes, etcd over TLS) beside the
//! same scenarios on a plain cluster, alternating, in one invocation. The seed reference
//! runs beside P1 as it does in P1, so the ratio to it comes from the same run.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::{json, Value};

use crate::procs::{Loadgen, NodePeer, Peer};
use crate::report::{self, median};
use crate::{
    fanout_run, fmt_rate, p1_publishing, ringfeed_urls, settled_rss, start_ringfeed_as, Args,
    RunResult, Secure, Sizes, System, SOURCES,
};

/// The bar: secure P1 at least this fraction of plain P1.
const P1_FRACTION: f64 = 0.75;
/// Reported beside the bar: secure P1 still at least this many times the seed
/// reference (docs/benchmarks.md, P1's goal).
const SEED_GOAL: f64 = 2.5;
/// The bar: KiB per idle `wss://` connection, at most (the goal: [`P3_GOAL_KIB`]).
const P3_BAR_KIB: f64 = 12.0;
const P3_GOAL_KIB: f64 = 6.0;

/// What the box's CPU went to in one throughput run, per delivered message.
fn cpu_per_message(r: &RunResult, window_secs: u64) -> (f64, f64) {
    let delivered = r.rate * window_secs as f64;
    if delivered > 0.0 {
        (
            r.box_cpu_ms * 1000.0 / delivered,
            r.loadgen_cpu_ms * 1000.0 / delivered,
        )
    } else {
        (f64::NAN, f64::NAN)
    }
}

/// P10: P1 plain, P1 secure and the seed reference alternating, then P3 plain and P3
/// secure alternating (each measurement in a fresh node, run by a `P10-idle` process
/// of its own).
pub(crate) async fn p10(args: &Args, sizes: &Sizes) -> Result<()> {
    // The plain cluster starts first: once a secure cluster has started in a process,
    // the cluster-tests helpers speak TLS to every router (their CA is process-wide),
    // and a plain cluster's start waits on its router through them. For the same
    // reason every P3 measurement below runs in a process of its own.
    let keys = format!("p1:*{}", sizes.keys);
    let plain = start_ringfeed_as(3, &[], false).await?;
    let seed = NodePeer::start(&args.peers, Peer::Seed, 2).await?;
    let secure = start_ringfeed_as(3, &[], true).await?;
    let secure_creds = Secure::of(&secure).context("a secure cluster")?;
    ensure!(
        ringfeed_urls(&secure)
            .iter()
            .all(|u| u.starts_with("wss://")),
        "the secure cluster's nodes do not serve wss://"
    );
    let systems = [
        (
            "plain",
            System::Ringfeed {
                urls: ringfeed_urls(&plain),
                router: plain.router_grpc(),
                direct: None,
                secure: None,
            },
        ),
        (
            "secure",
            System::Ringfeed {
                urls: ringfeed_urls(&secure),
                router: secure.router_grpc(),
                direct: None,
                secure: Some(secure_creds),
            },
        ),
        ("seed-reference", seed.system()),
    ];
    let publishing = p1_publishing();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut cpu_us: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut loadgen_cpu_us: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut last: Vec<Option<RunResult>> = systems.iter().map(|_| None).collect();
    for run in 0..args.runs {
        for (i, (name, system)) in systems.iter().enumerate() {
            let r = fanout_run(
                system,
                &keys,
                sizes.per_key,
                sizes.sub_procs,
                publishing,
                Duration::from_secs(2),
                Duration::from_secs(args.window_secs),
            )
            .await?;
            let (cpu, loadgen) = cpu_per_message(&r, args.window_secs);
            println!(
                "P10 run {}/{} P1 {name:>14}: {} delivered to {} sockets ({} closed by the server; p99 {:.1} ms); box CPU {cpu:.2} µs per message, {loadgen:.2} of it the load generators",
                run + 1,
                args.runs,
                fmt_rate(r.rate),
                r.connected,
                r.closed,
                r.hist.value_at_quantile(0.99) as f64 / 1000.0
            );
            rates[i].push(r.rate);
            cpu_us[i].push(cpu);
            loadgen_cpu_us[i].push(loadgen);
            last[i] = Some(r);
        }
    }
    drop(seed);
    drop(secure);
    drop(plain);
    let m: Vec<f64> = rates.iter().map(|r| median(r)).collect();
    let (p1_plain, p1_secure, p1_seed) = (m[0], m[1], m[2]);
    let p1_fraction = p1_secure / p1_plain;
    let secure_vs_seed = p1_secure / p1_seed;
    let plain_vs_seed = p1_plain / p1_seed;
    let p1_met = p1_fraction >= P1_FRACTION;
    let seed_goal_met = secure_vs_seed >= SEED_GOAL;
    let cpu: Vec<f64> = cpu_us.iter().map(|v| median(v)).collect();
    let loadgen_cpu: Vec<f64> = loadgen_cpu_us.iter().map(|v| median(v)).collect();
    // The seed reference's figure in the latest P1 report, for comparison.
    let p1_json_seed = std::fs::read_to_string(args.out.join("P1.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["peers"]["seed-reference"]["median"].as_f64());
    println!(
        "P10 P1 medians: plain {} · secure {} = {:.0}% of plain ({}) · seed reference {} (secure {secure_vs_seed:.2}×, plain {plain_vs_seed:.2}× the seed reference; ≥ {SEED_GOAL}×: {}); box CPU per message plain {:.2} µs, secure {:.2} µs (load generators {:.2} / {:.2})",
        fmt_rate(p1_plain),
        fmt_rate(p1_secure),
        p1_fraction * 100.0,
        if p1_met { "≥ 75%: met" } else { "< 75%: not met" },
        fmt_rate(p1_seed),
        if seed_goal_met { "yes" } else { "no" },
        cpu[0],
        cpu[1],
        loadgen_cpu[0],
        loadgen_cpu[1],
    );

    // P3: plain and secure alternating, at each of P3's sizes, each in a fresh node.
    let mut kib: [Vec<Vec<f64>>; 2] = [
        vec![Vec::new(); sizes.idle.len()],
        vec![Vec::new(); sizes.idle.len()],
    ];
    let mut tickets_ms: Vec<Vec<f64>> = vec![Vec::new(); sizes.idle.len()];
    for run in 0..args.runs {
        for (si, &n) in sizes.idle.iter().enumerate() {
            for (mode, secure) in [(0, false), (1, true)] {
                let r = idle_in_child(args, n, secure, run).await?;
                let per = r["kib"].as_f64().unwrap_or(f64::NAN);
                let mib = |k: &str| r[k].as_f64().unwrap_or(f64::NAN) / 1048576.0;
                let tickets = r["tickets_ms"].as_f64();
                println!(
                    "P10 run {}/{} P3 {:>6}: {n} idle {} connections: RSS {:.1} → {:.1} MiB = {per:.2} KiB per connection{}",
                    run + 1,
                    args.runs,
                    if secure { "secure" } else { "plain" },
                    if secure { "wss://" } else { "ws://" },
                    mib("before"),
                    mib("after"),
                    tickets
                        .map(|t| format!(" ({n} tickets issued first, in {:.1} s)", t / 1000.0))
                        .unwrap_or_default()
                );
                kib[mode][si].push(per);
                if let Some(t) = tickets {
                    tickets_ms[si].push(t);
                }
            }
        }
    }
    let worst = |mode: usize| kib[mode].iter().map(|v| median(v)).fold(0.0, f64::max);
    let (p3_plain, p3_secure) = (worst(0), worst(1));
    let p3_met = p3_secure <= P3_BAR_KIB;
    let p3_goal_met = p3_secure <= P3_GOAL_KIB;
    let at_sizes = |mode: usize| -> Vec<String> {
        sizes
            .idle
            .iter()
            .enumerate()
            .map(|(si, n)| format!("{:.2} KiB at {n}", median(&kib[mode][si])))
            .collect()
    };
    let (plain_text, secure_text) = (at_sizes(0), at_sizes(1));
    // What TLS adds to one idle connection, at each size.
    let extra: Vec<f64> = (0..sizes.idle.len())
        .map(|si| median(&kib[1][si]) - median(&kib[0][si]))
        .collect();
    println!(
        "P10 P3 medians: plain (ws://) {} · secure (wss://) {}; TLS adds {} per idle connection; worst secure {p3_secure:.2} KiB ({} 12 KiB; goal 6 KiB {})",
        plain_text.join(", "),
        secure_text.join(", "),
        extra
            .iter()
            .zip(&sizes.idle)
            .map(|(e, n)| format!("{e:.2} KiB at {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        if p3_met { "≤" } else { ">" },
        if p3_goal_met { "met" } else { "not met" },
    );
    let met = p1_met && p3_met;
    println!("P10: bar {}", if met { "met" } else { "not met" });

    let summary = format!(
        "P1 secure {} = {:.0}% of plain {} ({secure_vs_seed:.2}× the seed reference: {} {SEED_GOAL}×); P3 secure {p3_secure:.2} KiB per idle wss:// connection (plain ws:// {p3_plain:.2} KiB)",
        fmt_rate(p1_secure),
        p1_fraction * 100.0,
        fmt_rate(p1_plain),
        if seed_goal_met { "≥" } else { "<" },
    );
    let latency = |i: usize| last[i].as_ref().map(|r| report::percentiles(&r.hist));
    let result = json!({
        "id": "P10",
        "what": "the price of security: P1 and P3 in secure mode (TLS on every listener, wss:// with tickets, mutual TLS, API token) beside plain mode",
        "setup": {
            "secure_mode": "Cluster::builder().secure(): certificates from ringfeed-node certs (ECDSA P-256); https/wss and gRPC over TLS on every listener; mutual TLS between processes; etcd over TLS; --auth (a ticket per key, asked of the nodes before connecting; not single-use); the API token on the router's calls and POST /v1/tickets",
            "p1": {"keys": sizes.keys, "subscribers_per_key": sizes.per_key, "nodes": 3, "payload_bytes": 64, "batch": publishing.batch, "publish_concurrency": publishing.concurrency, "ack": "replicated", "window_secs": args.window_secs, "order": ["plain", "secure", "seed-reference"], "seed_endpoints": 2},
            "p3": {"connections": sizes.idle, "nodes": 1, "how": "a fresh node per measurement, each in a P10-idle process of its own; for secure, the subscribers ask for their tickets first and the node's resident set is read after it issued them, before the first connection"},
            "runs": args.runs,
        },
        "runs": {
            "p1_plain_msg_s": rates[0],
            "p1_secure_msg_s": rates[1],
            "p1_seed_reference_msg_s": rates[2],
            "p1_box_cpu_us_per_message": {"plain": cpu_us[0], "secure": cpu_us[1], "seed-reference": cpu_us[2]},
            "p1_loadgen_cpu_us_per_message": {"plain": loadgen_cpu_us[0], "secure": loadgen_cpu_us[1], "seed-reference": loadgen_cpu_us[2]},
            "p3_plain_kib_per_connection": kib[0],
            "p3_secure_kib_per_connection": kib[1],
            "p3_secure_tickets_ms": tickets_ms,
        },
        "medians": {
            "p1_plain_msg_s": p1_plain,
            "p1_secure_msg_s": p1_secure,
            "p1_seed_reference_msg_s": p1_seed,
            "p1_box_cpu_us_per_message": {"plain": cpu[0], "secure": cpu[1], "seed-reference": cpu[2]},
            "p1_loadgen_cpu_us_per_message": {"plain": loadgen_cpu[0], "secure": loadgen_cpu[1], "seed-reference": loadgen_cpu[2]},
            "p1_latency_last_run": {"plain": latency(0), "secure": latency(1), "seed-reference": latency(2)},
            "p3_plain_kib_per_connection": kib[0].iter().map(|v| median(v)).collect::<Vec<_>>(),
            "p3_secure_kib_per_connection": kib[1].iter().map(|v| median(v)).collect::<Vec<_>>(),
            "p3_plain_worst_kib": p3_plain,
            "p3_secure_worst_kib": p3_secure,
        },
        "ratio": {
            "p1_secure_over_plain": p1_fraction,
            "p1_secure_over_seed_reference": secure_vs_seed,
            "p1_plain_over_seed_reference": plain_vs_seed,
            "p1_secure_over_p1_json_seed_reference": p1_json_seed.map(|s| p1_secure / s),
            "p3_secure_over_plain": p3_secure / p3_plain,
            "p3_tls_kib_per_connection": extra,
        },
        "p1_json_seed_reference_msg_s": p1_json_seed,
        "bar": "P1 secure ≥ 75% of plain; P3 secure ≤ 12 KiB per idle wss:// connection (goal 6)",
        "met": met,
        "p1_met": p1_met,
        "p3_met": p3_met,
        "p3_goal_met": p3_goal_met,
        "p1_secure_at_least_2_5x_seed_reference": seed_goal_met,
        "summary_ringfeed": summary,
        "summary_peers": format!("seed reference {} (same run)", fmt_rate(p1_seed)),
        "summary_calibration": "—",
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P10", &result)?;
    Ok(())
}

/// One P3 measurement (`n` idle connections on a fresh node, plain or secure) in a
/// `P10-idle` process of its own: its result line.
async fn idle_in_child(args: &Args, n: usize, secure: bool, run: usize) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("P10-idle")
        .args(["--idle-connections", &n.to_string()])
        .args(["--idle-run", &run.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if secure {
        command.arg("--idle-secure");
    }
    if args.smoke {
        command.arg("--smoke");
    }
    let out = tokio::time::timeout(Duration::from_secs(900), command.output())
        .await
        .map_err(|_| anyhow!("P10-idle ({n}, secure: {secure}) took over 15 minutes"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "P10-idle ({n}, secure: {secure}) failed: {}\n{stdout}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(IDLE_RESULT))
        .ok_or_else(|| anyhow!("P10-idle said no result: {stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

/// How a `P10-idle` process's result line starts.
const IDLE_RESULT: &str = "P10-idle result ";

/// `P10-idle`: one node (secure with `--idle-secure`), `--idle-connections` idle
/// WebSocket connections each on its own key, as P3 holds them; prints the resident set
/// before and after and the KiB per connection as one result line.
pub(crate) async fn idle_child(args: &Args, sizes: &Sizes) -> Result<()> {
    let n = args.idle_connections;
    ensure!(n > 0, "P10-idle needs --idle-connections");
    let cluster = start_ringfeed_as(1, &[], args.idle_secure).await?;
    let pid = cluster.nodes[0].pid().context("the node runs")?;
    let urls = ringfeed_urls(&cluster);
    let secure = Secure::of(&cluster);
    let keys = format!("p10-{}-{n}:*{n}", args.idle_run);
    let mut subs = Vec::new();
    for p in 0..sizes.sub_procs {
        let mut sub_args = vec![
            "sub".into(),
            "--target".into(),
            "ws".into(),
            "--url".into(),
            urls.join(","),
            "--keys".into(),
            keys.clone(),
            "--shard".into(),
            format!("{p}/{}", sizes.sub_procs),
            "--sources".into(),
            SOURCES.into(),
            "--hold".into(),
        ];
        if let Some(secure) = &secure {
            sub_args.extend(secure.loadgen_args());
        }
        subs.push(Loadgen::spawn(&format!("idle {p}"), &sub_args)?);
    }
    // The tickets first (secure): the node issues them before its "before" reading.
    let mut tickets_ms: Option<f64> = None;
    for s in &mut subs {
        if secure.is_some() {
            let t = s.wait("tickets", Duration::from_secs(600)).await?;
            let ms = t["ms"].as_f64().unwrap_or(f64::NAN);
            tickets_ms = Some(tickets_ms.map_or(ms, |m| m.max(ms)));
        }
        s.wait("holding", Duration::from_secs(60)).await?;
    }
    let before = settled_rss(pid).await?;
    for s in &mut subs {
        s.say("connect").await?;
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
    ensure!(connected as usize == n, "{connected} of {n} connected");
    let after = settled_rss(pid).await?;
    let kib = after.saturating_sub(before) as f64 / n as f64 / 1024.0;
    println!(
        "{IDLE_RESULT}{}",
        json!({"kib": kib, "before": before, "after": after, "tickets_ms": tickets_ms, "connections": n, "secure": secure.is_some()})
    );
    for s in &mut subs {
        s.finish(Duration::from_secs(30)).await?;
    }
    drop(cluster);
    Ok(())
}
