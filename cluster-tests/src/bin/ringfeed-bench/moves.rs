//! P7 (failover) and P8 (rebalance): 3,000 subscribed clients that follow every move
//! like real clients (`ringfeed-loadgen sub --follow`), under publish load, while a
//! node is SIGKILLed or joins; the time until every one of them receives again, and
//! every seq accounted for.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ringfeed_cluster_tests::Cluster;
use ringfeed_proto::v1::{GetRingRequest, LookupRequest};
use ringfeed_router::ring::{Member, MemberState, NodeId, Ring, DEFAULT_POINTS};
use serde_json::{json, Value};

use crate::procs::Loadgen;
use crate::{now_ns, report, ringfeed_urls, Args};

/// Clients per key, and updates/s spread over the keys (≈13 per key per second: a
/// client that is back receives within ~75 ms).
const PER_KEY: usize = 10;
const RATE: u64 = 4000;

struct Moved {
    clients: usize,
    interrupted: u64,
    /// From the fault (kill, or the join's ring event) to the last client receiving.
    back_ms: f64,
    /// From the kill to the ring without the node (P7).
    expiry_ms: Option<f64>,
    max_outage_ms: f64,
    published: u64,
    publish_errors: u64,
    gaps: u64,
    duplicates: u64,
    resets: u64,
}

