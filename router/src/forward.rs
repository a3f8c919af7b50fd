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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rand::Rng;
use ringfeed_proto::v1::{
    self as pb, deliver_result, key_presence_reply, node_client::NodeClient, publish_result,
};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::key;
use crate::membership::{Backoff, Membership};
use crate::ring::RingId;

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
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            max_payload: 64 * 1024,
            max_batch: 1000,
            default_deadline: Duration::from_secs(10),
        }
    }
}

/// `Deliver` calls a lane keeps in flight to its node.
pub const LANE_CALLS: usize = 4;
/// Groups queued on a lane before callers wait for room.
const LANE_QUEUE: usize = 4096;

/// Pooled channels to nodes, a lane per node, and the retry logic around them.
pub struct Forwarder {
    membership: Membership,
    config: ForwardConfig,
    channels: Mutex<HashMap<String, NodeClient<Channel>>>,
    lanes: Mutex<HashMap<String, Lane>>,
}

/// What each item of a group came to, in order, or why the call carrying it failed.
type GroupResult = Result<Vec<pb::DeliverResult>, Status>;

/// One caller's items for one owner, decided on `ring`.
struct Group {
    ring: pb::RingRef,
    items: Vec<pb::PublishRequest>,
    deadline: Instant,
    reply: oneshot::Sender<GroupResult>,
}

/// The way to one node's `Deliver`: a bounded queue of groups, drained by one task.
#[derive(Clone)]
struct Lane {
    tx: mpsc::Sender<Group>,
}

