//! The internal `ringfeed.v1.Node` gRPC service: deliveries from routers, presence,
//! and from peers replication, hand-off, status (for fencing) and drain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ringfeed_proto::v1::{
    self as pb, deliver_result, key_document_reply, key_presence_reply, node_server,
};
use ringfeed_router::key;
use ringfeed_router::membership::View;
use ringfeed_router::ring::RingId;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::cluster::replication::{self, entry_from_pb, snapshot_from_pb, PublishError};
use crate::node::{Decision, Node};
use crate::protocol::peer;
use crate::state::{Applied, MemberRef, Publish};
use crate::wire::ToWire;

/// `DeliverStream` requests one stream has handled at once (a router keeps 4 unanswered).
const DELIVER_STREAM_CALLS: usize = 64;
/// How long a `DeliverStream` request without `timeout_ms` may take.
const DELIVER_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Replies a `ReplicateStream` holds before it waits for the owner to read them (the
/// owner keeps fewer requests than this in flight).
const REPLICATE_STREAM_REPLIES: usize = 16;

/// Serves `Node` for one node.
#[derive(Clone)]
pub struct NodeService {
    node: Arc<Node>,
    /// Cancelled to ask this node to drain (as SIGTERM does).
    drain: CancellationToken,
}

impl NodeService {
    pub fn new(node: Arc<Node>, drain: CancellationToken) -> NodeService {
        NodeService { node, drain }
    }

    /// Our view, caught up (bounded) to the caller's ring when it is newer.
    async fn view(&self, ring: Option<&pb::RingRef>) -> Arc<View> {
        match ring {
            Some(r) => {
                let id = RingId(r.ring_id.clone());
                self.node.view_for(Some(r.ring_version), Some(&id)).await
            }
            None => self.node.membership.view(),
        }
    }

    /// One `Deliver` request, from a unary call or a stream: every item applied (at
    /// once, each on its own), answered in the items' order.
    ///
    /// Items are started one after another without waiting — staged and sent to the
    /// successor — and then waited for, each on its oneshot: a request of 500 updates
    /// is not 500 futures polled and woken one by one. An item that cannot start yet
    /// (its key is being handed over, or this node has not caught up to the ring) waits
    /// for that ([`start_when_ready`](Self::start_when_ready)); so does every later
    /// item for the same key, and a key's waiting items start in the request's order
    /// (keys concurrently): a key's items get their seqs in the request's order.
    async fn deliver_one(&self, request: pb::DeliverRequest) -> pb::DeliverReply {
        // Counted when this returns or, past its time limit, is dropped.
        let _timer = self.node.counters.deliver.start();
        let view = self.view(request.ring.as_ref()).await;
        // The indices of the items that wait, per key in order, and where each key is
        // in `held` (both empty, unallocated, in the common case).
        let mut held: Vec<Vec<usize>> = Vec::new();
        let mut held_at: HashMap<&str, usize> = HashMap::new();
        let mut steps: Vec<Step> = Vec::with_capacity(request.items.len());
        for (i, item) in request.items.iter().enumerate() {
            if let Some(&at) = held_at.get(item.key.as_str()) {
                held[at].push(i);
                steps.push(Step::Held);
                continue;
            }
            let step = self.start(&view, item);
            if matches!(step, Step::Held) {
                held_at.insert(&item.key, held.len());
                held.push(vec![i]);
            }
            steps.push(step);
        }
        if !held.is_empty() {
            let (view, items) = (&view, &request.items);
            let per_key = held.iter().map(|indices| async move {
                let mut started = Vec::with_capacity(indices.len());
                for &i in indices {
                    started.push((i, self.start_when_ready(view, &items[i]).await));
                }
                started
            });
            for (i, step) in futures_util::future::join_all(per_key)
                .await
                .into_iter()
                .flatten()
            {
                steps[i] = step;
            }
        }
        let mut results = Vec::with_capacity(steps.len());
        for (item, step) in request.items.iter().zip(steps) {
            let result = match step {
                Step::Done(result) => result,
                Step::Started(started) => {
                    let finished = crate::cluster::documents::finish(
                        &self.node,
                        &item.key,
                        started,
                        wait_for(item),
                    );
                    self.answer(finished.await)
                }
                Step::Held => error(Code::Internal, "an update was never started".into()),
            };
            results.push(pb::DeliverResult {
                result: Some(result),
            });
        }
        pb::DeliverReply {
            results,
            ring: Some(ring_ref(&view)),
            ..Default::default()
        }
    }

    /// Over mutual TLS, checks that the caller's certificate (`certs`, its chain) names
    /// node `from`, the node it says it is: PERMISSION_DENIED otherwise. Without the
    /// cluster CA there are no credentials to check.
    fn check_from(
        &self,
        certs: Option<&[tonic::transport::CertificateDer<'static>]>,
        from: &str,
    ) -> Result<(), Status> {
        if self.node.config.tls.tls_ca.is_none() {
            return Ok(());
        }
        let named = certs
            .and_then(|c| c.first())
            .is_some_and(|leaf| ringfeed_router::tls::names_node(leaf, from));
        if named {
            Ok(())
        } else {
            self.node
                .counters
                .peer_input_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                from,
                "a peer's certificate does not name the node it claims to be"
            );
            Err(Status::permission_denied(format!(
                "the caller's certificate does not name node {from:?}"
            )))
        }
    }

    /// The most entries and idempotency records a peer's state of one key may carry:
    /// what this node keeps of a key (its history and window) twice over, plus room
    /// for the entries in flight; a peer's configuration may differ a little.
    fn peer_sizes(&self) -> (usize, usize) {
        let limits = self.node.keys.limits();
        (
            limits.history_len * 2 + 10_000,
            limits.idempotency_window * 2 + 10_000,
        )
    }

    /// Notes state from peer `from` for `key` that failed its checks; it is not stored.
    fn malformed(&self, from: &str, key: &str, error: &str) {
        self.node
            .counters
            .peer_input_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(from, key, error, "refused malformed state from a peer");
    }

    /// One `Replicate` request, from a unary call or a stream.
    async fn replicate_one(
        &self,
        request: pb::ReplicateRequest,
    ) -> Result<pb::ReplicateReply, Status> {
        if self.node.is_fenced() {
            return Err(Status::unavailable("fenced: this node's lease is in doubt"));
        }
        let view = self.view(request.ring.as_ref()).await;
        let from = request.from;
        // Fencing by the replica: only the owner in our own view may write.
        let owns = |key: &str| view.ring.owner(key).is_some_and(|o| o.id.0 == from);
        // Replicas remember the owner's incarnation: a node restarted under the same id
        // is another owner, and the old one's replicas are orphans.
        let owner = view
            .ring
            .member(&ringfeed_router::ring::NodeId(from.clone()))
            .map(MemberRef::of);
        let mut refused = Vec::new();
        let limits = self.node.keys.limits().payload();
        let (max_entries, max_window) = self.peer_sizes();
        for snapshot in request.snapshots {
            if key::validate(&snapshot.key).is_err() || !owns(&snapshot.key) {
                refused.push(snapshot.key);
                continue;
            }
            if let Err(e) = peer::check_snapshot(&snapshot, limits)
                .and_then(|()| peer::check_sizes(&snapshot, max_entries, max_window))
            {
                self.malformed(&from, &snapshot.key, &e);
                refused.push(snapshot.key);
                continue;
            }
            let key = snapshot.key.clone();
            self.node
                .replicas
                .snapshot(&key, owner.as_ref(), snapshot_from_pb(snapshot));
        }
        for entry in request.entries {
            if key::validate(&entry.key).is_err() || !owns(&entry.key) {
                if !refused.contains(&entry.key) {
                    refused.push(entry.key);
                }
                continue;
            }
            if let Err(e) = peer::check_entry(&entry, limits) {
                self.malformed(&from, &entry.key, &e);
                if !refused.contains(&entry.key) {
                    refused.push(entry.key);
                }
                continue;
            }
            let (key, epoch) = (entry.key.clone(), entry.epoch.clone());
            if let Some(entry) = entry_from_pb(entry) {
                self.node
                    .replicas
                    .entry(&key, owner.as_ref(), &epoch, entry);
            }
        }
        for key in request.dropped {
            self.node.replicas.drop_from(&key, owner.as_ref());
        }
        Ok(pb::ReplicateReply {
            refused,
            ring: Some(ring_ref(&view)),
        })
    }

    /// Starts `item` without waiting, unless its key is still being handed over.
    fn start(&self, view: &Arc<View>, item: &pb::PublishRequest) -> Step {
        if let Err(e) = key::validate(&item.key) {
            return Step::Done(error(Code::InvalidArgument, format!("invalid key: {e}")));
        }
        let view = match self.node.decide(view.clone(), &item.key) {
            Decision::Mine(view) => view,
            _ => return Step::Done(deliver_result::Result::NotOwner(ring_ref(view))),
        };
        if !self.node.handoffs.ready_now(&item.key, &view) {
            return Step::Held;
        }
        self.stage(&view, item)
    }

    /// Starts `item` once this node has caught up to the ring and its key's hand-over
    /// is done; answers it instead when that takes too long or the key moved meanwhile.
    async fn start_when_ready(&self, view: &Arc<View>, item: &pb::PublishRequest) -> Step {
        if let Err(e) = key::validate(&item.key) {
            return Step::Done(error(Code::InvalidArgument, format!("invalid key: {e}")));
        }
        if !matches!(self.node.decide(view.clone(), &item.key), Decision::Mine(_)) {
            return Step::Done(deliver_result::Result::NotOwner(ring_ref(view)));
        }
        if !self.node.handoffs.ready(&item.key, view).await {
            return Step::Done(error(
                Code::Unavailable,
                "the key's state is still being handed over; retry".into(),
            ));
        }
        // The ring may have moved while we waited: decide on the newest view.
        let newest = self.node.membership.view();
        let view = match self.node.decide(newest.clone(), &item.key) {
            Decision::Mine(view) => view,
            _ => return Step::Done(deliver_result::Result::NotOwner(ring_ref(&newest))),
        };
        self.stage(&view, item)
    }

    /// Stages `item` on `view`, where this node owns its key and nothing holds it.
    fn stage(&self, view: &View, item: &pb::PublishRequest) -> Step {
        crate::cluster::follower::promote_if_due(&self.node, &item.key, view);
        match replication::start(&self.node, view, &item.key, publish_of(item)) {
            Ok(started) => Step::Started(started),
            Err(e) => Step::Done(self.answer(Err(e))),
        }
    }

    /// The answer to a publish that landed or did not.
    fn answer(&self, published: Result<(Applied, bool), PublishError>) -> deliver_result::Result {
        match published {
            Ok((applied, replicated)) => deliver_result::Result::Ok(pb::PublishReply {
                seq: applied.seq,
                epoch: applied.epoch,
                node: self.node.id.0.clone(),
                delivered: applied.delivered,
                replicated,
            }),
            Err(e) => error(e.wire().grpc, e.to_string()),
        }
    }
}

/// Where one item of a `Deliver` request stands after [`NodeService::start`].
enum Step {
    /// Answered already (refused, or not this node's key).
    Done(deliver_result::Result),
    /// Staged and on its way to the successor.
    Started(replication::Started),
    /// Not started yet: its key is being handed over to this node, or this node has
    /// not caught up to the ring (or an earlier item for its key is held).
    Held,
}

/// `item` as the key table takes it.
fn publish_of(item: &pb::PublishRequest) -> Publish<'_> {
    Publish {
        data: &item.data,
        content_type: &item.content_type,
        expected_seq: item.expected_seq,
        expected_epoch: &item.expected_epoch,
        idempotency_key: &item.idempotency_key,
    }
}