/// What happens to the cluster under load.
enum Fault {
    /// SIGKILL of this node; the ring event is its leaving.
    Kill(&'static str),
    /// This node joins; the ring event is its arrival (the fault's time).
    Join(&'static str),
}

/// `keys`, subscribed `PER_KEY` times each by two follow-mode processes, under `RATE`
/// publishes/s; runs the `fault`, then waits until every interrupted client receives
/// again. Returns the account, the fault's time and the ring event's time (ns).
async fn under_load(
    cluster: &mut Cluster,
    keys: &[String],
    dir: &std::path::Path,
    fault: Fault,
) -> Result<(Moved, u64, Option<u64>)> {
    let file = dir.join("keys.txt");
    std::fs::write(&file, keys.join("\n"))?;
    let keys_arg = format!("@{}", file.display());
    let urls = ringfeed_urls(cluster).join(",");
    let mut subs = Vec::new();
    for i in 0..2 {
        subs.push(Loadgen::spawn(
            &format!("followers {i}"),
            &[
                "sub".into(),
                "--follow".into(),
                "--url".into(),
                urls.clone(),
                "--keys".into(),
                keys_arg.clone(),
                "--per-key".into(),
                PER_KEY.to_string(),
                "--shard".into(),
                format!("{i}/2"),
                // One source, no explicit bind: moving clients reconnect many times, and
                // only connect()'s own port choice reuses the TIME_WAIT ports that
                // leaves (net.ipv4.tcp_tw_reuse); bind(port 0) would run out.
                "--sources".into(),
                "127.0.0.1".into(),
            ],
        )?);
    }
    let clients = keys.len() * PER_KEY;
    let mut connected = 0;
    for s in &mut subs {
        connected += s.wait("connected", Duration::from_secs(120)).await?["n"]
            .as_u64()
            .unwrap_or(0);
    }
    ensure!(
        connected as usize == clients,
        "{connected} of {clients} clients connected"
    );
    let mut publisher = Loadgen::spawn(
        "publisher",
        &[
            "pub".into(),
            "--grpc".into(),
            cluster.router_grpc(),
            "--keys".into(),
            keys_arg,
            "--batch".into(),
            "20".into(),
            "--rate".into(),
            RATE.to_string(),
            "--concurrency".into(),
            "32".into(),
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let router_addr = cluster.router_grpc();
    let (fault_ns, expiry_ns) = match fault {
        Fault::Kill(id) => {
            let killed = now_ns();
            cluster.node_mut(id).kill().await;
            let gone = ring_event(&router_addr, |m| !m.iter().any(|m| m == id)).await?;
            (killed, Some(gone))
        }
        Fault::Join(id) => {
            let event = tokio::spawn(async move {
                ring_event(&router_addr, |m| m.iter().any(|m| m == id)).await
            });
            cluster.add_node(id).await?;
            (event.await??, None)
        }
    };
    // Until every client the fault touched receives again (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (mut interrupted, mut down) = (0, 0);
        for s in &mut subs {
            if let Some(t) = s.poll_ticks() {
                interrupted += t["interrupted"].as_u64().unwrap_or(0);
                down += t["down"].as_i64().unwrap_or(0);
            }
        }
        let settled = interrupted > 0 && down == 0 && now_ns() > fault_ns + 1_000_000_000;
        if settled || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let published = publisher.finish(Duration::from_secs(30)).await?;
    // Everything acknowledged reaches its clients before they stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut m = Moved {
        clients,
        interrupted: 0,
        back_ms: 0.0,
        expiry_ms: None,
        max_outage_ms: 0.0,
        published: published["published"].as_u64().unwrap_or(0),
        publish_errors: published["errors"].as_u64().unwrap_or(0),
        gaps: 0,
        duplicates: 0,
        resets: 0,
    };
    let mut last_resumed = 0;
    let mut still_down = 0;
    for s in &mut subs {
        let d = s.finish(Duration::from_secs(30)).await?;
        let n = |k: &str| d[k].as_u64().unwrap_or(0);
        m.interrupted += n("interrupted");
        m.gaps += n("gaps");
        m.duplicates += n("duplicates");
        m.resets += n("resets");
        last_resumed = last_resumed.max(n("last_resumed_ns"));
        m.max_outage_ms = m.max_outage_ms.max(n("max_outage_us") as f64 / 1000.0);
        still_down += d["still_down"].as_i64().unwrap_or(0);
    }
    ensure!(still_down == 0, "{still_down} clients never received again");
    m.back_ms = last_resumed.saturating_sub(fault_ns) as f64 / 1e6;
    m.expiry_ms = expiry_ns.map(|e| e.saturating_sub(fault_ns) as f64 / 1e6);
    Ok((m, fault_ns, expiry_ns))
}

/// Polls the router's ring until `present(members)` holds; returns when (ns).
async fn ring_event(router: &str, present: impl Fn(&[String]) -> bool) -> Result<u64> {
    let mut client = ringfeed_cluster_tests::connect_router(router).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ring = client.get_ring(GetRingRequest {}).await?.into_inner();
        let members: Vec<String> = ring
            .members
            .iter()
            .filter(|m| m.state == "active")
            .map(|m| m.id.clone())
            .collect();
        if present(&members) {
            return Ok(now_ns());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no ring event within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn moved_json(m: &Moved) -> Value {
    json!({
        "clients": m.clients,
        "interrupted": m.interrupted,
        "every_client_back_ms": m.back_ms,
        "ring_event_ms": m.expiry_ms,
        "longest_outage_ms": m.max_outage_ms,
        "published_acked": m.published,
        "publish_errors": m.publish_errors,
        "lost": m.gaps,
        "duplicates": m.duplicates,
        "resets": m.resets,
    })
}

/// P7: SIGKILL of the node whose keys have 3,000 subscribed clients, TTL 2 s and 5 s.
pub(crate) async fn p7(args: &Args) -> Result<()> {
    let keys_wanted = if args.smoke { 20 } else { 300 };
    let ttls: Vec<u64> = match std::env::var("RINGFEED_BENCH_TTLS") {
        Ok(list) => list.split(',').filter_map(|t| t.parse().ok()).collect(),
        Err(_) if args.smoke => vec![2],
        Err(_) => vec![2, 5],
    };
    let mut results = Vec::new();
    let mut met = true;
    for &ttl in &ttls {
        let mut cluster = Cluster::builder()
            .nodes(3)
            .lease_ttl(ttl)
            .node_args(&["--max-connections", "19000"])
            .start()
            .await?;
        let mut router = cluster.router().await?;
        let mut keys = Vec::new();
        for i in 0.. {
            let key = format!("p7-{ttl}:{i}");
            let owner = router
                .lookup(LookupRequest { key: key.clone() })
                .await?
                .into_inner()
                .owner
                .context("no owner")?;
            if owner.id == "n3" {
                keys.push(key);
                if keys.len() == keys_wanted {
                    break;
                }
            }
        }
        let dir = tempfile::tempdir()?;
        let (m, killed, gone) =
            under_load(&mut cluster, &keys, dir.path(), Fault::Kill("n3")).await?;
        if let Some(path) = std::env::var_os("RINGFEED_BENCH_LOGS") {
            let path = format!("{}.ttl{ttl}", path.to_string_lossy());
            let head = format!("killed at {killed} ns, off the ring at {gone:?} ns\n");
            std::fs::write(path, head + &cluster.logs())?;
        }
        let bar_ms = ttl as f64 * 1000.0 + 1500.0;
        let ok = m.back_ms <= bar_ms && m.gaps == 0;
        met &= ok;
        println!(
            "P7 TTL {ttl} s: {} clients of the killed node; n3 off the ring {:.0} ms after the kill; every client receiving again {:.0} ms after the kill ({:.0} ms after the ring event); {} acked, {} lost, {} duplicates, {} resets, {} publish errors; bar ≤ {bar_ms:.0} ms {}",
            m.interrupted,
            m.expiry_ms.unwrap_or(f64::NAN),
            m.back_ms,
            m.back_ms - m.expiry_ms.unwrap_or(0.0),
            m.published,
            m.gaps,
            m.duplicates,
            m.resets,
            m.publish_errors,
            if ok { "met" } else { "not met" }
        );
        let mut v = moved_json(&m);
        v["ttl_secs"] = json!(ttl);
        v["from_ring_event_ms"] = json!(m.back_ms - m.expiry_ms.unwrap_or(0.0));
        v["bar_ms"] = json!(bar_ms);
        v["met"] = json!(ok);
        results.push(v);
    }
    let summary: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "TTL {} s: back {:.2} s after the kill ({:.2} s after the ring event), {} lost",
                r["ttl_secs"],
                r["every_client_back_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
                r["from_ring_event_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
                r["lost"]
            )
        })
        .collect();
    let result = json!({
        "id": "P7",
        "what": "failover: SIGKILL of the node holding 3,000 subscribed clients' keys, under load",
        "setup": {"nodes": 3, "keys": keys_wanted, "clients_per_key": PER_KEY, "publishes_per_s": RATE, "ack": "replicated"},
        "ringfeed": results,
        "bar": "every client receiving again ≤ TTL + 1.5 s after the kill; 0 acked lost",
        "met": met,
        "summary_ringfeed": summary.join("; "),
        "summary_peers": "— (the peers have no failover)",
        "summary_calibration": "—",
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P7", &result)?;
    Ok(())
}

/// P8: a 4th node joins while its future arcs have 3,000 subscribed clients.
pub(crate) async fn p8(args: &Args) -> Result<()> {
    let keys_wanted = if args.smoke { 20 } else { 300 };
    let mut cluster = Cluster::builder()
        .nodes(3)
        .lease_ttl(5)
        .node_args(&["--max-connections", "19000"])
        .start()
        .await?;
    let future = ring_of(&["n1", "n2", "n3", "n4"]);
    let keys: Vec<String> = (0..)
        .map(|i| format!("p8:{i}"))
        .filter(|k| future.owner(k).is_some_and(|o| o.id.0 == "n4"))
        .take(keys_wanted)
        .collect();
    let dir = tempfile::tempdir()?;
    let (m, event, _) = under_load(&mut cluster, &keys, dir.path(), Fault::Join("n4")).await?;
    if let Some(path) = std::env::var_os("RINGFEED_BENCH_LOGS") {
        // For a look at where the time goes: the processes' logs, and the event's time.
        std::fs::write(
            path,
            format!("ring event at {event} ns\n{}", cluster.logs()),
        )?;
    }
    let ok = m.back_ms <= 1000.0 && m.gaps == 0 && m.resets == 0;
    println!(
        "P8: {} clients moved to n4; every one receiving from it {:.0} ms after the join's ring event; {} acked, {} lost, {} duplicates, {} resets, {} publish errors; bar ≤ 1000 ms {}",
        m.interrupted,
        m.back_ms,
        m.published,
        m.gaps,
        m.duplicates,
        m.resets,
        m.publish_errors,
        if ok { "met" } else { "not met" }
    );
    let result = json!({
        "id": "P8",
        "what": "rebalance: a 4th node joins under its future arcs' 3,000 subscribed clients, under load",
        "setup": {"nodes": 3, "keys": keys_wanted, "clients_per_key": PER_KEY, "publishes_per_s": RATE, "ack": "replicated"},
        "ringfeed": moved_json(&m),
        "bar": "every moved client receiving from the new owner ≤ 1 s after the ring event; 0 lost, 0 reset",
        "met": ok,
        "summary_ringfeed": format!("{} clients moved, all receiving {:.2} s after the ring event; {} lost, {} resets", m.interrupted, m.back_ms / 1000.0, m.gaps, m.resets),
        "summary_peers": "— (the peers have no rebalancing)",
        "summary_calibration": "—",
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P8", &result)?;
    Ok(())
}

/// The ring of active members `ids` with the default points: owners depend on ids and
/// points only, so the bench can tell where keys live (or will) without asking.
pub(crate) fn ring_of(ids: &[&str]) -> Ring {
    Ring::new(ids.iter().map(|id| Member {
        id: NodeId((*id).into()),
        incarnation: String::new(),
        grpc: String::new(),
        http: String::new(),
        quic: None,
        quic_sha256: None,
        points: DEFAULT_POINTS,
        state: MemberState::Active,
        version: String::new(),
    }))
}
