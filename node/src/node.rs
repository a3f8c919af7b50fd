//! The node's shared state, ownership decisions, and its reaction to new rings.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use ringfeed_router::membership::{Membership, Registration, View};
use ringfeed_router::ring::{Member, NodeId, RingId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::MemoryBudget;
use crate::config::{Auth, Config};
use crate::peers::Peers;
use crate::protocol::close::CloseCode;
use crate::protocol::frames::ServerFrame;
use crate::protocol::ticket::TicketError;
use crate::state::KeySnapshot;
use crate::state::{Fence, Handoffs, KeyTable, Kick, MemberRef, Replicas, Replication};

/// How long a request that carries a newer ring version waits for this node to see it.
pub const CATCH_UP_BOUND: Duration = Duration::from_secs(2);

/// Everything the transports and services share.
pub struct Node {
    pub id: NodeId,
    pub config: Config,
    pub membership: Membership,
    pub keys: KeyTable,
    /// The limits a `SIGHUP` may change while the node runs.
    pub live: LiveLimits,
    /// The hottest keys, sampled on demand (`/v1/hot`, `/metrics`).
    pub hot: std::sync::Mutex<crate::state::hot::HotKeys>,
    /// Copies of other owners' keys, held as their successor.
    pub replicas: Replicas,
    pub replication: Replication,
    pub handoffs: Handoffs,
    /// The Yjs documents of the `doc:` keys this node owns.
    pub docs: crate::state::docs::Docs,
    /// Where document snapshots go.
    pub store: crate::store::Store,
    /// One permit per held client connection.
    pub connections: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    registration: OnceLock<Registration>,
    /// The incarnation of a node without a registration (an in-process test's).
    incarnation: OnceLock<String>,
    /// How peers' internal services are reached.
    pub peers: Peers,
    /// Tickets and API tokens, when authentication is on.
    pub auth: Option<Auth>,
    /// Held while the ring follower handles one ring and while replicas are promoted,
    /// so the two never interleave (only synchronous work runs under it).
    pub(crate) ring_step: std::sync::Mutex<()>,
    draining: AtomicBool,
    /// Resident memory against the budget; past it, no new keys or connections.
    pub budget: MemoryBudget,
    pub counters: Counters,
    /// A [`Fence`], as its discriminant.
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
    /// Client tickets refused, by reason.
    pub tickets_refused: TicketRefusals,
    /// Requests refused for a missing or wrong API token.
    pub tokens_refused: AtomicU64,
    /// Authentications refused unread: their address was past its failures.
    pub auth_throttled: AtomicU64,
    /// Replicated or handed-off state refused for failing its checks
    /// ([`crate::protocol::peer`]).
    pub peer_input_refused: AtomicU64,
    /// Document snapshots written to the store.
    pub doc_snapshots: AtomicU64,
    /// Editors closed for breaking a document's bounds (a malformed message, an
    /// update over the limit, an awareness flood).
    pub doc_refused: AtomicU64,
    /// A `Deliver` request (a router's batch for this owner), from its arrival to its
    /// answer or its time limit: the owner's share of a publish's latency, replication
    /// included.
    pub deliver: crate::latency::Latency,
    /// A replication batch, from being sent to the successor to its answer (retries
    /// included).
    pub replication: crate::latency::Latency,
    /// Client connections open now, by transport.
    pub open: OpenConnections,
}

/// The limits that change without a restart (`SIGHUP` with a changed config file):
/// read at each use from here, not from [`Config`].
#[derive(Debug)]
pub struct LiveLimits {
    pub client_message_rate: std::sync::atomic::AtomicU32,
    pub client_control_rate: std::sync::atomic::AtomicU32,
}

impl LiveLimits {
    fn of(config: &Config) -> LiveLimits {
        LiveLimits {
            client_message_rate: config.client_message_rate.into(),
            client_control_rate: config.client_control_rate.into(),
        }
    }

    /// Takes `config`'s values; returns what changed, `(setting, from, to)`.
    pub fn update(&self, config: &Config) -> Vec<(&'static str, u32, u32)> {
        let mut changed = Vec::new();
        for (name, slot, to) in [
            (
                "client-message-rate",
                &self.client_message_rate,
                config.client_message_rate,
            ),
            (
                "client-control-rate",
                &self.client_control_rate,
                config.client_control_rate,
            ),
        ] {
            let from = slot.swap(to, Ordering::Relaxed);
            if from != to {
                changed.push((name, from, to));
            }
        }
        changed
    }
}

/// The transports a client connection comes over (the `transport` label of
/// `ringfeed_connections_open`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
    Poll,
    Quic,
    Doc,
}

