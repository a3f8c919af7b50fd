//! Following the ring: on every new ring, keys this node gave up are handed to their
//! new owners, replicas of a departed owner are promoted, and keys whose successor
//! changed are sent whole to the new one; and keeping memory bounded (idle keys and
//! stale replicas go).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ringfeed_router::membership::View;

use super::{documents, handoff, replication};
use crate::node::{departed, redirect_kick, Node};
use crate::state::{successor_of, KeySnapshot, MemberRef};

/// How often the resident set is sampled against the memory budget.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How long a replica nobody updates is kept before it is dropped.
const REPLICA_GRACE: Duration = Duration::from_secs(30);

/// Follows the ring: on every new ring, keys this node no longer owns are handed
/// to their new owners and their subscribers redirected there; replicas of a
/// departed owner are promoted; keys whose successor changed are sent to the new one.
///
/// Subscribes at once, when called, not when the task first runs: the task is
/// spawned just before the node registers, and a ring broadcast before a late
/// subscription (this node's own first ring, say) would be taken as the starting
/// point and never handled — a first node would never settle, and its join's
/// transition would hold every later join for as long as it lives.
pub fn follow_ring(node: Arc<Node>) -> impl std::future::Future<Output = ()> + Send {
    // Every ring, in order: a node restarted under the same id must be seen leaving
    // (and its replicas promoted) before its new, empty incarnation joins.
    let rings = node.membership.rings();
    let previous = node.membership.view().ring.clone();
    follow_ring_from(node, rings, previous)
}

async fn follow_ring_from(
    node: Arc<Node>,
    mut rings: tokio::sync::broadcast::Receiver<Arc<View>>,
    mut previous: Arc<ringfeed_router::ring::Ring>,
) {
    loop {
        let view = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            view = rings.recv() => match view {
                Ok(view) => view,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "fell behind the ring; continuing from the latest");
                    node.membership.view()
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        };
        if view.ring.id() == previous.id() {
            continue;
        }
        // One ring's step at a time, and never beside a promotion (see
        // `promote_orphans`): a key is either promoted before this step takes what
        // moved, or left as a replica this step offers to its new owner.
        let step = node.ring_step.lock().expect("ring step lock poisoned");
        let before = std::mem::replace(&mut previous, view.ring.clone());
        node.handoffs.begin(&node.id, before, &view);
        // A node that is not on the ring yet (starting) or any more (leaving) keeps
        // its clients until its own lifecycle moves them.
        if !view.ring.is_active(&node.id) {
            drop(step);
            continue;
        }
        // Keys this node gave up go whole to their new owners, then this node's
        // marker to everyone, then their clients are redirected.
        let elsewhere = |key: &str| view.ring.owner(key).is_some_and(|o| o.id != node.id);
        let mut moved = node.keys.take_where(elsewhere);
        documents::take_moved(&node, &mut moved, elsewhere);
        let offers = orphans_owned_elsewhere(&node, &view);
        node.tasks
            .spawn(handoff::hand_off(node.clone(), view.clone(), moved, offers));
        // Replicas of a departed owner are promoted once every other member has
        // offered what it holds (its marker): the newest copy wins.
        let promoting = node.clone();
        let ring_view = view.clone();
        node.tasks.spawn(async move {
            let settled = tokio::select! {
                settled = promoting.handoffs.settled(ring_view.ring.id()) => settled,
                _ = promoting.shutdown.cancelled() => false,
            };
            if settled {
                promote_orphans(&promoting, &ring_view);
            }
        });
        // Every key whose successor changed is sent whole to the new one (or, with
        // no successor left, shows what was waiting for the old one).
        for key in node.keys.keys() {
            let to_replica = node
                .keys
                .replicate_to(&key, successor_of(&view, &key), view.version);
            replication::dispatch(&node, &key, to_replica);
        }
        drop(step);
    }
}

