//! etcd membership: register a node under a lease, and keep a view of the ring.
//!
//! Layout (docs/protocol.md *etcd layout*): `/ringfeed/{cluster}/nodes/{node_id}` → a JSON
//! [`Member`] record attached to the node's lease, created only if absent.
//!
//! A [`View`] is a ring plus the etcd revision it was read at (the *ring version*).
//! Views only move forward: the watch task applies membership revisions in order, and
//! [`Membership::catch_up`] may read the prefix afresh when a caller has seen a newer
//! version than the watch has delivered so far; events at or below the published
//! version are folded into the map but never published again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use rand::Rng;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ring::{Member, MemberState, NodeId, Ring, RingId};

/// Views kept for slow readers of [`Membership::rings`].
const HISTORY: usize = 1024;

/// How long one etcd request may take before we treat etcd as unreachable.
const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("registration cancelled")]
    Cancelled,
}

/// Where the cluster's records live and how long a lease lasts.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// etcd endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The cluster name: records live under `/ringfeed/{cluster}/`.
    pub cluster: String,
    /// Lease TTL of a node's record; keep-alives go out every TTL/3.
    pub lease_ttl: Duration,
}

/// A ring as of an etcd revision.
#[derive(Clone, Debug)]
pub struct View {
    pub ring: Arc<Ring>,
    /// The etcd revision this view reflects: the ring version.
    pub version: u64,
}

impl View {
    /// Whether this view reflects etcd at `version` or later, or is the ring `id`.
    pub fn has_seen(&self, version: u64, id: Option<&RingId>) -> bool {
        self.version >= version || id.is_some_and(|id| id == self.ring.id())
    }
}

/// A handle on the cluster's membership: the current view, catch-up, registration.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    cluster: String,
    lease_ttl: Duration,
    views: watch::Sender<Arc<View>>,
    /// Every published view, in order, for whoever must not skip a ring.
    history: broadcast::Sender<Arc<View>>,
    /// The members as of the last applied revision, shared by the watch task and
    /// fresh reads.
    members: std::sync::Mutex<BTreeMap<String, Member>>,
    /// One fresh read at a time; others wait for its result.
    reading: tokio::sync::Mutex<()>,
    /// When the last fresh read started: reads on demand (a request carrying a ring
    /// version this process has not seen) are at most one per [`FRESH_READ_INTERVAL`],
    /// whatever the request rate, so a forged version cannot make etcd's load.
    last_read: std::sync::Mutex<Option<Instant>>,
    /// Fresh reads made on demand, for `/metrics`.
    fresh_reads: AtomicU64,
}

/// The least time between two fresh reads of the ring made on demand.
pub const FRESH_READ_INTERVAL: Duration = Duration::from_secs(1);

impl Membership {
    /// Connects to etcd, reads the current ring and starts watching it. The watch runs
    /// on `tasks` until `shutdown` is cancelled.
    pub async fn start(
        config: &MembershipConfig,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Membership, MembershipError> {
        // etcd refuses HTTP/2 pings more often than every 5 s on a connection without
        // traffic (GOAWAY "too many pings"), so keep-alive pings stay above that; a
        // dead etcd shows up through the requests' own timeouts.
        let options = ConnectOptions::new()
            .with_connect_timeout(ETCD_REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false);
        let client = timed(Client::connect(&config.endpoints, Some(options))).await?;
        let (views, _) = watch::channel(Arc::new(View {
            ring: Arc::new(Ring::empty()),
            version: 0,
        }));
        let membership = Membership {
            inner: Arc::new(Inner {
                client,
                cluster: config.cluster.clone(),
                lease_ttl: config.lease_ttl,
                views,
                history: broadcast::channel(HISTORY).0,
                members: std::sync::Mutex::new(BTreeMap::new()),
                reading: tokio::sync::Mutex::new(()),
                last_read: std::sync::Mutex::new(None),
                fresh_reads: AtomicU64::new(0),
            }),
        };
        membership.read_fresh().await?;
        let watcher = membership.clone();
        tasks.spawn(async move { watcher.watch_loop(shutdown).await });
        Ok(membership)
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.inner.cluster
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.inner.views.borrow().clone()
    }

    /// A receiver of the latest view (intermediate views may be skipped).
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.inner.views.subscribe()
    }

