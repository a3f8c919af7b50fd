//! A node's own record in etcd: created under a fresh lease and incarnation, kept
//! alive, drained and deleted; and the cluster's transition record.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use rand::RngExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::etcd::timed;
use super::{Membership, MembershipError};
use crate::backoff::Backoff;
use crate::ring::{Member, MemberState, NodeId};

impl Membership {
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
            joined: std::sync::Mutex::new(String::new()),
        });
        let Some(client) = self.client() else {
            return Err(MembershipError::Fixed);
        };
        let registration = Registration {
            membership: self.clone(),
            client,
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
    client: Client,
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
    /// The transition record this node's last join wrote: what `end_transition` may
    /// delete. Its drain's transition is another value, never closed by it.
    joined: std::sync::Mutex<String>,
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
        let mut client = self.client.clone();
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
        let mut client = self.client.clone();
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
        let joined = self.transition_record("join");
        let txn = Txn::new()
            .when([
                Compare::create_revision(key, CompareOp::Equal, 0),
                Compare::create_revision(transition.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(key, record, Some(PutOptions::new().with_lease(lease))),
                TxnOp::put(
                    transition.as_str(),
                    joined.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ]);
        let created = timed(client.txn(txn)).await?.succeeded();
        if created {
            *self.state.joined.lock().expect("joined lock poisoned") = joined;
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
                    let mut client = self.client.clone();
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
        let mut client = self.client.clone();
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
        let mut client = self.client.clone();
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

    /// Ends the transition this node's join opened, if it is still open. Another
    /// node's is left alone, and so is this node's drain: that one lasts until the
    /// node leaves (its record and the transition go with its lease).
    pub async fn end_transition(&self) -> Result<(), MembershipError> {
        let transition = self.transition_key();
        let lease = self.state.lease_id.load(Ordering::Relaxed) as i64;
        let joined = self
            .state
            .joined
            .lock()
            .expect("joined lock poisoned")
            .clone();
        let txn = Txn::new()
            .when([
                Compare::lease(transition.as_str(), CompareOp::Equal, lease),
                Compare::value(transition.as_str(), CompareOp::Equal, joined),
            ])
            .and_then([TxnOp::delete(transition.as_str(), None)]);
        let mut client = self.client.clone();
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

/// A random incarnation: 16 hex digits.
fn new_incarnation() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}
