//! Collaborative documents: a `doc:` key's Yjs document on its owner, the awareness of
//! its editors, and a bounded broadcast of every change, in the y-websocket protocol's
//! own messages (so a connection forwards them as they are).
//!
//! Built so far: documents in memory on the owner, edited through `/v1/doc/{name}`.
//! Not yet: hand-off, replication, snapshots, gRPC updates (issue 25).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::broadcast;
use yrs::sync::{Awareness, Message, SyncMessage};
use yrs::updates::encoder::{Encode, Encoder, EncoderV1};
use yrs::Doc;

/// Messages queued for a document's slowest editor before it misses some (and is
/// closed: it reconnects and syncs again).
pub const ROOM_QUEUE: usize = 1024;

/// One document and its editors.
pub struct Room {
    /// The document and its editors' awareness; held only between awaits.
    pub awareness: Mutex<Awareness>,
    /// Every change, as a y-protocol message: updates and awareness.
    pub changes: broadcast::Sender<Bytes>,
}

impl Room {
    fn new() -> Arc<Room> {
        let doc = Doc::new();
        let (changes, _) = broadcast::channel(ROOM_QUEUE);
        let tx = changes.clone();
        doc.observe_update_v1("room", move |_: &yrs::TransactionMut, event| {
            let message = Message::Sync(SyncMessage::Update(event.update.clone()));
            // Nobody listening is fine: the document keeps the change.
            let _ = tx.send(Bytes::from(encode(&message)));
        })
        .expect("a new document takes an observer");
        Arc::new(Room {
            awareness: Mutex::new(Awareness::new(doc)),
            changes,
        })
    }
}

/// A y-protocol message's bytes.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut encoder = EncoderV1::new();
    message.encode(&mut encoder);
    encoder.to_vec()
}

/// The documents this node holds, by key.
#[derive(Default)]
pub struct Docs {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
}

impl Docs {
    /// `key`'s document, made empty if it is not held yet.
    pub fn room(&self, key: &str) -> Arc<Room> {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_insert_with(Room::new)
            .clone()
    }
}
