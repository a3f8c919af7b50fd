//! What a node checks of the state a peer sends it (replication and hand-off) before
//! storing any of it: an authenticated peer may still be buggy or compromised, and one
//! node must not be able to make another serve text of its choosing as a key's updates.
//!
//! A key's entries must be `update` frames this code could have made for that key and
//! seq — byte for byte what [`super::frames::update`] writes for their payload (so every
//! reader of frames, `update_seq` and the idempotency digest among them, sees the layout
//! it expects) — with seqs strictly rising and at most [`MAX_SEQ`], under one valid
//! epoch.

use std::borrow::Cow;

use base64::Engine;
use ringfeed_proto::v1 as pb;
use ringfeed_router::key::{self, MAX_IDEMPOTENCY_KEY};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::epoch::valid_epoch;
use super::frames::{json_depth, update, PayloadLimits, MAX_CONTENT_TYPE};

/// The largest seq a peer may send: 2^53, the largest integer a JavaScript client reads
/// exactly, and far from `u64::MAX`, so no seq arithmetic can overflow.
pub const MAX_SEQ: u64 = 1 << 53;

/// An update frame's fields, as [`super::frames::update`] writes them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    key: Cow<'a, str>,
    seq: u64,
    /// Present, whatever its value: `null` is a payload too.
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data_b64: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content_type: Option<Cow<'a, str>>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as Deserialize>::deserialize(d).map(Some)
}

/// The longest update frame of `key` a payload of `limits` makes (base64 is the larger
/// form; a document's key takes larger updates).
fn max_frame(key: &str, limits: PayloadLimits) -> usize {
    let payload = if key.starts_with("doc:") {
        limits.max_payload.max(limits.max_doc_update)
    } else {
        limits.max_payload
    };
    payload.div_ceil(3) * 4 + key::MAX_KEY_LEN * 6 + MAX_CONTENT_TYPE * 6 + 256
}

/// Checks that `frame` is the update frame of `key` at `seq`.
pub fn check_update(
    key: &str,
    seq: u64,
    frame: &[u8],
    limits: PayloadLimits,
) -> Result<(), String> {
    if frame.len() > max_frame(key, limits) {
        return Err(format!(
            "a frame of {} bytes is over the limit",
            frame.len()
        ));
    }
    let text = std::str::from_utf8(frame).map_err(|_| "a frame is not UTF-8".to_owned())?;
    if text.contains(['\n', '\r']) {
        return Err("a frame spans lines".into());
    }
    // The payload's depth is bounded before serde recurses into it (+1: the frame).
    if json_depth(frame) > limits.max_json_depth + 1 {
        return Err("a frame nests too deeply".into());
    }
    let parsed: UpdateFrame<'_> =
        serde_json::from_str(text).map_err(|e| format!("not an update frame: {e}"))?;
    if parsed.kind != "update" || parsed.key != key || parsed.seq != seq {
        return Err(format!(
            "a frame for {:?} seq {} where {key:?} seq {seq} was named",
            parsed.key, parsed.seq
        ));
    }
    if seq > MAX_SEQ {
        return Err(format!("seq {seq} is past {MAX_SEQ}"));
    }
    // The frame this node would write for that payload must be the very same bytes.
    let rebuilt = match (parsed.data, parsed.data_b64, parsed.content_type) {
        (Some(data), None, None) => update(key, seq, data.get().as_bytes(), "", limits),
        (None, Some(b64), Some(content_type)) => {
            if content_type.len() > MAX_CONTENT_TYPE {
                return Err("a content type over the limit".into());
            }
            let data = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| "data_b64 is not base64".to_owned())?;
            update(key, seq, &data, &content_type, limits)
        }
        _ => return Err("an update frame has either data or data_b64 and content_type".into()),
    }
    .map_err(|e| format!("its payload: {e}"))?;
    if rebuilt.as_bytes() == frame {
        Ok(())
    } else {
        Err("not laid out as a node writes an update frame".into())
    }
}

/// Checks one replicated entry (its key named, its epoch valid, its frame its own).
pub fn check_entry(entry: &pb::ReplicaEntry, limits: PayloadLimits) -> Result<(), String> {
    key::validate(&entry.key).map_err(|e| format!("invalid key: {e}"))?;
    if !valid_epoch(&entry.epoch) {
        return Err("invalid epoch".into());
    }
    if entry.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err("idempotency key over the limit".into());
    }
    check_update(&entry.key, entry.seq, &entry.frame, limits)
}

/// Checks a key's whole state, as a replica or a hand-off carries it: a valid key and
/// epoch; entries of that key and epoch (or naming none), seqs strictly rising; an
/// idempotency window of well-formed records.
pub fn check_snapshot(snapshot: &pb::ReplicaSnapshot, limits: PayloadLimits) -> Result<(), String> {
    key::validate(&snapshot.key).map_err(|e| format!("invalid key: {e}"))?;
    if !valid_epoch(&snapshot.epoch) {
        return Err("invalid epoch".into());
    }
    if snapshot.seq > MAX_SEQ {
        return Err(format!("seq {} is past {MAX_SEQ}", snapshot.seq));
    }
    let mut last = None;
    for entry in &snapshot.entries {
        if !entry.key.is_empty() && entry.key != snapshot.key {
            return Err(format!(
                "an entry of {:?} in {:?}'s state",
                entry.key, snapshot.key
            ));
        }
        if !entry.epoch.is_empty() && entry.epoch != snapshot.epoch {
            return Err("an entry of another epoch".into());
        }
        if last.is_some_and(|last| entry.seq <= last) {
            return Err(format!("seq {} after seq {}", entry.seq, last.unwrap_or(0)));
        }
        last = Some(entry.seq);
        if entry.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err("idempotency key over the limit".into());
        }
        check_update(&snapshot.key, entry.seq, &entry.frame, limits)?;
    }
    let bad_record = |r: &pb::IdempotencyRecord| {
        r.id.is_empty() || r.id.len() > MAX_IDEMPOTENCY_KEY || r.seq > MAX_SEQ
    };
    if snapshot.idempotency.iter().any(bad_record) {
        return Err("an idempotency record with an empty or too long id, or past MAX_SEQ".into());
    }
    if !snapshot.doc.is_empty() {
        if !snapshot.key.starts_with("doc:") {
            return Err("a document in the state of a key that is not a doc: key".into());
        }
        super::frames::decode_yjs(&snapshot.doc).map_err(|e| format!("document: {e}"))?;
    }
    Ok(())
}