impl Forwarder {
    pub fn new(membership: Membership, config: ForwardConfig) -> Forwarder {
        Forwarder {
            membership,
            config,
            channels: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// The lane to the node at `grpc`, started on first use. Starting one also ends the
    /// lanes of nodes no longer on the ring (their tasks stop once their queue closes).
    fn lane(&self, grpc: &str) -> Result<Lane, Status> {
        let mut lanes = self.lanes.lock().expect("lane lock poisoned");
        if let Some(lane) = lanes.get(grpc).filter(|l| !l.tx.is_closed()) {
            return Ok(lane.clone());
        }
        let client = self.client(grpc)?;
        let view = self.membership.view();
        lanes.retain(|addr, _| view.ring.members().iter().any(|m| &m.grpc == addr));
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        tokio::spawn(run_lane(
            Arc::new(Link::new(client)),
            rx,
            self.config.max_batch,
        ));
        let lane = Lane { tx };
        lanes.insert(grpc.to_owned(), lane.clone());
        Ok(lane)
    }

    pub fn config(&self) -> &ForwardConfig {
        &self.config
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
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
        let client = NodeClient::new(endpoint.connect_lazy());
        channels.insert(grpc.to_owned(), client.clone());
        Ok(client)
    }

    /// Checks one item against the per-request limits and fills in its idempotency key.
    fn prepare(&self, item: &mut pb::PublishRequest) -> Result<(), Status> {
        key::validate(&item.key)
            .map_err(|e| Status::invalid_argument(format!("invalid key: {e}")))?;
        if item.data.len() > self.config.max_payload {
            return Err(Status::invalid_argument(format!(
                "payload is {} bytes; the limit is {}",
                item.data.len(),
                self.config.max_payload
            )));
        }
        let bounded = [
            (
                "content_type",
                item.content_type.len(),
                key::MAX_CONTENT_TYPE,
            ),
            (
                "idempotency_key",
                item.idempotency_key.len(),
                key::MAX_IDEMPOTENCY_KEY,
            ),
            ("expected_epoch", item.expected_epoch.len(), key::MAX_EPOCH),
        ];
        for (field, len, max) in bounded {
            if len > max {
                return Err(Status::invalid_argument(format!(
                    "{field} is {len} bytes; the limit is {max}"
                )));
            }
        }
        if item.idempotency_key.is_empty() {
            item.idempotency_key = new_idempotency_key();
        }
        Ok(())
    }

    /// Delivers every item to its owner, in parallel per owner, until each one is
    /// answered or `deadline` passes. Results come in the order of `items`.
    pub async fn publish(
        &self,
        mut items: Vec<pb::PublishRequest>,
        deadline: Instant,
    ) -> Vec<Result<pb::PublishReply, Status>> {
        let mut results: Vec<Option<Result<pb::PublishReply, Status>>> =
            Vec::with_capacity(items.len());
        let mut pending = Vec::new();
        for (i, item) in items.iter_mut().enumerate() {
            match self.prepare(item) {
                Ok(()) => {
                    results.push(None);
                    pending.push(i);
                }
                Err(status) => results.push(Some(Err(status))),
            }
        }

        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        let mut behind: Option<(u64, RingId)> = None;
        let mut last_error = String::from("no owner reachable");
        // Whether the last failure was an owner that took the call but did not answer
        // in time (DEADLINE_EXCEEDED at the end) rather than no owner reachable
        // (UNAVAILABLE), as docs/protocol.md tells the two apart.
        let mut timed_out = false;
        let mut first = true;
        while !pending.is_empty() {
            // A retry is only started with time left: one started at the deadline would
            // time out at once and read as an owner that did not answer.
            if !std::mem::take(&mut first) && Instant::now() >= deadline {
                break;
            }
            if let Some((version, id)) = behind.take() {
                self.membership.catch_up(version, Some(&id), deadline).await;
            }
            let view = self.membership.view();
            let ring_ref = pb::RingRef {
                ring_version: view.version,
                ring_id: view.ring.id().0.clone(),
            };

            let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
            let mut unowned = Vec::new();
            for &i in &pending {
                match view.ring.owner(&items[i].key) {
                    Some(owner) => groups.entry(owner.grpc.as_str()).or_default().push(i),
                    None => unowned.push(i),
                }
            }
            if !unowned.is_empty() {
                last_error = "the ring has no active members".into();
                timed_out = false;
            }

            let calls = groups.into_iter().map(|(grpc, indices)| {
                let lane = self.lane(grpc);
                let group_items: Vec<pb::PublishRequest> =
                    indices.iter().map(|&i| items[i].clone()).collect();
                let ring = ring_ref.clone();
                async move {
                    let reply = match lane {
                        Ok(lane) => {
                            let (tx, rx) = oneshot::channel();
                            let group = Group {
                                ring,
                                items: group_items,
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
                            // The lane bounds the call by the latest deadline it carries;
                            // this bounds our own wait.
                            let left = deadline.saturating_duration_since(Instant::now());
                            match tokio::time::timeout(left, answered).await {
                                Ok(reply) => reply,
                                Err(_) => Err(Status::deadline_exceeded("deliver timed out")),
                            }
                        }
                        Err(status) => Err(status),
                    };
                    (grpc.to_owned(), indices, reply)
                }
            });
            let answers = join_all(calls).await;

            let mut retry = unowned;
            let mut transport_failure = !retry.is_empty();
            for (grpc, indices, reply) in answers {
                match reply {
                    Ok(answered) if answered.len() == indices.len() => {
                        for (i, result) in indices.into_iter().zip(answered) {
                            match result.result {
                                Some(deliver_result::Result::Ok(ok)) => results[i] = Some(Ok(ok)),
                                // The node asks for a retry (the key is moving, or the
                                // same update is still in flight): same item, same
                                // idempotency key, until the deadline.
                                Some(deliver_result::Result::Error(e))
                                    if e.code == Code::Unavailable as u32 =>
                                {
                                    last_error = e.message;
                                    timed_out = false;
                                    transport_failure = true;
                                    retry.push(i);
                                }
                                Some(deliver_result::Result::Error(e)) => {
                                    results[i] = Some(Err(error_status(e)))
                                }
                                Some(deliver_result::Result::NotOwner(r)) => {
                                    // Decided on our own ring: nothing to catch up
                                    // with, so back off before the next try.
                                    if r.ring_id == ring_ref.ring_id {
                                        transport_failure = true;
                                    }
                                    note_behind(&mut behind, r);
                                    retry.push(i);
                                }
                                None => {
                                    results[i] =
                                        Some(Err(Status::internal("node sent an empty result")))
                                }
                            }
                        }
                    }
                    Ok(_) => {
                        for i in indices {
                            results[i] = Some(Err(Status::internal(
                                "node answered a different number of items",
                            )));
                        }
                    }
                    Err(status) if retryable(&status) => {
                        tracing::debug!(node = %grpc, %status, "deliver failed; will retry");
                        timed_out = status.code() == Code::DeadlineExceeded;
                        last_error = if timed_out {
                            format!("owner {grpc} did not answer in time: {}", status.message())
                        } else {
                            format!("owner {grpc} unreachable: {}", status.message())
                        };
                        transport_failure = true;
                        retry.extend(indices);
                    }
                    Err(status) => {
                        for i in indices {
                            results[i] = Some(Err(status.clone()));
                        }
                    }
                }
            }
            retry.sort_unstable();
            pending = retry;
            if pending.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if transport_failure {
                let pause = backoff.next_pause().min(deadline - now);
                let mut ring = self.membership.subscribe();
                // A new ring may name a new owner: do not sleep through it.
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ring.changed() => {}
                }
            }
        }
        let code = if timed_out {
            Code::DeadlineExceeded
        } else {
            Code::Unavailable
        };
        for i in pending {
            results[i] = Some(Err(Status::new(
                code,
                format!("{last_error} before the deadline"),
            )));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Status::internal("item left unanswered"))))
            .collect()
    }

