//! The query string of `/v1/connect`, `/v1/sse` and `/v1/poll` (and `/v1/route`), as
//! `protocol::params::ClientQuery::parse` reads it.
//!
//! Asserts: a refusal names a parameter the query holds ("invalid {name} …"); an
//! accepted query keeps its raw text, has `wait` ≤ `MAX_WAIT_S` and a valid epoch,
//! resumes exactly when it has `since`, presents its resume token
//! before its ticket; written back with `form_urlencoded` it parses
//! back to the same values; and no query at all parses like an empty one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfeed_node::protocol::epoch::valid_epoch;
use ringfeed_node::protocol::params::{ClientQuery, Resume, MAX_WAIT_S};

fn fields(q: &ClientQuery) -> impl PartialEq + std::fmt::Debug {
    (
        q.ticket.clone(),
        q.resume_token.clone(),
        q.key.clone(),
        q.since,
        q.epoch.clone(),
        q.rv,
        q.presence,
        q.wait,
    )
}

fuzz_target!(|data: &[u8]| {
    // A URI's query is ASCII; percent-escapes decode to anything, which this covers.
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let q = match ClientQuery::parse(Some(query)) {
        Err(e) => {
            let named = ["since", "rv", "wait", "epoch", "presence"]
                .into_iter()
                .find(|name| e.starts_with(&format!("invalid {name} ")))
                .unwrap_or_else(|| panic!("refusal names no parameter: {e:?}"));
            assert!(
                form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == named),
                "{e:?} names a parameter {query:?} does not have"
            );
            return;
        }
        Ok(q) => q,
    };
    assert_eq!(&*q.raw, query);
    assert_eq!(
        q.credential(),
        q.resume_token.as_deref().or(q.ticket.as_deref()),
        "the resume token is presented before the ticket"
    );
    assert!(q.wait.is_none_or(|w| w <= MAX_WAIT_S), "{:?}", q.wait);
    assert!(q.epoch.as_deref().is_none_or(valid_epoch), "{:?}", q.epoch);
    assert_eq!(
        q.resume(),
        q.since.map(|since| Resume {
            since,
            epoch: q.epoch.clone()
        })
    );

    let mut out = form_urlencoded::Serializer::new(String::new());
    if let Some(key) = &q.key {
        out.append_pair("key", key);
    }
    if let Some(ticket) = &q.ticket {
        out.append_pair("ticket", ticket);
    }
    if let Some(token) = &q.resume_token {
        out.append_pair("resume", token);
    }
    if let Some(since) = q.since {
        out.append_pair("since", &since.to_string());
    }
    if let Some(epoch) = &q.epoch {
        out.append_pair("epoch", epoch);
    }
    if let Some(rv) = q.rv {
        out.append_pair("rv", &rv.to_string());
    }
    if let Some(wait) = q.wait {
        out.append_pair("wait", &wait.to_string());
    }
    out.append_pair("presence", if q.presence { "1" } else { "0" });
    let written = out.finish();
    let back = ClientQuery::parse(Some(&written))
        .unwrap_or_else(|e| panic!("{query:?} written back as {written:?} is refused: {e}"));
    assert_eq!(
        fields(&back),
        fields(&q),
        "{query:?} written back as {written:?}"
    );

    if query.is_empty() {
        let none = ClientQuery::parse(None).expect("no query is fine");
        assert_eq!(fields(&none), fields(&q));
    }
});
