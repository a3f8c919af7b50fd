//! The cluster's figures, for the dashboard (`GET /`, `GET /v1/dashboard`).
//!
//! Each node answers its own figures over the internal service ([`local`], the
//! `Figures` call). The node a dashboard is open on gathers them from every member of
//! its ring, with the open transition from etcd, into one [`Dashboard`] snapshot a
//! second, and as soon as its view of the ring changes. One gathering task serves every
//! dashboard open on the node, and it runs only while one is: the cost of a dashboard
//! is one `Figures` call per peer a second, however many are watching.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ringfeed_proto::v1 as pb;
use ringfeed_proto::v1::node_client::NodeClient;
use ringfeed_router::ring::{Member, Ring, RingId};
use serde_json::{json, Value};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::node::{Node, Transport};

/// How often a snapshot is made while a dashboard is open.
pub const PERIOD: Duration = Duration::from_secs(1);

/// How long a peer has to answer `Figures` before it is shown unreachable.
const ASK_TIMEOUT: Duration = Duration::from_millis(600);

/// After a ring change, how long the next snapshot waits for more of them.
const RING_CHANGE_GAP: Duration = Duration::from_millis(100);

/// Dashboards (streams and one-off reads) a node serves at once.
pub const MAX_WATCHERS: usize = 32;

/// Hottest keys shown, cluster-wide.
const HOT_SHOWN: usize = 10;

/// Points at which the ring is sampled for drawing: a quarter degree each.
const RING_SAMPLES: u64 = 1440;

/// This node's own figures, as the `Figures` call answers them.
pub fn local(node: &Node) -> pb::FiguresReply {
    let view = node.membership.view();
    let hot = node.hot_keys();
    let state = if node.is_fenced() {
        "fenced"
    } else if node.is_draining() || node.shutdown.is_cancelled() {
        "draining"
    } else {
        "serving"
    };
    let now = Instant::now();
    pb::FiguresReply {
        node: node.id.0.clone(),
        incarnation: node
            .registration()
            .map(|r| r.record().incarnation)
            .unwrap_or_default(),
        ring: Some(pb::RingRef {
            ring_version: view.version,
            ring_id: view.ring.id().0.clone(),
        }),
        ready: node.not_ready().is_none(),
        state: state.into(),
        keys: node.keys.len() as u64,
        replicas: node.replicas.len() as u64,
        documents: node.docs.count() as u64,
        connections: Transport::ALL
            .iter()
            .map(|t| (t.name().to_owned(), node.counters.open.get(*t)))
            .collect(),
        published_total: node
            .counters
            .published
            .load(std::sync::atomic::Ordering::Relaxed),
        resident_bytes: node.budget.rss(),
        by_rate: hot
            .by_rate
            .iter()
            .map(|(key, per_s)| pb::HotKey {
                key: key.clone(),
                per_s: *per_s,
                subscribers: 0,
            })
            .collect(),
        by_subscribers: hot
            .by_subscribers
            .iter()
            .map(|(key, n)| pb::HotKey {
                key: key.clone(),
                per_s: 0.0,
                subscribers: *n as u64,
            })
            .collect(),
        uptime_ms: node.clock_ms(now).saturating_sub(1),
    }
}

/// Dashboards are at their limit on this node.
#[derive(Debug)]
pub struct Busy;

/// The latest cluster snapshot, shared by every dashboard open on a node.
pub struct Dashboard {
    node: Arc<Node>,
    /// The latest snapshot (JSON), `None` before the first.
    latest: watch::Sender<Option<Bytes>>,
    /// Whether the gathering task runs; held while subscribing and while it decides to
    /// stop, so that a new watcher never finds it stopping.
    running: Mutex<bool>,
    watchers: Arc<Semaphore>,
}

/// One dashboard's hold on the snapshots: it sees each new one, and counts against
/// [`MAX_WATCHERS`] until dropped.
pub struct Watch {
    pub snapshots: watch::Receiver<Option<Bytes>>,
    _permit: OwnedSemaphorePermit,
}

impl Dashboard {
    pub fn new(node: Arc<Node>) -> Arc<Dashboard> {
        Arc::new(Dashboard {
            node,
            latest: watch::Sender::new(None),
            running: Mutex::new(false),
            watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
        })
    }

