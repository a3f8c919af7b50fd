//! A lane per node: the groups of concurrent calls for one owner, coalesced into
//! `Node.Deliver`s with at most [`LANE_CALLS`] in flight, on one long-lived
//! `DeliverStream` (unary `Deliver` for a node without it, or while it cannot be
//! opened). Every task a lane starts runs on the forwarder's tracker and stops at its
//! shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use prometheus_client::metrics::gauge::Gauge;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use ringfeed_proto::v1::{self as pb, node_client::NodeClient};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::plan::{error_status, GroupResult};

/// `Deliver` calls a lane keeps in flight to its node.
pub const LANE_CALLS: usize = 4;
/// Groups queued on a lane before callers wait for room.
pub(super) const LANE_QUEUE: usize = 4096;

/// One caller's items for one owner, decided on `ring`.
pub(super) struct Group {
    pub(super) ring: pb::RingRef,
    pub(super) items: Vec<pb::PublishRequest>,
    pub(super) deadline: Instant,
    pub(super) reply: oneshot::Sender<GroupResult>,
}

/// The way to one node's `Deliver`: a bounded queue of groups, drained by one task.
#[derive(Clone)]
pub(super) struct Lane {
    pub(super) tx: mpsc::Sender<Group>,
    /// This owner's calls-in-flight gauge, found once when the lane starts.
    pub(super) in_flight: Gauge<i64, AtomicI64>,
}

/// Drains one node's lane: takes what is queued (up to `max_batch` items, all decided on
/// one ring) into one `Deliver`, with at most [`LANE_CALLS`] in flight. Room is taken
/// before the queue is read, so while every call is out, groups gather for the next.
pub(super) async fn run_lane(
    link: Arc<Link>,
    mut rx: mpsc::Receiver<Group>,
    max_batch: usize,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let calls = Arc::new(Semaphore::new(LANE_CALLS));
    let mut carried: Option<Group> = None;
    loop {
        let permit = tokio::select! {
            permit = calls.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let first = match carried.take() {
            Some(group) => group,
            None => tokio::select! {
                group = rx.recv() => match group {
                    Some(group) => group,
                    None => return,
                },
                _ = shutdown.cancelled() => return,
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
        tasks.spawn(async move {
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
pub(super) struct Link {
    client: NodeClient<Channel>,
    /// Where its stream's reader runs.
    tasks: TaskTracker,
    stream: tokio::sync::Mutex<Option<Arc<DeliverStream>>>,
    /// Cleared for good once the node answers that it has no `DeliverStream`.
    streaming: AtomicBool,
}

impl Link {
    pub(super) fn new(client: NodeClient<Channel>, tasks: TaskTracker) -> Link {
        Link {
            client,
            tasks,
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
        match DeliverStream::open(
            self.client.clone(),
            left.min(STREAM_OPEN_TIMEOUT),
            &self.tasks,
        )
        .await
        {
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
        tasks: &TaskTracker,
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
        tasks.spawn(async move {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::plan::retryable;
    use crate::forward::testing::{Calls, HeldNode};
    use ringfeed_proto::v1::deliver_result;
    use tonic::transport::Endpoint;

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
        let tasks = TaskTracker::new();
        tokio::spawn(run_lane(
            Arc::new(Link::new(client, tasks.clone())),
            rx,
            1000,
            tasks,
            CancellationToken::new(),
        ));

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
        let tasks = TaskTracker::new();
        tokio::spawn(run_lane(
            Arc::new(Link::new(client, tasks.clone())),
            rx,
            1000,
            tasks,
            CancellationToken::new(),
        ));
        let (g1, a1) = group(1, &["a"]);
        let (g2, a2) = group(1, &["b", "c"]);
        tx.send(g1).await.unwrap();
        tx.send(g2).await.unwrap();
        for a in [a1, a2] {
            let status = a.await.unwrap().unwrap_err();
            assert!(retryable(&status), "{status:?}");
        }
    }
}
