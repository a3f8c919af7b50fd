//! The node's shared state, ownership decisions, and its reaction to new rings.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ringfeed_router::membership::{Membership, Registration, View};
use ringfeed_router::ring::{Member, NodeId, RingId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::MemoryBudget;
use crate::config::Config;
use crate::handoff::{self, Handoffs};
use crate::protocol::frames::ServerFrame;
use crate::replication::{successor_of, Replication};
use crate::state::KeySnapshot;
use crate::state::{KeyTable, Kick, Replicas};

/// How long a request that carries a newer ring version waits for this node to see it.
pub const CATCH_UP_BOUND: Duration = Duration::from_secs(2);
/// How long a replica nobody updates is kept before it is dropped.
const REPLICA_GRACE: Duration = Duration::from_secs(30);

/// WebSocket close code: moved to another node.
pub const CLOSE_MOVED: u16 = 4300;
/// WebSocket close code: draining or fenced, owner not known yet.
pub const CLOSE_UNAVAILABLE: u16 = 4503;

/// Everything the transports and services share.
pub struct Node {
    pub id: NodeId,
    pub config: Config,
    pub membership: Membership,
    pub keys: KeyTable,
    /// Copies of other owners' keys, held as their successor.
    pub replicas: Replicas,
    pub replication: Replication,
    pub handoffs: Handoffs,
    /// One permit per held client connection.
    pub connections: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    registration: OnceLock<Registration>,
    draining: AtomicBool,
    /// Resident memory against the budget; past it, no new keys or connections.
    pub budget: MemoryBudget,
    pub counters: Counters,
    /// A [`crate::fence::Fence`], as its discriminant.
    pub(crate) fence_state: AtomicU8,
    /// Where the node's clock ([`Node::clock_ms`]) starts.
    clock_origin: tokio::time::Instant,
}

/// The node's counters, exported by `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Updates assigned a seq by this node as their owner.
    pub published: AtomicU64,
    /// …of which had no successor to replicate to (a one-node cluster).
    pub unreplicated: AtomicU64,
    /// New connections refused at the connection limit.
    pub refused_connections: AtomicU64,
    /// New keys and connections refused past the memory budget.
    pub refused_memory: AtomicU64,
    /// Times this node fenced itself (paused, or found itself off the ring).
    pub fenced: AtomicU64,
    /// WebSocket clients closed (1008) for breaking a per-connection bound.
    pub violations: Violations,
    /// A `Deliver` request (a router's batch for this owner), from its arrival to its
    /// answer or its time limit: the owner's share of a publish's latency, replication
    /// included.
    pub deliver: crate::latency::Latency,
    /// A replication batch, from being sent to the successor to its answer (retries
    /// included).
    pub replication: crate::latency::Latency,
}

/// A per-connection bound a client broke (it is then closed with 1008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// More control frames (ping, pong, close) in a second than allowed.
    ControlFlood,
    /// More messages in a second than allowed.
    MessageFlood,
    /// A message (with its fragments) not complete within the time allowed.
    MessageTimeout,
}

impl Violation {
    const ALL: [Violation; 3] = [
        Violation::ControlFlood,
        Violation::MessageFlood,
        Violation::MessageTimeout,
    ];

    /// Its `bound` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Violation::ControlFlood => "control_flood",
            Violation::MessageFlood => "message_flood",
            Violation::MessageTimeout => "message_timeout",
        }
    }

    /// The close frame's reason.
    pub fn reason(self) -> &'static str {
        match self {
            Violation::ControlFlood => "too many control frames",
            Violation::MessageFlood => "too many messages",
            Violation::MessageTimeout => "message not completed in time",
        }
    }
}

/// Clients closed for breaking a per-connection bound, by the bound.
#[derive(Debug, Default)]
pub struct Violations([AtomicU64; 3]);