/// Whether `item`'s caller waits until its successor holds it (`ack=replicated`).
fn wait_for(item: &pb::PublishRequest) -> bool {
    item.ack() == pb::Ack::Replicated
}

fn error(code: Code, message: String) -> deliver_result::Result {
    deliver_result::Result::Error(pb::Error {
        code: code as u32,
        message,
    })
}

/// The next request of a stream; `None` once it ends, fails, or the node shuts down (so
/// a shutting-down server is not held open by it).
async fn next_request<T>(node: &Node, requests: &mut tonic::Streaming<T>) -> Option<T> {
    tokio::select! {
        _ = node.shutdown.cancelled() => None,
        request = requests.message() => request.ok().flatten(),
    }
}

fn ring_ref(view: &View) -> pb::RingRef {
    pb::RingRef {
        ring_version: view.version,
        ring_id: view.ring.id().0.clone(),
    }
}

/// The node's own `Deliver`, for the public `Router` it serves beside `Node`: a
/// publish this node owns is applied in process, not sent to itself over gRPC.
pub struct LocalDeliver {
    service: NodeService,
    grpc: String,
}

impl LocalDeliver {
    /// Delivers through `service` for the node on the ring at `grpc`.
    pub fn new(service: NodeService, grpc: String) -> LocalDeliver {
        LocalDeliver { service, grpc }
    }
}

