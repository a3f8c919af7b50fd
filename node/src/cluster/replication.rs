//! Owner → successor replication, with a high watermark.
//!
//! A publish is staged on its key (it gets a seq), sent to the key's successor, and
//! shown to subscribers — and answered with `ack=replicated` — only once the successor
//! holds it ([`KeyTable::replicated`](crate::state::KeyTable::replicated) shows updates in
//! seq order, up to the first one not yet held). So a subscriber never sees what the
//! replica lacks, and a promoted replica never reuses a seq for different data.
//!
//! Each successor gets one pipe: a bounded queue drained by one task that batches what
//! is queued and sends each batch on one long-lived `ReplicateStream`, up to [`WINDOW`]
//! batches unanswered (the successor applies and answers them in order, so no batch
//! waits for the one before it to come back). When the stream fails, or an answer is
//! late, what it left unanswered is retried call by call with unary `Replicate`, with
//! jittered back-off while the successor is on the ring but unreachable (the entries
//! wait; the guarantee is never lowered), and the next batch opens a new stream. When the successor leaves the ring, the keys it held are sent whole
//! to their new successors by the ring follower.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ringfeed_proto::v1::{self as pb, node_client::NodeClient};
use ringfeed_router::membership::{Backoff, View};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tracing::Instrument;

use crate::node::Node;
use crate::state::{
    job_key, successor_of, Applied, ApplyError, Job, KeySnapshot, LogEntry, Publish, Staged,
    Successor, ToReplica,
};

/// Jobs queued per successor. Past it a job is not queued: its key forgets its replica,
/// so the key's next publish sends it whole (publishers never wait for room).
const PIPE_CAPACITY: usize = 65_536;
/// Most jobs in one `Replicate` call.
const MAX_BATCH: usize = 1024;
/// How long one `Replicate` call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a publish did not land.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("the key moved while its update was being replicated; retry")]
    Moved,
    #[error("this node is fenced (its lease is in doubt); retry")]
    Fenced,
}

/// Queues `job` for `to`, starting its pipe if needed. A successor that is no
/// longer on the ring gets nothing: the ring follower re-sends the key whole.
fn send(node: &Arc<Node>, to: &Successor, job: Job) {
    let open = || {
        let view = node.membership.view();
        let member = view.ring.member(&to.id)?;
        if member.incarnation != to.incarnation {
            return None;
        }
        let (tx, rx) = mpsc::channel(PIPE_CAPACITY);
        node.tasks
            .spawn(pipe(node.clone(), to.clone(), member.grpc.clone(), rx));
        Some(tx)
    };
    let Some(tx) = node.replication.queue(to, open) else {
        return;
    };
    if let Err(e) = tx.try_send(job) {
        let job = e.into_inner();
        if !matches!(job, Job::Drop { .. }) {
            // Full (or closing): make the key's next publish send it whole instead.
            let key = job_key(&job);
            tracing::warn!(successor = %to, %key, "replication queue full");
            node.keys.forget_replica(key);
        }
    }
}

/// Tells `to` that this node dropped `key` as idle, so its replica goes too.
pub fn drop_key(node: &Arc<Node>, to: &Successor, key: String) {
    send(node, to, Job::Drop { key });
}

/// Sends what staging said the replica needs.
pub fn dispatch(node: &Arc<Node>, key: &str, to_replica: ToReplica) {
    match to_replica {
        ToReplica::Nothing => {}
        ToReplica::Entry(to, epoch, entry) => {
            send(
                node,
                &to,
                Job::Entry {
                    key: key.to_owned(),
                    epoch,
                    entry,
                },
            );
        }
        ToReplica::Snapshot(to, mut snapshot) => {
            // A document's state goes with its key's to a new successor.
            if let Some(room) = node.docs.get(key) {
                snapshot.doc = Some(room.state());
            }
            send(
                node,
                &to,
                Job::Snapshot {
                    key: key.to_owned(),
                    snapshot,
                },
            );
        }
    }
}

