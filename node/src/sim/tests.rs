//! The cluster layer driven in one process (see [`super`]): replication,
//! promotion after an owner's loss, and a hand-off that races publishes — the node's
//! own code on a fixed ring, an in-memory network and paused time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringfeed_proto::v1::deliver_result;
use ringfeed_router::ring::Ring;

use super::{eventually, key_placed, member, Cluster};
use crate::cluster::replication;
use crate::protocol::frames;
use crate::protocol::params::Resume;
use crate::state::Publish;

fn publish(data: &[u8]) -> Publish<'_> {
    Publish {
        data,
        content_type: "",
        expected_seq: None,
        expected_epoch: "",
        idempotency_key: "",
    }
}

/// The latest seq `node` shows for `key` (0: none, or the key is not held there).
fn shown(cluster: &Cluster, node: &str, key: &str) -> u64 {
    cluster
        .node(node)
        .keys
        .held_position(key)
        .map_or(0, |(_, seq)| seq)
}

#[tokio::test(start_paused = true)]
async fn an_update_is_shown_only_once_the_successor_holds_it() {
    let ids = ["n1", "n2", "n3"];
    let cluster = Cluster::start(&ids);
    let key = key_placed(&ids, "n1", Some("n2"));
    let n1 = cluster.node("n1");
    // The successor is on the ring but cannot be reached.
    cluster.cut("n2");
    let view = n1.membership.view();
    let (applied, _) = replication::publish(n1, &view, &key, publish(b"1"), false)
        .await
        .expect("staged");
    assert_eq!(applied.seq, 1);
    // However long that lasts, the update waits: no subscriber or reader sees it.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(shown(&cluster, "n1", &key), 0);
    assert!(cluster.node("n2").replicas.copy(&key).is_none());
    // Once the successor is back, it gets the update, and then the owner shows it.
    cluster.heal("n2");
    eventually("the update is shown", || shown(&cluster, "n1", &key) == 1).await;
    let replica = cluster.node("n2").replicas.copy(&key).expect("a replica");
    assert!(replica.entries.iter().any(|e| e.seq == 1));
}

#[tokio::test(start_paused = true)]
async fn the_successor_takes_over_a_lost_owners_keys_with_their_history() {
    let ids = ["n1", "n2", "n3"];
    let cluster = Cluster::start(&ids);
    let key = key_placed(&ids, "n1", Some("n2"));
    for i in 1..=3u64 {
        let result = cluster
            .deliver("n1", &key, i.to_string().as_bytes(), &format!("u{i}"))
            .await
            .expect("delivered");
        match result.result {
            Some(deliver_result::Result::Ok(ok)) => assert_eq!(ok.seq, i),
            other => panic!("publish {i}: {other:?}"),
        }
    }
    let (epoch, seq) = cluster.node("n1").keys.held_position(&key).expect("held");
    assert_eq!(seq, 3);

    cluster.kill("n1").await;
    cluster.set_ring(&["n2", "n3"]);
    let n2 = cluster.node("n2");
    eventually("n2 serves the key with its history", || {
        n2.keys.held_position(&key) == Some((epoch.clone(), 3))
    })
    .await;
    // The run goes on: same epoch, the next seq.
    let result = cluster
        .deliver("n2", &key, b"4", "u4")
        .await
        .expect("delivered");
    match result.result {
        Some(deliver_result::Result::Ok(ok)) => {
            assert_eq!((ok.epoch.as_str(), ok.seq), (epoch.as_str(), 4));
        }
        other => panic!("publish after promotion: {other:?}"),
    }
}

/// A key `from` owns on the ring of `before` and `to` owns on the ring of `after`.
fn key_moving(before: &[&str], after: &[&str], from: &str, to: &str) -> String {
    let ring = |ids: &[&str]| Ring::new(ids.iter().map(|id| member(id)));
    let (before, after) = (ring(before), ring(after));
    (0..)
        .map(|i| format!("doc:{i}"))
        .find(|k| {
            before.owner(k).is_some_and(|o| o.id.0 == from)
                && after.owner(k).is_some_and(|o| o.id.0 == to)
        })
        .expect("a key that moves")
}

