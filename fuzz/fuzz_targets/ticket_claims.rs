//! Tickets made from structured claims, then damaged: `Signer::sign` and
//! `Signer::verify`, with the fixed secret.
//!
//! The input is text lines: `sub`, `key`, `exp`, flags, `now`, `nonce`, then the rest. Flags:
//! `p` publish, `r` presence, `R` a resume token, `J` raw mode.
//!
//! * Claims mode: the claims are signed; the token must verify exactly as the claims
//!   say (`Ok` with the same claims; `Expired` at or after `exp`; `OtherKey` for
//!   another key; `Malformed` past `MAX_SUBJECT`/`MAX_TOKEN`). The rest is edits
//!   (triples: op, position, byte: set, flip bits, insert, remove, truncate); a token
//!   changed by them must never verify, and is refused as `Forged` or `Malformed`.
//! * Raw mode: the rest is the claims JSON as a buggy or older signer holding the
//!   secret might have written it, MACed with the secret: it must verify exactly when
//!   serde reads it as `Claims` that are valid for the key and time, and claims that
//!   verify signed again verify to the same claims.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use ringfeed_fuzz::{signer, SECRET};
use ringfeed_node::protocol::ticket::{Claims, Kind, TicketError, MAX_SUBJECT, MAX_TOKEN};
use sha2::Sha256;

/// What `verify(token, key, now)` must answer for a token carrying `claims`.
fn expected(claims: &Claims, token: &str, key: &str, now: u64) -> Result<Claims, TicketError> {
    if token.len() > MAX_TOKEN || claims.sub.len() > MAX_SUBJECT {
        Err(TicketError::Malformed)
    } else if claims.exp <= now {
        Err(TicketError::Expired)
    } else if claims.key != key {
        Err(TicketError::OtherKey)
    } else {
        Ok(claims.clone())
    }
}

fn number(line: &[u8]) -> u64 {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(7, |&b| b == b'\n');
    let mut next = || lines.next().unwrap_or(&[]);
    let sub = String::from_utf8_lossy(next()).into_owned();
    let key = String::from_utf8_lossy(next()).into_owned();
    let exp = number(next());
    let flags = next();
    let now = number(next());
    let nonce = String::from_utf8_lossy(next()).into_owned();
    let rest = next();
    let signer = signer();

    if flags.contains(&b'J') {
        // Raw mode: whatever the MAC covers is the claims' JSON.
        let signed = format!("v1.{}", URL_SAFE_NO_PAD.encode(rest));
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("any key length");
        mac.update(signed.as_bytes());
        let token = format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        let got = signer.verify(Some(&token), &key, now);
        let want = if token.len() > MAX_TOKEN || rest.is_empty() {
            Err(TicketError::Malformed)
        } else {
            match serde_json::from_slice::<Claims>(rest) {
                Err(_) => Err(TicketError::Malformed),
                Ok(claims) => expected(&claims, &token, &key, now),
            }
        };
        assert_eq!(got, want, "token {token:?}");
        if let Ok(claims) = got {
            let again = signer.sign(&claims);
            assert_eq!(
                signer.verify(Some(&again), &key, now),
                expected(&claims, &again, &key, now),
                "{token:?} signed again as {again:?}"
            );
        }
        return;
    }

    let claims = Claims {
        sub,
        key,
        exp,
        publish: flags.contains(&b'p'),
        presence: flags.contains(&b'r'),
        kind: if flags.contains(&b'R') {
            Kind::Resume
        } else {
            Kind::Ticket
        },
        nonce,
    };
    let token = signer.sign(&claims);
    assert!(
        token.starts_with("v1.") && token.matches('.').count() == 2,
        "{token:?}"
    );
    assert_eq!(
        signer.verify(Some(&token), &claims.key, now),
        expected(&claims, &token, &claims.key, now)
    );
    let elsewhere = format!("{}x", claims.key);
    assert_eq!(
        signer.verify(Some(&token), &elsewhere, now),
        expected(&claims, &token, &elsewhere, now)
    );

    let mut bytes = token.clone().into_bytes();
    for edit in rest.chunks_exact(3) {
        let (op, at, byte) = (edit[0] % 5, usize::from(edit[1]), edit[2]);
        let at = at * (bytes.len() + 1) / 256;
        match op {
            0 if at < bytes.len() => bytes[at] = byte,
            1 if at < bytes.len() => bytes[at] ^= byte | 1,
            2 => bytes.insert(at.min(bytes.len()), byte),
            3 if at < bytes.len() => {
                bytes.remove(at);
            }
            4 => bytes.truncate(at),
            _ => {}
        }
    }
    let Ok(changed) = String::from_utf8(bytes) else {
        return;
    };
    if changed == token {
        return;
    }
    let got = signer.verify(Some(&changed), &claims.key, now);
    assert!(
        matches!(
            got,
            Err(TicketError::Forged | TicketError::Malformed | TicketError::Missing)
        ),
        "{token:?} changed to {changed:?} is {got:?}"
    );
    assert_eq!(got == Err(TicketError::Missing), changed.is_empty());
});