/// Publishes through `key`'s log on this node (its owner on `view`): stage, send to
/// the successor, and — when `wait` — wait until it is shown. Returns what was applied
/// and whether a successor holds it.
pub async fn publish(
    node: &Arc<Node>,
    view: &View,
    key: &str,
    publish: Publish<'_>,
    wait: bool,
) -> Result<(Applied, bool), PublishError> {
    let started = start(node, view, key, publish)?;
    started.finish(wait).await
}

/// A publish staged and on its way to the successor: [`Started::finish`] answers
/// with it, after waiting until it is shown when asked to.
pub struct Started {
    applied: Applied,
    /// The publish's span (key, seq, owner), for what happens to it next.
    span: tracing::Span,
    /// Whether a successor holds (or will hold) it.
    replicated: bool,
    /// Told the subscribers reached once shown; `None` for a duplicate.
    done: Option<oneshot::Receiver<u32>>,
    /// A document update: waited for, so that its caller applies it to the
    /// document once shown ([`crate::cluster::documents::finish`]).
    doc: Option<bytes::Bytes>,
}

impl Started {
    /// What was applied, once shown when `wait`.
    pub async fn finish(self, wait: bool) -> Result<(Applied, bool), PublishError> {
        let Started {
            mut applied,
            replicated,
            done,
            span,
            doc,
        } = self;
        let wait = wait || doc.is_some();
        if let (true, Some(done)) = (wait, done) {
            let shown = done.instrument(span.clone()).await;
            let _in = span.enter();
            applied.delivered = shown.map_err(|_| {
                tracing::debug!("moved before the successor held it");
                PublishError::Moved
            })?;
            tracing::trace!(delivered = applied.delivered, "shown");
        }
        Ok((applied, replicated))
    }

    /// The document update this publish carries, if it is one.
    pub fn doc_update(&self) -> Option<&bytes::Bytes> {
        self.doc.as_ref()
    }
}

/// The part of [`publish`] that does not wait: stage, and send to the successor.
pub fn start(
    node: &Arc<Node>,
    view: &View,
    key: &str,
    publish: Publish<'_>,
) -> Result<Started, PublishError> {
    let span = tracing::debug_span!("publish", key, owner = %node.id, seq = tracing::field::Empty);
    let _in = span.enter();
    if node.is_fenced() {
        return Err(PublishError::Fenced);
    }
    let doc = if crate::protocol::frames::is_doc_update(key, publish.content_type) {
        // Refused before it is logged: an update that would grow the document past
        // its bound.
        let max = node.config.docs.doc_max_bytes;
        if node
            .docs
            .get(key)
            .is_some_and(|d| !d.fits(publish.data.len(), max))
        {
            return Err(
                ApplyError::Payload(crate::protocol::frames::PayloadError::DocumentFull(max))
                    .into(),
            );
        }
        Some(bytes::Bytes::copy_from_slice(publish.data))
    } else {
        None
    };
    let successor = successor_of(view, key);
    let replicated = successor.is_some();
    match node.keys.stage(key, publish, successor, view.version) {
        Err(ApplyError::InFlight) => {
            // A retry of an update in flight: make sure it is on its way, then retry.
            let to = successor_of(view, key);
            let to_replica = node.keys.replicate_to(key, to, view.version);
            dispatch(node, key, to_replica);
            Err(ApplyError::InFlight.into())
        }
        Err(e) => {
            tracing::debug!(error = %e, "refused");
            // Counted here, for every transport alike.
            if matches!(e, ApplyError::MemoryBudget) {
                node.counters.refused_memory.fetch_add(1, Ordering::Relaxed);
            }
            Err(e.into())
        }
        Ok(Staged::Duplicate(applied)) => {
            span.record("seq", applied.seq);
            tracing::debug!("a retry of an update already logged");
            drop(_in);
            Ok(Started {
                applied,
                replicated,
                done: None,
                span,
                doc,
            })
        }
        Ok(Staged::Waiting {
            applied,
            to_replica,
            done,
        }) => {
            node.counters.published.fetch_add(1, Ordering::Relaxed);
            if !replicated {
                node.counters.unreplicated.fetch_add(1, Ordering::Relaxed);
            }
            span.record("seq", applied.seq);
            tracing::trace!(replicated, "staged");
            dispatch(node, key, to_replica);
            drop(_in);
            Ok(Started {
                applied,
                replicated,
                done: Some(done),
                span,
                doc,
            })
        }
    }
}