    /// Starts watching the snapshots (and the gathering, if nobody was watching).
    pub fn watch(self: &Arc<Self>) -> Result<Watch, Busy> {
        let permit = self
            .watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy)?;
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let snapshots = self.latest.subscribe();
        if !*running {
            *running = true;
            self.node.tasks.spawn(self.clone().gather());
        }
        Ok(Watch {
            snapshots,
            _permit: permit,
        })
    }

    /// Makes a snapshot a [`PERIOD`] and on each change of the ring, until nobody
    /// watches or the node stops.
    async fn gather(self: Arc<Self>) {
        let mut gathering = Gathering::default();
        let mut views = self.node.membership.subscribe();
        let mut tick = tokio::time::interval_at(Instant::now() + PERIOD, PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.stop(false) {
                return;
            }
            let snapshot = gathering.snapshot(&self.node).await;
            self.latest.send_replace(Some(snapshot));
            tokio::select! {
                _ = tick.tick() => {}
                changed = views.changed() => {
                    if changed.is_err() {
                        // The ring's source is gone (the node is stopping).
                        self.stop(true);
                        return;
                    }
                    // A burst of ring changes makes one snapshot, not one each.
                    tokio::time::sleep(RING_CHANGE_GAP).await;
                }
                _ = self.node.shutdown.cancelled() => {}
            }
        }
    }

    /// Stops the gathering if nobody watches or the node stops (or at once, when
    /// `anyway`); whether it stopped. It decides under the lock `watch` starts it
    /// under, so a new watcher never finds it stopping.
    fn stop(&self, anyway: bool) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let watched = self.latest.receiver_count() > 0 && !self.node.shutdown.is_cancelled();
        if watched && !anyway {
            return false;
        }
        // The next watcher waits for a fresh snapshot, not this old one.
        self.latest.send_replace(None);
        *running = false;
        true
    }
}

/// What the gathering task keeps between snapshots.
#[derive(Default)]
struct Gathering {
    /// A client per peer's gRPC address.
    clients: HashMap<String, NodeClient<Channel>>,
    /// Each incarnation's published total at the last snapshot, with its uptime then,
    /// for its rate (by the member's own clock: when its answer arrived says nothing).
    published: HashMap<String, (u64, u64)>,
    /// The ring drawn last, its drawing and each member's share.
    drawing: Option<(RingId, Value, HashMap<String, f64>)>,
    /// The open transition, and since when it has been seen open.
    transition: Option<(String, Instant)>,
}

impl Gathering {
    /// Asks every member for its figures (at once, bounded by [`ASK_TIMEOUT`]) and reads
    /// the transition, into one snapshot.
    async fn snapshot(&mut self, node: &Node) -> Bytes {
        let view = node.membership.view();
        let members = view.ring.members();
        let asks = members.iter().map(|m| {
            let client = (m.id != node.id).then(|| self.client(node, m)).flatten();
            let own = (m.id == node.id).then(|| local(node));
            async move {
                if own.is_some() {
                    return own;
                }
                let mut client = client?;
                let request = pb::FiguresRequest {
                    from: node.id.0.clone(),
                };
                tokio::time::timeout(ASK_TIMEOUT, client.figures(request))
                    .await
                    .ok()?
                    .ok()
                    .map(|r| r.into_inner())
            }
        });
        let (figures, transition) = tokio::join!(
            futures_util::future::join_all(asks),
            tokio::time::timeout(ASK_TIMEOUT, node.membership.transition()),
        );
        let transition = transition.ok().and_then(Result::ok).flatten();
        let now = Instant::now();
        let mut shown = Vec::new();
        let mut hot_rate = Vec::new();
        let mut hot_subs = Vec::new();
        let (mut keys, mut connections, mut per_s_total) = (0u64, 0u64, 0f64);
        for (member, figures) in members.iter().zip(figures) {
            let Some(f) = figures else {
                shown.push(json!({
                    "id": member.id.0, "state": member.state.as_str(), "incarnation": member.incarnation,
                    "http": member.http, "version": member.version, "points": member.points,
                    "reachable": false,
                }));
                continue;
            };
            let per_s = self.rate(&member.incarnation, f.published_total, f.uptime_ms);
            let open: u64 = f.connections.values().sum();
            keys += f.keys;
            connections += open;
            per_s_total += per_s.unwrap_or(0.0);
            hot_rate.extend(
                f.by_rate
                    .iter()
                    .map(|h| (h.key.clone(), h.per_s, &member.id.0)),
            );
            hot_subs.extend(
                f.by_subscribers
                    .iter()
                    .map(|h| (h.key.clone(), h.subscribers, &member.id.0)),
            );
            shown.push(json!({
                "id": member.id.0, "state": member.state.as_str(), "incarnation": member.incarnation,
                "http": member.http, "version": member.version, "points": member.points,
                "reachable": true, "node_state": f.state, "ready": f.ready,
                "ring_version": f.ring.as_ref().map(|r| r.ring_version),
                "keys": f.keys, "replicas": f.replicas, "documents": f.documents,
                "connections": f.connections, "connections_total": open,
                "updates_per_s": per_s, "resident_bytes": f.resident_bytes, "uptime_ms": f.uptime_ms,
            }));
        }
        let live: std::collections::HashSet<&String> =
            members.iter().map(|m| &m.incarnation).collect();
        self.published
            .retain(|incarnation, _| live.contains(incarnation));
        hot_rate.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        hot_subs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let transition = self.transition_json(transition, now);
        let (arcs, shares) = self.drawing(&view.ring);
        for shown in &mut shown {
            let share = shown["id"].as_str().and_then(|id| shares.get(id)).copied();
            shown["share"] = json!(share);
        }
        let snapshot = json!({
            "cluster": node.membership.cluster(),
            "node": node.id.0,
            "ring_version": view.version,
            "ring_id": view.ring.id().0,
            "members": shown,
            "arcs": arcs,
            "transition": transition,
            "totals": { "keys": keys, "connections": connections, "updates_per_s": per_s_total },
            "hot": {
                "by_rate": hot_rate.iter().take(HOT_SHOWN)
                    .map(|(k, r, n)| json!({"key": k, "per_s": r, "node": n})).collect::<Vec<_>>(),
                "by_subscribers": hot_subs.iter().take(HOT_SHOWN)
                    .map(|(k, s, n)| json!({"key": k, "subscribers": s, "node": n})).collect::<Vec<_>>(),
            },
            "period_ms": PERIOD.as_millis() as u64,
        });
        Bytes::from(snapshot.to_string())
    }