/// Checks that a key's state is within the sizes a node keeps: at most `max_entries`
/// entries and `max_window` idempotency records (a sender keeps no more; anything past
/// that is a peer trying to make this node hold what it would not).
pub fn check_sizes(
    snapshot: &pb::ReplicaSnapshot,
    max_entries: usize,
    max_window: usize,
) -> Result<(), String> {
    if snapshot.entries.len() > max_entries || snapshot.idempotency.len() > max_window {
        return Err(format!(
            "{} entries and {} idempotency records, past {max_entries} and {max_window}",
            snapshot.entries.len(),
            snapshot.idempotency.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frames::update;

    const LIMITS: PayloadLimits = PayloadLimits {
        max_payload: 1024,
        max_json_depth: 8,
        max_doc_update: 1024,
    };

    fn frame(key: &str, seq: u64, data: &[u8], content_type: &str) -> Vec<u8> {
        update(key, seq, data, content_type, LIMITS)
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    fn entry(key: &str, seq: u64, frame: Vec<u8>) -> pb::ReplicaEntry {
        pb::ReplicaEntry {
            key: key.into(),
            epoch: "e1".into(),
            seq,
            frame,
            idempotency_key: String::new(),
        }
    }

    #[test]
    fn frames_we_make_pass_and_others_do_not() {
        for (data, ct) in [
            (&b"{\"a\":[1,2]}"[..], ""),
            (b"\x00\xff", "application/octet-stream"),
        ] {
            let f = frame("user:1", 7, data, ct);
            assert_eq!(check_update("user:1", 7, &f, LIMITS), Ok(()));
            assert!(check_update("user:2", 7, &f, LIMITS).is_err());
            assert!(check_update("user:1", 8, &f, LIMITS).is_err());
        }
        for bad in [
            &b"hello, I am not an update"[..],
            br#"{"type":"welcome","key":"user:1","seq":7}"#,
            br#"{"type":"update","key":"user:1","seq":7}"#,
            br#"{"type":"update","key":"user:1","seq":7,"data":1,"evil":true}"#,
            br#"{"type":"update","key":"user:1","seq":7,"data":1,"data_b64":"AA==","content_type":"x"}"#,
            br#"{"type":"update","key":"user:1","seq":7,"data_b64":"!!","content_type":"x"}"#,
            b"{\"type\":\"update\",\"key\":\"user:1\",\"seq\":7,\"data\":\n1}",
            br#"{"type":"update","key":"user:1","seq":7,"data":[[[[[[[[[[1]]]]]]]]]]}"#,
            // Valid JSON, but not as a node lays a frame out: readers of frames that
            // expect that layout (`update_seq`) would not find the seq.
            br#"{"type": "update", "key": "user:1", "seq": 7, "data": 1}"#,
            br#"{"key":"user:1","type":"update","seq":7,"data":1}"#,
        ] {
            assert!(check_update("user:1", 7, bad, LIMITS).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let huge = vec![b' '; 4096];
        assert!(check_update("user:1", 7, &huge, LIMITS).is_err());
        // `null` is a payload like any other.
        let null = frame("user:1", 7, b"null", "");
        assert_eq!(check_update("user:1", 7, &null, LIMITS), Ok(()));
        // No seq near the end of u64: arithmetic on it could overflow.
        let far = frame("user:1", MAX_SEQ + 1, b"1", "");
        assert!(check_update("user:1", MAX_SEQ + 1, &far, LIMITS).is_err());
    }

    #[test]
    fn a_snapshot_must_be_one_keys_in_rising_order() {
        let good = pb::ReplicaSnapshot {
            key: "k".into(),
            epoch: "e1".into(),
            seq: 2,
            entries: vec![
                entry("k", 1, frame("k", 1, b"1", "")),
                entry("k", 2, frame("k", 2, b"2", "")),
            ],
            idempotency: vec![],
            ..Default::default()
        };
        assert_eq!(check_snapshot(&good, LIMITS), Ok(()));
        let mut swapped = good.clone();
        swapped.entries.reverse();
        assert!(check_snapshot(&swapped, LIMITS).is_err());
        let mut foreign = good.clone();
        foreign.entries[1] = entry("j", 2, frame("j", 2, b"2", ""));
        assert!(check_snapshot(&foreign, LIMITS).is_err());
        let mut bad_epoch = good.clone();
        bad_epoch.epoch = "no spaces".into();
        assert!(check_snapshot(&bad_epoch, LIMITS).is_err());
        assert_eq!(check_entry(&good.entries[0], LIMITS), Ok(()));
        assert!(check_entry(&entry("k", 1, b"text".to_vec()), LIMITS).is_err());
    }
}
