//! Tickets and resume tokens (docs/protocol.md *Tickets and authentication*): what a
//! client presents for one key, signed with HMAC-SHA256 over a cluster secret, so any
//! node can check one without asking anybody.
//!
//! A token is `v1.{claims}.{mac}`: the claims as JSON, then the MAC of `v1.{claims}`,
//! both base64url without padding. Several secrets are accepted at once — tokens are
//! signed with the first and checked against each — so a secret can be rotated: add
//! the new one first, wait out the longest ticket, drop the old one. Checking reads the
//! token's bytes only, bounded by [`MAX_TOKEN`], compares MACs in constant time, and
//! says why a token is refused ([`TicketError::reason`], a metric label).
//!
//! A ticket may be spent once only ([`Spent`], `--single-use-tickets`): the owner
//! records it when it admits the connection, until the ticket expires. Resume tokens
//! are never spent: a client presents its one on every reconnect and redirect.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::Mutex;

type HmacSha256 = Hmac<Sha256>;

/// The longest token accepted; anything longer is refused unread.
pub const MAX_TOKEN: usize = 2048;
/// The longest subject (a presence id to other clients).
pub const MAX_SUBJECT: usize = 256;
/// The shortest secret accepted: 32 bytes, the MAC's own size.
pub const MIN_SECRET: usize = 32;

const VERSION: &str = "v1";
/// HMAC-SHA256's tag length.
const TAG_LEN: usize = 32;

/// What a token says of its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who holds it: the presence id other clients see.
    pub sub: String,
    /// The one key it is for.
    pub key: String,
    /// When it stops being valid, in seconds since the Unix epoch.
    pub exp: u64,
    /// Whether the holder may publish from the client.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish: bool,
    /// Whether the holder may see presence.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub presence: bool,
    /// A ticket, or a resume token handed back in `welcome`.
    pub kind: Kind,
    /// Random: no two tickets are alike, even with the same claims in the same second
    /// (a single-use ticket is recorded by its bytes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nonce: String,
}

/// Which kind of token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Issued by `POST /v1/tickets`: short-lived.
    Ticket,
    /// Handed back in `welcome`, to reconnect or follow a redirect with.
    Resume,
}

/// Why a token was refused. Every one is 401 / close 4401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("a ticket is required for this key")]
    Missing,
    #[error("the ticket is not one of ours")]
    Malformed,
    #[error("the ticket's signature does not match")]
    Forged,
    #[error("the ticket has expired")]
    Expired,
    #[error("the ticket is for another key")]
    OtherKey,
    #[error("the ticket does not allow presence")]
    NoPresence,
    #[error("the ticket has been used already")]
    Reused,
}

impl TicketError {
    /// Every refusal, for metrics that list each reason.
    pub const ALL: [TicketError; 7] = [
        TicketError::Missing,
        TicketError::Malformed,
        TicketError::Forged,
        TicketError::Expired,
        TicketError::OtherKey,
        TicketError::NoPresence,
        TicketError::Reused,
    ];

    /// Its `reason` label in `/metrics`.
    pub fn reason(self) -> &'static str {
        match self {
            TicketError::Missing => "missing",
            TicketError::Malformed => "malformed",
            TicketError::Forged => "forged",
            TicketError::Expired => "expired",
            TicketError::OtherKey => "other_key",
            TicketError::NoPresence => "no_presence",
            TicketError::Reused => "reused",
        }
    }
}

/// A secret too short to sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a ticket secret must be at least {MIN_SECRET} bytes (it was {0})")]
pub struct WeakSecret(pub usize);

/// The cluster's ticket secrets: the first signs, every one verifies.
pub struct Signer {
    keys: Vec<HmacSha256>,
}

impl std::fmt::Debug for Signer {
    /// Never the secrets themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} secrets)", self.keys.len())
    }
}