    /// The exact presence list of `key`, from its owner.
    pub async fn presence(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<pb::PresenceReply, Status> {
        key::validate(key).map_err(|e| Status::invalid_argument(format!("invalid key: {e}")))?;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        let mut behind: Option<(u64, RingId)> = None;
        loop {
            if let Some((version, id)) = behind.take() {
                self.membership.catch_up(version, Some(&id), deadline).await;
            }
            let view = self.membership.view();
            let Some(owner) = view.ring.owner(key) else {
                return Err(Status::unavailable("the ring has no active members"));
            };
            let mut client = self.client(&owner.grpc)?;
            let request = pb::KeyPresenceRequest {
                ring: Some(pb::RingRef {
                    ring_version: view.version,
                    ring_id: view.ring.id().0.clone(),
                }),
                key: key.to_owned(),
            };
            let mut request = tonic::Request::new(request);
            request.set_timeout(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            );
            match client.key_presence(request).await {
                Ok(reply) => match reply.into_inner().result {
                    Some(key_presence_reply::Result::Ok(ok)) => return Ok(ok),
                    Some(key_presence_reply::Result::NotOwner(r)) => {
                        if r.ring_id == view.ring.id().0 {
                            // The owner decided on our own ring: wait before asking again.
                            tokio::time::sleep(
                                backoff
                                    .next_pause()
                                    .min(deadline.saturating_duration_since(Instant::now())),
                            )
                            .await;
                        }
                        note_behind(&mut behind, r);
                    }
                    None => return Err(Status::internal("node sent an empty presence reply")),
                },
                Err(status) if retryable(&status) => {
                    if Instant::now() >= deadline {
                        return Err(Status::unavailable(format!(
                            "owner unreachable: {}",
                            status.message()
                        )));
                    }
                    tokio::time::sleep(
                        backoff
                            .next_pause()
                            .min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                Err(status) => return Err(status),
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable("no owner answered before the deadline"));
            }
        }
    }
}

/// Drains one node's lane: takes what is queued (up to `max_batch` items, all decided on
/// one ring) into one `Deliver`, with at most [`LANE_CALLS`] in flight. Room is taken
/// before the queue is read, so while every call is out, groups gather for the next.
async fn run_lane(link: Arc<Link>, mut rx: mpsc::Receiver<Group>, max_batch: usize) {
    let calls = Arc::new(Semaphore::new(LANE_CALLS));
    let mut carried: Option<Group> = None;
    loop {
        let Ok(permit) = calls.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(group) => group,
            None => match rx.recv().await {
                Some(group) => group,
                None => return,
            },
        };
        // A group whose caller stopped waiting (its deadline passed while it queued)
        // is not sent: nobody would learn what became of it.
        if first.reply.is_closed() {
            continue;
        }
        let mut count = first.items.len();
        let mut batch = vec![first];
        while count < max_batch {
            match rx.try_recv() {
                Ok(group) if group.reply.is_closed() => {}
                // A group decided on another ring goes in the next call.
                Ok(group) if group.ring != batch[0].ring => {
                    carried = Some(group);
                    break;
                }
                Ok(group) => {
                    count += group.items.len();
                    batch.push(group);
                }
                Err(_) => break,
            }
        }
        let link = link.clone();
        tokio::spawn(async move {
            deliver(&link, batch).await;
            drop(permit);
        });
    }
}

/// One `Deliver` carrying `batch`; each group is answered with its own items' results.
async fn deliver(link: &Link, batch: Vec<Group>) {
    let deadline = batch
        .iter()
        .map(|g| g.deadline)
        .max()
        .unwrap_or_else(Instant::now);
    let ring = batch[0].ring.clone();
    let mut replies = Vec::with_capacity(batch.len());
    let mut items = Vec::with_capacity(batch.iter().map(|g| g.items.len()).sum());
    for group in batch {
        replies.push((group.items.len(), group.reply));
        items.extend(group.items);
    }
    let sent = items.len();
    let request = pb::DeliverRequest {
        ring: Some(ring),
        items,
        ..Default::default()
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let answer = match link.deliver(request, left).await {
        Ok(reply) if reply.results.len() == sent => Ok(reply.results),
        Ok(_) => Err(Status::internal(
            "node answered a different number of items",
        )),
        Err(status) => Err(status),
    };
    match answer {
        Ok(results) => {
            let mut results = results.into_iter();
            for (n, reply) in replies {
                let _ = reply.send(Ok(results.by_ref().take(n).collect()));
            }
        }
        Err(status) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

/// How a lane reaches its node: one `DeliverStream`, reopened after it ends, or unary
/// `Deliver` calls for a node that has no stream (an older version) and while a stream
/// cannot be opened.
struct Link {
    client: NodeClient<Channel>,
    stream: tokio::sync::Mutex<Option<Arc<DeliverStream>>>,
    /// Cleared for good once the node answers that it has no `DeliverStream`.
    streaming: AtomicBool,
}

impl Link {
    fn new(client: NodeClient<Channel>) -> Link {
        Link {
            client,
            stream: tokio::sync::Mutex::new(None),
            streaming: AtomicBool::new(true),
        }
    }

    /// Delivers `request` within `left`.
    async fn deliver(
        &self,
        request: pb::DeliverRequest,
        left: Duration,
    ) -> Result<pb::DeliverReply, Status> {
        if let Some(stream) = self.stream(left).await {
            return stream.call(request, left).await;
        }
        let mut call = tonic::Request::new(request);
        // The header tells the node; the timeout bounds our own wait.
        call.set_timeout(left.max(Duration::from_millis(1)));
        match tokio::time::timeout(left, self.client.clone().deliver(call)).await {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("deliver timed out")),
        }
    }

    /// The open stream, opened now if there is none; `None` to call unary instead.
    async fn stream(&self, left: Duration) -> Option<Arc<DeliverStream>> {
        if !self.streaming.load(Ordering::Relaxed) {
            return None;
        }
        let mut slot = self.stream.lock().await;
        if let Some(stream) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Some(stream.clone());
        }
        *slot = None;
        match DeliverStream::open(self.client.clone(), left.min(STREAM_OPEN_TIMEOUT)).await {
            Ok(stream) => {
                *slot = Some(stream.clone());
                Some(stream)
            }
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::info!("node has no DeliverStream; delivering call by call");
                self.streaming.store(false, Ordering::Relaxed);
                None
            }
            Err(status) => {
                tracing::debug!(%status, "cannot open a deliver stream; a unary call this time");
                None
            }
        }
    }
}

/// How long opening a `DeliverStream` may take.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests a `DeliverStream` queues before they are sent (a lane has at most
/// [`LANE_CALLS`] unanswered).
const STREAM_QUEUE: usize = 64;

/// The callers of a `DeliverStream` waiting for their replies, by request id.
type Waiting = HashMap<u64, oneshot::Sender<pb::DeliverReply>>;

/// One `DeliverStream`: requests go out with an id, a task matches replies back.
struct DeliverStream {
    requests: mpsc::Sender<pb::DeliverRequest>,
    /// The callers waiting, by request id; `None` once the stream ended (which
    /// dropped every waiting sender, failing those calls).
    pending: Arc<Mutex<Option<Waiting>>>,
    next_id: AtomicU64,
}

impl DeliverStream {
    async fn open(
        mut client: NodeClient<Channel>,
        limit: Duration,
    ) -> Result<Arc<DeliverStream>, Status> {
        let (requests, rx) = mpsc::channel(STREAM_QUEUE);
        let mut replies = tokio::time::timeout(
            limit,
            client.deliver_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "opening a deliver stream timed out",
            ))
        })?
        .into_inner();
        let pending: Arc<Mutex<Option<Waiting>>> = Arc::new(Mutex::new(Some(HashMap::new())));
        let waiting = pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(reply)) = replies.message().await {
                let caller = waiting
                    .lock()
                    .expect("pending lock poisoned")
                    .as_mut()
                    .and_then(|p| p.remove(&reply.id));
                if let Some(caller) = caller {
                    let _ = caller.send(reply);
                }
            }
            waiting.lock().expect("pending lock poisoned").take();
        });
        Ok(Arc::new(DeliverStream {
            requests,
            pending,
            next_id: AtomicU64::new(0),
        }))
    }

    fn is_closed(&self) -> bool {
        self.pending
            .lock()
            .expect("pending lock poisoned")
            .is_none()
            || self.requests.is_closed()
    }

    async fn call(
        &self,
        mut request: pb::DeliverRequest,
        left: Duration,
    ) -> Result<pb::DeliverReply, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        request.id = id;
        request.timeout_ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("pending lock poisoned").as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(Status::unavailable("the deliver stream ended")),
        };
        if self.requests.try_send(request).is_err() {
            self.forget(id);
            return Err(Status::unavailable("the deliver stream ended"));
        }
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(reply)) => match reply.error {
                Some(e) => Err(error_status(e)),
                None => Ok(reply),
            },
            Ok(Err(_)) => Err(Status::unavailable("the deliver stream ended")),
            Err(_) => {
                self.forget(id);
                Err(Status::deadline_exceeded("deliver timed out"))
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Some(pending) = self.pending.lock().expect("pending lock poisoned").as_mut() {
            pending.remove(&id);
        }
    }
}

