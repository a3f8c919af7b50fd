//! A ticket or resume token as a client presents it (`?ticket=` or `Authorization:
//! Bearer`), checked by `protocol::ticket::Signer::verify` for key `user:42` with a fixed
//! secret and clock. The seed corpus holds tokens signed with that secret.
//!
//! Asserts: an empty token is `Missing`, one past `MAX_TOKEN` is `Malformed`; the
//! answer does not change when a second, other secret is added (rotation) and is never
//! `Ok` under that other secret alone; a token that verifies is for the key, unexpired,
//! with a subject within `MAX_SUBJECT`, is refused for another key (`OtherKey`) and at
//! its expiry (`Expired`), and its claims signed again verify to the same claims; a
//! ticket (not a resume token) is spent once (`Spent`: `Reused` the second time) and
//! forgotten at its expiry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfeed_fuzz::{signer, NOW, OTHER_SECRET, SECRET, TICKET_KEY};
use ringfeed_node::protocol::ticket::{
    Kind, Signer, SpendError, Spent, TicketError, MAX_SUBJECT, MAX_TOKEN,
};

fuzz_target!(|data: &[u8]| {
    // Query parameters and header values reach the signer as strings.
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let signer = signer();
    let got = signer.verify(Some(token), TICKET_KEY, NOW);
    if token.is_empty() {
        assert_eq!(got, Err(TicketError::Missing));
    }
    if token.len() > MAX_TOKEN {
        assert_eq!(got, Err(TicketError::Malformed));
    }
    let rotating = Signer::new(&[OTHER_SECRET, SECRET]).expect("two secrets");
    assert_eq!(rotating.verify(Some(token), TICKET_KEY, NOW), got);
    let other = Signer::new(&[OTHER_SECRET]).expect("a secret");
    assert!(other.verify(Some(token), TICKET_KEY, NOW).is_err());

    let Ok(claims) = got else {
        return;
    };
    assert_eq!(claims.key, TICKET_KEY);
    assert!(claims.exp > NOW);
    assert!(claims.sub.len() <= MAX_SUBJECT);
    assert!(token.len() <= MAX_TOKEN);
    assert_eq!(
        signer.verify(Some(token), "user:43", NOW),
        Err(TicketError::OtherKey)
    );
    assert_eq!(
        signer.verify(Some(token), TICKET_KEY, claims.exp),
        Err(TicketError::Expired)
    );
    let again = signer.sign(&claims);
    assert_eq!(
        signer.verify(Some(&again), TICKET_KEY, NOW),
        Ok(claims.clone()),
        "{token:?} re-signed as {again:?}"
    );
    assert_eq!(
        other.verify(Some(&again), TICKET_KEY, NOW),
        Err(TicketError::Forged)
    );
    // A single-use ticket is spent once.
    if claims.kind == Kind::Ticket {
        let spent = Spent::default();
        assert_eq!(spent.spend(token, claims.exp, NOW), Ok(()));
        assert_eq!(spent.spend(token, claims.exp, NOW), Err(SpendError::Reused));
        spent.prune(claims.exp);
        assert!(spent.is_empty(), "an expired ticket is still recorded");
    }
});