impl Signer {
    /// A signer with `secrets`, newest first; none may be shorter than [`MIN_SECRET`].
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Result<Signer, WeakSecret> {
        let keys = secrets
            .iter()
            .map(|s| {
                let s = s.as_ref();
                if s.len() < MIN_SECRET {
                    return Err(WeakSecret(s.len()));
                }
                Ok(HmacSha256::new_from_slice(s).expect("HMAC takes a key of any length"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(WeakSecret(0));
        }
        Ok(Signer { keys })
    }

    /// `claims` as a token, signed with the newest secret.
    pub fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(claims).expect("claims encode as JSON");
        let signed = format!("{VERSION}.{}", URL_SAFE_NO_PAD.encode(json));
        let mut mac = self.keys[0].clone();
        mac.update(signed.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The claims of `token` if one of the secrets signed it, it is for `key`, and it
    /// has not expired at `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: Option<&str>, key: &str, now: u64) -> Result<Claims, TicketError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(TicketError::Missing)?;
        if token.len() > MAX_TOKEN {
            return Err(TicketError::Malformed);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(TicketError::Malformed)?;
        let payload = signed
            .strip_prefix(VERSION)
            .and_then(|rest| rest.strip_prefix('.'))
            .ok_or(TicketError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TicketError::Malformed)?;
        if payload.is_empty() || tag.len() != TAG_LEN {
            return Err(TicketError::Malformed);
        }
        // The MAC first: nothing a forger wrote is parsed.
        let signed_by_us = self.keys.iter().any(|k| {
            let mut mac = k.clone();
            mac.update(signed.as_bytes());
            mac.verify_slice(&tag).is_ok()
        });
        if !signed_by_us {
            return Err(TicketError::Forged);
        }
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TicketError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TicketError::Malformed)?;
        if claims.sub.len() > MAX_SUBJECT {
            return Err(TicketError::Malformed);
        }
        if claims.exp <= now {
            return Err(TicketError::Expired);
        }
        if claims.key != key {
            return Err(TicketError::OtherKey);
        }
        Ok(claims)
    }
}

/// Single-use tickets spent on this node, each kept until it expires (after which it
/// is refused as expired anyway). Bounded: past [`Spent::CAPACITY`] live tickets, a
/// new one is refused (the caller answers "retry later") rather than forgetting one
/// that could then be used again.
#[derive(Default)]
pub struct Spent {
    /// A ticket's xxh3-128 → its expiry (seconds since the Unix epoch).
    seen: Mutex<HashMap<u128, u64>>,
}

/// Why a single-use ticket was not spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendError {
    /// It was spent before.
    Reused,
    /// Too many live tickets are recorded already.
    Full,
}

impl Spent {
    /// The most live single-use tickets a node records (~48 MB at most).
    pub const CAPACITY: usize = 1 << 20;

    /// Records `token`, valid until `exp`, as spent at `now`, unless it was already.
    pub fn spend(&self, token: &str, exp: u64, now: u64) -> Result<(), SpendError> {
        let id = xxhash_rust::xxh3::xxh3_128(token.as_bytes());
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= Self::CAPACITY {
            seen.retain(|_, exp| *exp > now);
            if seen.len() >= Self::CAPACITY {
                return Err(SpendError::Full);
            }
        }
        match seen.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => Err(SpendError::Reused),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(exp);
                Ok(())
            }
        }
    }

