//! The operator's commands of the `ringfeed` CLI: `route`, `ring --node` and
//! `simulate`, computed from the ring any node publishes.

use std::collections::BTreeMap;

use ringfeed_client::routing::{gauge, RingView};
use ringfeed_client::Tls;
use ringfeed_router::ring::Ring;

/// `ringfeed route KEY`: the owner computed here, and what the node says.
pub(crate) async fn route(
    node: &str,
    key: &str,
    json: bool,
    tls: Option<&Tls>,
) -> anyhow::Result<()> {
    let view = RingView::fetch(node, tls).await?;
    let owner = view
        .owner(key)
        .ok_or_else(|| anyhow::anyhow!("the ring has no active member"))?;
    let path = format!("/v1/route?key={}", form_key(key));
    let said = ringfeed_client::http_json(node, ringfeed_client::Call::get(&path), tls).await?;
    let server = said["owner"]["id"].as_str().unwrap_or_default().to_owned();
    if json {
        println!(
            "{}",
            serde_json::json!({"key": key, "owner": owner.id.0, "http": owner.http,
                "grpc": owner.grpc, "ring_version": view.version, "node_says": server})
        );
    } else {
        println!(
            "{key} → {} (http {}, grpc {}) on ring version {}",
            owner.id, owner.http, owner.grpc, view.version
        );
        if server != owner.id.0 {
            println!("  the node says {server}: the ring moved meanwhile; ask again");
        }
    }
    Ok(())
}

/// `ringfeed ring --node URL`: members, state, share of the keys.
pub(crate) async fn ring(node: &str, json: bool, tls: Option<&Tls>) -> anyhow::Result<()> {
    let view = RingView::fetch(node, tls).await?;
    let shares = view.shares();
    if json {
        let members: Vec<_> = view
            .ring
            .members()
            .iter()
            .map(|m| {
                serde_json::json!({"id": m.id.0, "state": m.state.as_str(),
                    "incarnation": m.incarnation, "http": m.http, "grpc": m.grpc,
                    "points": m.points, "share": shares.get(&m.id.0).copied().unwrap_or(0.0)})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"cluster": view.cluster, "ring_version": view.version,
                "ring_id": view.ring.id().0, "members": members})
        );
        return Ok(());
    }
    println!(
        "cluster {} ring version {} ({})",
        view.cluster,
        view.version,
        view.ring.id()
    );
    for m in view.ring.members() {
        let share = shares.get(&m.id.0).copied().unwrap_or(0.0);
        println!(
            "  {:<8} {:<9} {:>6.2}% of keys  {} points  http {}",
            m.id.0,
            m.state.as_str(),
            share * 100.0,
            m.points,
            m.http
        );
    }
    Ok(())
}

/// What `simulate` changes.
pub(crate) enum Change {
    Remove(String),
    Add(String, u32),
}

/// `ringfeed simulate`: a dry run of a member leaving or joining, against the live
/// ring: the share of keys that would move, from where to where, and — from each
/// node's own counts — about how many keys and connections.
pub(crate) async fn simulate(
    node: &str,
    change: Change,
    json: bool,
    tls: Option<&Tls>,
) -> anyhow::Result<()> {
    let view = RingView::fetch(node, tls).await?;
    let next: Ring = match &change {
        Change::Remove(id) => {
            anyhow::ensure!(
                view.ring.members().iter().any(|m| &m.id.0 == id),
                "{id} is not on the ring"
            );
            view.without(id)
        }
        Change::Add(id, points) => view.with(id, *points),
    };
    let shares = view.shares();
    // Each node's live keys and connections, to scale shares into counts.
    let mut live: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for m in view.ring.members() {
        let keys = gauge(&m.http, "ringfeed_keys", tls).await.unwrap_or(0);
        let conns = gauge(&m.http, "ringfeed_connections", tls)
            .await
            .unwrap_or(0);
        live.insert(m.id.0.clone(), (keys, conns));
    }
    let mut rows = Vec::new();
    let mut total = 0.0;
    for (from, to, share) in view.ring.moves_to(&next) {
        if from == to {
            continue;
        }
        total += share;
        let of_from = shares.get(&from.0).copied().unwrap_or(0.0);
        let (keys, conns) = live.get(&from.0).copied().unwrap_or((0, 0));
        let part = if of_from > 0.0 { share / of_from } else { 0.0 };
        rows.push((
            from.0,
            to.0,
            share,
            (keys as f64 * part).round() as u64,
            (conns as f64 * part).round() as u64,
        ));
    }
    if json {
        let moves: Vec<_> = rows
            .iter()
            .map(|(f, t, s, k, c)| {
                serde_json::json!({"from": f, "to": t, "share": s, "keys": k, "connections": c})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"ring_version": view.version, "moved_share": total, "moves": moves})
        );
        return Ok(());
    }
    println!(
        "{:.2}% of the keys would move (ring version {}):",
        total * 100.0,
        view.version
    );
    for (from, to, share, keys, conns) in rows {
        println!(
            "  {from} → {to}: {:.2}% of keys, about {keys} keys and {conns} connections now",
            share * 100.0
        );
    }
    Ok(())
}

/// `key` for a query string.
fn form_key(key: &str) -> String {
    url::form_urlencoded::byte_serialize(key.as_bytes()).collect()
}