/// Drains one successor's queue: batch, send on the stream (or call), retry until it
/// lands or the successor leaves the ring.
async fn pipe(node: Arc<Node>, to: Successor, grpc: String, mut rx: mpsc::Receiver<Job>) {
    let Some(mut client) = node.peers.client(&grpc, Duration::from_secs(1)) else {
        tracing::error!(%grpc, "bad successor address");
        return;
    };
    let shutdown = node.shutdown.clone();
    // Batches sent on the stream and not yet answered, oldest first, with when sent.
    let mut in_flight: VecDeque<(Vec<Job>, Instant)> = VecDeque::new();
    let mut stream: Option<Stream> = None;
    // Cleared for good when the successor does not know the stream (an older version).
    let mut streaming = true;
    loop {
        let oldest = in_flight.front().map(|(_, sent)| *sent + CALL_TIMEOUT);
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            job = rx.recv(), if in_flight.len() < WINDOW => match job {
                Some(job) => Event::Job(job),
                None => return,
            },
            reply = next_reply(&mut stream), if !in_flight.is_empty() => Event::Reply(reply),
            _ = sleep_until(oldest), if oldest.is_some() => {
                Event::Reply(Err(tonic::Status::deadline_exceeded("replicate timed out")))
            }
        };
        match event {
            Event::Job(first) => {
                let mut bytes = first.wire_bytes();
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH && bytes < crate::config::REQUEST_BUDGET {
                    match rx.try_recv() {
                        Ok(job) => {
                            bytes += job.wire_bytes();
                            batch.push(job);
                        }
                        Err(_) => break,
                    }
                }
                let view = node.membership.view();
                if !holds_place(&view, &to) {
                    in_flight.push_back((batch, Instant::now()));
                    return left_the_ring(&node, &to, rx, in_flight);
                }
                if streaming && stream.is_none() {
                    match Stream::open(&mut client).await {
                        Ok(opened) => stream = Some(opened),
                        Err(status) if status.code() == tonic::Code::Unimplemented => {
                            tracing::info!(successor = %to, "successor has no ReplicateStream; replicating call by call");
                            streaming = false;
                        }
                        Err(status) => {
                            tracing::debug!(successor = %to, %status, "cannot open the replicate stream");
                        }
                    }
                }
                let sent = stream
                    .as_ref()
                    .is_some_and(|s| s.requests.try_send(request(&node, &view, &batch)).is_ok());
                in_flight.push_back((batch, Instant::now()));
                if !sent {
                    // No stream (or it just broke): call by call, in order.
                    stream = None;
                    if !retry(&node, &to, &client, &mut in_flight).await {
                        return left_the_ring(&node, &to, rx, in_flight);
                    }
                }
            }
            Event::Reply(Ok(reply)) => {
                if let Some((batch, sent)) = in_flight.pop_front() {
                    node.counters.replication.record(sent.elapsed());
                    settle(&node, &to, &batch, &reply.refused);
                }
            }
            Event::Reply(Err(status)) => {
                // What the stream did not answer may or may not have landed: a retry is
                // harmless (the successor keeps what it already holds).
                tracing::debug!(successor = %to, %status, "replicate stream failed; retrying call by call");
                stream = None;
                if !retry(&node, &to, &client, &mut in_flight).await {
                    return left_the_ring(&node, &to, rx, in_flight);
                }
            }
        }
    }
}

/// `Replicate` batches a pipe keeps in flight on its stream.
const WINDOW: usize = 4;

