//! The `Last-Event-ID` header of `/v1/sse`, as `protocol::params::last_event_id` reads
//! it (`http/sse.rs` passes it the header once it is visible ASCII; any UTF-8 is fuzzed).
//!
//! Asserts: it is accepted exactly when it is `{epoch}:{seq}` with a valid epoch (the
//! text before the first `:`) and a seq of digits only that fits a u64; an accepted one resumes in its epoch,
//! written back as the server writes event ids it parses back equal, and it resumes
//! where `since={seq}&epoch={epoch}` on the query would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfeed_node::protocol::epoch::valid_epoch;
use ringfeed_node::protocol::params::{last_event_id, ClientQuery};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = last_event_id(value);
    let expected = value
        .split_once(':')
        .filter(|(epoch, _)| valid_epoch(epoch))
        // Digits only (no sign), within u64.
        .filter(|(_, seq)| !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|(epoch, seq)| Some((epoch, seq.parse::<u64>().ok()?)));
    let resume = match (parsed, expected) {
        (Err(e), None) => {
            assert!(e.contains("Last-Event-ID"), "{e:?}");
            return;
        }
        (Ok(resume), Some((epoch, seq))) => {
            assert_eq!(resume.epoch.as_deref(), Some(epoch));
            assert_eq!(resume.since, seq);
            resume
        }
        (got, want) => panic!("{value:?}: parsed {got:?}, expected {want:?}"),
    };
    let epoch = resume.epoch.clone().expect("an epoch");
    let id = format!("{epoch}:{}", resume.since);
    assert_eq!(
        last_event_id(&id),
        Ok(resume.clone()),
        "written back as {id:?}"
    );
    let query = format!("since={}&epoch={epoch}", resume.since);
    let q = ClientQuery::parse(Some(&query)).expect("the same position as a query");
    assert_eq!(q.resume(), Some(resume));
});
