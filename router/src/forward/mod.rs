//! Getting updates to the owner of their key.
//!
//! A [`Forwarder`] hashes each key on the current ring, groups the items per owner,
//! hands each group to that owner's lane, and retries what did not land. A lane
//! coalesces the groups of concurrent calls (unary `Publish`es above all) into one
//! `Node.Deliver`, with at most [`LANE_CALLS`] in flight: an idle lane sends at once,
//! a busy one batches what queued meanwhile. The requests go on one long-lived
//! `DeliverStream` per lane, not a call each (unary `Deliver` for a node without it,
//! or while it cannot be opened); when the stream ends, what it left unanswered fails
//! as unavailable and is retried like any other. Retries: `NOT_OWNER` → catch up to the
//! ring the node decided on, then again; an unreachable owner → jittered back-off
//! until the ring changes or the deadline ends, then `UNAVAILABLE`. Every item carries
//! an idempotency key (made here when the caller gave none), so a retry can never apply
//! an update twice.
//!
//! * [`plan`] — the decisions, pure: checking items, grouping per owner, reading
//!   answers into results and retries.
//! * [`lane`] — the lanes and their streams.
//! * this module — the [`Forwarder`]: its channel pool (pruned when members leave),
//!   its lanes (tracked, stopped at shutdown) and the retry loop.

mod lane;
mod plan;
#[cfg(test)]
mod testing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::future::join_all;
use ringfeed_proto::v1::{
    self as pb, key_document_reply, key_presence_reply, node_client::NodeClient,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::key;
use crate::membership::{Membership, View};
use crate::ring::RingId;
use crate::stats::{NodeLabel, RouterStats};

/// Runs `f` when dropped.
struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}
pub use lane::LANE_CALLS;
use lane::{run_lane, Group, Lane, Link, LANE_QUEUE};
pub use plan::{error_status, parse_grpc_timeout, publish_result, status_error};
use plan::{note_behind, plan, retryable, Outcome};

/// Limits and timing of forwarding.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Largest `data` of one update, in bytes.
    pub max_payload: usize,
    /// Most items in one `PublishBatch`.
    pub max_batch: usize,
    /// How long a call may take when the caller sets no deadline. Long enough to cover
    /// a lease expiry, so publishes to a crashed owner land on its successor.
    pub default_deadline: Duration,
    /// Mutual TLS to nodes (the cluster CA, this process's certificate); plain without.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            max_payload: 64 * 1024,
            max_batch: 1000,
            default_deadline: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// A node's own delivery, for a forwarder that runs inside a node (every node serves
/// the public `Router` too): groups for this node are handed to it in process, not
/// sent to itself over gRPC.
pub trait LocalDelivery: Send + Sync {
    /// The gRPC address the node has on the ring.
    fn grpc(&self) -> &str;
    /// Delivers `request` as the node's `Deliver` would.
    fn deliver(
        &self,
        request: pb::DeliverRequest,
    ) -> futures_util::future::BoxFuture<'_, pb::DeliverReply>;
}