/// A router's loop for one publisher: each update to the owner of `key` on the
/// router's ring, moving to the owner a NOT_OWNER names and retrying the same item
/// (same idempotency key) while the key is in flight. The (seq, data) of each
/// acknowledged update go to `acked`.
async fn publish_all(
    cluster: Arc<Cluster>,
    router: Arc<Mutex<Ring>>,
    key: String,
    data: Vec<u64>,
    acked: Arc<Mutex<Vec<(u64, u64)>>>,
) {
    for d in data {
        for attempt in 0.. {
            assert!(attempt < 500, "update {d} never landed");
            let owner = router
                .lock()
                .unwrap()
                .owner(&key)
                .expect("an owner")
                .id
                .0
                .clone();
            let result = cluster
                .deliver(&owner, &key, d.to_string().as_bytes(), &format!("u{d}"))
                .await;
            match result.ok().and_then(|r| r.result) {
                Some(deliver_result::Result::Ok(ok)) => {
                    acked.lock().unwrap().push((ok.seq, d));
                    // Paced, so the move happens in the middle of the run.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    break;
                }
                Some(deliver_result::Result::Error(e))
                    if e.code != tonic::Code::Unavailable as u32 =>
                {
                    panic!("update {d}: {e:?}")
                }
                // NOT_OWNER: the node's ring is newer or older than the router's; the
                // router's moves on by itself here. Unavailable: the key is moving.
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_handed_to_a_joining_node_keeps_every_update_published_during_the_move() {
    let before = ["n1", "n2"];
    let after = ["n1", "n2", "n3"];
    let ring = |ids: &[&str]| Ring::new(ids.iter().map(|id| member(id)));
    let mut cluster = Cluster::start(&before);
    let key = key_moving(&before, &after, "n1", "n3");
    cluster.add("n3", &before);
    let cluster = Arc::new(cluster);

    // Four publishers at once, 20 updates each, while the key moves under them.
    let router = Arc::new(Mutex::new(ring(&before)));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let publishers: Vec<_> = (0..4u64)
        .map(|p| {
            let data = (1..=20).map(|i| p * 100 + i).collect();
            let publisher = publish_all(
                cluster.clone(),
                router.clone(),
                key.clone(),
                data,
                acked.clone(),
            );
            tokio::spawn(publisher)
        })
        .collect();
    eventually("the first updates land", || {
        acked.lock().unwrap().len() >= 8
    })
    .await;
    // n3 and the router see the new ring first: publishes reach n3 while n1 still
    // takes them as the owner; n3 must wait for n1's hand-off before it serves.
    cluster.set_ring_on(&["n2", "n3"], &after);
    *router.lock().unwrap() = ring(&after);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The successor stops answering (n1's next updates wait, in flight), n1 sees the
    // new ring and hands the key over, and the successor comes back.
    cluster.cut("n2");
    tokio::time::sleep(Duration::from_millis(50)).await;
    cluster.set_ring_on(&["n1"], &after);
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.heal("n2");
    for p in publishers {
        p.await.expect("a publisher");
    }
    // Every acknowledged update has its own seq, gap-free…
    let mut acked = acked.lock().unwrap().clone();
    acked.sort_unstable();
    let seqs: Vec<u64> = acked.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=80).collect::<Vec<_>>());
    // …and the new owner holds each one, with the data it was acknowledged for.
    let n3 = cluster.node("n3");
    let from_start = Resume {
        since: 0,
        epoch: None,
    };
    let (catchup, _) = n3
        .keys
        .read(&key, &from_start, 100)
        .expect("n3 holds the key");
    assert!(catchup.reset.is_none(), "{:?}", catchup.reset);
    assert_eq!(catchup.updates.len(), 80);
    for ((seq, data), frame) in acked.iter().zip(&catchup.updates) {
        assert_eq!(frames::update_seq(frame), Some(*seq));
        assert!(frame.contains(&format!(r#""data":{data}"#)), "{frame}");
    }
}

/// A subscription refused past the memory budget is counted once, in the session
/// every transport subscribes through (WebSocket and SSE alike).
#[tokio::test(start_paused = true)]
async fn a_refused_subscription_is_counted_whatever_the_transport() {
    let cluster = Cluster::start(&["n1"]);
    let node = cluster.node("n1");
    node.keys.set_full(true);
    let key = ringfeed_router::key::Key::parse("user:1").expect("a key");
    let refused = crate::session::subscribe(node, &key, Arc::from("key=user:1"), None, false, None);
    assert!(matches!(
        refused,
        Err(crate::state::SubscribeError::MemoryBudget)
    ));
    let counted = node
        .counters
        .refused_memory
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(counted, 1);
}
