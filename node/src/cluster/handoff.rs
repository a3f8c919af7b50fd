//! Keys move with their state on planned ring changes (a node joins).
//!
//! The previous owner of every key that moves sends the key whole (`Handoff`: epoch,
//! history, idempotency window) to its new owner, then a marker (`complete`) to every
//! member of the new ring, then redirects the key's subscribers there. A new owner
//! cannot tell "no state yet" from "this key never existed" key by key, so it waits —
//! per previous owner, bounded — for that owner's marker before it serves a key that
//! owner held. For a previous owner whose record vanished (a crash), it waits instead
//! for a marker from every other active member, since any of them may hold a replica
//! of those keys to offer before its marker; the newest offered copy is promoted
//! (bookkeeping: [`crate::state::Handoffs`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use ringfeed_proto::v1::{self as pb};
use ringfeed_router::membership::{Backoff, View};
use ringfeed_router::ring::NodeId;

use crate::node::{redirect_kick, Node};
use crate::state::{KeySnapshot, Moved};

/// Clients redirected between two pauses.
const REDIRECT_BATCH: usize = 500;
/// Keys per `Handoff` call.
const KEYS_PER_CALL: usize = 256;

/// `snapshots` in calls of at most [`KEYS_PER_CALL`] keys and about
/// [`REQUEST_BUDGET`](crate::config::REQUEST_BUDGET) bytes (a larger key goes alone).
fn chunks(
    snapshots: &[(String, crate::state::KeySnapshot)],
) -> impl Iterator<Item = &[(String, crate::state::KeySnapshot)]> {
    let mut rest = snapshots;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len().min(KEYS_PER_CALL) {
            let (key, snapshot) = &rest[n];
            bytes += snapshot.wire_bytes(key);
            if n > 0 && bytes > crate::config::REQUEST_BUDGET {
                break;
            }
            n += 1;
        }
        let (chunk, later) = rest.split_at(n);
        rest = later;
        Some(chunk)
    })
}
/// How long one `Handoff` call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Hands `moved` keys to their owners on `view`, offers `offers` (replicas of owners
/// that left, for keys another node owns now) to those owners, sends this node's marker
/// to every other member, then redirects the moved keys' subscribers.
pub async fn hand_off(
    node: Arc<Node>,
    view: Arc<View>,
    moved: Vec<Moved>,
    offers: Vec<(String, KeySnapshot)>,
) {
    let mut per_owner: HashMap<(NodeId, bool), Vec<(String, KeySnapshot)>> = HashMap::new();
    let mut subscribers = Vec::new();
    for m in moved {
        if let Some(owner) = view.ring.owner(&m.key) {
            per_owner
                .entry((owner.id.clone(), false))
                .or_default()
                .push((m.key.clone(), m.snapshot));
            subscribers.push((owner.clone(), m.subscribers));
        }
    }
    let offered = offers.len();
    for (key, snapshot) in offers {
        if let Some(owner) = view.ring.owner(&key) {
            per_owner
                .entry((owner.id.clone(), true))
                .or_default()
                .push((key, snapshot));
        }
    }
    let keys: usize = per_owner.values().map(Vec::len).sum::<usize>() - offered;
    if keys > 0 && node.config.test_handoff_delay_ms > 0 {
        tracing::warn!(keys, "holding the hand-off (--test-handoff-delay-ms)");
        tokio::time::sleep(Duration::from_millis(node.config.test_handoff_delay_ms)).await;
    }
    let sends = per_owner.into_iter().map(|((owner, offered), snapshots)| {
        let node = node.clone();
        let view = view.clone();
        async move {
            for chunk in chunks(&snapshots) {
                let request = pb::HandoffRequest {
                    ring: Some(ring_ref(&view)),
                    from: node.id.0.clone(),
                    snapshots: chunk
                        .iter()
                        .map(|(k, s)| crate::cluster::replication::snapshot_pb(k, s))
                        .collect(),
                    complete: false,
                    offered,
                };
                if !call(&node, &owner, request).await {
                    return;
                }
            }
        }
    });
    futures_util::future::join_all(sends).await;
    // The marker, to every other member: "all I gave up on this ring has been sent".
    // The clients go once the owners they go to have it; a member that is down
    // (waiting for its lease to expire) must not hold them up.
    let receivers: HashSet<NodeId> = subscribers.iter().map(|(o, _)| o.id.clone()).collect();
    let mut to_receivers = Vec::new();
    for m in view.ring.members().iter().filter(|m| m.id != node.id) {
        let sender = node.clone();
        let view = view.clone();
        let id = m.id.clone();
        let marker = node.tasks.spawn(async move {
            let node = sender;
            let request = pb::HandoffRequest {
                ring: Some(ring_ref(&view)),
                from: node.id.0.clone(),
                snapshots: Vec::new(),
                complete: true,
                offered: false,
            };
            call(&node, &id, request).await;
        });
        if receivers.contains(&m.id) {
            to_receivers.push(marker);
        }
    }
    futures_util::future::join_all(to_receivers).await;
    // Paced, jittered batches, so that a drain does not turn into a reconnect storm.
    let mut clients = 0usize;
    for (owner, subs) in subscribers {
        for s in subs {
            s.control
                .kick(redirect_kick(&owner, &s.redirect_query(), view.version));
            clients += 1;
            if clients.is_multiple_of(REDIRECT_BATCH) {
                let pause = rand::rng().random_range(5..15);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
    if keys + offered + clients > 0 {
        tracing::info!(ring_id = %view.ring.id(), keys, offered, clients, "handed off keys and redirected their clients");
    }
}

/// Calls `Handoff` on `to` until it lands (true), or `to` leaves the ring or this node
/// shuts down (false).
async fn call(node: &Arc<Node>, to: &NodeId, request: pb::HandoffRequest) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        let view = node.membership.view();
        let Some(member) = view.ring.member(to) else {
            return false;
        };
        let Some(mut client) = node.peers.client(&member.grpc, Duration::from_secs(1)) else {
            return false;
        };
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(CALL_TIMEOUT);
        match tokio::time::timeout(CALL_TIMEOUT, client.handoff(call)).await {
            Ok(Ok(reply)) => {
                let refused = reply.into_inner().refused;
                if !refused.is_empty() {
                    tracing::warn!(to = %to, refused = refused.len(), "hand-off refused for some keys");
                }
                return true;
            }
            Ok(Err(status)) => tracing::debug!(to = %to, %status, "hand-off failed; retrying"),
            Err(_) => tracing::debug!(to = %to, "hand-off timed out; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_pause()) => {}
            _ = node.shutdown.cancelled() => return false,
        }
    }
}

fn ring_ref(view: &View) -> pb::RingRef {
    pb::RingRef {
        ring_version: view.version,
        ring_id: view.ring.id().0.clone(),
    }
}
