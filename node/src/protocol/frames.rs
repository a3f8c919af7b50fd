//! JSON frames of the client protocol (docs/protocol.md *WebSocket frames*).
//!
//! Server frames on the fan-out path are written by hand into one buffer, once per
//! update, and shared by every subscriber; the rest go through serde.

use std::fmt::Write as _;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub use ringfeed_router::key::MAX_CONTENT_TYPE;

/// The deepest `--max-json-depth` may be: serde_json (ours and most clients') refuses
/// to parse past 128 levels, and an update frame adds one.
pub const MAX_JSON_DEPTH: usize = 120;

/// Why a payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload is {0} bytes; the limit is {1}")]
    TooLarge(usize, usize),
    #[error("content type is {0} bytes; the limit is {MAX_CONTENT_TYPE}")]
    ContentTypeTooLong(usize),
    #[error("JSON payload nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("not a Yjs update (content type application/vnd.yjs.update): {0}")]
    BadDocUpdate(String),
    #[error("the document would grow past its limit of {0} bytes")]
    DocumentFull(usize),
    #[error("payload is not valid JSON for content type {0}: {1}")]
    BadJson(String, String),
}

/// Whether `content_type` is JSON (`application/json` or `…+json`); empty means JSON.
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.is_empty()
        || essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// The `update` frame of `key` at `seq`: JSON payloads go in `data` as they are (after
