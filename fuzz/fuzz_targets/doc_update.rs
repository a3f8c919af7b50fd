//! A document editor's WebSocket message on `/v1/doc/{name}` (the y-websocket
//! protocol: sync step 1, sync step 2, update, awareness, awareness query; several may
//! share a message), checked and read as `http/doc.rs` does (`protocol::ysync::check`,
//! then yrs's `MessageReader`), and what the owner does with each
//! update in it: the node's own check (`frames::decode_yjs`), the document
//! (`state::docs::Room::apply`), the frame it is logged as (`frames::update`, content
//! type `YJS_UPDATE`), read back as a successor and a snapshot do
//! (`frames::doc_update`, `protocol::peer::check_update`), and the successor's copy
//! (`state::docs::ReplicaDoc`).
//!
//! Asserts: nothing panics, and nothing runs away in time or memory (libFuzzer's
//! limits); an update `decode_yjs` accepts is applied or refused with a reason; the
//! logged frame gives back the same bytes, and a peer accepts it; applying an update
//! again leaves the document's state as it was; a copy rebuilt from the document's
//! state alone (as a hand-off or the store rebuilds one) has the same state vector.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfeed_node::protocol::frames::{self, PayloadLimits, MAX_JSON_DEPTH, YJS_UPDATE};
use ringfeed_node::protocol::peer;
use ringfeed_node::state::docs::{Docs, ReplicaDoc};
use yrs::encoding::read::Cursor;
use yrs::sync::{Awareness, Message, MessageReader, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::{Doc, ReadTxn, StateVector, Transact};

/// The state vector of a whole-document update (`Room::state`, `ReplicaDoc::state`).
fn state_vector(state: &[u8]) -> StateVector {
    let doc = Doc::new();
    let update = yrs::Update::decode_v1(state).expect("a document's own state decodes");
    doc.transact_mut()
        .apply_update(update)
        .expect("a document's own state applies");
    let sv = doc.transact().state_vector();
    sv
}

/// yrs checks some of what it reads from the wire only with debug assertions and
/// overflow checks (a client id past 53 bits in `ClientID::new`, a clock that overflows
/// in `Update::decode`), and masks or wraps in release builds, the node's among them.
/// This build has both on, so those panics, raised inside yrs as debug checks, are let
/// through (the input dropped); every other panic still aborts, as libFuzzer expects.
fn allow_yrs_debug_checks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_yrs = info.location().is_some_and(|l| l.file().contains("/yrs-"));
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|m| m.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let debug_check =
                message.starts_with("attempt to ") || message.starts_with("assertion failed");
            if !(in_yrs && debug_check) {
                abort(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    allow_yrs_debug_checks();
    let _ = std::panic::catch_unwind(|| run(data));
});

fn run(data: &[u8]) {
    let docs = Docs::default();
    let (room, _) = docs.room("doc:fuzz");
    let mut awareness = Awareness::new(Doc::new());
    let limits = PayloadLimits {
        max_payload: 1 << 20,
        max_json_depth: MAX_JSON_DEPTH,
        max_doc_update: 1 << 20,
    };
    // What `http/doc.rs` checks before yrs reads the message (a refusal closes the
    // editor with 4400).
    if ringfeed_node::protocol::ysync::check(data).is_err() {
        return;
    }
    let mut decoder = DecoderV1::new(Cursor::new(data));
    let mut applied = Vec::new();
    for (seq, message) in MessageReader::new(&mut decoder).enumerate() {
        let Ok(message) = message else {
            // The editor is closed with 4400; nothing of this message is kept.
            break;
        };
        let update = match message {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                // Answered with the document's state since `sv`.
                let _ = room.state();
                let _ = Doc::new().transact().encode_state_as_update_v1(&sv);
                continue;
            }
            Message::Sync(SyncMessage::SyncStep2(update) | SyncMessage::Update(update)) => update,
            Message::Awareness(update) => {
                let _ = awareness.apply_update_summary(update);
                continue;
            }
            Message::AwarenessQuery => {
                let _ = awareness.update();
                continue;
            }
            Message::Auth(_) | Message::Custom(..) => continue,
        };
        let Ok(decoded) = frames::decode_yjs(&update) else {
            continue;
        };
        if decoded.is_empty() {
            continue;
        }
        // Logged as the key's update frame; a successor and a snapshot read it back.
        let seq = seq as u64 + 1;
        // The owner refuses an update that would leave a document whose state does not
        // read back (`protocol::ysync::check_update`), before it is logged.
        let frame = match frames::update("doc:fuzz", seq, &update, YJS_UPDATE, limits) {
            Ok(frame) => frame,
            Err(frames::PayloadError::BadDocUpdate(_)) => continue,
            Err(e) => panic!("a decoded update of {} bytes refused: {e}", update.len()),
        };
        assert_eq!(
            frames::doc_update(frame.as_str()).as_deref(),
            Some(&update[..]),
            "the logged frame gives back other bytes"
        );
        if let Err(e) = peer::check_update("doc:fuzz", seq, frame.as_str().as_bytes(), limits) {
            panic!("a peer refuses the logged frame ({e})");
        }
        match room.apply(&update) {
            Ok(()) => applied.push(update),
            Err(e) => assert!(!e.is_empty(), "a refusal without a reason"),
        }
    }
    if applied.is_empty() {
        return;
    }
    let state = room.state();
    // Applying an update again changes nothing.
    for update in &applied {
        room.apply(update).expect("it applied once");
    }
    assert_eq!(
        state_vector(&room.state()),
        state_vector(&state),
        "applying the updates again changed the document"
    );
    // A copy from the state alone is the same document; so is one from every update.
    let from_state = ReplicaDoc::from_updates([&state[..]]);
    assert_eq!(state_vector(&from_state.state()), state_vector(&state));
    let from_log = ReplicaDoc::from_updates(applied.iter().map(Vec::as_slice));
    assert_eq!(state_vector(&from_log.state()), state_vector(&state));
}