/// What a pipe waits for.
enum Event {
    Job(Job),
    Reply(Result<pb::ReplicateReply, tonic::Status>),
}

/// A pipe's `ReplicateStream`: requests go in, one reply each comes back in order.
struct Stream {
    requests: mpsc::Sender<pb::ReplicateRequest>,
    replies: tonic::Streaming<pb::ReplicateReply>,
}

impl Stream {
    async fn open(client: &mut NodeClient<Channel>) -> Result<Stream, tonic::Status> {
        // Room for every request in flight: sending never waits.
        let (requests, rx) = mpsc::channel(WINDOW);
        let opened = tokio::time::timeout(
            CALL_TIMEOUT,
            client.replicate_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(
                "replicate stream timed out",
            ))
        })?;
        Ok(Stream {
            requests,
            replies: opened.into_inner(),
        })
    }
}

/// The next reply on `stream`; never, without one.
async fn next_reply(stream: &mut Option<Stream>) -> Result<pb::ReplicateReply, tonic::Status> {
    match stream {
        Some(stream) => {
            stream.replies.message().await?.ok_or_else(|| {
                tonic::Status::unavailable("the successor ended the replicate stream")
            })
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Whether `to` (this incarnation) is still on `view`'s ring.
fn holds_place(view: &View, to: &Successor) -> bool {
    view.ring
        .member(&to.id)
        .is_some_and(|m| m.incarnation == to.incarnation)
}

/// Lands every batch in flight, in order, call by call; false once `to` left the ring
/// (what did not land stays in `in_flight`).
async fn retry(
    node: &Arc<Node>,
    to: &Successor,
    client: &NodeClient<Channel>,
    in_flight: &mut VecDeque<(Vec<Job>, Instant)>,
) -> bool {
    while let Some((batch, sent)) = in_flight.front() {
        if !deliver_batch(node, to, client.clone(), batch).await {
            return false;
        }
        node.counters.replication.record(sent.elapsed());
        in_flight.pop_front();
    }
    true
}

/// The successor left the ring: its keys go whole to their new successors (the ring
/// follower does that for every key; what this pipe still held is re-sent now).
fn left_the_ring(
    node: &Arc<Node>,
    to: &Successor,
    mut rx: mpsc::Receiver<Job>,
    in_flight: VecDeque<(Vec<Job>, Instant)>,
) {
    node.replication.close(to);
    rx.close();
    let mut jobs: Vec<Job> = in_flight.into_iter().flat_map(|(batch, _)| batch).collect();
    while let Ok(job) = rx.try_recv() {
        jobs.push(job);
    }
    resend(node, jobs);
}

/// Calls `Replicate` until the batch lands (true) or `to` is no longer on the ring (false).
async fn deliver_batch(
    node: &Arc<Node>,
    to: &Successor,
    mut client: NodeClient<Channel>,
    batch: &[Job],
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    let mut views = node.membership.subscribe();
    loop {
        let view = node.membership.view();
        if !holds_place(&view, to) {
            return false;
        }
        let request = request(node, &view, batch);
        let mut call = tonic::Request::new(request);
        call.set_timeout(CALL_TIMEOUT);
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.replicate(call))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("replicate timed out")));
        match answer {
            Ok(reply) => {
                let reply = reply.into_inner();
                settle(node, to, batch, &reply.refused);
                return true;
            }
            Err(status) => {
                tracing::debug!(successor = %to, %status, "replicate failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_pause()) => {}
                    _ = views.changed() => {}
                    _ = node.shutdown.cancelled() => return true,
                }
            }
        }
    }
}

fn request(node: &Node, view: &View, batch: &[Job]) -> pb::ReplicateRequest {
    let mut request = pb::ReplicateRequest {
        ring: Some(pb::RingRef {
            ring_version: view.version,
            ring_id: view.ring.id().0.clone(),
        }),
        from: node.id.0.clone(),
        snapshots: Vec::new(),
        entries: Vec::new(),
        dropped: Vec::new(),
    };
    for job in batch {
        match job {
            Job::Drop { key } => request.dropped.push(key.clone()),
            Job::Entry { key, epoch, entry } => request.entries.push(entry_pb(key, epoch, entry)),
            Job::Snapshot { key, snapshot } => request.snapshots.push(snapshot_pb(key, snapshot)),
        }
    }
    request
}