impl Violations {
    /// Counts one client closed for `violation`.
    pub fn count(&self, violation: Violation) {
        self.0[violation as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Each bound's label and count.
    pub fn read(&self) -> [(&'static str, u64); 3] {
        Violation::ALL.map(|v| (v.label(), self.0[v as usize].load(Ordering::Relaxed)))
    }
}

/// Who owns a key, as this node decided it.
pub enum Decision {
    /// This node owns it.
    Mine(Arc<View>),
    /// Another member owns it.
    Elsewhere(Arc<View>, Member),
    /// The ring has no active member.
    Nobody(Arc<View>),
}

impl Node {
    pub fn new(
        config: Config,
        membership: Membership,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Node {
        Node {
            id: NodeId(config.id.clone()),
            keys: KeyTable::new(config.key_limits()),
            replicas: Replicas::new(config.key_limits()),
            replication: Replication::default(),
            handoffs: Handoffs::default(),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            budget: MemoryBudget::new(config.memory_budget()),
            counters: Counters::default(),
            config,
            membership,
            shutdown,
            tasks,
            registration: OnceLock::new(),
            draining: AtomicBool::new(false),
            fence_state: AtomicU8::new(0),
            clock_origin: tokio::time::Instant::now(),
        }
    }

    /// `at` in ms of the node's clock (from 1), which connections set their
    /// [`Control`](crate::state::Control) deadlines in; rounded up, so a clock never
    /// goes off early.
    pub fn clock_ms(&self, at: tokio::time::Instant) -> u64 {
        let since = at.saturating_duration_since(self.clock_origin);
        u64::try_from(since.as_micros().div_ceil(1000)).unwrap_or(u64::MAX - 1) + 1
    }

    /// How often the clock sweeps: an eighth of a heartbeat, within 10 ms – 1 s. A
    /// connection's ping or close is that much late at most.
    pub fn clock_period(&self) -> Duration {
        (self.config.heartbeat() / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// The node's clock: sets off every connection deadline that has passed (see
    /// [`KeyTable::fire_due`]). One sweep per period replaces a timer per connection.
    pub async fn run_clock(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.clock_period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.keys
                .fire_due(self.clock_ms(tokio::time::Instant::now()));
        }
    }

    /// A permit for a new client connection, or why there is none (the connection
    /// limit, or the memory budget); refusals are counted.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, &'static str> {
        if self.budget.over() {
            self.counters.refused_memory.fetch_add(1, Ordering::Relaxed);
            return Err("memory budget reached");
        }
        self.connections.clone().try_acquire_owned().map_err(|_| {
            self.counters
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            "connection limit reached"
        })
    }

    pub fn set_registration(&self, registration: Registration) {
        let _ = self.registration.set(registration);
    }

    pub fn registration(&self) -> Option<&Registration> {
        self.registration.get()
    }

    /// Starts the node's shutdown: whatever waits on `shutdown` stops, and every client
    /// subscribed here is kicked with 1001. A WebSocket session waits on its own kick,
    /// not on the node-wide token: an idle connection keeps no waiter on it.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
        self.keys.kick_all(|_| Kick {
            frame: None,
            code: crate::ws::CLOSE_GOING_AWAY,
            reason: "node shutting down".into(),
        });
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Why this node is not ready, if it is not: ready = registered, on the last known
    /// ring under its own incarnation, not fenced, not draining.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.is_draining() || self.shutdown.is_cancelled() {
            return Some("draining");
        }
        if self.is_fenced() {
            return Some("fenced: lease in doubt");
        }
        let Some(registration) = self.registration() else {
            return Some("not registered yet");
        };
        let view = self.membership.view();
        match view.ring.member(&self.id) {
            Some(m) if m.incarnation == registration.record().incarnation => None,
            _ => Some("not on the last known ring"),
        }
    }

    /// The view to decide on for a caller that has seen `version` (and `id`): ours,
    /// after catching up (bounded) when the caller's is newer and a different ring.
    pub async fn view_for(&self, version: Option<u64>, id: Option<&RingId>) -> Arc<View> {
        let view = self.membership.view();
        match version {
            Some(v) if !view.has_seen(v, id) => {
                self.membership
                    .catch_up(v, id, Instant::now() + CATCH_UP_BOUND)
                    .await
            }
            _ => view,
        }
    }

    /// Who owns `key` on `view`.
    /// A record under this node's id but of another incarnation (an earlier process,
    /// dead but not yet off the ring) owns nothing here: nobody serves its keys until
    /// the ring moves them.
    pub fn decide(&self, view: Arc<View>, key: &str) -> Decision {
        match view.ring.owner(key) {
            Some(owner) if owner.id == self.id => {
                if self
                    .registration()
                    .is_some_and(|r| r.is_incarnation(&owner.incarnation))
                {
                    Decision::Mine(view)
                } else {
                    Decision::Nobody(view)
                }
            }
            Some(owner) => {
                let owner = owner.clone();
                Decision::Elsewhere(view, owner)
            }
            None => Decision::Nobody(view),
        }
    }

    /// Follows the ring: on every new ring, keys this node no longer owns are handed
    /// to their new owners and their subscribers redirected there; replicas of a
    /// departed owner are promoted; keys whose successor changed are sent to the new one.
    ///
    /// Subscribes at once, when called, not when the task first runs: the task is
    /// spawned just before the node registers, and a ring broadcast before a late
    /// subscription (this node's own first ring, say) would be taken as the starting
    /// point and never handled — a first node would never settle, and its join's
    /// transition would hold every later join for as long as it lives.
    pub fn follow_ring(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send {
        // Every ring, in order: a node restarted under the same id must be seen leaving
        // (and its replicas promoted) before its new, empty incarnation joins.
        let rings = self.membership.rings();
        let previous = self.membership.view().ring.clone();
        self.follow_ring_from(rings, previous)
    }

    async fn follow_ring_from(
        self: Arc<Self>,
        mut rings: tokio::sync::broadcast::Receiver<Arc<View>>,
        mut previous: Arc<ringfeed_router::ring::Ring>,
    ) {
        loop {
            let view = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                view = rings.recv() => match view {
                    Ok(view) => view,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "fell behind the ring; continuing from the latest");
                        self.membership.view()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            if view.ring.id() == previous.id() {
                continue;
            }
            let before = std::mem::replace(&mut previous, view.ring.clone());
            self.handoffs.begin(&self.id, before, &view);
            // A node that is not on the ring yet (starting) or any more (leaving) keeps
            // its clients until its own lifecycle moves them.
            if !view.ring.is_active(&self.id) {
                continue;
            }
            // Keys this node gave up go whole to their new owners, then this node's
            // marker to everyone, then their clients are redirected.
            let moved = self
                .keys
                .take_where(|key| view.ring.owner(key).is_some_and(|o| o.id != self.id));
            let offers = self.orphans_owned_elsewhere(&view);
            self.tasks
                .spawn(handoff::hand_off(self.clone(), view.clone(), moved, offers));
            // Replicas of a departed owner are promoted once every other member has
            // offered what it holds (its marker): the newest copy wins.
            let node = self.clone();
            let ring_view = view.clone();
            self.tasks.spawn(async move {
                let settled = tokio::select! {
                    settled = node.handoffs.settled(ring_view.ring.id()) => settled,
                    _ = node.shutdown.cancelled() => false,
                };
                if settled {
                    node.promote_orphans(&ring_view);
                }
            });
            // Every key whose successor changed is sent whole to the new one (or, with
            // no successor left, shows what was waiting for the old one).
            for key in self.keys.keys() {
                let to_replica =
                    self.keys
                        .replicate_to(&key, successor_of(&view, &key), view.version);
                self.replication.dispatch(&self, &key, to_replica);
            }
        }
    }

    /// Keeps memory bounded: drops keys idle for `--key-idle-ttl-ms` (telling their
    /// replicas to go too) and replicas nobody keeps up to date any more — copies at a
    /// former successor, or of a departed owner whose key another node serves now.
    pub async fn sweep(self: Arc<Self>) {
        let ttl = Duration::from_millis(self.config.key_idle_ttl_ms);
        let mut tick = tokio::time::interval((ttl / 4).min(Duration::from_secs(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let dropped = self.keys.drop_idle(ttl);
            if !dropped.is_empty() {
                tracing::debug!(keys = dropped.len(), "dropped idle keys");
            }
            for (key, successor) in dropped {
                if let Some(to) = successor {
                    self.replication.drop_key(&self, &to, key);
                }
            }
            let view = self.membership.view();
            // Only replicas unchanged for the grace can go: the others are not looked
            // at (nor copied — a successor holds one for each of its predecessors' keys).
            let grace = ttl.min(REPLICA_GRACE);
            let stale: HashSet<String> = self
                .replicas
                .owners_unchanged_for(grace)
                .into_iter()
                .filter(|(key, owner)| self.replica_is_stale(&view, key, owner))
                .map(|(key, _)| key)
                .collect();
            if stale.is_empty() {
                continue;
            }
            let gone = self
                .replicas
                .drop_where(|key, _, age| age >= grace && stale.contains(key));
            if gone > 0 {
                tracing::debug!(replicas = gone, "dropped stale replicas");
            }
        }
    }

    /// A replica no owner keeps up to date: its owner is on the ring but this node is
    /// not the key's successor there (the owner sent the key whole to the new one), or
    /// its owner left and another node serves the key (it was offered there), or this
    /// node serves the key with its own history.
    fn replica_is_stale(&self, view: &View, key: &str, owner: &str) -> bool {
        if !departed(view, owner) {
            let owner_id = NodeId(owner_id_of(owner).to_owned());
            let successor = view.ring.successor(key).map(|m| &m.id);
            return view.ring.owner(key).map(|o| &o.id) != Some(&owner_id)
                || successor != Some(&self.id);
        }
        match view.ring.owner(key) {
            Some(o) if o.id == self.id => self.keys.has_history(key),
            Some(_) => true,
            None => false,
        }
    }

    /// Copies of the replicas this node holds whose owner has left `view`'s ring and
    /// whose key another member owns now: they are offered to that member, which may
    /// have no other copy (the key moved to it by a join just before its owner died).
    fn orphans_owned_elsewhere(&self, view: &View) -> Vec<(String, KeySnapshot)> {
        self.replicas
            .owners()
            .into_iter()
            .filter(|(key, owner)| {
                departed(view, owner)
                    && view
                        .ring
                        .owner(key)
                        .is_some_and(|o| o.id != self.id && view.ring.is_active(&o.id))
            })
            .filter_map(|(key, _)| self.replicas.copy(&key).map(|s| (key, s)))
            .collect()
    }

    /// Promotes the replicas this node holds whose owner has left the ring and whose
    /// key it now owns (same epoch, same seq).
    fn promote_orphans(self: &Arc<Self>, view: &View) {
        let mut promoted = 0usize;
        for (key, owner) in self.replicas.owners() {
            if !departed(view, &owner) {
                continue;
            }
            // A key another live node owns now keeps its copy here: it may be the only
            // one left, and it stays until that owner's successor is sent the key whole.
            let mine = view.ring.owner(&key).is_some_and(|o| o.id == self.id);
            if mine && self.promote(&key, view) {
                promoted += 1;
            }
        }
        if promoted > 0 {
            tracing::info!(
                ring_version = view.version,
                keys = promoted,
                "promoted replicas of a departed owner"
            );
        }
    }

    /// Promotes `key`'s replica if its owner has left and this node owns the key now.
    /// Called before a key is used (after [`Handoffs::ready`]), so a client or publish
    /// that arrives before the ring follower gets there still finds the key's history.
    pub fn promote_if_due(self: &Arc<Self>, key: &str, view: &View) {
        let Some(owner) = self.replicas.owner_of(key) else {
            return;
        };
        if departed(view, &owner) && view.ring.owner(key).is_some_and(|o| o.id == self.id) {
            self.promote(key, view);
        }
    }

    /// Installs a key handed over by its previous owner. Any replica of it held here is
    /// older than what its owner handed over, and goes.
    pub fn install(self: &Arc<Self>, key: &str, snapshot: KeySnapshot, view: &View) {
        self.restore(key, || Some(snapshot), view);
        self.replicas.take(key);
    }

    /// Takes a replica of a departed owner offered by another member, unless this node
    /// already serves the key with its history.
    pub fn offer(&self, key: &str, snapshot: KeySnapshot) {
        if !self.keys.has_history(key) {
            self.replicas.offer(key, snapshot);
        }
    }

    fn promote(self: &Arc<Self>, key: &str, view: &View) -> bool {
        self.restore(
            key,
            || self.replicas.take(key).map(|r| r.into_snapshot()),
            view,
        )
    }

    fn restore(
        self: &Arc<Self>,
        key: &str,
        take: impl FnOnce() -> Option<KeySnapshot>,
        view: &View,
    ) -> bool {
        let Some(early) = self.keys.restore(key, take) else {
            return false;
        };
        // Clients that reached a fresh state before the promotion reconnect into it.
        if let Some(me) = view.ring.member(&self.id) {
            for s in early {
                s.control
                    .kick(redirect_kick(me, &s.redirect_query(), view.version));
            }
        }
        let to_replica = self
            .keys
            .replicate_to(key, successor_of(view, key), view.version);
        self.replication.dispatch(self, key, to_replica);
        true
    }
}

/// How a replica names its owner: id and incarnation (`""` when unknown).
pub fn owner_label(id: &str, incarnation: &str) -> String {
    format!("{id}@{incarnation}")
}

fn owner_id_of(label: &str) -> &str {
    label.split_once('@').map_or(label, |(id, _)| id)
}

/// Whether a replica's owner (see [`owner_label`]) is no longer an active member of
/// `view` under the same incarnation.
pub fn departed(view: &View, owner: &str) -> bool {
    let Some((id, incarnation)) = owner.split_once('@') else {
        return true;
    };
    !view
        .ring
        .member(&NodeId(id.to_owned()))
        .is_some_and(|m| m.incarnation == incarnation && view.ring.is_active(&m.id))
}

/// The `redirect` frame and close 4300 that send a client to `owner`.
pub fn redirect_kick(owner: &Member, query: &str, ring_version: u64) -> Kick {
    let url = redirect_url(&owner.ws_base(), "/v1/connect", query, ring_version);
    let frame = ServerFrame::Redirect {
        url: &url,
        node: &owner.id.0,
        ring_version,
    }
    .encode();
    Kick {
        frame: Some(frame),
        code: CLOSE_MOVED,
        reason: format!("moved to {}", owner.id),
    }
}

/// `base` + `path` + `query` with `rv` set to `ring_version` (replacing any `rv`).
pub fn redirect_url(base: &str, path: &str, query: &str, ring_version: u64) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != "rv" {
            out.append_pair(&k, &v);
        }
    }
    out.append_pair("rv", &ring_version.to_string());
    format!("{base}{path}?{}", out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_urls_replace_rv() {
        assert_eq!(
            redirect_url("ws://h:1", "/v1/connect", "key=user%3A1&since=4&rv=2", 9),
            "ws://h:1/v1/connect?key=user%3A1&since=4&rv=9"
        );
        assert_eq!(
            redirect_url("http://h", "/v1/sse", "", 3),
            "http://h/v1/sse?rv=3"
        );
    }
}