    /// A receiver of every view, in order (it lags, and says so, only if it falls
    /// more than a few hundred views behind).
    pub fn rings(&self) -> broadcast::Receiver<Arc<View>> {
        self.inner.history.subscribe()
    }

    /// Makes sure the view reflects etcd at `version` or later (or is ring `id`),
    /// reading etcd afresh if the watch has not delivered it soon; gives up at
    /// `deadline` and returns the view it has.
    pub async fn catch_up(
        &self,
        version: u64,
        id: Option<&RingId>,
        deadline: Instant,
    ) -> Arc<View> {
        let mut rx = self.subscribe();
        loop {
            let view = rx.borrow_and_update().clone();
            if view.has_seen(version, id) {
                return view;
            }
            let now = Instant::now();
            if now >= deadline {
                return view;
            }
            let wait = Duration::from_millis(50).min(deadline - now);
            if tokio::time::timeout(wait, rx.changed())
                .await
                .is_ok_and(|r| r.is_ok())
            {
                continue;
            }
            // Read etcd afresh: single-flight, and at most once per interval; until the
            // next read is due, wait for the watch instead.
            let pause = self.until_next_read();
            if !pause.is_zero() {
                let wait = pause.min(deadline.saturating_duration_since(Instant::now()));
                let _ = tokio::time::timeout(wait, rx.changed()).await;
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(_reading) = tokio::time::timeout(left, self.inner.reading.lock()).await else {
                return self.view();
            };
            if self.view().has_seen(version, id) || !self.until_next_read().is_zero() {
                continue;
            }
            *self
                .inner
                .last_read
                .lock()
                .expect("last read lock poisoned") = Some(Instant::now());
            self.inner.fresh_reads.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(left, self.read_fresh()).await {
                Ok(Ok(revision)) if revision < version => {
                    // etcd itself is not at `version` yet: whoever sent it was not
                    // reading this etcd. Waiting cannot help.
                    return self.view();
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => tracing::debug!(error = %e, "fresh ring read failed"),
                Err(_) => return self.view(),
            }
            {
                let now = Instant::now();
                if now >= deadline {
                    return self.view();
                }
                tokio::time::sleep(Duration::from_millis(100).min(deadline - now)).await;
            }
        }
    }

    /// How long until a fresh read on demand may start (zero: now).
    fn until_next_read(&self) -> Duration {
        let last = *self
            .inner
            .last_read
            .lock()
            .expect("last read lock poisoned");
        last.map_or(Duration::ZERO, |at| {
            (at + FRESH_READ_INTERVAL).saturating_duration_since(Instant::now())
        })
    }

    /// Fresh reads of the ring made on demand so far (see [`catch_up`](Self::catch_up)).
    pub fn fresh_reads(&self) -> u64 {
        self.inner.fresh_reads.load(Ordering::Relaxed)
    }

    fn nodes_prefix(&self) -> String {
        format!("/ringfeed/{}/nodes/", self.inner.cluster)
    }

    fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// Reads every record and publishes the ring if it is newer than the current view.
    /// Returns the revision etcd answered at.
    async fn read_fresh(&self) -> Result<u64, MembershipError> {
        let prefix = self.nodes_prefix();
        let mut client = self.client();
        let resp =
            timed(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut members = BTreeMap::new();
        for kv in resp.kvs() {
            if let Some(member) = parse_record(&prefix, kv.key(), kv.value()) {
                members.insert(member.id.0.clone(), member);
            }
        }
        let mut map = self.inner.members.lock().expect("members lock poisoned");
        if to_version(revision) > self.view().version {
            *map = members;
            self.publish(&map, to_version(revision));
        }
        Ok(to_version(revision))
    }

    /// Publishes the ring of `members` at `version`, if `version` is newer than the
    /// current view. Called with the members lock held, so publications are ordered.
    fn publish(&self, members: &BTreeMap<String, Member>, version: u64) {
        let history = &self.inner.history;
        self.inner.views.send_if_modified(|current| {
            if version <= current.version {
                return false;
            }
            let ring = Ring::new(members.values().cloned());
            let ring = if ring.id() == current.ring.id() {
                current.ring.clone()
            } else {
                tracing::info!(
                    ring_version = version,
                    ring_id = %ring.id(),
                    members = ?ring.members().iter().map(|m| (m.id.0.as_str(), m.state.as_str())).collect::<Vec<_>>(),
                    "new ring"
                );
                Arc::new(ring)
            };
            *current = Arc::new(View { ring, version });
            let _ = history.send(current.clone());
            true
        });
    }

    async fn watch_loop(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.watch_once() => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "ring watch interrupted; serving on the last ring");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_pause()) => {}
            }
            if self.read_fresh().await.is_ok() {
                backoff.reset();
            }
        }
    }

    /// Watches the prefix from just after the current view until the stream ends.
    async fn watch_once(&self) -> Result<(), MembershipError> {
        let prefix = self.nodes_prefix();
        let start = i64::try_from(self.view().version).unwrap_or(i64::MAX - 1) + 1;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_progress_notify();
        let mut client = self.client();
        let mut stream = timed(client.watch(prefix.as_str(), Some(options))).await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                tracing::warn!(
                    reason = resp.cancel_reason(),
                    "ring watch cancelled by etcd"
                );
                return Ok(());
            }
            let revision = to_version(resp.header().map_or(0, |h| h.revision()));
            let mut map = self.inner.members.lock().expect("members lock poisoned");
            let events = resp.events();
            for (i, event) in events.iter().enumerate() {
                let Some(kv) = event.kv() else { continue };
                let at = to_version(kv.mod_revision());
                let Some(id) = kv.key().strip_prefix(prefix.as_bytes()) else {
                    continue;
                };
                let id = String::from_utf8_lossy(id).into_owned();
                match event.event_type() {
                    EventType::Put => match parse_record(&prefix, kv.key(), kv.value()) {
                        Some(member) => {
                            map.insert(id, member);
                        }
                        None => {
                            map.remove(&id);
                        }
                    },
                    EventType::Delete => {
                        map.remove(&id);
                    }
                }
                // One ring per revision: a response can carry several, and a node
                // restarted under the same id must be seen leaving before it rejoins.
                let last_of_revision = events
                    .get(i + 1)
                    .and_then(|e| e.kv())
                    .is_none_or(|next| to_version(next.mod_revision()) != at);
                if last_of_revision {
                    self.publish(&map, at);
                }
            }
            // A response's header revision is etcd's when it was sent: events up to it
            // may still be on their way (the response that creates the watch, catch-up
            // chunks), and a view claiming that revision would make them look old and
            // be dropped — a first node never saw its own ring. Only a progress
            // notification (no events, watch already created) says nothing older is
            // left to come.
            if events.is_empty() && !resp.created() {
                self.publish(&map, revision);
            }
        }
        Ok(())
    }

    /// Registers `record` (its incarnation is made here) under a fresh lease and keeps
    /// it alive on `tasks` until `shutdown`. Waits first for an earlier incarnation's
    /// record under the same id to expire.
    pub async fn register(
        &self,
        record: Member,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Registration, MembershipError> {
        let state = Arc::new(LeaseState {
            lease_id: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
            last_ok_sent: std::sync::Mutex::new(Instant::now()),
            record: std::sync::Mutex::new(record),
        });
        let registration = Registration {
            membership: self.clone(),
            state,
        };
        registration.create(&shutdown).await?;
        let keeper = registration.clone();
        tasks.spawn(async move { keeper.keep_alive_loop(shutdown).await });
        Ok(registration)
    }
}

