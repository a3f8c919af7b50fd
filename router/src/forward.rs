//! Getting updates to the owner of their key.
//!
//! A [`Forwarder`] hashes each key on the current ring, groups the items per owner,
//! sends one `Node.Deliver` per owner over a pooled channel, and retries what did not
//! land: `NOT_OWNER` → catch up to the ring the node decided on, then again; an
//! unreachable owner → jittered back-off until the ring changes or the deadline ends,
//! then `UNAVAILABLE`. Every item carries an idempotency key (made here when the caller
//! gave none), so a retry can never apply an update twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rand::Rng;
use ringfeed_proto::v1::{
    self as pb, deliver_result, key_presence_reply, node_client::NodeClient, publish_result,
};
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

/// Pooled channels to nodes, and the retry logic around them.
pub struct Forwarder {
    membership: Membership,
    config: ForwardConfig,
    channels: Mutex<HashMap<String, NodeClient<Channel>>>,
}

impl Forwarder {
    pub fn new(membership: Membership, config: ForwardConfig) -> Forwarder {
        Forwarder {
            membership,
            config,
            channels: Mutex::new(HashMap::new()),
        }
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
        while !pending.is_empty() {
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
            }

            let calls = groups.into_iter().map(|(grpc, indices)| {
                let request = pb::DeliverRequest {
                    ring: Some(ring_ref.clone()),
                    items: indices.iter().map(|&i| items[i].clone()).collect(),
                };
                let client = self.client(grpc);
                async move {
                    let reply = match client {
                        Ok(mut client) => {
                            let mut request = tonic::Request::new(request);
                            request.set_timeout(
                                deadline
                                    .saturating_duration_since(Instant::now())
                                    .max(Duration::from_millis(1)),
                            );
                            // The header tells the node; this bounds our own wait.
                            let left = deadline.saturating_duration_since(Instant::now());
                            match tokio::time::timeout(left, client.deliver(request)).await {
                                Ok(reply) => reply.map(|r| r.into_inner()),
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
                    Ok(reply) if reply.results.len() == indices.len() => {
                        for (i, result) in indices.into_iter().zip(reply.results) {
                            match result.result {
                                Some(deliver_result::Result::Ok(ok)) => results[i] = Some(Ok(ok)),
                                // The node asks for a retry (the key is moving, or the
                                // same update is still in flight): same item, same
                                // idempotency key, until the deadline.
                                Some(deliver_result::Result::Error(e))
                                    if e.code == Code::Unavailable as u32 =>
                                {
                                    last_error = e.message;
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
                        last_error = format!("owner {grpc} unreachable: {}", status.message());
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
        for i in pending {
            results[i] = Some(Err(Status::unavailable(format!(
                "{last_error} before the deadline"
            ))));
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

    #[test]
    fn generated_idempotency_keys_differ() {
        assert_ne!(new_idempotency_key(), new_idempotency_key());
    }
}
