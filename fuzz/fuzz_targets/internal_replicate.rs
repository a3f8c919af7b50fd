//! A peer's `Replicate` request, prost-decoded from arbitrary bytes, applied as
//! `internal.rs` (`replicate_one`) applies it on the successor — valid keys only, the
//! sender taken as their owner (the ring check needs a running node), and only what
//! `protocol::peer::check_snapshot` / `check_entry` accept: snapshots through
//! `replication::snapshot_from_pb` into `Replicas::snapshot`, entries through
//! `replication::entry_from_pb` into `Replicas::entry`, then `Replicas::drop_from` for
//! the dropped keys; finally each replica left is promoted as `cluster/follower.rs`
//! does (`KeyTable::restore` from `Replicas::take`).
//!
//! Asserts: an accepted frame reads back its seq with `frames::update_seq` (what SSE
//! event ids are made from); a snapshot survives `snapshot_pb`/`snapshot_from_pb`
//! whole; every replica keeps its entries in increasing seq
//! order within the limits, holds only what the owner sent (since its last snapshot or
//! epoch change), keeps the newest entry it was sent, takes a snapshot's epoch and
//! idempotency window as sent, an entry's epoch, and remembers an entry's idempotency
//! key within the window; drops happen exactly for held keys; and a promoted replica
//! reads exactly as the docs say a restored key does.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ringfeed_fuzz::{check_accepted_frame, check_replica, limits, KeyModel};
use ringfeed_node::cluster::replication::{entry_from_pb, snapshot_from_pb, snapshot_pb};
use ringfeed_node::protocol::{frames, peer};
use ringfeed_node::state::{KeySnapshot, KeyTable, MemberRef, Replicas};
use ringfeed_proto::v1 as pb;
use ringfeed_router::key;
use ringfeed_router::ring::NodeId;

fn same(a: &KeySnapshot, b: &KeySnapshot) -> bool {
    a.epoch == b.epoch
        && a.seq == b.seq
        && a.idempotency == b.idempotency
        && a.entries.len() == b.entries.len()
        && a.entries.iter().zip(&b.entries).all(|(x, y)| {
            x.seq == y.seq && x.frame == y.frame && x.idempotency_key == y.idempotency_key
        })
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = pb::ReplicateRequest::decode(data) else {
        return;
    };
    let limits = limits();
    let replicas = Replicas::new(limits);
    let owner = MemberRef {
        id: NodeId(request.from.clone()),
        incarnation: "i1".into(),
    };
    // Per key: what the owner sent since the replica was last reset (seq → frame).
    let mut sent: BTreeMap<String, BTreeMap<u64, String>> = BTreeMap::new();

    for snapshot in &request.snapshots {
        if key::validate(&snapshot.key).is_err() {
            continue;
        }
        let key = snapshot.key.as_str();
        if peer::check_snapshot(snapshot, limits.payload()).is_err() {
            continue;
        }
        for e in &snapshot.entries {
            check_accepted_frame(key, e.seq, &e.frame);
        }
        let taken = snapshot_from_pb(snapshot.clone());
        assert_eq!(
            taken.entries.len(),
            snapshot.entries.len(),
            "accepted entries dropped"
        );
        let wire = snapshot_pb(key, &taken).encode_to_vec();
        let back = snapshot_from_pb(pb::ReplicaSnapshot::decode(wire.as_slice()).expect("ours"));
        assert!(same(&back, &taken), "{taken:?} came back as {back:?}");

        replicas.snapshot(key, Some(&owner), taken.clone());
        let held = replicas.copy(key).expect("just taken");
        check_replica(key, &held, &limits);
        assert_eq!(held.epoch, taken.epoch);
        assert_eq!(held.idempotency, taken.idempotency);
        let mut frames_sent = BTreeMap::new();
        for e in &taken.entries {
            frames_sent.insert(e.seq, e.frame.as_str().to_owned());
        }
        if let Some((newest, _)) = frames_sent.last_key_value() {
            assert_eq!(
                held.entries.last().map(|e| e.seq),
                Some(*newest),
                "newest entry lost"
            );
        }
        for e in &held.entries {
            assert_eq!(
                frames_sent.get(&e.seq).map(String::as_str),
                Some(e.frame.as_str())
            );
        }
        sent.insert(key.to_owned(), frames_sent);
    }

    for entry in &request.entries {
        if key::validate(&entry.key).is_err() {
            continue;
        }
        let key = entry.key.as_str();
        if peer::check_entry(entry, limits.payload()).is_err() {
            continue;
        }
        check_accepted_frame(key, entry.seq, &entry.frame);
        let taken = entry_from_pb(entry.clone()).expect("an accepted entry is UTF-8");
        let before = replicas.copy(key);
        let newest_before = before
            .as_ref()
            .filter(|b| b.epoch == entry.epoch)
            .and_then(|b| b.entries.last().map(|e| e.seq));
        if before.as_ref().is_none_or(|b| b.epoch != entry.epoch) {
            sent.remove(key);
        }
        replicas.entry(key, Some(&owner), &entry.epoch, taken.clone());
        let held = replicas.copy(key).expect("just taken");
        check_replica(key, &held, &limits);
        assert_eq!(held.epoch, entry.epoch);
        let frames_sent = sent.entry(key.to_owned()).or_default();
        frames_sent.insert(taken.seq, taken.frame.as_str().to_owned());
        for e in &held.entries {
            assert_eq!(
                frames_sent.get(&e.seq).map(String::as_str),
                Some(e.frame.as_str()),
                "{key:?} holds seq {} it was not sent",
                e.seq
            );
        }
        if newest_before.is_none_or(|n| taken.seq >= n) {
            let last = held.entries.last().expect("an entry was just taken");
            assert_eq!(
                (last.seq, last.frame.as_str()),
                (taken.seq, taken.frame.as_str())
            );
        }
        if !taken.idempotency_key.is_empty() {
            assert!(held.idempotency.len() <= limits.idempotency_window);
            let digest = frames::payload_digest(&taken.frame);
            assert_eq!(
                held.idempotency.last(),
                Some(&(taken.idempotency_key.clone(), taken.seq, digest))
            );
        }
        assert_eq!(replicas.owner_of(key), Some(Some(owner.clone())));
    }

    for key in &request.dropped {
        let held = replicas.copy(key).is_some();
        assert_eq!(replicas.drop_from(key, Some(&owner)), held);
        assert!(replicas.copy(key).is_none());
        sent.remove(key.as_str());
    }

    // The owner is gone: promote every replica.
    let table = KeyTable::new(limits);
    for (key, _) in replicas.owners() {
        let held = replicas.copy(&key).expect("listed");
        let model = KeyModel::restored(&held, &limits);
        let early = table.restore(&key, || replicas.take(&key).map(|r| r.into_snapshot()));
        assert!(early.is_some_and(|subscribers| subscribers.is_empty()));
        model.check_reads(&table, &key);
    }
    assert!(replicas.is_empty());
});
