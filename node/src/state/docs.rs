//! Collaborative documents: a `doc:` key's Yjs document on its owner, the awareness of
//! its editors, and a bounded broadcast of every change, in the y-websocket protocol's
//! own messages (so a connection forwards them as they are).
//!
//! The document is state derived from the key's log (docs/design.md *Documents*):
//! every update applied to it was first logged as an update of the key (content type
//! [`YJS_UPDATE`](crate::protocol::frames::YJS_UPDATE)) and shown — held by the
//! successor — so an editor never sees an edit the replica lacks. What the log no
//! longer holds, the document's encoded state carries in the key's snapshot
//! ([`KeySnapshot::doc`]) on hand-off, to a new successor, and into the store. Yjs
//! updates commute and applying one twice changes nothing, so whoever rebuilds a
//! document applies that state and every logged update, in any order.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use yrs::sync::{Awareness, Message, SyncMessage};
use yrs::updates::encoder::{Encode, Encoder, EncoderV1};
use yrs::{Doc, GetString, ReadTxn, StateVector, Transact};

use super::log::KeySnapshot;
use crate::protocol::frames;

/// Messages queued for one editor before it misses some (and is closed: it reconnects
/// and syncs again). A queue takes memory as it fills, and lets go of each message
/// once sent.
pub const ROOM_QUEUE: usize = 256;

/// The editors' queues of one document.
#[derive(Default)]
struct Editors {
    next: u64,
    queues: Vec<(u64, mpsc::Sender<Bytes>)>,
}

impl Editors {
    /// Queues `message` for every editor; an editor whose queue is full is dropped
    /// (its receiver ends: it is too far behind).
    fn send(&mut self, message: &Bytes) {
        self.queues
            .retain(|(_, tx)| tx.try_send(message.clone()).is_ok());
    }
}

/// One editor's place in a document: its queue of changes, left when dropped.
pub struct Editor {
    id: u64,
    room: Arc<Room>,
    /// The document's changes for this editor; it ends when the editor fell too far
    /// behind.
    pub changes: mpsc::Receiver<Bytes>,
}

impl Drop for Editor {
    fn drop(&mut self) {
        let id = self.id;
        self.room.editors().queues.retain(|(i, _)| *i != id);
    }
}

/// One document and its editors.
pub struct Room {
    /// The document and its editors' awareness; held only between awaits.
    pub awareness: Mutex<Awareness>,
    /// Every editor's queue of changes (y-protocol messages: updates and awareness).
    editors: Arc<Mutex<Editors>>,
    /// Cancelled when the document leaves this node (its key moved): its editors are
    /// closed, and reconnect to the new owner.
    pub gone: CancellationToken,
    /// About the size of the encoded state: its size when last encoded, plus every
    /// update applied since.
    size: AtomicUsize,
    /// Changed since it was last written to the store.
    dirty: AtomicBool,
}