/// A node's own record in etcd, kept alive in the background.
#[derive(Clone)]
pub struct Registration {
    membership: Membership,
    state: Arc<LeaseState>,
}

struct LeaseState {
    lease_id: AtomicU64,
    /// Whether the last keep-alive round trip succeeded.
    healthy: AtomicBool,
    /// When the last keep-alive (or lease grant) that etcd answered was sent: the lease
    /// cannot expire before this + TTL.
    last_ok_sent: std::sync::Mutex<Instant>,
    record: std::sync::Mutex<Member>,
}

impl Registration {
    /// The record as last written (with its incarnation).
    pub fn record(&self) -> Member {
        self.state
            .record
            .lock()
            .expect("record lock poisoned")
            .clone()
    }

    /// Whether the last keep-alive reached etcd.
    pub fn lease_healthy(&self) -> bool {
        self.state.healthy.load(Ordering::Relaxed)
    }

    /// When the last keep-alive that etcd answered was sent: the lease lives at least
    /// until this + TTL.
    pub fn last_ok_sent(&self) -> Instant {
        *self.state.last_ok_sent.lock().expect("lease lock poisoned")
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.membership.inner.lease_ttl
    }

    /// Sends one keep-alive now, on its own stream, and waits up to `within` for
    /// etcd's answer; true if etcd renewed the lease (then
    /// [`last_ok_sent`](Self::last_ok_sent) is now). A node whose own keep-alives
    /// failed asks this before it pauses because its peers reach etcd again: the
    /// regular loop may be waiting out a timed-out attempt on a dead connection.
    pub async fn renew_now(&self, within: Duration) -> bool {
        let lease = self.state.lease_id.load(Ordering::Relaxed) as i64;
        let sent = Instant::now();
        let mut client = self.membership.client();
        let once = async {
            let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(responses.message().await?.map(|r| r.ttl()))
        };
        match tokio::time::timeout(within, once).await {
            Ok(Ok(Some(ttl))) if ttl > 0 => {
                self.answered(sent);
                true
            }
            _ => false,
        }
    }