impl ringfeed_router::forward::LocalDelivery for LocalDeliver {
    fn grpc(&self) -> &str {
        &self.grpc
    }

    fn deliver(
        &self,
        request: pb::DeliverRequest,
    ) -> futures_util::future::BoxFuture<'_, pb::DeliverReply> {
        Box::pin(self.service.deliver_one(request))
    }
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn deliver(
        &self,
        request: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverReply>, Status> {
        Ok(Response::new(self.deliver_one(request.into_inner()).await))
    }

    type DeliverStreamStream = ReceiverStream<Result<pb::DeliverReply, Status>>;

    async fn deliver_stream(
        &self,
        request: Request<tonic::Streaming<pb::DeliverRequest>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        if self.node.config.test_no_stream_rpcs {
            return Err(Status::unimplemented(
                "DeliverStream is off (--test-no-stream-rpcs)",
            ));
        }
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(DELIVER_STREAM_CALLS);
        let calls = Arc::new(Semaphore::new(DELIVER_STREAM_CALLS));
        let service = self.clone();
        self.node.tasks.spawn(async move {
            loop {
                // At most DELIVER_STREAM_CALLS requests are handled at once; the next
                // is read only when one is answered.
                let Ok(permit) = calls.clone().acquire_owned().await else {
                    return;
                };
                let Some(request) = next_request(&service.node, &mut requests).await else {
                    return;
                };
                let (service, tx) = (service.clone(), tx.clone());
                service.node.tasks.clone().spawn(async move {
                    let id = request.id;
                    let limit = match request.timeout_ms {
                        0 => DELIVER_STREAM_TIMEOUT,
                        ms => Duration::from_millis(u64::from(ms)),
                    };
                    // As a call's grpc-timeout would: the handling stops at the limit.
                    let mut reply = tokio::time::timeout(limit, service.deliver_one(request))
                        .await
                        .unwrap_or_else(|_| pb::DeliverReply {
                            error: Some(pb::Error {
                                code: Code::DeadlineExceeded as u32,
                                message: "deliver timed out on the node".into(),
                            }),
                            ..Default::default()
                        });
                    reply.id = id;
                    let _ = tx.send(Ok(reply)).await;
                    drop(permit);
                });
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn key_document(
        &self,
        request: Request<pb::KeyDocumentRequest>,
    ) -> Result<Response<pb::KeyDocumentReply>, Status> {
        let request = request.into_inner();
        key::validate(&request.key)
            .map_err(|e| Status::invalid_argument(format!("invalid key: {e}")))?;
        if !request.key.starts_with("doc:") || request.text.len() > key::MAX_KEY_LEN {
            return Err(Status::invalid_argument(
                "documents live on doc: keys; a text name is at most 256 bytes",
            ));
        }
        let view = self.view(request.ring.as_ref()).await;
        let result = match self.node.decide(view.clone(), &request.key) {
            Decision::Mine(_) => {
                // The document may still be on its way from its previous owner.
                if !self.node.handoffs.ready(&request.key, &view).await {
                    return Err(Status::unavailable("the document is moving here; retry"));
                }
                let room = crate::cluster::documents::open(&self.node, &request.key).await;
                key_document_reply::Result::Ok(pb::GetDocumentReply {
                    update: room.state().to_vec(),
                    text: match request.text.as_str() {
                        "" => String::new(),
                        name => room.text(name),
                    },
                    node: self.node.id.0.clone(),
                })
            }
            Decision::Elsewhere(..) => key_document_reply::Result::NotOwner(ring_ref(&view)),
            Decision::Nobody(_) => {
                return Err(Status::unavailable(
                    "no live owner for this key on this ring yet",
                ))
            }
        };
        Ok(Response::new(pb::KeyDocumentReply {
            result: Some(result),
        }))
    }

    async fn key_presence(
        &self,
        request: Request<pb::KeyPresenceRequest>,
    ) -> Result<Response<pb::KeyPresenceReply>, Status> {
        let request = request.into_inner();
        key::validate(&request.key)
            .map_err(|e| Status::invalid_argument(format!("invalid key: {e}")))?;
        let view = self.view(request.ring.as_ref()).await;
        let result = match self.node.decide(view.clone(), &request.key) {
            Decision::Mine(_) => key_presence_reply::Result::Ok(pb::PresenceReply {
                members: self.node.keys.presence(&request.key),
                node: self.node.id.0.clone(),
            }),
            Decision::Elsewhere(..) => key_presence_reply::Result::NotOwner(ring_ref(&view)),
            Decision::Nobody(_) => {
                return Err(Status::unavailable(
                    "no live owner for this key on this ring yet",
                ))
            }
        };
        Ok(Response::new(pb::KeyPresenceReply {
            result: Some(result),
        }))
    }

    async fn replicate(
        &self,
        request: Request<pb::ReplicateRequest>,
    ) -> Result<Response<pb::ReplicateReply>, Status> {
        let certs = request.peer_certs();
        self.check_from(certs.as_deref().map(Vec::as_slice), &request.get_ref().from)?;
        self.replicate_one(request.into_inner())
            .await
            .map(Response::new)
    }

    type ReplicateStreamStream = ReceiverStream<Result<pb::ReplicateReply, Status>>;

    async fn replicate_stream(
        &self,
        request: Request<tonic::Streaming<pb::ReplicateRequest>>,
    ) -> Result<Response<Self::ReplicateStreamStream>, Status> {
        if self.node.config.test_no_stream_rpcs {
            return Err(Status::unimplemented(
                "ReplicateStream is off (--test-no-stream-rpcs)",
            ));
        }
        let certs = request.peer_certs();
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(REPLICATE_STREAM_REPLIES);
        let service = self.clone();
        self.node.tasks.spawn(async move {
            loop {
                let Some(request) = next_request(&service.node, &mut requests).await else {
                    return;
                };
                let reply =
                    match service.check_from(certs.as_deref().map(Vec::as_slice), &request.from) {
                        Ok(()) => service.replicate_one(request).await,
                        Err(status) => Err(status),
                    };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn figures(
        &self,
        _request: Request<pb::FiguresRequest>,
    ) -> Result<Response<pb::FiguresReply>, Status> {
        Ok(Response::new(crate::cluster::figures::local(&self.node)))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(crate::cluster::fence::status(&self.node)))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        // An operator action: with authentication on, it needs an API token.
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.node
            .check_api_token(authorization, request.remote_addr().map(|a| a.ip()))
            .map_err(|e| Status::new(e.wire().grpc, e.to_string()))?;
        let request = request.into_inner();
        if request.node != self.node.id.0 {
            return Err(Status::failed_precondition(format!(
                "this is node {:?}, not {:?}",
                self.node.id.0, request.node
            )));
        }
        tracing::info!("drain requested over gRPC");
        let connections =
            self.node.config.max_connections - self.node.connections.available_permits();
        self.drain.cancel();
        Ok(Response::new(pb::DrainReply {
            node: self.node.id.0.clone(),
            keys: u32::try_from(self.node.keys.len()).unwrap_or(u32::MAX),
            connections: u32::try_from(connections).unwrap_or(u32::MAX),
        }))
    }

    async fn handoff(
        &self,
        request: Request<pb::HandoffRequest>,
    ) -> Result<Response<pb::HandoffReply>, Status> {
        let certs = request.peer_certs();
        self.check_from(certs.as_deref().map(Vec::as_slice), &request.get_ref().from)?;
        let request = request.into_inner();
        let view = self.view(request.ring.as_ref()).await;
        let mut refused = Vec::new();
        let limits = self.node.keys.limits().payload();
        let (max_entries, max_window) = self.peer_sizes();
        for snapshot in request.snapshots {
            if let Err(e) = peer::check_snapshot(&snapshot, limits)
                .and_then(|()| peer::check_sizes(&snapshot, max_entries, max_window))
            {
                self.malformed(&request.from, &snapshot.key, &e);
                refused.push(snapshot.key);
                continue;
            }
            let mine = view
                .ring
                .owner(&snapshot.key)
                .is_some_and(|o| o.id == self.node.id);
            if key::validate(&snapshot.key).is_err() || !mine {
                refused.push(snapshot.key);
                continue;
            }
            let key = snapshot.key.clone();
            if request.offered {
                self.node.offer(&key, snapshot_from_pb(snapshot));
            } else {
                crate::cluster::follower::install(
                    &self.node,
                    &key,
                    snapshot_from_pb(snapshot),
                    &view,
                );
            }
        }
        if request.complete {
            if let Some(ring) = &request.ring {
                self.node
                    .handoffs
                    .marker(&request.from, RingId(ring.ring_id.clone()));
            }
        }
        Ok(Response::new(pb::HandoffReply {
            refused,
            ring: Some(ring_ref(&view)),
        }))
    }
}