/// `ringfeed drain ID`: asks node ID (found on the ring `node` publishes) to drain,
/// then shows its keys and connections going until it has left the ring, within
/// `wait_secs`. Plain clusters only: a secure cluster's internal port admits only a
/// node certificate (use `ringfeed-node drain` there).
pub(crate) async fn drain(
    node: &str,
    id: &str,
    token: Option<&str>,
    wait_secs: u64,
    json: bool,
) -> anyhow::Result<()> {
    use ringfeed_proto::v1::{node_client::NodeClient, DrainRequest};
    let view = RingView::fetch(node, None).await?;
    let member = view
        .ring
        .members()
        .iter()
        .find(|m| m.id.0 == id)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{id} is not on the ring"))?;
    anyhow::ensure!(
        member.http != node.trim_end_matches('/'),
        "--node must be another node than the one drained (it is asked who is left)"
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", member.grpc))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await?;
    let mut request = tonic::Request::new(DrainRequest {
        node: id.to_owned(),
    });
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("--token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let reply = NodeClient::new(channel).drain(request).await?.into_inner();
    if !json {
        println!(
            "{id} is draining: {} keys and {} connections to move",
            reply.keys, reply.connections
        );
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
    let mut last = None;
    loop {
        let keys = gauge(&member.http, "ringfeed_keys", None).await.ok();
        let conns = gauge(&member.http, "ringfeed_connections", None).await.ok();
        let on_ring = RingView::fetch(node, None)
            .await
            .map(|v| v.ring.members().iter().any(|m| m.id.0 == id))
            .unwrap_or(true);
        if !json && last != Some((keys, conns)) {
            match (keys, conns) {
                (Some(k), Some(c)) => println!("  {k} keys, {c} connections left"),
                _ => println!("  {id} no longer answers"),
            }
            last = Some((keys, conns));
        }
        if !on_ring && keys.is_none() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{id} had not left within {wait_secs} s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"node": id, "keys": reply.keys, "connections": reply.connections, "gone": true})
        );
    } else {
        println!("{id} has left the ring and exited");
    }
    Ok(())
}

/// One key's figures in `ringfeed top`.
#[derive(Debug, Clone, Default)]
struct HotKey {
    node: String,
    per_s: f64,
    subscribers: u64,
}

/// Every active member's hottest keys (`GET /v1/hot`), merged.
async fn hot_keys(view: &RingView, tls: Option<&Tls>) -> BTreeMap<String, HotKey> {
    let mut keys: BTreeMap<String, HotKey> = BTreeMap::new();
    for m in view.ring.members() {
        let Ok(answer) =
            ringfeed_client::http_json(&m.http, ringfeed_client::Call::get("/v1/hot"), tls).await
        else {
            continue;
        };
        for item in answer["by_rate"].as_array().into_iter().flatten() {
            if let Some(key) = item["key"].as_str() {
                let entry = keys.entry(key.to_owned()).or_default();
                entry.node = m.id.0.clone();
                entry.per_s = item["per_s"].as_f64().unwrap_or(0.0);
            }
        }
        for item in answer["by_subscribers"].as_array().into_iter().flatten() {
            if let Some(key) = item["key"].as_str() {
                let entry = keys.entry(key.to_owned()).or_default();
                entry.node = m.id.0.clone();
                entry.subscribers = item["subscribers"].as_u64().unwrap_or(0);
            }
        }
    }
    keys
}

/// `ringfeed top`: the hottest keys cluster-wide, by update rate and by subscribers,
/// from every member's own view (each samples at most once a second). Refreshed every
/// `interval` in the terminal until interrupted; with `once`, printed once after two
/// samples (so that rates exist).
pub(crate) async fn top(
    node: &str,
    count: usize,
    interval: std::time::Duration,
    once: bool,
    json: bool,
    tls: Option<&Tls>,
) -> anyhow::Result<()> {
    let interval = interval.max(std::time::Duration::from_millis(1100));
    let view = RingView::fetch(node, tls).await?;
    // The first sample of each node only starts its clock.
    hot_keys(&view, tls).await;
    loop {
        tokio::time::sleep(interval).await;
        let view = RingView::fetch(node, tls).await.unwrap_or(view.clone());
        let keys = hot_keys(&view, tls).await;
        let mut by_rate: Vec<(&String, &HotKey)> =
            keys.iter().filter(|(_, h)| h.per_s > 0.0).collect();
        by_rate.sort_by(|a, b| b.1.per_s.total_cmp(&a.1.per_s).then_with(|| a.0.cmp(b.0)));
        by_rate.truncate(count);
        let mut by_subs: Vec<(&String, &HotKey)> =
            keys.iter().filter(|(_, h)| h.subscribers > 0).collect();
        by_subs.sort_by(|a, b| {
            b.1.subscribers
                .cmp(&a.1.subscribers)
                .then_with(|| a.0.cmp(b.0))
        });
        by_subs.truncate(count);
        if json {
            let rate: Vec<_> = by_rate
                .iter()
                .map(|(k, h)| serde_json::json!({"key": k, "node": h.node, "per_s": h.per_s}))
                .collect();
            let subs: Vec<_> = by_subs
                .iter()
                .map(|(k, h)| serde_json::json!({"key": k, "node": h.node, "subscribers": h.subscribers}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"ring_version": view.version, "by_rate": rate, "by_subscribers": subs})
            );
        } else {
            if !once {
                // Clear the terminal and go home: a live view.
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "hottest keys, ring version {} (every {:?})",
                view.version, interval
            );
            println!("  {:<40} {:>10}  {:<8}", "key", "updates/s", "owner");
            for (k, h) in &by_rate {
                println!("  {k:<40} {:>10.1}  {:<8}", h.per_s, h.node);
            }
            println!("  {:<40} {:>10}  {:<8}", "key", "subscribers", "owner");
            for (k, h) in &by_subs {
                println!("  {k:<40} {:>10}  {:<8}", h.subscribers, h.node);
            }
        }
        if once {
            return Ok(());
        }
    }
}
