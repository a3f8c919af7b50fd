//! A client's WebSocket text frame, as `ws.rs` hands it to
//! `protocol::frames::parse_client`, then what the node does with a publish: the data
//! goes into an `update` frame (`frames::update`) and the id comes back in `ack`/`nack`.
//!
//! Asserts: refusals carry one of the documented codes, `too_deep` exactly when the
//! frame nests past `MAX_JSON_DEPTH + 1`; a publish's data and id written back into a
//! frame parse back equal; data that passed the frame's depth check makes a valid,
//! one-line `update` frame (at the deepest `--max-json-depth`) whose seq reads back,
//! whose `data` is the payload, and which a peer's `protocol::peer::check_update`
//! accepts; the id comes back equal in `ack` and `nack`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfeed_fuzz::json_eq;
use ringfeed_node::protocol::frames::{
    self, json_depth, parse_client, ClientFrame, PayloadLimits, ServerFrame, MAX_JSON_DEPTH,
};
use ringfeed_node::protocol::peer;
use serde_json::value::RawValue;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // tungstenite hands over text frames only once they are valid UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let frame = match parse_client(text) {
        Err(e) => {
            assert!(
                ["too_deep", "bad_json", "bad_frame", "unknown_type"].contains(&e.code),
                "undocumented code {:?}",
                e.code
            );
            assert!(!e.message.is_empty());
            assert_eq!(
                e.code == "too_deep",
                json_depth(text.as_bytes()) > MAX_JSON_DEPTH + 1,
                "{e:?}"
            );
            return;
        }
        Ok(frame) => frame,
    };
    assert!(json_depth(text.as_bytes()) <= MAX_JSON_DEPTH + 1);
    let (data, id) = match frame {
        ClientFrame::Ping => {
            assert!(matches!(
                parse_client(r#"{"type":"ping"}"#),
                Ok(ClientFrame::Ping)
            ));
            return;
        }
        ClientFrame::Publish { data, id } => (data, id),
    };

    // The frame written back parses back to the same publish.
    let again = format!(
        r#"{{"type":"publish","data":{},"id":{}}}"#,
        data.get(),
        serde_json::to_string(&id).expect("a value serialises")
    );
    match parse_client(&again) {
        Ok(ClientFrame::Publish { data: d2, id: id2 }) => {
            assert_eq!(d2.get(), data.get(), "data changed on a round trip");
            assert!(
                json_eq(&id, &id2),
                "id changed on a round trip: {id} vs {id2}"
            );
        }
        other => panic!("{again:?} written back does not parse back: {other:?}"),
    }

    // What ws.rs publishes: the data as JSON. It passed the frame's depth check, so it
    // fits the deepest depth a node may be configured with.
    let limits = PayloadLimits {
        max_payload: usize::MAX,
        max_json_depth: MAX_JSON_DEPTH,
        max_doc_update: usize::MAX,
    };
    let seq = 7;
    let update = frames::update(
        "user:1",
        seq,
        data.get().as_bytes(),
        "application/json",
        limits,
    )
    .unwrap_or_else(|e| panic!("publish data {:?} refused: {e}", data.get()));
    let update = update.as_str();
    assert!(
        !update.contains(['\n', '\r']),
        "update frame spans lines: {update:?}"
    );
    assert_eq!(frames::update_seq(update), Some(seq));
    let prefix = r#"{"type":"update","key":"user:1","seq":7,"data":"#;
    let embedded = update
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or_else(|| panic!("update frame of another shape: {update:?}"));
    assert_eq!(embedded, data.get().trim().replace(['\n', '\r'], " "));
    serde_json::from_str::<&RawValue>(update)
        .unwrap_or_else(|e| panic!("update frame is not JSON ({e}): {update:?}"));
    // The successor takes the frame this node made (`protocol::peer::check_update`).
    let peer_limits = PayloadLimits {
        max_payload: 1 << 20,
        max_json_depth: MAX_JSON_DEPTH,
        max_doc_update: 1 << 20,
    };
    if let Err(e) = peer::check_update("user:1", seq, update.as_bytes(), peer_limits) {
        panic!("a peer refuses the update frame made of this publish ({e}): {update:?}");
    }
    // The digest of an update does not depend on its seq.
    let later = frames::update("user:1", seq + 1000, data.get().as_bytes(), "", limits)
        .expect("same payload");
    assert_eq!(
        frames::payload_digest(update),
        frames::payload_digest(&later)
    );

    // The id comes back as it was sent.
    for reply in [
        ServerFrame::Ack { id: &id, seq }.encode(),
        ServerFrame::Nack {
            id: &id,
            code: "forbidden",
            message: "no",
        }
        .encode(),
    ] {
        let v: Value = serde_json::from_str(reply.as_str())
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", reply.as_str()));
        assert!(
            json_eq(&v["id"], &id),
            "reply {} lost id {id}",
            reply.as_str()
        );
    }
});