/// checking they parse), others in `data_b64` beside `content_type`.
pub fn update(
    key: &str,
    seq: u64,
    data: &[u8],
    content_type: &str,
    limits: PayloadLimits,
) -> Result<Utf8Bytes, PayloadError> {
    let max = limits.max_for(key, content_type);
    if data.len() > max {
        return Err(PayloadError::TooLarge(data.len(), max));
    }
    if content_type.len() > MAX_CONTENT_TYPE {
        return Err(PayloadError::ContentTypeTooLong(content_type.len()));
    }
    if is_doc_update(key, content_type) {
        super::ysync::check_update(data).map_err(PayloadError::BadDocUpdate)?;
    }
    let mut out = String::with_capacity(update_capacity(key, data.len(), content_type));
    out.push_str(r#"{"type":"update","key":"#);
    push_json_str(&mut out, key);
    out.push_str(r#","seq":"#);
    write!(out, "{seq}").expect("writing to a String cannot fail");
    if is_json(content_type) {
        let text = std::str::from_utf8(data)
            .map_err(|e| PayloadError::BadJson(display_type(content_type), e.to_string()))?;
        if json_depth(text.as_bytes()) > limits.max_json_depth {
            return Err(PayloadError::TooDeep(limits.max_json_depth));
        }
        serde_json::from_str::<&RawValue>(text)
            .map_err(|e| PayloadError::BadJson(display_type(content_type), e.to_string()))?;
        out.push_str(r#","data":"#);
        // Outside strings a raw CR or LF can only be whitespace (inside one it would not be
        // valid JSON), so blanking them keeps the value and keeps every frame one line —
        // which SSE's `data:` lines need.
        let text = text.trim();
        if text.contains(['\n', '\r']) {
            out.push_str(&text.replace(['\n', '\r'], " "));
        } else {
            out.push_str(text);
        }
    } else {
        out.push_str(r#","data_b64":""#);
        base64::engine::general_purpose::STANDARD.encode_string(data, &mut out);
        out.push_str(r#"","content_type":"#);
        push_json_str(&mut out, content_type);
    }
    out.push('}');
    Ok(Utf8Bytes::from(out))
}

/// The bounds a payload is checked against.
#[derive(Debug, Clone, Copy)]
pub struct PayloadLimits {
    pub max_payload: usize,
    pub max_json_depth: usize,
    /// The largest Yjs update to a document ([`is_doc_update`]), in place of
    /// `max_payload`: a returning editor's sync can carry a whole document.
    pub max_doc_update: usize,
}

impl PayloadLimits {
    /// The largest payload `key` takes in `content_type`.
    pub fn max_for(&self, key: &str, content_type: &str) -> usize {
        if is_doc_update(key, content_type) {
            self.max_doc_update.max(self.max_payload)
        } else {
            self.max_payload
        }
    }
}

/// The content type of a Yjs update (docs/protocol.md *Documents*).
pub const YJS_UPDATE: &str = "application/vnd.yjs.update";

/// Whether a publish of `content_type` to `key` is an update of the key's document:
/// a Yjs update to a `doc:` key.
pub fn is_doc_update(key: &str, content_type: &str) -> bool {
    key.starts_with("doc:")
        && content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case(YJS_UPDATE)
}

pub use super::ysync::decode_yjs;

/// The Yjs update an `update` frame made by [`update`] carries, if it carries one
/// (a frame of a `doc:` key whose content type is [`YJS_UPDATE`]).
pub fn doc_update(frame: &str) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Binary<'a> {
        key: &'a str,
        #[serde(borrow)]
        data_b64: Option<&'a str>,
        #[serde(borrow)]
        content_type: Option<&'a str>,
    }
    if !frame.contains(r#""data_b64":"#) {
        return None;
    }
    let binary: Binary<'_> = serde_json::from_str(frame).ok()?;
    if !is_doc_update(binary.key, binary.content_type?) {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(binary.data_b64?)
        .ok()
}

/// How deeply `json`'s arrays and objects nest (brackets inside strings do not count).
/// It does not check that `json` is valid: that is serde's, after this has made sure
/// that serde's recursion will stay within bounds.
pub fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// What identifies an update's payload apart from its seq: a digest of its frame from
/// the seq on (the data, or the base64 data and content type). An idempotency key
/// reused for another payload is told apart by it. The frame is ours, so the key
/// before the seq holds no `"seq":` (keys have no quotes).
pub fn payload_digest(frame: &str) -> u64 {
    const SEQ: &str = r#","seq":"#;
    let rest = frame
        .find(SEQ)
        .map(|at| &frame[at + SEQ.len()..])
        .map(|rest| rest.trim_start_matches(|c: char| c.is_ascii_digit()))
        .unwrap_or(frame);
    xxhash_rust::xxh3::xxh3_64(rest.as_bytes())
}

/// Room for a whole `update` frame (a key or content type needing escapes may grow
/// it): one allocation, which the log then keeps.
fn update_capacity(key: &str, data_len: usize, content_type: &str) -> usize {
    let payload = if is_json(content_type) {
        data_len
    } else {
        data_len.div_ceil(3) * 4 + 32 + content_type.len()
    };
    64 + key.len() + payload
}

/// The seq of an `update` frame made by [`update`], read without parsing the payload.
pub fn update_seq(frame: &str) -> Option<u64> {
    let rest = frame.strip_prefix(r#"{"type":"update","key":""#)?;
    // Keys hold no quote, so the first `","seq":` ends the key.
    let (_, rest) = rest.split_once(r#"","seq":"#)?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

fn display_type(content_type: &str) -> String {
    if content_type.is_empty() {
        "application/json".into()
    } else {
        content_type.to_owned()
    }
}

fn push_json_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        // Nothing to escape (every valid key): as serde_json writes it, without its
        // allocation.
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("a string serialises"));
    }
}

/// Frames the server sends, other than `update`.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Welcome {
        key: &'a str,
        node: &'a str,
        epoch: &'a str,
        seq: u64,
        heartbeat_ms: u64,
        /// With authentication on: the token to reconnect and follow redirects with.
        #[serde(skip_serializing_if = "Option::is_none")]
        resume: Option<&'a str>,
    },
    Redirect {
        url: &'a str,
        node: &'a str,
        ring_version: u64,
        /// The owner's QUIC address (host:port), when it has one.
        #[serde(skip_serializing_if = "Option::is_none")]
        quic: Option<&'a str>,
    },
    Ack {
        id: &'a serde_json::Value,
        seq: u64,
    },
    Nack {
        id: &'a serde_json::Value,
        code: &'a str,
        message: &'a str,
    },
    Pong,
    Error {
        code: &'a str,
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> Utf8Bytes {
        Utf8Bytes::from(serde_json::to_string(self).expect("server frames serialise"))
    }
}

/// Frames a client may send.
#[derive(Debug)]
pub enum ClientFrame {
    Publish {
        data: Box<RawValue>,
        id: serde_json::Value,
    },
    Ping,
}

/// The wire shape of a client frame. (A `RawValue` cannot sit inside an internally
/// tagged enum, so the tag is read by hand.)
#[derive(Deserialize)]
struct RawClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    /// `None` only when absent: `"data":null` publishes `null`.
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    id: serde_json::Value,
}

/// A field that is there, whatever its value (`null` included); `Option`'s own
/// deserializer would read `null` as absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// Why a client frame was refused: a code for the `error` frame and a message.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

/// Parses one text frame from a client.
pub fn parse_client(text: &str) -> Result<ClientFrame, FrameError> {
    // serde_json stops at 128 levels with a recursion error; say what it is instead.
    if json_depth(text.as_bytes()) > MAX_JSON_DEPTH + 1 {
        return Err(FrameError {
            code: "too_deep",
            message: format!("frame nests deeper than {} levels", MAX_JSON_DEPTH + 1),
        });
    }
    let raw: RawClientFrame<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            FrameError {
                code: "bad_json",
                message: format!("frame is not valid JSON: {e}"),
            }
        } else {
            FrameError {
                code: "bad_frame",
                message: format!("malformed frame: {e}"),
            }
        }
    })?;
    match &*raw.kind {
        "ping" => Ok(ClientFrame::Ping),
        "publish" => match raw.data {
            Some(data) => Ok(ClientFrame::Publish { data, id: raw.id }),
            None => Err(FrameError {
                code: "bad_frame",
                message: "publish frame has no \"data\"".into(),
            }),
        },
        other => Err(FrameError {
            code: "unknown_type",
            message: format!("unknown frame type {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yjs_update_claiming_more_clients_than_its_bytes_hold_is_refused_before_yrs_reserves_room()
    {
        // 0xffffff0f: 2^32 - 1 clients in five bytes.
        assert!(decode_yjs(&[0xff, 0xff, 0xff, 0xff, 0x0f])
            .unwrap_err()
            .contains("claiming"));
        assert!(decode_yjs(&[0x80, 0x80, 0x80, 0x01, 0, 0]).is_err());
        // The empty update: no clients, an empty delete set.
        assert!(decode_yjs(&[0, 0]).is_ok());
    }

    fn lim(max_payload: usize) -> PayloadLimits {
        PayloadLimits {
            max_payload,
            max_json_depth: 64,
            max_doc_update: max_payload,
        }
    }

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(br#"{"a":[1,{"b":2}]}"#), 3);
        assert_eq!(json_depth(br#""[[[[\"[[" "#), 0);
        assert_eq!(json_depth(br#"["\\",[]]"#), 2);
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(json_depth(deep.as_bytes()), 200);
    }

    #[test]
    fn payloads_past_the_limits_are_refused() {
        let at = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(update("k", 1, at.as_bytes(), "", lim(1024)).is_ok());
        let past = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(
            update("k", 1, past.as_bytes(), "", lim(1024)),
            Err(PayloadError::TooDeep(64))
        );
        // Binary payloads are not JSON: their bytes are not looked into.
        assert!(update("k", 1, past.as_bytes(), "text/plain", lim(1024)).is_ok());
        let long_type = format!("text/{}", "x".repeat(251));
        assert_eq!(
            update("k", 1, b"x", &long_type, lim(1024)),
            Err(PayloadError::ContentTypeTooLong(256))
        );
        assert!(update("k", 1, b"x", &long_type[..255], lim(1024)).is_ok());
    }

    #[test]
    fn the_digest_ignores_the_seq_only() {
        let a1 = update("k", 1, b"{\"a\":1}", "", lim(1024)).unwrap();
        let a9 = update("k", 9, b"{\"a\":1}", "", lim(1024)).unwrap();
        let b1 = update("k", 1, b"{\"a\":2}", "", lim(1024)).unwrap();
        let t1 = update("k", 1, b"x", "text/plain", lim(1024)).unwrap();
        let o1 = update("k", 1, b"x", "application/octet-stream", lim(1024)).unwrap();
        assert_eq!(payload_digest(&a1), payload_digest(&a9));
        assert_ne!(payload_digest(&a1), payload_digest(&b1));
        assert_ne!(payload_digest(&t1), payload_digest(&o1));
    }

    #[test]
    fn a_client_frame_too_deep_for_serde_is_named() {
        let deep = format!(
            r#"{{"type":"publish","data":{}1{},"id":"d"}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(parse_client(&deep).unwrap_err().code, "too_deep");
    }

    #[test]
    fn json_updates_embed_data() {
        let f = update(
            "user:1",
            7,
            br#" {"a":[1,2]} "#,
            "application/json",
            lim(1024),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"update","key":"user:1","seq":7,"data":{"a":[1,2]}})
        );
        let f = update("k", 1, b"{\"a\":\r\n 1}", "", lim(1024)).unwrap();
        assert!(!f.as_str().contains(['\n', '\r']));
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["data"]["a"], 1);
        let f = update("k", 1, b"3", "", lim(1024)).unwrap();
        assert_eq!(
            f.as_str(),
            r#"{"type":"update","key":"k","seq":1,"data":3}"#
        );
        assert!(update(
            "k",
            1,
            b"1",
            "application/vnd.x+json; charset=utf-8",
            lim(8)
        )
        .is_ok());
    }

    #[test]
    fn an_update_frame_fits_the_room_made_for_it() {
        for (data, content_type) in [
            (&b"{\"a\":1}"[..], ""),
            (&b"1234567890"[..], "application/json"),
            (&[0u8, 1, 2, 3, 4][..], "application/octet-stream"),
            (&[7u8; 64][..], "x"),
            (&[][..], "application/x-anything-at-all"),
        ] {
            let key = "user:a-fairly-long-key-42";
            let f = update(key, u64::MAX, data, content_type, lim(1024)).unwrap();
            assert!(
                f.len() <= update_capacity(key, data.len(), content_type),
                "{}",
                f.as_str()
            );
        }
    }

    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        for s in [
            "user:42",
            "a/b@c.d_e-f",
            "",
            "quote\"d",
            "back\\slash",
            "tab\t",
            "é",
            "\u{7f}",
        ] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap());
        }
    }

    #[test]
    fn update_seqs_read_back() {
        let f = update("a:b", 42, b"{\"seq\":1}", "", lim(1024)).unwrap();
        assert_eq!(update_seq(f.as_str()), Some(42));
        assert_eq!(update_seq(r#"{"type":"presence"}"#), None);
    }

    #[test]
    fn other_types_go_base64() {
        let f = update("k", 2, &[0, 255], "application/octet-stream", lim(1024)).unwrap();
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["data_b64"], "AP8=");
        assert_eq!(v["content_type"], "application/octet-stream");
    }

    #[test]
    fn bad_payloads_are_refused() {
        assert!(matches!(
            update("k", 1, b"{nope", "application/json", lim(1024)),
            Err(PayloadError::BadJson(..))
        ));
        assert!(matches!(
            update("k", 1, b"1 2", "", lim(1024)),
            Err(PayloadError::BadJson(..))
        ));
        assert!(matches!(
            update("k", 1, &[0xff], "", lim(1024)),
            Err(PayloadError::BadJson(..))
        ));
        assert_eq!(
            update("k", 1, b"12345", "", lim(4)),
            Err(PayloadError::TooLarge(5, 4))
        );
    }

    #[test]
    fn client_frames() {
        assert!(matches!(
            parse_client(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        ));
        match parse_client(r#"{"type":"publish","data":{"x":1},"id":"a1"}"#).unwrap() {
            ClientFrame::Publish { data, id } => {
                assert_eq!(data.get(), r#"{"x":1}"#);
                assert_eq!(id, "a1");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_client("nope").unwrap_err().code, "bad_json");
        assert_eq!(
            parse_client(r#"{"type":"shout"}"#).unwrap_err().code,
            "unknown_type"
        );
        assert_eq!(parse_client(r#"{"kind":1}"#).unwrap_err().code, "bad_frame");
        assert_eq!(
            parse_client(r#"{"type":"publish"}"#).unwrap_err().code,
            "bad_frame"
        );
        // `null` is a JSON value like any other: published, not taken for "no data".
        match parse_client(r#"{"type":"publish","data":null,"id":"n"}"#).unwrap() {
            ClientFrame::Publish { data, .. } => assert_eq!(data.get(), "null"),
            other => panic!("{other:?}"),
        }
    }
}