impl Transport {
    pub const ALL: [Transport; 5] = [
        Transport::Ws,
        Transport::Sse,
        Transport::Poll,
        Transport::Quic,
        Transport::Doc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
            Transport::Quic => "quic",
            Transport::Doc => "doc",
        }
    }
}

/// Client connections open now, by transport.
#[derive(Debug, Default)]
pub struct OpenConnections([AtomicU64; 5]);

impl OpenConnections {
    pub fn opened(&self, transport: Transport) {
        self.0[transport as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self, transport: Transport) {
        self.0[transport as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// How many are open over `transport`.
    pub fn get(&self, transport: Transport) -> u64 {
        self.0[transport as usize].load(Ordering::Relaxed)
    }
}

/// One open client connection, counted by transport until dropped.
pub struct Held {
    node: Arc<Node>,
    transport: Transport,
}

impl Held {
    /// Counts a connection over `transport` open until the guard is dropped.
    pub fn new(node: &Arc<Node>, transport: Transport) -> Held {
        node.counters.open.opened(transport);
        Held {
            node: node.clone(),
            transport,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.node.counters.open.closed(self.transport);
    }
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

/// Why a new client connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("memory budget reached")]
    MemoryBudget,
    #[error("connection limit reached")]
    ConnectionLimit,
}

/// Refused tickets, by reason.
#[derive(Debug, Default)]
pub struct TicketRefusals([AtomicU64; TicketError::ALL.len()]);

impl TicketRefusals {
    /// Counts one ticket refused for `error`.
    pub fn count(&self, error: TicketError) {
        self.0[error as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Each reason's label and count.
    pub fn read(&self) -> [(&'static str, u64); TicketError::ALL.len()] {
        TicketError::ALL.map(|e| (e.reason(), self.0[e as usize].load(Ordering::Relaxed)))
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
            hot: Default::default(),
            live: LiveLimits::of(&config),
            replicas: Replicas::new(config.key_limits()),
            replication: Replication::default(),
            handoffs: Handoffs::default(),
            docs: Default::default(),
            store: crate::store::Store::None,
            connections: Arc::new(Semaphore::new(config.max_connections)),
            budget: MemoryBudget::new(config.memory_budget()),
            counters: Counters::default(),
            config,
            membership,
            shutdown,
            tasks,
            registration: OnceLock::new(),
            incarnation: OnceLock::new(),
            peers: Peers::Tcp,
            auth: None,
            ring_step: std::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            fence_state: AtomicU8::new(0),
            clock_origin: tokio::time::Instant::now(),
        }
    }

    /// Checks an API token (an `authorization` value, from `source`) for an operator
    /// action or a ticket, counting a refusal in `ringfeed_api_tokens_refused_total`, or
    /// in `ringfeed_auth_throttled_total` when the source is past its failures. Always
    /// accepted with authentication off.
    pub fn check_api_token(
        &self,
        authorization: Option<&str>,
        source: Option<std::net::IpAddr>,
    ) -> Result<(), ringfeed_router::api_token::TokenError> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        auth.api_tokens
            .check(authorization, source)
            .inspect_err(|e| {
                let counter = match e {
                    ringfeed_router::api_token::TokenError::Throttled { .. } => {
                        &self.counters.auth_throttled
                    }
                    _ => &self.counters.tokens_refused,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            })
    }

    /// The node, with authentication on ([`Config::load_auth`]).
    pub fn with_auth(mut self, auth: Option<Auth>) -> Node {
        self.auth = auth;
        self
    }

    /// The node, writing document snapshots to `store`.
    pub fn with_store(mut self, store: crate::store::Store) -> Node {
        self.store = store;
        self
    }

    /// The node, reaching its peers by `peers` instead of TCP.
    pub fn with_peers(mut self, peers: Peers) -> Node {
        self.peers = peers;
        self
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
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, AdmitError> {
        if self.budget.over() {
            self.counters.refused_memory.fetch_add(1, Ordering::Relaxed);
            return Err(AdmitError::MemoryBudget);
        }
        self.connections.clone().try_acquire_owned().map_err(|_| {
            self.counters
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            AdmitError::ConnectionLimit
        })
    }

    pub fn set_registration(&self, registration: Registration) {
        let _ = self.registration.set(registration);
    }

    /// Takes `incarnation` as this process's own where no registration says it (an
    /// in-process node without etcd): keys its record owns on the ring are this node's.
    pub fn set_incarnation(&self, incarnation: &str) {
        let _ = self.incarnation.set(incarnation.to_owned());
    }

    /// Whether `incarnation` is this process's (its registration's current one: a
    /// re-registration makes a new one).
    fn is_incarnation(&self, incarnation: &str) -> bool {
        match self.registration() {
            Some(registration) => registration.is_incarnation(incarnation),
            None => self.incarnation.get().is_some_and(|i| i == incarnation),
        }
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
            code: CloseCode::GoingAway,
            reason: "node shutting down".into(),
        });
    }

    /// This node's hottest keys, sampled now (at most once a second).
    pub fn hot_keys(&self) -> crate::state::hot::Hot {
        self.hot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(&self.keys, tokio::time::Instant::now())
    }

    /// Where self-fencing stands.
    pub fn fence(&self) -> Fence {
        match self.fence_state.load(Ordering::Relaxed) {
            0 => Fence::Serving,
            1 => Fence::Paused,
            _ => Fence::Out,
        }
    }

    /// Sets where self-fencing stands ([`crate::cluster::fence`] decides).
    pub fn set_fence(&self, fence: Fence) {
        self.fence_state.store(fence as u8, Ordering::Relaxed);
    }

    /// Whether this node is fenced (paused or out): it takes no deliveries, replicated
    /// entries or clients.
    pub fn is_fenced(&self) -> bool {
        self.fence() != Fence::Serving
    }

    /// Whether this node's current incarnation is missing from its own view of the ring.
    pub fn not_on_own_ring(&self) -> bool {
        let Some(registration) = self.registration() else {
            return true;
        };
        let view = self.membership.view();
        view.ring
            .member(&self.id)
            .is_none_or(|m| m.incarnation != registration.record().incarnation)
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
        if self.registration().is_none() && self.incarnation.get().is_none() {
            return Some("not registered yet");
        }
        let view = self.membership.view();
        match view.ring.member(&self.id) {
            Some(m) if self.is_incarnation(&m.incarnation) => None,
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
                if self.is_incarnation(&owner.incarnation) {
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

    /// Takes a replica of a departed owner offered by another member, unless this node
    /// already serves the key with its history.
    pub fn offer(&self, key: &str, snapshot: KeySnapshot) {
        if !self.keys.has_history(key) {
            self.replicas.offer(key, snapshot);
        }
    }
}

/// Whether a replica's owner is gone: not known, or no longer an active member of
/// `view` under the same incarnation.
pub fn departed(view: &View, owner: Option<&MemberRef>) -> bool {
    !owner.is_some_and(|o| o.is_active_on(view))
}

/// The `redirect` frame and close 4300 that send a client to `owner`.
pub fn redirect_kick(owner: &Member, query: &str, ring_version: u64) -> Kick {
    let url = crate::protocol::redirect::redirect_url(
        &owner.ws_base(),
        "/v1/connect",
        query,
        ring_version,
    );
    let frame = ServerFrame::Redirect {
        url: &url,
        node: &owner.id.0,
        ring_version,
        quic: owner.quic.as_deref(),
    }
    .encode();
    Kick {
        frame: Some(frame),
        code: CloseCode::Moved,
        reason: format!("moved to {}", owner.id),
    }
}
