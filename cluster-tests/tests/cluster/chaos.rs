//! Faults under load: a workload publishes continuously through the router while a
//! client per key follows its key wherever it moves; every test ends with a key-by-key
//! account of what was acknowledged against what was received.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rand::Rng;
use ringfeed_client::{connect_url, publisher, Event, Frame, Subscription};
use ringfeed_cluster_tests::{eventually, Cluster};
use ringfeed_proto::v1::{publish_result, Ack, PublishBatchRequest};
use serde_json::json;

use crate::{bounded, owner_of};

/// What one key's client saw.
#[derive(Default, Debug)]
struct Seen {
    /// (epoch, seq) → payload, every copy received.
    updates: Vec<(String, u64, serde_json::Value)>,
    resets: Vec<String>,
    /// When each update arrived, and from which node.
    arrivals: Vec<(Instant, String)>,
}

type Ledger = Arc<Mutex<HashMap<String, Seen>>>;

/// A client that follows `key` across redirects, drops and crashes, resuming with
/// `since` from its last (epoch, seq), until `stop`.
fn follow(
    key: String,
    nodes: Vec<String>,
    ledger: Ledger,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: Option<(u64, String)> = None;
        let mut attempt = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let entry = &nodes[attempt % nodes.len()];
            attempt += 1;
            let url = connect_url(
                entry,
                &key,
                last.as_ref().map(|(s, e)| (*s, Some(e.as_str()))),
            );
            let mut sub = match Subscription::connect(&url).await {
                Ok(sub) => sub,
                Err(_) => {
                    let pause = rand::rng().random_range(20..120);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
            };
            let from = sub.node().to_owned();
            if let Frame::Welcome { epoch, seq, .. } = &sub.welcome {
                if last.is_none() {
                    last = Some((*seq, epoch.clone()));
                }
            }
            loop {
                match sub.next_within(Duration::from_millis(500)).await {
                    Ok(Event::Frame(Frame::Update { seq, data, .. })) => {
                        let epoch = last.as_ref().map(|(_, e)| e.clone()).unwrap_or_default();
                        let mut ledger = ledger.lock().expect("ledger");
                        let seen = ledger.entry(key.clone()).or_default();
                        seen.updates
                            .push((epoch.clone(), seq, data.unwrap_or_default()));
                        seen.arrivals.push((Instant::now(), from.clone()));
                        last = Some((seq, epoch));
                    }
                    Ok(Event::Frame(Frame::Reset {
                        epoch, seq, reason, ..
                    })) => {
                        ledger
                            .lock()
                            .expect("ledger")
                            .entry(key.clone())
                            .or_default()
                            .resets
                            .push(reason);
                        last = Some((seq, epoch));
                    }
                    Ok(Event::Frame(_)) => {}
                    Err(ringfeed_client::ClientError::Timeout) => {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                    Ok(Event::Closed { .. }) | Err(_) => break,
                }
            }
        }
    })
}

/// What the workload had acknowledged: key → seq → (epoch, payload).
type Acked = Arc<Mutex<HashMap<String, BTreeMap<u64, (String, serde_json::Value)>>>>;

/// Publishes batches over `keys` through the router until `stop`, recording every
/// update acknowledged with `ack`.
fn workload(
    router: String,
    keys: Vec<String>,
    ack: Ack,
    acked: Acked,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<(u64, u64)>> {
    tokio::spawn(async move {
        let mut client = ringfeed_cluster_tests::connect_router(&router).await?;
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let items: Vec<_> = (0..50)
                .map(|_| {
                    n += 1;
                    let key = &keys[(n as usize) % keys.len()];
                    let mut item = publisher::json(key, &json!({"n": n}));
                    item.ack = ack as i32;
                    item
                })
                .collect();
            let payloads: Vec<(String, serde_json::Value)> = items
                .iter()
                .map(|i| {
                    (
                        i.key.clone(),
                        serde_json::from_slice(&i.data).unwrap_or_default(),
                    )
                })
                .collect();
            let mut request = tonic::Request::new(PublishBatchRequest { items });
            request.set_timeout(Duration::from_secs(10));
            let reply = match client.publish_batch(request).await {
                Ok(reply) => reply.into_inner(),
                Err(_) => {
                    failed += payloads.len() as u64;
                    continue;
                }
            };
            let mut acked = acked.lock().expect("acked");
            for ((key, payload), result) in payloads.into_iter().zip(reply.results) {
                match result.result {
                    Some(publish_result::Result::Ok(r)) => {
                        ok += 1;
                        acked
                            .entry(key)
                            .or_default()
                            .insert(r.seq, (r.epoch, payload));
                    }
                    _ => failed += 1,
                }
            }
        }
        Ok((ok, failed))
    })
}

