//! Routing keys: 1–256 bytes of `A-Z a-z 0-9 . _ - : @ /` (docs/protocol.md *Keys*).

use std::fmt;

/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// The longest `content_type` of a publish, in bytes (RFC 6838's 127 + `/` + 127,
/// rounded to 255 as docs/protocol.md states it).
pub const MAX_CONTENT_TYPE: usize = 255;

/// The longest idempotency key of a publish, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The longest `expected_epoch` of a publish, in bytes (epochs are 16 characters).
pub const MAX_EPOCH: usize = 64;

/// The largest encoded batch of `max_batch` publishes of at most `max_payload` bytes
/// each, every other field at its limit, plus framing: what a gRPC server that takes
/// such a batch (the router's `PublishBatch`, a node's `Deliver`) needs to decode.
pub fn max_batch_message(max_batch: usize, max_payload: usize) -> usize {
    let item = max_payload + MAX_KEY_LEN + MAX_CONTENT_TYPE + MAX_IDEMPOTENCY_KEY + MAX_EPOCH + 64;
    max_batch.saturating_mul(item).saturating_add(64 * 1024)
}

/// A validated routing key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

/// Why a key was refused; the message is shown to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is empty")]
    Empty,
    #[error("key is {0} bytes long; the limit is 256")]
    TooLong(usize),
    #[error("key has a character outside A-Z a-z 0-9 . _ - : @ / at byte {0}")]
    BadChar(usize),
}

impl Key {
    /// Validates `raw` as a key.
    pub fn parse(raw: &str) -> Result<Key, KeyError> {
        validate(raw)?;
        Ok(Key(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this key holds a collaborative document.
    pub fn is_doc(&self) -> bool {
        self.0.starts_with("doc:")
    }
}

/// Checks `raw` against the key grammar without allocating.
pub fn validate(raw: &str) -> Result<(), KeyError> {
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    if raw.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(raw.len()));
    }
    match raw.bytes().position(|b| !is_key_byte(b)) {
        Some(at) => Err(KeyError::BadChar(at)),
        None => Ok(()),
    }
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@' | b'/')
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_grammar() {
        for ok in [
            "user:42",
            "doc:roadmap",
            "a",
            "A-Z_a.z@x/y",
            &"k".repeat(256),
        ] {
            assert!(Key::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_the_rest() {
        assert_eq!(Key::parse(""), Err(KeyError::Empty));
        assert_eq!(Key::parse(&"k".repeat(257)), Err(KeyError::TooLong(257)));
        assert_eq!(Key::parse("user 42"), Err(KeyError::BadChar(4)));
        assert_eq!(Key::parse("ü"), Err(KeyError::BadChar(0)));
        assert_eq!(Key::parse("a%2F"), Err(KeyError::BadChar(1)));
    }
}