    /// The client for `member`'s internal service, made once.
    fn client(&mut self, node: &Node, member: &Member) -> Option<NodeClient<Channel>> {
        if let Some(client) = self.clients.get(&member.grpc) {
            return Some(client.clone());
        }
        let client = node.peers.client(&member.grpc, ASK_TIMEOUT)?;
        // Peers come and go: forget the clients of addresses that left.
        if self.clients.len() > 256 {
            self.clients.clear();
        }
        self.clients.insert(member.grpc.clone(), client.clone());
        Some(client)
    }

    /// Updates a second of `incarnation` since the last snapshot (`None` on its first).
    fn rate(&mut self, incarnation: &str, total: u64, uptime_ms: u64) -> Option<f64> {
        let (before, then) = self
            .published
            .insert(incarnation.to_owned(), (total, uptime_ms))?;
        let ms = uptime_ms.saturating_sub(then);
        (ms > 0).then(|| total.saturating_sub(before) as f64 * 1000.0 / ms as f64)
    }

    /// The ring drawn as arcs `[member index, from, to]` in turns (0..1, clockwise from
    /// hash 0), merging neighbouring samples of the same owner, and each active
    /// member's exact share of the keys; made once per ring.
    fn drawing(&mut self, ring: &Ring) -> (Value, HashMap<String, f64>) {
        if let Some((id, arcs, shares)) = &self.drawing {
            if id == ring.id() {
                return (arcs.clone(), shares.clone());
            }
        }
        let arcs = Value::Array(draw(ring));
        let shares: HashMap<String, f64> = ring
            .shares()
            .into_iter()
            .map(|(id, share)| (id.0, share))
            .collect();
        self.drawing = Some((ring.id().clone(), arcs.clone(), shares.clone()));
        (arcs, shares)
    }

    /// The transition record, with how long it has been open (as seen from here).
    fn transition_json(&mut self, record: Option<String>, now: Instant) -> Value {
        let Some(record) = record else {
            self.transition = None;
            return Value::Null;
        };
        let since = match &self.transition {
            Some((seen, since)) if *seen == record => *since,
            _ => now,
        };
        self.transition = Some((record.clone(), since));
        let mut value: Value = serde_json::from_str(&record).unwrap_or(json!({"raw": record}));
        if let Value::Object(map) = &mut value {
            map.insert(
                "open_ms".into(),
                json!(now.duration_since(since).as_millis() as u64),
            );
        }
        value
    }
}

/// `ring`'s owners along the circle: `[member index, from, to]` runs, in turns.
fn draw(ring: &Ring) -> Vec<Value> {
    let index: HashMap<&str, usize> = ring
        .members()
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.0.as_str(), i))
        .collect();
    let step = u64::MAX / RING_SAMPLES;
    let mut runs: Vec<(usize, u64, u64)> = Vec::new();
    for sample in 0..RING_SAMPLES {
        let Some(owner) = ring.owner_of_hash(sample * step + step / 2) else {
            return Vec::new();
        };
        let at = index[owner.id.0.as_str()];
        match runs.last_mut() {
            Some(run) if run.0 == at => run.2 = sample + 1,
            _ => runs.push((at, sample, sample + 1)),
        }
    }
    runs.iter()
        .map(|(at, from, to)| {
            json!([
                at,
                *from as f64 / RING_SAMPLES as f64,
                *to as f64 / RING_SAMPLES as f64
            ])
        })
        .collect()
}