impl Room {
    fn new() -> Arc<Room> {
        let doc = Doc::new();
        let editors = Arc::new(Mutex::new(Editors::default()));
        let queues = editors.clone();
        doc.observe_update_v1("room", move |_: &yrs::TransactionMut, event| {
            let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
            if !queues.queues.is_empty() {
                let message = Message::Sync(SyncMessage::Update(event.update.clone()));
                queues.send(&Bytes::from(encode(&message)));
            }
        })
        .expect("a new document takes an observer");
        Arc::new(Room {
            awareness: Mutex::new(Awareness::new(doc)),
            editors,
            gone: CancellationToken::new(),
            size: AtomicUsize::new(0),
            dirty: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Awareness> {
        self.awareness.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn editors(&self) -> std::sync::MutexGuard<'_, Editors> {
        self.editors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new editor's queue of the document's changes.
    pub fn join(self: &Arc<Self>) -> Editor {
        let (tx, changes) = mpsc::channel(ROOM_QUEUE);
        let mut editors = self.editors();
        let id = editors.next;
        editors.next += 1;
        editors.queues.push((id, tx));
        Editor {
            id,
            room: self.clone(),
            changes,
        }
    }

    /// Sends `message` to every editor (awareness: the document does not keep it).
    pub fn send(&self, message: Bytes) {
        self.editors().send(&message);
    }

    /// Applies a Yjs update (v1) and tells the editors. An update that does not decode
    /// is refused; one that adds nothing changes nothing.
    pub fn apply(&self, update: &[u8]) -> Result<(), String> {
        let decoded = frames::decode_yjs(update).map_err(|e| format!("malformed update: {e}"))?;
        self.lock()
            .doc()
            .transact_mut()
            .apply_update(decoded)
            .map_err(|e| format!("update not applied: {e}"))?;
        self.size.fetch_add(update.len(), Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The whole document as one Yjs update (v1).
    pub fn state(&self) -> Bytes {
        let state = crate::protocol::ysync::encode_state(
            &self.lock().doc().transact(),
            &StateVector::default(),
        );
        self.size.store(state.len(), Ordering::Relaxed);
        Bytes::from(state)
    }

    /// About the size of the encoded document (at least its real size, measured again
    /// when asked to be `exact`).
    pub fn size(&self, exact: bool) -> usize {
        if exact {
            self.state().len()
        } else {
            self.size.load(Ordering::Relaxed)
        }
    }

    /// Whether `more` bytes of update keep it within `max` (measured exactly when
    /// the estimate says no).
    pub fn fits(&self, more: usize, max: usize) -> bool {
        self.size(false) + more <= max || self.size(true) + more <= max
    }

    /// The text of the document's `Y.Text` named `name` (empty if there is none).
    pub fn text(&self, name: &str) -> String {
        let awareness = self.lock();
        let txn = awareness.doc().transact();
        txn.get_text(name)
            .map(|text| text.get_string(&txn))
            .unwrap_or_default()
    }

    /// Whether it changed since the last call (the store's writer asks).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    /// Marks it changed again (a write to the store failed).
    pub fn set_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Connections editing it here.
    pub fn editor_count(&self) -> usize {
        self.editors().queues.len()
    }
}

/// A y-protocol message's bytes.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut encoder = EncoderV1::new();
    message.encode(&mut encoder);
    encoder.to_vec()
}

/// The document updates a key's snapshot carries: its document's state, then every
/// document update of its log.
pub fn snapshot_updates(snapshot: &KeySnapshot) -> Vec<Vec<u8>> {
    snapshot
        .doc
        .iter()
        .map(|d| d.to_vec())
        .chain(
            snapshot
                .entries
                .iter()
                .filter_map(|e| frames::doc_update(&e.frame)),
        )
        .collect()
}

/// The documents this node holds, by key.
#[derive(Default)]
pub struct Docs {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
}

impl Docs {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Room>>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key`'s document, and whether it was made empty now (not held yet).
    pub fn room(&self, key: &str) -> (Arc<Room>, bool) {
        let mut map = self.map();
        if let Some(room) = map.get(key) {
            return (room.clone(), false);
        }
        let room = Room::new();
        map.insert(key.to_owned(), room.clone());
        (room, true)
    }

    /// `key`'s document, if held here.
    pub fn get(&self, key: &str) -> Option<Arc<Room>> {
        self.map().get(key).cloned()
    }

    /// Removes every document for which `moved` returns true, closing its editors.
    pub fn take_where(
        &self,
        mut moved: impl FnMut(&str, &Room) -> bool,
    ) -> Vec<(String, Arc<Room>)> {
        let mut map = self.map();
        let keys: Vec<String> = map
            .iter()
            .filter(|(k, r)| moved(k, r))
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .filter_map(|key| {
                let room = map.remove(&key)?;
                room.gone.cancel();
                Some((key, room))
            })
            .collect()
    }

    /// Applies `updates` to `key`'s document (made if not held): what a snapshot
    /// brought to its new owner. Updates that do not apply are skipped (each was
    /// checked where it was logged).
    pub fn install(&self, key: &str, updates: &[Vec<u8>]) {
        if updates.is_empty() {
            return;
        }
        let (room, _) = self.room(key);
        for update in updates {
            if let Err(e) = room.apply(update) {
                tracing::warn!(%key, error = %e, "a document update did not apply");
            }
        }
    }

    /// Every document held, with its key.
    pub fn all(&self) -> Vec<(String, Arc<Room>)> {
        self.map()
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    /// How many documents are held.
    pub fn count(&self) -> usize {
        self.map().len()
    }
}

/// A replica's copy of a document: every document update replicated to it, applied.
#[derive(Clone, Default)]
pub struct ReplicaDoc(Doc);

impl ReplicaDoc {
    /// A copy from a document's state and the updates logged beside it.
    pub fn from_updates<'a>(updates: impl IntoIterator<Item = &'a [u8]>) -> ReplicaDoc {
        let doc = ReplicaDoc::default();
        for update in updates {
            doc.apply(update);
        }
        doc
    }

    /// Applies one update (checked by the owner, and by `protocol::peer`); one that
    /// does not apply is skipped.
    pub fn apply(&self, update: &[u8]) {
        if let Ok(update) = frames::decode_yjs(update) {
            if let Err(e) = self.0.transact_mut().apply_update(update) {
                tracing::warn!(error = %e, "a replicated document update did not apply");
            }
        }
    }

    /// The whole document as one update.
    pub fn state(&self) -> Bytes {
        Bytes::from(crate::protocol::ysync::encode_state(
            &self.0.transact(),
            &StateVector::default(),
        ))
    }
}

impl fmt::Debug for ReplicaDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplicaDoc")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{Text, WriteTxn};

    #[test]
    fn a_document_with_updates_yrs_cannot_merge_back_still_gives_its_state() {
        // fuzz/corpus/doc_update/crash-pending-encode: two updates whose waiting parts
        // made yrs 0.28 panic in encode_state_as_update_v1.
        let hex = "00010e01010100020f0101010001000000000000036c05286f0001016d0000";
        let message: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let mut decoder =
            yrs::updates::decoder::DecoderV1::new(yrs::encoding::read::Cursor::new(&message));
        let room = Room::new();
        let mut applied = 0;
        for message in yrs::sync::MessageReader::new(&mut decoder).flatten() {
            if let Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u)) = message {
                if room.apply(&u).is_ok() {
                    applied += 1;
                }
            }
        }
        assert!(applied > 0);
        assert!(room.lock().doc().transact().has_missing_updates());
        let state = room.state();
        assert!(frames::decode_yjs(&state).is_ok());
        let copy = ReplicaDoc::from_updates([&state[..]]);
        assert!(frames::decode_yjs(&copy.state()).is_ok());
    }

    fn edit(text: &str) -> Vec<u8> {
        let doc = Doc::new();
        {
            let mut txn = doc.transact_mut();
            let t = txn.get_or_insert_text("text");
            t.insert(&mut txn, 0, text);
        }
        let state = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        state
    }

    #[test]
    fn a_document_is_rebuilt_from_its_state_and_updates_in_any_order_even_twice() {
        let docs = Docs::default();
        let a = edit("hello");
        docs.install("doc:x", std::slice::from_ref(&a));
        let (room, new) = docs.room("doc:x");
        assert!(!new);
        assert_eq!(room.text("text"), "hello");
        let state = room.state().to_vec();
        let replica = ReplicaDoc::from_updates([state.as_slice(), a.as_slice(), state.as_slice()]);
        let again = Docs::default();
        again.install("doc:x", &[replica.state().to_vec()]);
        assert_eq!(again.room("doc:x").0.text("text"), "hello");
        assert!(room.apply(b"\xff\xff\xff").is_err());
        let taken = docs.take_where(|k, _| k == "doc:x");
        assert_eq!(taken.len(), 1);
        assert!(taken[0].1.gone.is_cancelled());
        assert!(docs.get("doc:x").is_none());
    }
}