/// The wire form of a key's snapshot.
pub fn snapshot_pb(key: &str, snapshot: &KeySnapshot) -> pb::ReplicaSnapshot {
    pb::ReplicaSnapshot {
        key: key.to_owned(),
        epoch: snapshot.epoch.clone(),
        seq: snapshot.seq,
        entries: snapshot
            .entries
            .iter()
            .map(|e| entry_pb(key, &snapshot.epoch, e))
            .collect(),
        idempotency: snapshot
            .idempotency
            .iter()
            .map(|(id, seq, digest)| pb::IdempotencyRecord {
                id: id.clone(),
                seq: *seq,
                digest: *digest,
            })
            .collect(),
        doc: snapshot
            .doc
            .as_ref()
            .map(|d| d.to_vec())
            .unwrap_or_default(),
    }
}

/// A wire snapshot back as a key snapshot (entries whose frame is not UTF-8 are dropped).
pub fn snapshot_from_pb(snapshot: pb::ReplicaSnapshot) -> KeySnapshot {
    KeySnapshot {
        epoch: snapshot.epoch,
        seq: snapshot.seq,
        entries: snapshot
            .entries
            .into_iter()
            .filter_map(entry_from_pb)
            .collect(),
        idempotency: snapshot
            .idempotency
            .into_iter()
            .map(|r| (r.id, r.seq, r.digest))
            .collect(),
        doc: (!snapshot.doc.is_empty()).then(|| bytes::Bytes::from(snapshot.doc)),
    }
}

fn entry_pb(key: &str, epoch: &str, entry: &LogEntry) -> pb::ReplicaEntry {
    pb::ReplicaEntry {
        key: key.to_owned(),
        epoch: epoch.to_owned(),
        seq: entry.seq,
        frame: entry.frame.as_str().as_bytes().to_vec(),
        idempotency_key: entry.idempotency_key.clone(),
    }
}

/// The successor holds the batch but for `refused` keys: show what it holds; abort
/// what it refused (their callers retry on the right owner).
fn settle(node: &Node, to: &Successor, batch: &[Job], refused: &[String]) {
    for key in refused {
        tracing::info!(%key, "successor refused replication: it does not see this node as the owner");
        node.keys.abort_pending(key);
    }
    for job in batch {
        match job {
            Job::Entry { key, epoch, entry } if !refused.contains(key) => {
                node.keys.replicated(key, epoch, entry.seq, to)
            }
            Job::Snapshot { key, snapshot } if !refused.contains(key) => {
                for e in &snapshot.entries {
                    node.keys.replicated(key, &snapshot.epoch, e.seq, to);
                }
            }
            _ => {}
        }
    }
}

/// Re-sends the keys of jobs whose successor left, whole, to their current successors.
fn resend(node: &Arc<Node>, batch: Vec<Job>) {
    let view = node.membership.view();
    let mut keys: Vec<String> = batch
        .into_iter()
        .filter_map(|job| match job {
            Job::Entry { key, .. } | Job::Snapshot { key, .. } => Some(key),
            Job::Drop { .. } => None,
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let to_replica = node
            .keys
            .replicate_to(&key, successor_of(&view, &key), view.version);
        dispatch(node, &key, to_replica);
    }
}

/// Turns a wire entry back into a log entry; `None` if its frame is not UTF-8.
pub fn entry_from_pb(entry: pb::ReplicaEntry) -> Option<LogEntry> {
    let frame = String::from_utf8(entry.frame).ok()?;
    Some(LogEntry {
        seq: entry.seq,
        frame: frame.into(),
        idempotency_key: entry.idempotency_key,
    })
}