/// Keeps memory bounded: drops keys idle for `--key-idle-ttl-ms` (telling their
/// replicas to go too) and replicas nobody keeps up to date any more — copies at a
/// former successor, or of a departed owner whose key another node serves now.
pub async fn sweep(node: Arc<Node>) {
    let ttl = Duration::from_millis(node.config.key_idle_ttl_ms);
    let mut tick = tokio::time::interval((ttl / 4).min(Duration::from_secs(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dropped = node.keys.drop_idle(ttl, |key| {
            node.docs.get(key).is_some_and(|d| d.editor_count() > 0)
        });
        documents::let_go_idle(&node);
        if !dropped.is_empty() {
            tracing::debug!(keys = dropped.len(), "dropped idle keys");
        }
        for (key, successor) in dropped {
            if let Some(to) = successor {
                replication::drop_key(&node, &to, key);
            }
        }
        let view = node.membership.view();
        // Only replicas unchanged for the grace can go: the others are not looked
        // at (nor copied — a successor holds one for each of its predecessors' keys).
        let grace = ttl.min(REPLICA_GRACE);
        let stale: HashSet<String> = node
            .replicas
            .owners_unchanged_for(grace)
            .into_iter()
            .filter(|(key, owner)| replica_is_stale(&node, &view, key, owner.as_ref()))
            .map(|(key, _)| key)
            .collect();
        if stale.is_empty() {
            continue;
        }
        let gone = node
            .replicas
            .drop_where(|key, _, age| age >= grace && stale.contains(key));
        if gone > 0 {
            tracing::debug!(replicas = gone, "dropped stale replicas");
        }
    }
}

/// A replica no owner keeps up to date: its owner is on the ring but this node is
/// not the key's successor there (the owner sent the key whole to the new one), or
/// its owner left and another node serves the key (it was offered there), or this
/// node serves the key with its own history.
fn replica_is_stale(node: &Node, view: &View, key: &str, owner: Option<&MemberRef>) -> bool {
    if let Some(owner) = owner.filter(|o| o.is_active_on(view)) {
        let successor = view.ring.successor(key).map(|m| &m.id);
        return view.ring.owner(key).map(|o| &o.id) != Some(&owner.id)
            || successor != Some(&node.id);
    }
    match view.ring.owner(key) {
        Some(o) if o.id == node.id => node.keys.has_history(key),
        Some(_) => true,
        None => false,
    }
}

/// Copies of the replicas this node holds whose owner has left `view`'s ring and
/// whose key another member owns now: they are offered to that member, which may
/// have no other copy (the key moved to it by a join just before its owner died).
fn orphans_owned_elsewhere(node: &Node, view: &View) -> Vec<(String, KeySnapshot)> {
    node.replicas
        .owners()
        .into_iter()
        .filter(|(key, owner)| {
            departed(view, owner.as_ref())
                && view
                    .ring
                    .owner(key)
                    .is_some_and(|o| o.id != node.id && view.ring.is_active(&o.id))
        })
        .filter_map(|(key, _)| node.replicas.copy(&key).map(|s| (key, s)))
        .collect()
}

/// Promotes the replicas this node holds whose owner has left the ring and whose
/// key it now owns (same epoch, same seq).
fn promote_orphans(node: &Arc<Node>, view: &View) {
    // Not beside a ring step: a newer ring seen meanwhile may have given the key to
    // another node, and its step has offered the replica there instead.
    let _step = node.ring_step.lock().expect("ring step lock poisoned");
    let latest = node.membership.view();
    let mut promoted = 0usize;
    for (key, owner) in node.replicas.owners() {
        if !departed(view, owner.as_ref()) {
            continue;
        }
        // A key another live node owns now keeps its copy here: it may be the only
        // one left, and it stays until that owner's successor is sent the key whole.
        let mine = |v: &View| v.ring.owner(&key).is_some_and(|o| o.id == node.id);
        let mine = mine(view) && mine(&latest);
        if mine && promote(node, &key, view) {
            promoted += 1;
        }
    }
    if promoted > 0 {
        tracing::info!(
            ring_version = view.version,
            keys = promoted,
            "promoted replicas of a departed owner"
        );
    }
}

/// Promotes `key`'s replica if its owner has left and this node owns the key now.
/// Called before a key is used (after [`crate::state::Handoffs::ready`]), so a client or publish
/// that arrives before the ring follower gets there still finds the key's history.
pub fn promote_if_due(node: &Arc<Node>, key: &str, view: &View) {
    let Some(owner) = node.replicas.owner_of(key) else {
        return;
    };
    if departed(view, owner.as_ref()) && view.ring.owner(key).is_some_and(|o| o.id == node.id) {
        promote(node, key, view);
    }
}

/// Installs a key handed over by its previous owner. Any replica of it held here is
/// older than what its owner handed over, and goes.
pub fn install(node: &Arc<Node>, key: &str, snapshot: KeySnapshot, view: &View) {
    restore(node, key, || Some(snapshot), view);
    node.replicas.take(key);
}

fn promote(node: &Arc<Node>, key: &str, view: &View) -> bool {
    restore(
        node,
        key,
        || node.replicas.take(key).map(|r| r.into_snapshot()),
        view,
    )
}

fn restore(
    node: &Arc<Node>,
    key: &str,
    take: impl FnOnce() -> Option<KeySnapshot>,
    view: &View,
) -> bool {
    // The document the snapshot carries is installed before the key is sent to its
    // successor (which gets the document from it).
    let mut carried = None;
    let restored = node.keys.restore(key, || {
        let snapshot = take()?;
        carried = documents::carried(key, &snapshot);
        Some(snapshot)
    });
    let Some(early) = restored else {
        return false;
    };
    if let Some(updates) = carried {
        node.docs.install(key, &updates);
    }
    // Clients that reached a fresh state before the promotion reconnect into it.
    if let Some(me) = view.ring.member(&node.id) {
        for s in early {
            s.control
                .kick(redirect_kick(me, &s.redirect_query(), view.version));
        }
    }
    let to_replica = node
        .keys
        .replicate_to(key, successor_of(view, key), view.version);
    replication::dispatch(node, key, to_replica);
    true
}

/// Samples the resident set until shutdown, keeping `node`'s budget and key table
/// up to date.
pub async fn watch_memory(node: Arc<Node>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = node.shutdown.cancelled() => return,
        }
        if let Some(rss) = crate::budget::rss_bytes() {
            let over = node.budget.record(rss);
            node.keys.set_full(over);
        }
    }
}
