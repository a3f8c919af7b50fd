//! A router's `Deliver` request, prost-decoded from arbitrary bytes, applied as
//! `internal.rs` applies it on the owner: items with an invalid key are refused
//! (`key::validate`), the others are staged on the key table (`KeyTable::stage`, as
//! `replication::start` does; here with no successor, so each is shown at once). The
//! private `internal::publish_of` is rebuilt field by field.
//!
//! Asserts, against a model of each key (seq, log, idempotency window): the answer is
//! exactly the documented one — `IdempotencyKeyTooLong` past 256 bytes, the payload's
//! own error (as `frames::update` gives it), a duplicate with the original seq for a
//! remembered idempotency key with the same payload (or a digest of 0), a conflict for
//! another payload, a seq mismatch for a wrong `expected_seq`/`expected_epoch`, else
//! the next seq in the key's epoch, shown at once; every frame made passes a peer's
//! `protocol::peer::check_update`; afterwards every read of every key (any `since`,
//! epoch, `max`) gives what the model's log says, and the snapshot sent to a new
//! successor passes its `check_snapshot`.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ringfeed_fuzz::{limits, KeyModel};
use ringfeed_node::cluster::replication::snapshot_pb;
use ringfeed_node::protocol::{frames, peer};
use ringfeed_node::state::{
    Applied, ApplyError, KeyTable, MemberRef, Publish, Staged, ToReplica, MAX_IDEMPOTENCY_KEY,
};
use ringfeed_proto::v1 as pb;
use ringfeed_router::key;
use ringfeed_router::ring::NodeId;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = pb::DeliverRequest::decode(data) else {
        return;
    };
    let limits = limits();
    let table = KeyTable::new(limits);
    let mut models: BTreeMap<String, KeyModel> = BTreeMap::new();
    for item in &request.items {
        if key::validate(&item.key).is_err() {
            continue;
        }
        let publish = Publish {
            data: &item.data,
            content_type: &item.content_type,
            expected_seq: item.expected_seq,
            expected_epoch: &item.expected_epoch,
            idempotency_key: &item.idempotency_key,
        };
        let idem = item.idempotency_key.as_str();
        if idem.len() > MAX_IDEMPOTENCY_KEY {
            let got = table.stage(&item.key, publish, None, 0);
            assert!(
                matches!(got, Err(ApplyError::IdempotencyKeyTooLong(n)) if n == idem.len()),
                "{got:?}"
            );
            continue;
        }
        let model = models
            .entry(item.key.clone())
            .or_insert_with(|| KeyModel::fresh(table.position(&item.key).0));
        let got = table.stage(&item.key, publish, None, 0);
        let seq = model.seq as u64 + 1;
        let frame = frames::update(
            &item.key,
            seq,
            &item.data,
            &item.content_type,
            limits.payload(),
        );
        let frame = match frame {
            Err(e) => {
                assert!(
                    matches!(&got, Err(ApplyError::Payload(p)) if *p == e),
                    "{got:?}, want {e:?}"
                );
                continue;
            }
            Ok(frame) => frame,
        };
        let digest = frames::payload_digest(&frame);
        let epoch = model.epoch.clone();
        if let Some((was, known)) = (!idem.is_empty()).then(|| model.remembered(idem)).flatten() {
            if known != 0 && known != digest {
                assert!(
                    matches!(got, Err(ApplyError::IdempotencyConflict { seq }) if seq == was),
                    "{got:?}, want a conflict with {was}"
                );
            } else {
                let want = Applied {
                    seq: was,
                    epoch,
                    delivered: 0,
                    duplicate: true,
                };
                assert!(
                    matches!(&got, Ok(Staged::Duplicate(a)) if *a == want),
                    "{got:?}, want {want:?}"
                );
            }
            continue;
        }
        if let Some(expected) = item.expected_seq {
            let epoch_ok = item.expected_epoch.is_empty() || item.expected_epoch == epoch;
            if !epoch_ok || expected != model.seq as u64 {
                assert!(
                    matches!(&got, Err(ApplyError::SeqMismatch {
                        expected: e,
                        expected_epoch: ee,
                        seq: s,
                        epoch: ep,
                    }) if *e == expected
                        && *ee == item.expected_epoch
                        && u128::from(*s) == model.seq
                        && *ep == epoch),
                    "{got:?}, want a mismatch at seq {} of {epoch:?}",
                    model.seq
                );
                continue;
            }
        }
        match got {
            Ok(Staged::Waiting {
                applied,
                to_replica: ToReplica::Nothing,
                mut done,
            }) => {
                let want = Applied {
                    seq,
                    epoch,
                    delivered: 0,
                    duplicate: false,
                };
                assert_eq!(applied, want);
                assert_eq!(done.try_recv().ok(), Some(0), "not shown at once");
            }
            other => panic!("{other:?}, want seq {seq} applied"),
        }
        if let Err(e) = peer::check_update(&item.key, seq, frame.as_bytes(), limits.payload()) {
            panic!(
                "a peer would refuse the frame this node made ({e}): {:?}",
                frame.as_str()
            );
        }
        model.append(u128::from(seq), frame.as_str().to_owned(), &limits);
        model.seq = u128::from(seq);
        if !idem.is_empty() {
            model.remember(idem.to_owned(), seq, digest, limits.idempotency_window);
        }
    }
    let successor = MemberRef {
        id: NodeId("n2".into()),
        incarnation: "i2".into(),
    };
    for (key, model) in &models {
        model.check_reads(&table, key);
        // What the successor is sent of the key passes its checks.
        if let ToReplica::Snapshot(_, snapshot) =
            table.replicate_to(key, Some(successor.clone()), 1)
        {
            let wire = snapshot_pb(key, &snapshot);
            if let Err(e) = peer::check_snapshot(&wire, limits.payload()) {
                panic!("{key:?}: the successor refuses this node's snapshot: {e}: {wire:?}");
            }
        }
    }
});