fn note_behind(behind: &mut Option<(u64, RingId)>, ring: pb::RingRef) {
    if behind.as_ref().is_none_or(|(v, _)| ring.ring_version > *v) {
        *behind = Some((ring.ring_version, RingId(ring.ring_id)));
    }
}

/// Whether a failed call may succeed on another try (or another owner).
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// The `Status` of a per-item error a node sent.
pub fn error_status(e: pb::Error) -> Status {
    Status::new(Code::from(i32::try_from(e.code).unwrap_or(2)), e.message)
}

/// The per-item error of a `Status`, for `PublishBatch`.
pub fn status_error(status: &Status) -> pb::Error {
    pb::Error {
        code: status.code() as u32,
        message: status.message().to_owned(),
    }
}

/// A `PublishResult` from an item's outcome.
pub fn publish_result(result: Result<pb::PublishReply, Status>) -> pb::PublishResult {
    pb::PublishResult {
        result: Some(match result {
            Ok(reply) => publish_result::Result::Ok(reply),
            Err(status) => publish_result::Result::Error(status_error(&status)),
        }),
    }
}

/// A random idempotency key for callers that gave none: `r-` and 32 hex digits.
fn new_idempotency_key() -> String {
    format!("r-{:032x}", rand::rng().random::<u128>())
}

