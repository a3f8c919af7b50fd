//! A peer's `Handoff` request, prost-decoded from arbitrary bytes, applied as
//! `internal.rs` (`handoff`) applies it on the new owner — only snapshots that
//! `protocol::peer::check_snapshot` accepts, this node taken as their owner (the ring
//! check needs a running node): each snapshot through
//! `replication::snapshot_from_pb`, then, for an offer, into `Replicas::offer` (what
//! `Node::offer` does for a key without history); otherwise installed with
//! `KeyTable::restore` (what `cluster::follower::install` does before it replicates).
//! Then each installed key takes a publish and is handed off again, through the wire
//! form, to a second node.
//!
//! Asserts: an accepted frame reads back its seq with `frames::update_seq` (what SSE
//! event ids are made from); an offered replica replaces the one held only when newer (epoch, then
//! seq), never moves backwards, and stays within the limits; an installed key reads
//! exactly as the docs say (epoch, seq, the entries up to the first gap trimmed to the
//! history limits, resets for another epoch, a `since` ahead or gone); its restored
//! idempotency keys answer as duplicates (or conflicts for another payload); its next
//! publish gets the next seq; and handed off again its snapshot passes the next node's
//! `check_snapshot` and reads the same there.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ringfeed_fuzz::{check_accepted_frame, check_replica, limits, KeyModel};
use ringfeed_node::cluster::replication::{snapshot_from_pb, snapshot_pb};
use ringfeed_node::protocol::{frames, peer};
use ringfeed_node::state::{
    ApplyError, KeyTable, MemberRef, Publish, Replicas, Staged, ToReplica, MAX_IDEMPOTENCY_KEY,
};
use ringfeed_proto::v1 as pb;
use ringfeed_router::key;
use ringfeed_router::ring::NodeId;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = pb::HandoffRequest::decode(data) else {
        return;
    };
    let limits = limits();
    let replicas = Replicas::new(limits);
    let table = KeyTable::new(limits);
    let mut installed: BTreeMap<String, KeyModel> = BTreeMap::new();

    for snapshot in request.snapshots {
        if peer::check_snapshot(&snapshot, limits.payload()).is_err() {
            continue;
        }
        assert!(
            key::validate(&snapshot.key).is_ok(),
            "a snapshot of an invalid key accepted"
        );
        for e in &snapshot.entries {
            check_accepted_frame(&snapshot.key, e.seq, &e.frame);
        }
        let key = snapshot.key.clone();
        let taken = snapshot_from_pb(snapshot);
        if request.offered {
            let before = replicas
                .copy(&key)
                .map(|b| (b.epoch.clone(), b.seq, b.entries.len()));
            let last = taken.entries.last().map_or(0, |e| e.seq);
            let newer = before.as_ref().is_none_or(|(epoch, seq, _)| {
                (epoch.as_str(), *seq) < (taken.epoch.as_str(), last)
            });
            replicas.offer(&key, taken.clone());
            let held = replicas.copy(&key).expect("offered");
            check_replica(&key, &held, &limits);
            if newer {
                assert_eq!(held.epoch, taken.epoch);
                assert_eq!(held.idempotency, taken.idempotency);
                assert_eq!(
                    replicas.owner_of(&key),
                    Some(None),
                    "an offered replica's owner is unknown"
                );
            } else {
                assert_eq!(
                    Some((held.epoch.clone(), held.seq, held.entries.len())),
                    before
                );
            }
            if let Some((epoch, seq, _)) = &before {
                assert!(
                    (held.epoch.as_str(), held.seq) >= (epoch.as_str(), *seq),
                    "{key:?} moved back from {epoch}:{seq} to {}:{}",
                    held.epoch,
                    held.seq
                );
            }
        } else {
            let had = table.has_history(&key);
            let early = table.restore(&key, || Some(taken.clone()));
            assert_eq!(early.is_some(), !had, "restored over history");
            if early.is_some() {
                let model = KeyModel::restored(&taken, &limits);
                assert_eq!(table.has_history(&key), model.seq > 0);
                installed.insert(key, model);
            }
        }
    }

    let next_node = KeyTable::new(limits);
    let successor = MemberRef {
        id: NodeId("n2".into()),
        incarnation: "i2".into(),
    };
    for (key, mut model) in installed {
        model.check_reads(&table, &key);

        // The restored idempotency window answers retries.
        // (The digest does not depend on the seq; wrapping keeps an overflow the node's.)
        let retry = frames::update(
            &key,
            (model.seq as u64).wrapping_add(1),
            b"1",
            "",
            limits.payload(),
        )
        .expect("a valid payload");
        let retry_digest = frames::payload_digest(&retry);
        for (id, seq, digest) in model.window.clone() {
            // An empty key asks for no idempotency (a record with one is never matched).
            if id.is_empty() || id.len() > MAX_IDEMPOTENCY_KEY {
                continue;
            }
            let publish = Publish {
                data: b"1",
                idempotency_key: &id,
                ..Publish::default()
            };
            let got = table.stage(&key, publish, None, 0);
            if digest != 0 && digest != retry_digest {
                assert!(
                    matches!(got, Err(ApplyError::IdempotencyConflict { seq: s }) if s == seq),
                    "{got:?}"
                );
            } else {
                assert!(
                    matches!(&got, Ok(Staged::Duplicate(a)) if a.seq == seq && a.duplicate),
                    "{got:?}"
                );
            }
        }

        // The next publish goes on from the restored seq.
        let got = table.stage(
            &key,
            Publish {
                data: b"2",
                ..Publish::default()
            },
            None,
            0,
        );
        let seq = model.seq + 1;
        match got {
            Ok(Staged::Waiting {
                applied, mut done, ..
            }) => {
                assert_eq!(u128::from(applied.seq), seq);
                assert_eq!(applied.epoch, model.epoch);
                assert_eq!(done.try_recv().ok(), Some(0));
            }
            other => panic!("{key:?}: publish after restore: {other:?}"),
        }
        let frame = frames::update(&key, seq as u64, b"2", "", limits.payload()).expect("valid");
        model.append(seq, frame.as_str().to_owned(), &limits);
        model.seq = seq;
        model.check_reads(&table, &key);

        // Handed off again, through the wire, it is the same key on the next node.
        let ToReplica::Snapshot(_, snapshot) = table.replicate_to(&key, Some(successor.clone()), 1)
        else {
            panic!("{key:?}: a new successor gets no snapshot");
        };
        let wire = snapshot_pb(&key, &snapshot);
        if let Err(e) = peer::check_snapshot(&wire, limits.payload()) {
            panic!("{key:?}: the next node refuses what this one hands off: {e}: {wire:?}");
        }
        let wire = wire.encode_to_vec();
        let arrived = snapshot_from_pb(pb::ReplicaSnapshot::decode(wire.as_slice()).expect("ours"));
        let model2 = KeyModel::restored(&arrived, &limits);
        assert!(next_node.restore(&key, || Some(arrived)).is_some());
        assert_eq!((&model2.epoch, model2.seq), (&model.epoch, model.seq));
        assert_eq!(
            model2.log, model.log,
            "{key:?}: the history changed on a hand-off"
        );
        assert_eq!(
            model2.window, model.window,
            "{key:?}: the window changed on a hand-off"
        );
        model2.check_reads(&next_node, &key);
    }
});
