//! Documents among the cluster (docs/design.md *Documents*): opening a document on its
//! owner (from the store when no node brought it), applying logged updates to it once
//! shown, carrying it in its key's snapshots, and writing snapshots to the store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use ringfeed_router::membership::View;

use super::replication::{self, PublishError, Started};
use crate::node::Node;
use crate::protocol::frames;
use crate::state::docs::{snapshot_updates, Room};
use crate::state::{Applied, KeySnapshot, Moved, Publish};

/// `key`'s document on its owner (this node), made if not held. A document made here
/// is loaded from the store when the store has it, and that state is logged as an
/// update of the key, so the successor holds it like any other edit.
pub async fn open(node: &Arc<Node>, key: &str) -> Arc<Room> {
    let (room, new) = node.docs.room(key);
    if !new || node.store.is_none() {
        return room;
    }
    match node.store.load(key).await {
        Ok(Some(state)) => {
            if let Err(e) = room.apply(&state) {
                tracing::warn!(%key, error = %e, "the stored document does not apply");
                return room;
            }
            tracing::debug!(%key, bytes = state.len(), "document loaded from the store");
            let view = node.membership.view();
            let publish = Publish {
                data: &state,
                content_type: frames::YJS_UPDATE,
                ..Publish::default()
            };
            // Logged (it is applied already).
            let logged = replication::start(node, &view, key, publish);
            if let Err(e) = match logged {
                Ok(started) => started.finish(true).await.map(|_| ()),
                Err(e) => Err(e),
            } {
                tracing::warn!(%key, error = %e, "the stored document was not logged");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(%key, error = %e, "the store did not answer"),
    }
    room
}

/// Waits for a started publish (to its end when it carries a document update) and
/// applies its document update to the document once shown. Applying an update twice
/// changes nothing, so a retry of one shown is applied again.
pub async fn finish(
    node: &Arc<Node>,
    key: &str,
    started: Started,
    wait: bool,
) -> Result<(Applied, bool), PublishError> {
    let update = started.doc_update().cloned();
    let finished = started.finish(wait || update.is_some()).await?;
    if let Some(update) = update {
        let room = Box::pin(open(node, key)).await;
        if let Err(e) = room.apply(&update) {
            tracing::warn!(%key, error = %e, "a logged document update did not apply");
        }
    }
    Ok(finished)
}

/// Publishes through `key`'s log on this node (its owner on `view`), as
/// [`replication::publish`] does, applying a document update once shown.
pub async fn publish(
    node: &Arc<Node>,
    view: &View,
    key: &str,
    publish: Publish<'_>,
) -> Result<(Applied, bool), PublishError> {
    let started = replication::start(node, view, key, publish)?;
    finish(node, key, started, true).await
}

/// The keys in `moved` left this node: their documents go with their snapshots (the
/// editors are closed, and reconnect to the new owner), and to the store. Documents
/// `gone` says left without a key state here go to the store alone.
pub fn take_moved(node: &Arc<Node>, moved: &mut [Moved], gone: impl Fn(&str) -> bool) {
    // Only `doc:` keys have documents: index those, not every key a drain moves.
    let docs: std::collections::HashMap<String, usize> = moved
        .iter()
        .enumerate()
        .filter(|(_, m)| m.key.starts_with("doc:"))
        .map(|(i, m)| (m.key.clone(), i))
        .collect();
    let rooms = node
        .docs
        .take_where(|key, _| docs.contains_key(key) || gone(key));
    for (key, room) in rooms {
        let state = room.state();
        if let Some(&i) = docs.get(&key) {
            moved[i].snapshot.doc = Some(state.clone());
        }
        save_later(node, key, state);
    }
}

/// The document updates a snapshot of `key` carries, to install once the key is
/// restored here (`None` for a key that is not a document's).
pub fn carried(key: &str, snapshot: &KeySnapshot) -> Option<Vec<Vec<u8>>> {
    key.starts_with("doc:").then(|| snapshot_updates(snapshot))
}

/// Lets go of documents whose key this node dropped as idle and that nobody edits:
/// their last state goes to the store.
pub fn let_go_idle(node: &Arc<Node>) {
    let idle = node
        .docs
        .take_where(|key, room| room.editor_count() == 0 && !node.keys.has_history(key));
    for (key, room) in idle {
        if room.take_dirty() {
            save_later(node, key, room.state());
        }
    }
}

fn save_later(node: &Arc<Node>, key: String, state: Bytes) {
    if node.store.is_none() {
        return;
    }
    let store = node.store.clone();
    let id = node.id.0.clone();
    node.tasks.spawn(async move {
        if let Err(e) = store.save(&key, &state, &id).await {
            tracing::warn!(%key, error = %e, "a document snapshot was not written");
        }
    });
}

/// Writes every changed document to the store, each `--snapshot-interval-ms`, until
/// shutdown; then once more.
pub async fn write_snapshots(node: Arc<Node>) {
    if node.store.is_none() {
        return;
    }
    let every = Duration::from_millis(node.config.docs.snapshot_interval_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = node.shutdown.cancelled() => true,
        };
        for (key, room) in node.docs.all() {
            if !room.take_dirty() {
                continue;
            }
            let state = room.state();
            match node.store.save(&key, &state, &node.id.0).await {
                Ok(()) => {
                    node.counters
                        .doc_snapshots
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    room.set_dirty();
                    tracing::warn!(%key, error = %e, "a document snapshot was not written");
                }
            }
        }
        if last {
            return;
        }
    }
}
