//! Every message of the internal `ringfeed.v1.Node` service a node decodes from a peer
//! or a router, prost-decoded from arbitrary bytes: the requests it serves (Deliver,
//! KeyPresence, Replicate, Handoff, Status, Drain) and the replies it reads as a client
//! (Replicate, Handoff, Status, and Deliver/KeyPresence for completeness). The first
//! byte picks the message.
//!
//! Asserts: what decodes encodes to `encoded_len()` bytes, decodes back equal, and
//! encodes again to the same bytes. For a `StatusReply`, the member records are read
//! as `cluster/fence.rs` reads them (JSON `Member`s, unreadable ones skipped) and the
//! ring built from them holds each record once, sorted by id, with as many points as
//! its active records say. (fence.rs's reading is private; see the report: records
//! with `points` past `MAX_POINTS` are not filtered there, so the harness skips them.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ringfeed_proto::v1 as pb;
use ringfeed_router::ring::{Member, MemberState, Ring, MAX_POINTS};

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let msg = M::decode(bytes).ok()?;
    let encoded = msg.encode_to_vec();
    assert_eq!(encoded.len(), msg.encoded_len(), "{msg:?}");
    let back = M::decode(encoded.as_slice()).expect("what was encoded decodes");
    assert_eq!(back, msg, "a decoded message changed on a round trip");
    assert_eq!(back.encode_to_vec(), encoded, "encoding is not stable");
    Some(msg)
}

/// The ring a peer's status reply describes, as fence.rs builds it.
fn peer_ring(reply: &pb::StatusReply) {
    let members: Vec<Member> = reply
        .members
        .iter()
        .filter_map(|m| serde_json::from_str(m).ok())
        .collect();
    // Each point costs a hash and 12 bytes: keep an input's ring small (and see the
    // module docs for records past MAX_POINTS).
    let points: u64 = members.iter().map(|m| u64::from(m.points)).sum();
    if members.iter().any(|m| m.points > MAX_POINTS) || points > 200_000 {
        return;
    }
    let ring = Ring::new(members.clone());
    let ids: Vec<_> = ring.members().iter().map(|m| &m.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "members not sorted and unique"
    );
    let mut first_of_each: Vec<&Member> = Vec::new();
    for m in &members {
        if !first_of_each.iter().any(|f| f.id == m.id) {
            first_of_each.push(m);
        }
    }
    assert_eq!(ring.members().len(), first_of_each.len());
    let active: usize = first_of_each
        .iter()
        .filter(|m| m.state == MemberState::Active)
        .map(|m| m.points as usize)
        .sum();
    assert_eq!(ring.point_count(), active);
    for m in &first_of_each {
        assert_eq!(
            ring.member(&m.id),
            Some(*m),
            "the first record of an id is kept"
        );
    }
    if active > 0 {
        let owner = ring.owner("user:1").expect("a ring with points has owners");
        assert!(ring.is_active(&owner.id));
    } else {
        assert!(ring.owner("user:1").is_none());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 12 {
        0 => drop(round_trip::<pb::DeliverRequest>(bytes)),
        1 => drop(round_trip::<pb::ReplicateRequest>(bytes)),
        2 => drop(round_trip::<pb::HandoffRequest>(bytes)),
        3 => drop(round_trip::<pb::KeyPresenceRequest>(bytes)),
        4 => drop(round_trip::<pb::StatusRequest>(bytes)),
        5 => drop(round_trip::<pb::DrainRequest>(bytes)),
        6 => drop(round_trip::<pb::ReplicateReply>(bytes)),
        7 => drop(round_trip::<pb::HandoffReply>(bytes)),
        8 => {
            if let Some(reply) = round_trip::<pb::StatusReply>(bytes) {
                peer_ring(&reply);
            }
        }
        9 => drop(round_trip::<pb::DeliverReply>(bytes)),
        10 => drop(round_trip::<pb::KeyPresenceReply>(bytes)),
        _ => drop(round_trip::<pb::ReplicaSnapshot>(bytes)),
    }
});