    /// Forgets tickets that have expired by `now`.
    pub fn prune(&self, now: u64) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, exp| *exp > now);
    }

    /// How many are recorded.
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401 / close 4401.
    #[error(transparent)]
    Ticket(#[from] TicketError),
    /// Its address is past its failed authentications: 429 / close 4429.
    #[error("too many failed authentications from this address; retry in {retry_after_ms} ms")]
    Throttled { retry_after_ms: u64 },
    /// Too many single-use tickets are live to record another: retry later.
    #[error("too many single-use tickets in use; retry later")]
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_ticket_is_refused_until_it_is_forgotten_at_expiry() {
        let spent = Spent::default();
        assert_eq!(spent.spend("t1", NOW + 5, NOW), Ok(()));
        assert_eq!(spent.spend("t1", NOW + 5, NOW), Err(SpendError::Reused));
        assert_eq!(spent.spend("t2", NOW + 9, NOW), Ok(()));
        spent.prune(NOW + 5);
        assert_eq!(spent.len(), 1);
    }

    const NOW: u64 = 1_800_000_000;

    fn secret(b: u8) -> Vec<u8> {
        vec![b; 32]
    }

    fn claims(key: &str) -> Claims {
        Claims {
            sub: "user-7".into(),
            key: key.into(),
            exp: NOW + 60,
            publish: false,
            presence: true,
            kind: Kind::Ticket,
            nonce: String::new(),
        }
    }

    #[test]
    fn a_signed_ticket_verifies_for_its_key_until_it_expires() {
        let signer = Signer::new(&[secret(1)]).unwrap();
        let token = signer.sign(&claims("user:42"));
        assert!(token.starts_with("v1.") && token.len() < MAX_TOKEN);
        assert_eq!(
            signer.verify(Some(&token), "user:42", NOW),
            Ok(claims("user:42"))
        );
        assert_eq!(
            signer.verify(Some(&token), "user:43", NOW),
            Err(TicketError::OtherKey)
        );
        assert_eq!(
            signer.verify(Some(&token), "user:42", NOW + 60),
            Err(TicketError::Expired)
        );
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let signer = Signer::new(&[secret(1)]).unwrap();
        let token = signer.sign(&claims("user:42"));
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).unwrap();
            if changed == token {
                continue;
            }
            let refused = signer.verify(Some(&changed), "user:42", NOW);
            assert!(
                matches!(refused, Err(TicketError::Forged | TicketError::Malformed)),
                "byte {i}: {refused:?}"
            );
        }
    }

    #[test]
    fn another_clusters_secret_does_not_verify_and_rotation_keeps_both_valid() {
        let old = Signer::new(&[secret(1)]).unwrap();
        let other = Signer::new(&[secret(9)]).unwrap();
        let token = old.sign(&claims("k"));
        assert_eq!(
            other.verify(Some(&token), "k", NOW),
            Err(TicketError::Forged)
        );
        // Rotating: the new secret signs, the old one still verifies…
        let rotating = Signer::new(&[secret(2), secret(1)]).unwrap();
        assert!(rotating.verify(Some(&token), "k", NOW).is_ok());
        let fresh = rotating.sign(&claims("k"));
        // …until it is dropped.
        let rotated = Signer::new(&[secret(2)]).unwrap();
        assert!(rotated.verify(Some(&fresh), "k", NOW).is_ok());
        assert_eq!(
            rotated.verify(Some(&token), "k", NOW),
            Err(TicketError::Forged)
        );
    }

    #[test]
    fn missing_malformed_and_oversized_tokens_are_named() {
        let signer = Signer::new(&[secret(1)]).unwrap();
        assert_eq!(signer.verify(None, "k", NOW), Err(TicketError::Missing));
        assert_eq!(signer.verify(Some(""), "k", NOW), Err(TicketError::Missing));
        for bad in ["x", "v1.", "v1..", "v2.e30.AAAA", "v1.e30.!!!", "v1.e30"] {
            assert_eq!(
                signer.verify(Some(bad), "k", NOW),
                Err(TicketError::Malformed),
                "{bad}"
            );
        }
        let huge = format!("v1.{}.AAAA", "A".repeat(MAX_TOKEN));
        assert_eq!(
            signer.verify(Some(&huge), "k", NOW),
            Err(TicketError::Malformed)
        );
        // Well signed, but not claims.
        let mut mac = signer.keys[0].clone();
        let signed = format!("v1.{}", URL_SAFE_NO_PAD.encode(b"[1,2]"));
        mac.update(signed.as_bytes());
        let token = format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(
            signer.verify(Some(&token), "k", NOW),
            Err(TicketError::Malformed)
        );
    }

    #[test]
    fn weak_secrets_are_refused_and_never_printed() {
        assert_eq!(Signer::new(&[vec![1u8; 31]]).unwrap_err(), WeakSecret(31));
        assert_eq!(Signer::new::<Vec<u8>>(&[]).unwrap_err(), WeakSecret(0));
        let signer = Signer::new(&[b"0123456789abcdef0123456789abcdef"]).unwrap();
        assert_eq!(format!("{signer:?}"), "Signer(1 secrets)");
        let reasons: Vec<&str> = TicketError::ALL.iter().map(|e| e.reason()).collect();
        assert_eq!(
            reasons,
            [
                "missing",
                "malformed",
                "forged",
                "expired",
                "other_key",
                "no_presence",
                "reused"
            ]
        );
    }
}