/// The account of one run.
#[derive(Debug, Default)]
struct Account {
    acked: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    resets: u64,
    conflicts: u64,
}

/// Checks, key by key, what was acknowledged against what was received.
fn account(acked: &Acked, ledger: &Ledger) -> Account {
    let acked = acked.lock().expect("acked");
    let ledger = ledger.lock().expect("ledger");
    let mut a = Account::default();
    for (key, updates) in acked.iter() {
        let seen = ledger.get(key);
        let mut received: HashMap<(String, u64), serde_json::Value> = HashMap::new();
        if let Some(seen) = seen {
            a.resets += seen.resets.len() as u64;
            let mut last_seq = 0;
            for (epoch, seq, data) in &seen.updates {
                if *seq <= last_seq {
                    a.duplicated += 1;
                }
                last_seq = last_seq.max(*seq);
                match received.get(&(epoch.clone(), *seq)) {
                    Some(other) if other != data => a.conflicts += 1,
                    _ => {
                        received.insert((epoch.clone(), *seq), data.clone());
                    }
                }
            }
        }
        for (seq, (epoch, payload)) in updates {
            a.acked += 1;
            match received.get(&(epoch.clone(), *seq)) {
                Some(data) if data == payload => a.delivered += 1,
                Some(_) => a.conflicts += 1,
                None => a.lost += 1,
            }
        }
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_node_under_load_loses_no_replicated_update() {
    bounded(async {
        const KEYS: usize = 150;
        let mut cluster = Cluster::builder().nodes(3).lease_ttl(2).start().await?;
        let keys: Vec<String> = (0..KEYS).map(|i| format!("chaos:{i}")).collect();
        let mut victim_keys = Vec::new();
        for key in &keys {
            if owner_of(&cluster, key).await? == "n2" {
                victim_keys.push(key.clone());
            }
        }
        let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
        let ledger: Ledger = Arc::default();
        let acked: Acked = Arc::default();
        let stop_clients = Arc::new(AtomicBool::new(false));
        let stop_load = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = keys.iter().map(|k| follow(k.clone(), nodes.clone(), ledger.clone(), stop_clients.clone())).collect();
        eventually("every client subscribed", Duration::from_secs(30), || {
            let router = cluster.router_grpc();
            let keys = keys.clone();
            async move {
                let mut router = ringfeed_cluster_tests::connect_router(&router).await?;
                for key in keys.iter().step_by(15) {
                    let p = router.presence(ringfeed_proto::v1::PresenceRequest { key: key.clone() }).await?.into_inner();
                    if p.members.is_empty() {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
        })
        .await;

        let load = workload(cluster.router_grpc(), keys.clone(), Ack::Replicated, acked.clone(), stop_load.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let killed = Instant::now();
        cluster.node_mut("n2").kill().await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        stop_load.store(true, Ordering::Relaxed);
        let (ok, failed) = load.await??;
        ensure!(ok > 0, "the workload acknowledged nothing");

        // Every client catches up with what was acknowledged for its key.
        eventually("every client to catch up", Duration::from_secs(30), || {
            let acked = acked.clone();
            let ledger = ledger.clone();
            async move { Ok((account(&acked, &ledger).lost == 0).then_some(())) }
        })
        .await;
        stop_clients.store(true, Ordering::Relaxed);
        for c in clients {
            let _ = c.await;
        }
        let a = account(&acked, &ledger);
        // How long the killed node's keys went without an update.
        let back = {
            let ledger = ledger.lock().expect("ledger");
            victim_keys
                .iter()
                .filter_map(|k| ledger.get(k).and_then(|s| s.arrivals.iter().find(|(t, _)| *t > killed).map(|(t, _)| *t)))
                .map(|t| t.duration_since(killed))
                .max()
        };
        eprintln!(
            "SIGKILL under load (ack=replicated): acked {} / delivered {} / lost {} / duplicated {} / reset {} / conflicting {}; {} publishes failed; the killed node's {} keys were receiving again {:?} after the kill (lease TTL {} s)",
            a.acked, a.delivered, a.lost, a.duplicated, a.resets, a.conflicts, failed, victim_keys.len(), back, cluster.lease_ttl
        );
        ensure!(a.lost == 0 && a.conflicts == 0 && a.resets == 0, "{a:?}");
        ensure!(back.is_some(), "the killed node's keys never received again");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_joining_under_load_take_their_keys_with_state_and_clients() {
    bounded(async {
        const KEYS: usize = 150;
        let mut cluster = Cluster::builder().nodes(3).lease_ttl(2).start().await?;
        let keys: Vec<String> = (0..KEYS).map(|i| format!("join:{i}")).collect();
        let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
        let ledger: Ledger = Arc::default();
        let acked: Acked = Arc::default();
        let stop_clients = Arc::new(AtomicBool::new(false));
        let stop_load = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = keys.iter().map(|k| follow(k.clone(), nodes.clone(), ledger.clone(), stop_clients.clone())).collect();
        let router = cluster.router_grpc();
        eventually("every client subscribed", Duration::from_secs(30), || {
            let router = router.clone();
            let keys = keys.clone();
            async move {
                let mut router = ringfeed_cluster_tests::connect_router(&router).await?;
                for key in keys.iter().step_by(15) {
                    let p = router.presence(ringfeed_proto::v1::PresenceRequest { key: key.clone() }).await?.into_inner();
                    if p.members.is_empty() {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
        })
        .await;

        let load = workload(router.clone(), keys.clone(), Ack::Replicated, acked.clone(), stop_load.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut moved_in = Vec::new();
        for id in ["n4", "n5"] {
            let before: HashMap<String, String> = {
                let mut owners = HashMap::new();
                for key in &keys {
                    owners.insert(key.clone(), owner_of(&cluster, key).await?);
                }
                owners
            };
            cluster.add_node(id).await?;
            let joined = Instant::now();
            cluster.converged().await;
            let moved: Vec<String> = {
                let mut moved = Vec::new();
                for key in &keys {
                    if owner_of(&cluster, key).await? != before[key] {
                        moved.push(key.clone());
                    }
                }
                moved
            };
            // Every moved key's client receives from the new owner.
            let arrived = eventually("every moved client to receive from its new owner", Duration::from_secs(20), || {
                let ledger = ledger.clone();
                let moved = moved.clone();
                async move {
                    let ledger = ledger.lock().expect("ledger");
                    let mut last = joined;
                    for key in &moved {
                        let first = ledger
                            .get(key)
                            .and_then(|s| s.arrivals.iter().find(|(t, from)| *t > joined && from == id).map(|(t, _)| *t));
                        match first {
                            Some(t) => last = last.max(t),
                            None => return Ok(None),
                        }
                    }
                    Ok(Some(last.duration_since(joined)))
                }
            })
            .await;
            eprintln!("{id} joined under load: {} keys moved to it; their clients all receiving again within {arrived:?}", moved.len());
            moved_in.push((id, moved.len()));
        }
        stop_load.store(true, Ordering::Relaxed);
        let (ok, failed) = load.await??;
        ensure!(ok > 0, "the workload acknowledged nothing");
        eventually("every client to catch up", Duration::from_secs(30), || {
            let acked = acked.clone();
            let ledger = ledger.clone();
            async move { Ok((account(&acked, &ledger).lost == 0).then_some(())) }
        })
        .await;
        stop_clients.store(true, Ordering::Relaxed);
        for c in clients {
            let _ = c.await;
        }
        let a = account(&acked, &ledger);
        eprintln!(
            "scale-out under load: acked {} / delivered {} / lost {} / duplicated {} / reset {} / conflicting {}; {failed} publishes failed; moved {moved_in:?}",
            a.acked, a.delivered, a.lost, a.duplicated, a.resets, a.conflicts
        );
        ensure!(a.lost == 0 && a.conflicts == 0 && a.resets == 0, "{a:?}");
        Ok(())
    })
    .await;
}