/// Parses a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    /// The calls a test node saw: each one's ring and its items' keys.
    type Calls = Mutex<Vec<(pb::RingRef, Vec<String>)>>;

    /// A node whose `Deliver` records each call's items and holds every call until
    /// told to answer (the lane is a router part; the node here is only its peer).
    struct HeldNode {
        calls: Arc<Calls>,
        release: Arc<tokio::sync::Semaphore>,
    }

    #[tonic::async_trait]
    impl pb::node_server::Node for HeldNode {
        async fn deliver(
            &self,
            request: tonic::Request<pb::DeliverRequest>,
        ) -> Result<tonic::Response<pb::DeliverReply>, Status> {
            let request = request.into_inner();
            let keys: Vec<String> = request.items.iter().map(|i| i.key.clone()).collect();
            let ring = request.ring.clone().unwrap_or_default();
            self.calls.lock().unwrap().push((ring, keys.clone()));
            self.release.acquire().await.expect("open").forget();
            // Each item is answered with its key as the epoch, to check the order.
            let results = keys
                .into_iter()
                .map(|key| pb::DeliverResult {
                    result: Some(deliver_result::Result::Ok(pb::PublishReply {
                        epoch: key,
                        ..Default::default()
                    })),
                })
                .collect();
            Ok(tonic::Response::new(pb::DeliverReply {
                results,
                ring: request.ring,
                ..Default::default()
            }))
        }
        type DeliverStreamStream = futures_util::stream::Empty<Result<pb::DeliverReply, Status>>;
        async fn deliver_stream(
            &self,
            _: tonic::Request<tonic::Streaming<pb::DeliverRequest>>,
        ) -> Result<tonic::Response<Self::DeliverStreamStream>, Status> {
            Err(Status::unimplemented("test node"))
        }
        async fn key_presence(
            &self,
            _: tonic::Request<pb::KeyPresenceRequest>,
        ) -> Result<tonic::Response<pb::KeyPresenceReply>, Status> {
            Err(Status::unimplemented("test node"))
        }
        async fn replicate(
            &self,
            _: tonic::Request<pb::ReplicateRequest>,
        ) -> Result<tonic::Response<pb::ReplicateReply>, Status> {
            Err(Status::unimplemented("test node"))
        }
        type ReplicateStreamStream =
            futures_util::stream::Empty<Result<pb::ReplicateReply, Status>>;
        async fn replicate_stream(
            &self,
            _: tonic::Request<tonic::Streaming<pb::ReplicateRequest>>,
        ) -> Result<tonic::Response<Self::ReplicateStreamStream>, Status> {
            Err(Status::unimplemented("test node"))
        }
        async fn handoff(
            &self,
            _: tonic::Request<pb::HandoffRequest>,
        ) -> Result<tonic::Response<pb::HandoffReply>, Status> {
            Err(Status::unimplemented("test node"))
        }
        async fn status(
            &self,
            _: tonic::Request<pb::StatusRequest>,
        ) -> Result<tonic::Response<pb::StatusReply>, Status> {
            Err(Status::unimplemented("test node"))
        }
        async fn drain(
            &self,
            _: tonic::Request<pb::DrainRequest>,
        ) -> Result<tonic::Response<pb::DrainReply>, Status> {
            Err(Status::unimplemented("test node"))
        }
    }

    fn group(ring: u64, keys: &[&str]) -> (Group, oneshot::Receiver<GroupResult>) {
        let (reply, answer) = oneshot::channel();
        let group = Group {
            ring: pb::RingRef {
                ring_version: ring,
                ring_id: format!("r{ring}"),
            },
            items: keys
                .iter()
                .map(|k| pb::PublishRequest {
                    key: (*k).to_owned(),
                    ..Default::default()
                })
                .collect(),
            deadline: Instant::now() + Duration::from_secs(10),
            reply,
        };
        (group, answer)
    }

    /// Waits (bounded) until the node has seen `n` calls.
    async fn calls_reach(calls: &Calls, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while calls.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "the node saw fewer than {n} calls"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_busy_lane_coalesces_groups_into_one_deliver_and_answers_each_its_own() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let node = HeldNode {
            calls: calls.clone(),
            release: release.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::node_server::NodeServer::new(node))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let client = NodeClient::new(
            Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy(),
        );
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        tokio::spawn(run_lane(Arc::new(Link::new(client)), rx, 1000));

        // An idle lane sends each group at once, up to LANE_CALLS in flight.
        let mut answers = Vec::new();
        for i in 0..LANE_CALLS {
            let (g, a) = group(1, &[&format!("k{i}")]);
            tx.send(g).await.unwrap();
            answers.push(a);
            calls_reach(&calls, i + 1).await;
        }
        // While all are out, groups gather: one whose caller gave up, two on ring 1,
        // then one on ring 2.
        let (g0, a0) = group(1, &["gone"]);
        drop(a0);
        let (g1, a1) = group(1, &["a", "b"]);
        let (g2, a2) = group(1, &["c"]);
        let (g3, a3) = group(2, &["d"]);
        for g in [g0, g1, g2, g3] {
            tx.send(g).await.unwrap();
        }
        release.add_permits(LANE_CALLS + 2);
        calls_reach(&calls, LANE_CALLS + 2).await;
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), LANE_CALLS + 2);
        // The two ring-1 groups went as one call, without the abandoned one; the
        // ring-2 group on its own.
        assert_eq!(calls[LANE_CALLS].1, vec!["a", "b", "c"]);
        assert_eq!(calls[LANE_CALLS].0.ring_version, 1);
        assert_eq!(calls[LANE_CALLS + 1].1, vec!["d"]);
        assert_eq!(calls[LANE_CALLS + 1].0.ring_version, 2);
        let epochs = |r: GroupResult| -> Vec<String> {
            r.unwrap()
                .into_iter()
                .map(|d| match d.result {
                    Some(deliver_result::Result::Ok(ok)) => ok.epoch,
                    other => panic!("unexpected result {other:?}"),
                })
                .collect()
        };
        assert_eq!(epochs(a1.await.unwrap()), vec!["a", "b"]);
        assert_eq!(epochs(a2.await.unwrap()), vec!["c"]);
        assert_eq!(epochs(a3.await.unwrap()), vec!["d"]);
        for (i, a) in answers.into_iter().enumerate() {
            assert_eq!(epochs(a.await.unwrap()), vec![format!("k{i}")]);
        }
    }

    #[tokio::test]
    async fn a_failed_deliver_fails_every_group_it_carried() {
        // Nothing listens here: every group gets the call's error, retryable.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = NodeClient::new(
            Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_timeout(Duration::from_millis(500))
                .connect_lazy(),
        );
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        tokio::spawn(run_lane(Arc::new(Link::new(client)), rx, 1000));
        let (g1, a1) = group(1, &["a"]);
        let (g2, a2) = group(1, &["b", "c"]);
        tx.send(g1).await.unwrap();
        tx.send(g2).await.unwrap();
        for a in [a1, a2] {
            let status = a.await.unwrap().unwrap_err();
            assert!(retryable(&status), "{status:?}");
        }
    }

    #[test]
    fn generated_idempotency_keys_differ() {
        assert_ne!(new_idempotency_key(), new_idempotency_key());
    }
}