    /// etcd answered a keep-alive (or grant) sent at `sent`: the lease is healthy and
    /// lives at least until `sent` + TTL.
    fn answered(&self, sent: Instant) {
        self.state.healthy.store(true, Ordering::Relaxed);
        let mut last = self.state.last_ok_sent.lock().expect("lease lock poisoned");
        *last = (*last).max(sent);
    }

    fn key(&self) -> String {
        let id = self
            .state
            .record
            .lock()
            .expect("record lock poisoned")
            .id
            .0
            .clone();
        format!("{}{}", self.membership.nodes_prefix(), id)
    }

    /// Creates the record under a new lease and a new incarnation, waiting for any
    /// record of an earlier incarnation to go first.
    async fn create(&self, shutdown: &CancellationToken) -> Result<(), MembershipError> {
        let key = self.key();
        let ttl = i64::try_from(self.membership.inner.lease_ttl.as_secs().max(1)).unwrap_or(5);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut waited = false;
        loop {
            if shutdown.is_cancelled() {
                return Err(MembershipError::Cancelled);
            }
            match self.try_create(&key, ttl).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    if !waited {
                        tracing::info!(%key, "an earlier incarnation's record, or another planned change, is still there; waiting");
                        waited = true;
                    }
                    backoff.reset();
                }
                Err(e) => tracing::warn!(error = %e, "registration failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(MembershipError::Cancelled),
                _ = tokio::time::sleep(backoff.next_pause()) => {}
            }
        }
    }

    async fn try_create(&self, key: &str, ttl: i64) -> Result<bool, MembershipError> {
        let mut client = self.membership.client();
        let sent = Instant::now();
        let lease = timed(client.lease_grant(ttl, None)).await?.id();
        let record = {
            let mut record = self.state.record.lock().expect("record lock poisoned");
            record.incarnation = new_incarnation();
            serde_json::to_string(&*record).expect("a member record serialises")
        };
        // Joining is a planned change: it opens the transition (only if none is open),
        // attached to the same lease, in the same transaction as the record.
        let transition = self.transition_key();
        let txn = Txn::new()
            .when([
                Compare::create_revision(key, CompareOp::Equal, 0),
                Compare::create_revision(transition.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(key, record, Some(PutOptions::new().with_lease(lease))),
                TxnOp::put(
                    transition.as_str(),
                    self.transition_record("join"),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ]);
        let created = timed(client.txn(txn)).await?.succeeded();
        if created {
            self.state.lease_id.store(lease as u64, Ordering::Relaxed);
            self.answered(sent);
            tracing::info!(%key, lease, "registered");
        } else {
            let _ = timed(client.lease_revoke(lease)).await;
        }
        Ok(created)
    }

    /// Sends a keep-alive every TTL/3. If etcd says the lease is gone, registers again
    /// (a new incarnation); if etcd cannot be reached, keeps trying on the same lease.
    async fn keep_alive_loop(self, shutdown: CancellationToken) {
        let period = self.membership.inner.lease_ttl / 3;
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> =
            None;
        loop {
            // Between keep-alives the stream is watched too: a connection that breaks
            // (etcd stopped, its connection reset) says so at once, not at the next
            // keep-alive — peers asking whether etcd is down for everyone hear it then.
            let broken = async {
                match stream.as_mut() {
                    Some((_, responses)) => responses.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
                ended = broken => {
                    if !matches!(ended, Ok(Some(_))) {
                        let lease = self.state.lease_id.load(Ordering::Relaxed);
                        tracing::warn!(lease, result = ?ended.map(|_| ()), "keep-alive stream broke");
                        self.state.healthy.store(false, Ordering::Relaxed);
                        stream = None;
                    }
                    continue;
                }
            }
            let lease = self.state.lease_id.load(Ordering::Relaxed) as i64;
            let sent = Instant::now();
            let result = tokio::time::timeout(period.max(Duration::from_millis(300)), async {
                if stream.is_none() {
                    let mut client = self.membership.client();
                    stream = Some(client.lease_keep_alive(lease).await?);
                }
                let (keeper, responses) = stream.as_mut().expect("stream was just set");
                keeper.keep_alive().await?;
                Ok::<_, etcd_client::Error>(responses.message().await?.map(|r| r.ttl()))
            })
            .await;
            let mut expired = false;
            match result {
                Ok(Ok(Some(ttl))) if ttl > 0 => {
                    self.answered(sent);
                }
                // etcd answers a keep-alive of an expired lease with TTL 0, which
                // etcd-client reports as "lease not found".
                Ok(Ok(Some(_))) => expired = true,
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) if e == "lease not found" => {
                    expired = true;
                }
                other => {
                    if self.state.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(lease, result = ?other.map(|r| r.map(|_| ())), "keep-alive failed; retrying");
                    } else {
                        tracing::debug!(lease, result = ?other.map(|r| r.map(|_| ())), "keep-alive failed again");
                    }
                    stream = None;
                }
            }
            if expired {
                tracing::warn!(
                    lease,
                    "lease expired; registering again under a new incarnation"
                );
                self.state.healthy.store(false, Ordering::Relaxed);
                stream = None;
                if self.create(&shutdown).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Deletes the record by revoking its lease.
    pub async fn deregister(&self) -> Result<(), MembershipError> {
        let lease = self.state.lease_id.load(Ordering::Relaxed) as i64;
        let mut client = self.membership.client();
        timed(client.lease_revoke(lease)).await?;
        tracing::info!(lease, "deregistered");
        Ok(())
    }

    /// Starts draining: the record goes `draining` and the transition opens, in one
    /// transaction, once no other planned change is in progress (waiting up to
    /// `patience`; past it, the record goes `draining` anyway).
    pub async fn start_drain(&self, patience: Duration) -> Result<(), MembershipError> {
        let key = self.key();
        let transition = self.transition_key();
        let lease = self.state.lease_id.load(Ordering::Relaxed) as i64;
        let record = {
            let mut record = self.state.record.lock().expect("record lock poisoned");
            record.state = MemberState::Draining;
            serde_json::to_string(&*record).expect("a member record serialises")
        };
        let deadline = Instant::now() + patience;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        let mut client = self.membership.client();
        loop {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    transition.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([
                    TxnOp::put(
                        key.as_str(),
                        record.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::put(
                        transition.as_str(),
                        self.transition_record("drain"),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                ]);
            if timed(client.txn(txn)).await?.succeeded() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!("another planned change is still in progress; draining anyway");
                timed(client.put(key, record, Some(PutOptions::new().with_lease(lease)))).await?;
                return Ok(());
            }
            tokio::time::sleep(backoff.next_pause()).await;
        }
    }

    /// Ends the transition this node opened, if it is still open (another node's is
    /// left alone).
    pub async fn end_transition(&self) -> Result<(), MembershipError> {
        let transition = self.transition_key();
        let lease = self.state.lease_id.load(Ordering::Relaxed) as i64;
        let txn = Txn::new()
            .when([Compare::lease(transition.as_str(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(transition.as_str(), None)]);
        let mut client = self.membership.client();
        if timed(client.txn(txn)).await?.succeeded() {
            tracing::info!("planned change complete: transition closed");
        }
        Ok(())
    }

    fn transition_key(&self) -> String {
        format!("/ringfeed/{}/transition", self.membership.inner.cluster)
    }

    /// The transition record (docs/protocol.md *etcd layout*).
    fn transition_record(&self, kind: &str) -> String {
        let view = self.membership.view();
        serde_json::json!({
            "kind": kind,
            "node": self.state.record.lock().expect("record lock poisoned").id.0,
            "from_ring_id": view.ring.id().0,
            "from_ring_version": view.version,
        })
        .to_string()
    }

    /// Whether `incarnation` is this registration's current one.
    pub fn is_incarnation(&self, incarnation: &str) -> bool {
        self.state
            .record
            .lock()
            .expect("record lock poisoned")
            .incarnation
            == incarnation
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.state
            .record
            .lock()
            .expect("record lock poisoned")
            .id
            .clone()
    }
}

fn parse_record(prefix: &str, key: &[u8], value: &[u8]) -> Option<Member> {
    let id = key.strip_prefix(prefix.as_bytes())?;
    match serde_json::from_slice::<Member>(value) {
        Ok(member) if member.id.0.as_bytes() == id && member.points <= crate::ring::MAX_POINTS => {
            Some(member)
        }
        Ok(_) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "member record does not match its key; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "unreadable member record; ignored");
            None
        }
    }
}

fn to_version(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

/// A random incarnation: 16 hex digits.
fn new_incarnation() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, MembershipError> {
    match tokio::time::timeout(ETCD_REQUEST_TIMEOUT, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(MembershipError::Timeout(ETCD_REQUEST_TIMEOUT)),
    }
}

/// Jittered exponential back-off.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    /// The next pause: uniformly random in [current/2, current], then doubles.
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        half + ceiling.mul_f64(rand::rng().random::<f64>() * 0.5)
    }

    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let pauses: Vec<Duration> = (0..6).map(|_| b.next_pause()).collect();
        assert!(pauses[0] >= Duration::from_millis(50) && pauses[0] <= Duration::from_millis(100));
        for p in &pauses[3..] {
            assert!(*p >= Duration::from_millis(200) && *p <= Duration::from_millis(400));
        }
        b.reset();
        assert!(b.next_pause() <= Duration::from_millis(100));
    }

    #[test]
    fn records_must_match_their_key() {
        let prefix = "/ringfeed/c/nodes/";
        let good = br#"{"id":"n1","incarnation":"x","grpc":"g","http":"h","quic":null,"points":4,"state":"active","version":"0.1.0"}"#;
        assert!(parse_record(prefix, b"/ringfeed/c/nodes/n1", good).is_some());
        assert!(parse_record(prefix, b"/ringfeed/c/nodes/n2", good).is_none());
        assert!(parse_record(prefix, b"/ringfeed/c/nodes/n1", b"{nope").is_none());
    }
}