/// Pooled channels to nodes, a lane per node, and the retry logic around them.
pub struct Forwarder {
    membership: Membership,
    config: ForwardConfig,
    local: Option<Arc<dyn LocalDelivery>>,
    stats: Arc<RouterStats>,
    channels: Mutex<HashMap<String, NodeClient<Channel>>>,
    lanes: Mutex<HashMap<String, Lane>>,
    /// The ring version the pool was last pruned at.
    pruned_at: AtomicU64,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Forwarder {
    /// A forwarder on `membership`'s ring (from etcd, or [fixed](Membership::fixed)):
    /// its lanes run on `tasks` until `shutdown`.
    pub fn new(
        membership: Membership,
        config: ForwardConfig,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Forwarder {
        Forwarder {
            membership,
            config,
            local: None,
            stats: Arc::new(RouterStats::new()),
            channels: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
            pruned_at: AtomicU64::new(0),
            tasks,
            shutdown,
        }
    }

    /// The forwarder of a node: groups for `local` are delivered in process.
    pub fn with_local(mut self, local: Arc<dyn LocalDelivery>) -> Forwarder {
        self.local = Some(local);
        self
    }

    /// The figures it keeps (for the router's `/metrics`).
    pub fn stats(&self) -> &Arc<RouterStats> {
        &self.stats
    }

    /// The groups waiting in each owner's lane, by gRPC address.
    pub fn lane_depths(&self) -> Vec<(String, usize)> {
        self.lanes
            .lock()
            .expect("lane lock poisoned")
            .iter()
            .map(|(grpc, lane)| (grpc.clone(), LANE_QUEUE - lane.tx.capacity()))
            .collect()
    }

    pub fn config(&self) -> &ForwardConfig {
        &self.config
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Nodes with a pooled channel (for `/metrics` and tests).
    pub fn pooled(&self) -> usize {
        self.channels
            .lock()
            .expect("channel pool lock poisoned")
            .len()
    }

    /// Drops the channels and lanes of nodes no longer on `view`'s ring, once per
    /// ring version: a dropped lane's queue closes and its task ends.
    fn prune(&self, view: &View) {
        // Every call reads; only the first on a new version writes the shared word.
        if self.pruned_at.load(Ordering::Relaxed) == view.version
            || self.pruned_at.swap(view.version, Ordering::Relaxed) == view.version
        {
            return;
        }
        let on_ring = |grpc: &String| view.ring.members().iter().any(|m| &m.grpc == grpc);
        self.channels
            .lock()
            .expect("channel pool lock poisoned")
            .retain(|grpc, _| on_ring(grpc));
        self.lanes
            .lock()
            .expect("lane lock poisoned")
            .retain(|grpc, _| on_ring(grpc));
    }

    /// The lane to the node at `grpc`, started on first use.
    fn lane(&self, grpc: &str) -> Result<Lane, Status> {
        let mut lanes = self.lanes.lock().expect("lane lock poisoned");
        if let Some(lane) = lanes.get(grpc).filter(|l| !l.tx.is_closed()) {
            return Ok(lane.clone());
        }
        let client = self.client(grpc)?;
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        let lane = run_lane(
            Arc::new(Link::new(client, self.tasks.clone())),
            rx,
            self.config.max_batch,
            self.tasks.clone(),
            self.shutdown.clone(),
        );
        self.tasks
            .spawn(lane.instrument(tracing::debug_span!("lane", node = %grpc)));
        let in_flight = self
            .stats
            .in_flight
            .get_or_create(&NodeLabel {
                node: grpc.to_owned(),
            })
            .clone();
        let lane = Lane { tx, in_flight };
        lanes.insert(grpc.to_owned(), lane.clone());
        Ok(lane)
    }

    /// A client for the node at `grpc` (host:port), connected lazily and reused.
    pub fn client(&self, grpc: &str) -> Result<NodeClient<Channel>, Status> {
        let mut channels = self.channels.lock().expect("channel pool lock poisoned");
        if let Some(client) = channels.get(grpc) {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{grpc}"))
            .map_err(|e| Status::internal(format!("bad node address {grpc}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = crate::tls::channel(endpoint, grpc, self.config.tls.as_ref());
        let client = NodeClient::new(channel);
        channels.insert(grpc.to_owned(), client.clone());
        Ok(client)
    }

    /// Delivers every item to its owner, in parallel per owner, until each one is
    /// answered or `deadline` passes. Results come in the order of `items`.
    pub async fn publish(
        &self,
        mut items: Vec<pb::PublishRequest>,
        deadline: Instant,
    ) -> Vec<Result<pb::PublishReply, Status>> {
        let span = tracing::debug_span!("publish", items = items.len());
        let _in = span.enter();
        let outcome = Outcome::new(&mut items, &self.config);
        drop(_in);
        self.deliver(items, outcome, deadline)
            .instrument(span)
            .await
    }

    /// The retry loop of [`publish`](Self::publish), for the items `outcome` left
    /// pending.
    async fn deliver(
        &self,
        items: Vec<pb::PublishRequest>,
        mut outcome: Outcome,
        deadline: Instant,
    ) -> Vec<Result<pb::PublishReply, Status>> {
        let mut retry = Retry::new(deadline);
        let mut first = true;
        while !outcome.pending.is_empty() {
            // A retry is only started with time left: one started at the deadline would
            // time out at once and read as an owner that did not answer.
            if !std::mem::take(&mut first) && Instant::now() >= deadline {
                break;
            }
            let behind = outcome.behind.take();
            if behind.is_some() {
                self.stats.not_owner.inc();
            }
            let view = retry.view(&self.membership, behind).await;
            self.prune(&view);
            let ring = ring_ref(&view);
            let (groups, unowned) = plan(&view.ring, &items, &outcome.pending);
            outcome.begin_round(unowned);
            let calls = groups.into_iter().map(|(grpc, indices)| {
                let group: Vec<pb::PublishRequest> =
                    indices.iter().map(|&i| items[i].clone()).collect();
                let sent = self.send(grpc, group, ring.clone(), deadline);
                async move { (grpc, indices, sent.await) }
            });
            for (grpc, indices, reply) in join_all(calls).await {
                outcome.absorb(&ring.ring_id, grpc, indices, reply);
            }
            outcome.end_round();
            if outcome.pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            if outcome.transport_failure {
                self.stats.retries.inc();
                retry.pause(&self.membership).await;
            }
        }
        outcome.finish()
    }

    /// Sends one group to the lane of the node at `grpc` and waits, until `deadline`,
    /// for its answer.
    async fn send(
        &self,
        grpc: &str,
        items: Vec<pb::PublishRequest>,
        ring: pb::RingRef,
        deadline: Instant,
    ) -> plan::GroupResult {
        if let Some(local) = self.local.as_ref().filter(|l| l.grpc() == grpc) {
            let request = pb::DeliverRequest {
                ring: Some(ring),
                items,
                ..Default::default()
            };
            let left = deadline.saturating_duration_since(Instant::now());
            return match tokio::time::timeout(left, local.deliver(request)).await {
                Ok(reply) => Ok(reply.results),
                Err(_) => Err(Status::deadline_exceeded("deliver timed out")),
            };
        }
        let lane = self.lane(grpc)?;
        // The lane's own gauge (shared with the family): no label to build per call.
        let in_flight = lane.in_flight.clone();
        in_flight.inc();
        let _done = scopeguard(move || {
            in_flight.dec();
        });
        let (tx, rx) = oneshot::channel();
        let group = Group {
            ring,
            items,
            deadline,
            reply: tx,
        };
        let answered = async {
            lane.tx
                .send(group)
                .await
                .map_err(|_| Status::unavailable("lane closed"))?;
            rx.await
                .unwrap_or_else(|_| Err(Status::unavailable("deliver dropped")))
        };
        // The lane bounds the call by the latest deadline it carries; this bounds our
        // own wait.
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, answered)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("deliver timed out")))
    }

    /// The exact presence list of `key`, from its owner.
    pub async fn presence(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<pb::PresenceReply, Status> {
        self.ask_owner(key, deadline, |mut client, ring, request| {
            let key = key.to_owned();
            async move {
                let request = with_timeout(pb::KeyPresenceRequest { ring, key }, request);
                let reply = client.key_presence(request).await?.into_inner();
                match reply.result {
                    Some(key_presence_reply::Result::Ok(ok)) => Ok(Ok(ok)),
                    Some(key_presence_reply::Result::NotOwner(r)) => Ok(Err(r)),
                    None => Err(Status::internal("node sent an empty presence reply")),
                }
            }
        })
        .await
    }

    /// The Yjs document of the `doc:` key `key` (and the text of its `Y.Text` named
    /// `text`, when not empty), from its owner.
    pub async fn document(
        &self,
        key: &str,
        text: &str,
        deadline: Instant,
    ) -> Result<pb::GetDocumentReply, Status> {
        if !key.starts_with("doc:") {
            return Err(Status::invalid_argument("documents live on doc: keys"));
        }
        self.ask_owner(key, deadline, |mut client, ring, request| {
            let (key, text) = (key.to_owned(), text.to_owned());
            async move {
                let request = with_timeout(pb::KeyDocumentRequest { ring, key, text }, request);
                let reply = client.key_document(request).await?.into_inner();
                match reply.result {
                    Some(key_document_reply::Result::Ok(ok)) => Ok(Ok(ok)),
                    Some(key_document_reply::Result::NotOwner(r)) => Ok(Err(r)),
                    None => Err(Status::internal("node sent an empty document reply")),
                }
            }
        })
        .await
    }

    /// Asks `key`'s owner with `call` (a client, the ring decided on, and the time
    /// left), catching up with the ring an owner names and retrying an unreachable
    /// owner until `deadline`. `call` answers the owner's reply, or the ring it said
    /// it decided on when it does not own the key.
    async fn ask_owner<T, F, Fut>(
        &self,
        key: &str,
        deadline: Instant,
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut(NodeClient<Channel>, Option<pb::RingRef>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, pb::RingRef>, Status>>,
    {
        key::validate(key).map_err(|e| Status::invalid_argument(format!("invalid key: {e}")))?;
        let mut retry = Retry::new(deadline);
        let mut behind: Option<(u64, RingId)> = None;
        loop {
            let view = retry.view(&self.membership, behind.take()).await;
            self.prune(&view);
            let Some(owner) = view.ring.owner(key) else {
                return Err(Status::unavailable("the ring has no active members"));
            };
            let client = self.client(&owner.grpc)?;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            match call(client, Some(ring_ref(&view)), left).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(r)) => {
                    // The owner decided on our own ring: wait before asking again.
                    if r.ring_id == view.ring.id().0 {
                        retry.pause(&self.membership).await;
                    }
                    note_behind(&mut behind, r);
                }
                Err(status) if retryable(&status) => {
                    if Instant::now() >= deadline {
                        return Err(Status::unavailable(format!(
                            "owner unreachable: {}",
                            status.message()
                        )));
                    }
                    retry.pause(&self.membership).await;
                }
                Err(status) => return Err(status),
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable("no owner answered before the deadline"));
            }
        }
    }
}

/// `message` as a request that may take `timeout`.
fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// The retry skeleton publish and presence share: catch up with the ring an owner
/// named, and back off — jittered, within the deadline, cut short by a new ring.
struct Retry {
    backoff: Backoff,
    deadline: Instant,
}

impl Retry {
    fn new(deadline: Instant) -> Retry {
        Retry {
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(500)),
            deadline,
        }
    }

    /// The view to decide on: caught up (bounded by the deadline) with `behind`, the
    /// ring an owner said it decided on, if any.
    async fn view(&self, membership: &Membership, behind: Option<(u64, RingId)>) -> Arc<View> {
        if let Some((version, id)) = behind {
            membership.catch_up(version, Some(&id), self.deadline).await;
        }
        membership.view()
    }

    /// Waits the next back-off pause, or less: a new ring may name a new owner.
    async fn pause(&mut self, membership: &Membership) {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let pause = self.backoff.next_pause().min(left);
        let mut ring = membership.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = ring.changed() => {}
        }
    }
}

fn ring_ref(view: &View) -> pb::RingRef {
    pb::RingRef {
        ring_version: view.version,
        ring_id: view.ring.id().0.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testing::{member, HeldNode};

    fn item(key: &str) -> pb::PublishRequest {
        pb::PublishRequest {
            key: key.into(),
            ..Default::default()
        }
    }

    /// A forwarder on a fixed ring, no etcd: items reach the owner the ring names, and
    /// the channel pool keeps only members of the current ring.
    #[tokio::test]
    async fn a_forwarder_on_a_fixed_ring_delivers_to_owners_and_prunes_departed_ones() {
        let (n1, calls1) = HeldNode::serve_open().await;
        let (n2, calls2) = HeldNode::serve_open().await;
        let membership = Membership::fixed("t", [member("n1", &n1), member("n2", &n2)]);
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let forwarder = Forwarder::new(
            membership.clone(),
            ForwardConfig::default(),
            tasks.clone(),
            shutdown.clone(),
        );
        let keys: Vec<String> = (0..40).map(|i| format!("user:{i}")).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let results = forwarder
            .publish(keys.iter().map(|k| item(k)).collect(), deadline)
            .await;
        // The test node answers each item with its key as the epoch.
        for (key, result) in keys.iter().zip(&results) {
            assert_eq!(&result.as_ref().expect("delivered").epoch, key);
        }
        let view = membership.view();
        let seen = |calls: &testing::Calls| -> Vec<String> {
            calls
                .lock()
                .unwrap()
                .iter()
                .flat_map(|(_, k)| k.clone())
                .collect()
        };
        for key in seen(&calls1) {
            assert_eq!(view.ring.owner(&key).unwrap().grpc, n1);
        }
        for key in seen(&calls2) {
            assert_eq!(view.ring.owner(&key).unwrap().grpc, n2);
        }
        assert_eq!(seen(&calls1).len() + seen(&calls2).len(), keys.len());
        assert_eq!(forwarder.pooled(), 2);

        // n2 leaves: every key goes to n1, and n2's channel and lane are let go.
        membership.set_members([member("n1", &n1)]);
        let results = forwarder.publish(vec![item("user:1")], deadline).await;
        assert!(results[0].is_ok());
        assert_eq!(forwarder.pooled(), 1);

        // Shutdown stops every lane the forwarder started.
        shutdown.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("every lane stops at shutdown");
    }
}
