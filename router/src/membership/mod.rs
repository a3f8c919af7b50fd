//! The cluster's membership: the view of the ring every process decides on, where it
//! comes from (etcd, or a fixed ring in tests), and a node's own registration.
//!
//! * this module — [`View`], and [`Membership`], the view source: the latest view
//!   (watch) and every view in order (broadcast), with bounded catch-up.
//! * [`etcd`] — reading and watching the records in etcd.
//! * [`registration`] — a node's record under a lease, kept alive.
//!
//! Layout (docs/protocol.md *etcd layout*): `/ringfeed/{cluster}/nodes/{node_id}` → a JSON
//! [`Member`] record attached to the node's lease, created only if absent.
//!
//! A [`View`] is a ring plus the etcd revision it was read at (the *ring version*).
//! Views only move forward: the watch task applies membership revisions in order, and
//! [`Membership::catch_up`] may read the prefix afresh when a caller has seen a newer
//! version than the watch has delivered so far; events at or below the published
//! version are folded into the map but never published again.

mod etcd;
mod registration;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use etcd_client::Client;
use tokio::sync::{broadcast, watch};

pub use crate::backoff::Backoff;
use crate::ring::{Member, Ring, RingId};
pub use registration::Registration;

/// Views kept for slow readers of [`Membership::rings`].
const HISTORY: usize = 1024;

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("registration cancelled")]
    Cancelled,
    #[error("a fixed ring has no etcd to register in")]
    Fixed,
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
    /// TLS and credentials for etcd.
    pub security: EtcdSecurity,
}

/// How to reach a secured etcd: TLS (its CA, and a client certificate if it asks for
/// one) and a user. Never printed.
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    /// The CA (PEM) of etcd's certificate: TLS on.
    pub ca: Option<Vec<u8>>,
    /// A client certificate and key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// A user and password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.ca.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
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
    /// Where the records come from: `None` for a fixed ring (tests).
    client: Option<Client>,
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
    fn new(client: Option<Client>, cluster: &str, lease_ttl: Duration) -> Membership {
        let (views, _) = watch::channel(Arc::new(View {
            ring: Arc::new(Ring::empty()),
            version: 0,
        }));
        Membership {
            inner: Arc::new(Inner {
                client,
                cluster: cluster.to_owned(),
                lease_ttl,
                views,
                history: broadcast::channel(HISTORY).0,
                members: std::sync::Mutex::new(BTreeMap::new()),
                reading: tokio::sync::Mutex::new(()),
                last_read: std::sync::Mutex::new(None),
                fresh_reads: AtomicU64::new(0),
            }),
        }
    }

    /// A membership of `members` at ring version 1 that no etcd backs: for tests, which
    /// move it on with [`set_members`](Self::set_members). It cannot register.
    pub fn fixed(cluster: &str, members: impl IntoIterator<Item = Member>) -> Membership {
        let membership = Membership::new(None, cluster, Duration::from_secs(10));
        membership.set_members(members);
        membership
    }

    /// Publishes `members` as the next ring version of a [fixed](Self::fixed)
    /// membership, as a watch would deliver it. Does nothing where etcd has the say.
    pub fn set_members(&self, members: impl IntoIterator<Item = Member>) {
        if self.inner.client.is_some() {
            return;
        }
        let mut map = self.inner.members.lock().expect("members lock poisoned");
        *map = members.into_iter().map(|m| (m.id.0.clone(), m)).collect();
        let version = self.view().version + 1;
        self.publish(&map, version);
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
}
