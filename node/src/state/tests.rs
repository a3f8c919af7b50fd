//! The key state's unit tests.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::idempotency::Idempotency;
use super::presence::Presence;
use super::*;
use crate::protocol::epoch::{epoch_at, new_epoch, valid_epoch};
use crate::protocol::frames;
use crate::protocol::params::Resume;
use std::task::Poll;
use tokio::sync::oneshot;

#[test]
fn epochs_are_valid_unique_and_ordered_by_time() {
    let now = 1_795_000_000_000;
    for (a, b) in [(now, now + 1), (now, now + 64), (63, 64), (now, now * 2)] {
        let (a, b) = (epoch_at(a), epoch_at(b));
        assert!(valid_epoch(&a) && valid_epoch(&b) && a.len() == 16);
        assert!(a < b, "{a} < {b}");
    }
    assert_ne!(new_epoch(), new_epoch());
}

#[test]
fn an_offered_replica_is_kept_only_when_newer() {
    let replicas = Replicas::new(Limits::default());
    let snapshot = |epoch: &str, last: u64| KeySnapshot {
        epoch: epoch.into(),
        seq: last,
        entries: (1..=last)
            .map(|seq| LogEntry {
                seq,
                frame: format!("{seq}").into(),
                idempotency_key: String::new(),
            })
            .collect(),
        idempotency: Vec::new(),
        doc: None,
    };
    replicas.offer("k", snapshot("B", 5));
    replicas.offer("k", snapshot("B", 3));
    assert_eq!(replicas.copy("k").map(|s| s.seq), Some(5));
    replicas.offer("k", snapshot("A", 9));
    assert_eq!(replicas.copy("k").map(|s| s.seq), Some(5), "older epoch");
    replicas.offer("k", snapshot("C", 1));
    assert_eq!(replicas.copy("k").map(|s| s.epoch), Some("C".into()));
    assert_eq!(
        replicas.owner_of("k"),
        Some(None),
        "an offered copy's owner is not known"
    );
}

fn publish(data: &[u8]) -> Publish<'_> {
    Publish {
        data,
        ..Default::default()
    }
}

fn subscriber(
    table: &KeyTable,
    queue: usize,
    presence: Option<&str>,
) -> (Subscriber, Arc<Control>) {
    let id = table.next_subscriber_id();
    let control = Control::new("k", queue);
    let s = Subscriber {
        id,
        presence_id: presence.map_or_else(|| Arc::from(format!("c{id}")), Arc::from),
        wants_presence: presence.is_some(),
        query: None,
        control: control.clone(),
    };
    (s, control)
}

#[test]
fn a_subscriber_keeps_its_query_only_if_it_says_more_than_the_key() {
    let kept = |raw: &str| Subscriber::kept_query(&Arc::from(raw)).map(|q| q.to_string());
    assert_eq!(kept("key=user%3A1"), None);
    assert_eq!(kept("rv=3&key=user%3A1"), None);
    assert_eq!(kept("key=k&since=4"), Some("key=k&since=4".into()));
    assert_eq!(
        kept("key=k&presence=1&rv=2"),
        Some("key=k&presence=1&rv=2".into())
    );

    // Without the query kept, the redirect carries the key, escaped.
    let id = 7;
    let control = Control::new("user:42 ü", 4);
    let mut s = Subscriber {
        id,
        presence_id: Arc::from("c7"),
        wants_presence: false,
        query: None,
        control,
    };
    let url = |s: &Subscriber| {
        crate::protocol::redirect::redirect_url("ws://h:1", "/v1/connect", &s.redirect_query(), 9)
    };
    assert_eq!(url(&s), "ws://h:1/v1/connect?key=user%3A42+%C3%BC&rv=9");
    s.query = Subscriber::kept_query(&Arc::from("key=user%3A42+%C3%BC&since=5&rv=1"));
    assert_eq!(
        url(&s),
        "ws://h:1/v1/connect?key=user%3A42+%C3%BC&since=5&rv=9"
    );
}

fn seq_of(frame: &Utf8Bytes) -> u64 {
    let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
    v["seq"].as_u64().unwrap()
}

fn table(history_len: usize) -> KeyTable {
    KeyTable::new(Limits {
        history_len,
        ..Limits::default()
    })
}

#[test]
fn past_the_memory_budget_only_keys_already_held_take_publishes_and_subscribers() {
    let table = table(100);
    table.apply("held", publish(b"1")).unwrap();
    table.set_full(true);
    assert!(matches!(
        table.apply("new", publish(b"1")),
        Err(ApplyError::MemoryBudget)
    ));
    let (s, _rx) = subscriber(&table, 16, None);
    assert_eq!(
        table.subscribe("new", s, None).err(),
        Some(SubscribeError::MemoryBudget)
    );
    let from_start = Resume {
        since: 0,
        epoch: None,
    };
    assert!(
        table.read("new", &from_start, 10).is_none(),
        "a poll creates no key"
    );
    assert_eq!(table.len(), 1, "nothing created for the refused key");
    let (held, _) = table
        .read("held", &from_start, 10)
        .expect("a held key reads");
    assert_eq!(held.updates.len(), 1);
    assert_eq!(table.apply("held", publish(b"2")).unwrap().seq, 2);
    let (s, _rx2) = subscriber(&table, 16, None);
    assert!(table.subscribe("held", s, None).is_ok());
    table.set_full(false);
    assert_eq!(table.apply("new", publish(b"1")).unwrap().seq, 1);
}

#[test]
fn the_sweep_sets_off_only_the_clocks_that_are_due() {
    use std::task::{Context, Waker};
    let table = table(100);
    let (s, early) = subscriber(&table, 16, None);
    table.subscribe("a", s, None).unwrap();
    let (s, late) = subscriber(&table, 16, None);
    table.subscribe("b", s, None).unwrap();
    let (s, unset) = subscriber(&table, 16, None);
    table.subscribe("b", s, None).unwrap();
    early.set_due(10);
    late.set_due(20);
    let mut cx = Context::from_waker(Waker::noop());
    let went_off =
        |c: &Control, cx: &mut Context<'_>| matches!(c.poll_ready(cx), Poll::Ready(Ready::Due));
    table.fire_due(9);
    assert!(!went_off(&early, &mut cx) && !went_off(&late, &mut cx));
    table.fire_due(10);
    assert!(went_off(&early, &mut cx) && !went_off(&late, &mut cx));
    // It stays off until set again.
    table.fire_due(11);
    assert!(went_off(&early, &mut cx));
    early.set_due(30);
    table.fire_due(25);
    assert!(!went_off(&early, &mut cx) && went_off(&late, &mut cx));
    assert!(!went_off(&unset, &mut cx));
}

#[test]
fn seqs_count_from_one_and_reach_subscribers_in_order() {
    let table = table(100);
    let (s, rx) = subscriber(&table, 16, None);
    let start = table.subscribe("k", s, None).unwrap();
    assert_eq!((start.catchup.seq, start.catchup.updates.len()), (0, 0));
    for i in 1..=3u64 {
        let a = table.apply("k", publish(b"1")).unwrap();
        assert_eq!((a.seq, a.delivered, a.duplicate), (i, 1, false));
    }
    for i in 1..=3 {
        assert_eq!(seq_of(&rx.try_recv().unwrap()), i);
    }
}

#[test]
fn resume_replays_exactly_what_was_missed() {
    let table = table(100);
    for _ in 0..10 {
        table.apply("k", publish(b"1")).unwrap();
    }
    let epoch = table.position("k").0;
    let (s, _rx) = subscriber(&table, 16, None);
    let start = table
        .subscribe(
            "k",
            s,
            Some(&Resume {
                since: 6,
                epoch: Some(epoch),
            }),
        )
        .unwrap();
    assert!(start.catchup.reset.is_none());
    assert_eq!(start.replay_from, Some(6));
    let seqs: Vec<u64> = start.catchup.updates.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![7, 8, 9, 10]);
    // since without epoch reads the current epoch.
    let (s, _rx) = subscriber(&table, 16, None);
    let start = table
        .subscribe(
            "k",
            s,
            Some(&Resume {
                since: 10,
                epoch: None,
            }),
        )
        .unwrap();
    assert!(start.catchup.updates.is_empty() && start.catchup.reset.is_none());
}

#[test]
fn resets_say_why() {
    let table = table(5);
    for _ in 0..10 {
        table.apply("k", publish(b"1")).unwrap();
    }
    let epoch = table.position("k").0;
    let (c, _) = table
        .read(
            "k",
            &Resume {
                since: 2,
                epoch: Some(epoch.clone()),
            },
            100,
        )
        .expect("under the budget");
    assert_eq!(
        c.reset,
        Some(Reset {
            reason: ResetReason::HistoryGap,
            seq: 5
        })
    );
    assert_eq!(
        c.updates.iter().map(seq_of).collect::<Vec<_>>(),
        vec![6, 7, 8, 9, 10]
    );
    assert_eq!(c.position, 10);
    let (c, _) = table
        .read(
            "k",
            &Resume {
                since: 11,
                epoch: Some(epoch),
            },
            100,
        )
        .expect("under the budget");
    assert_eq!(
        c.reset,
        Some(Reset {
            reason: ResetReason::SeqAhead,
            seq: 10
        })
    );
    let (c, _) = table
        .read(
            "k",
            &Resume {
                since: 3,
                epoch: Some("other".into()),
            },
            100,
        )
        .expect("under the budget");
    assert_eq!(
        c.reset,
        Some(Reset {
            reason: ResetReason::EpochChanged,
            seq: 10
        })
    );
    assert!(c.updates.is_empty());
    let frame = c.reset.unwrap().frame("k", &c.epoch);
    assert!(frame.as_str().contains(r#""reason":"epoch_changed""#));
}

#[test]
fn the_buffer_is_bounded_by_bytes_too() {
    let table = KeyTable::new(Limits {
        history_bytes: 200,
        ..Limits::default()
    });
    for _ in 0..20 {
        table.apply("k", publish(b"\"0123456789\"")).unwrap();
    }
    let (c, _) = table
        .read(
            "k",
            &Resume {
                since: 0,
                epoch: None,
            },
            100,
        )
        .expect("under the budget");
    assert_eq!(
        c.reset.as_ref().map(|r| r.reason),
        Some(ResetReason::HistoryGap)
    );
    let bytes: usize = c.updates.iter().map(|f| f.len()).sum();
    assert!(bytes <= 200 && !c.updates.is_empty(), "{bytes}");
}

#[test]
fn idempotent_retries_return_the_original_and_deliver_nothing() {
    let table = table(100);
    let (s, rx) = subscriber(&table, 16, None);
    table.subscribe("k", s, None).unwrap();
    let first = table
        .apply(
            "k",
            Publish {
                idempotency_key: "x",
                ..publish(b"1")
            },
        )
        .unwrap();
    let again = table
        .apply(
            "k",
            Publish {
                idempotency_key: "x",
                ..publish(b"1")
            },
        )
        .unwrap();
    assert_eq!(
        (again.seq, again.delivered, again.duplicate),
        (first.seq, 0, true)
    );
    assert_eq!(seq_of(&rx.try_recv().unwrap()), 1);
    assert!(rx.try_recv().is_none());
    let long = "k".repeat(MAX_IDEMPOTENCY_KEY + 1);
    assert!(table
        .apply(
            "k",
            Publish {
                idempotency_key: &long,
                ..publish(b"1")
            }
        )
        .is_err());
}

#[test]
fn a_reused_idempotency_key_with_another_payload_is_refused() {
    let table = table(100);
    let with = |data: &'static [u8], content_type: &'static str| Publish {
        idempotency_key: "x",
        content_type,
        ..publish(data)
    };
    let first = table.apply("k", with(b"1", "")).unwrap();
    assert!(table.apply("k", with(b"1", "")).unwrap().duplicate);
    assert!(matches!(
        table.apply("k", with(b"2", "")),
        Err(ApplyError::IdempotencyConflict { seq }) if seq == first.seq
    ));
    assert!(matches!(
        table.apply("k", with(b"1", "text/plain")),
        Err(ApplyError::IdempotencyConflict { .. })
    ));
    // The window travels with the key: a replica promoted, or a key handed over,
    // still tells the payloads apart.
    let moved = table.take_where(|k| k == "k").pop().unwrap();
    let restored = KeyTable::new(Limits::default());
    restored.restore("k", || Some(moved.snapshot));
    assert!(restored.apply("k", with(b"1", "")).unwrap().duplicate);
    assert!(matches!(
        restored.apply("k", with(b"2", "")),
        Err(ApplyError::IdempotencyConflict { .. })
    ));
}

#[test]
fn the_idempotency_window_is_bounded() {
    let table = KeyTable::new(Limits {
        idempotency_window: 2,
        ..Limits::default()
    });
    for id in ["a", "b", "c"] {
        apply_with_id(&table, id);
    }
    // "a" fell out of the window: a retry applies again.
    assert!(!apply_with_id(&table, "a").duplicate);
    assert!(apply_with_id(&table, "c").duplicate);
}

/// Publishes to "k" with idempotency key `id`.
fn apply_with_id(table: &KeyTable, id: &str) -> Applied {
    table
        .apply(
            "k",
            Publish {
                idempotency_key: id,
                ..publish(b"1")
            },
        )
        .unwrap()
}

#[test]
fn a_long_idempotency_window_is_indexed_and_bounded() {
    let table = KeyTable::new(Limits {
        idempotency_window: 3 * Idempotency::FEW,
        ..Limits::default()
    });
    let apply = |id: &str| apply_with_id(&table, id);
    let ids: Vec<String> = (0..4 * Idempotency::FEW).map(|i| format!("i{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(apply(id).seq, i as u64 + 1);
    }
    // The newest 3·FEW are remembered, with their seqs; the oldest FEW are not.
    for (i, id) in ids.iter().enumerate().skip(Idempotency::FEW) {
        let again = apply(id);
        assert!(again.duplicate, "{id}");
        assert_eq!(again.seq, i as u64 + 1);
    }
    assert!(!apply(&ids[0]).duplicate);
}

#[test]
fn a_replica_keeps_its_entries_in_seq_order() {
    let limits = Limits {
        history_len: 3,
        ..Limits::default()
    };
    let replicas = Replicas::new(limits);
    let entry = |seq: u64, data: &str| LogEntry {
        seq,
        frame: Utf8Bytes::from(data.to_owned()),
        idempotency_key: String::new(),
    };
    for (seq, data) in [(2, "b"), (4, "d"), (3, "c"), (4, "D"), (1, "a")] {
        replicas.entry("k", Some(&succ("n1").unwrap()), "e", entry(seq, data));
    }
    let held = replicas.copy("k").expect("a replica");
    let seqs: Vec<(u64, &str)> = held
        .entries
        .iter()
        .map(|e| (e.seq, e.frame.as_str()))
        .collect();
    // A retry replaced 4 in place; the oldest fell out past history_len.
    assert_eq!(seqs, [(2, "b"), (3, "c"), (4, "D")]);
    assert_eq!(held.seq, 4);
}

#[tokio::test]
async fn a_queue_is_bounded_wakes_its_reader_and_drains_after_close() {
    let control = Control::new("k", 2);
    assert_eq!(control.push(Utf8Bytes::from_static("a")), Ok(()));
    assert_eq!(control.push(Utf8Bytes::from_static("b")), Ok(()));
    assert_eq!(
        control.push(Utf8Bytes::from_static("c")),
        Err(Refused::Full)
    );
    let reader = {
        let control = control.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(frame) = control.recv().await {
                got.push(frame.as_str().to_owned());
            }
            got
        })
    };
    // Wait until the reader has emptied the queue, then wake it with one more.
    while !control.outbox.lock().unwrap().frames.is_empty() {
        tokio::task::yield_now().await;
    }
    assert_eq!(control.push(Utf8Bytes::from_static("d")), Ok(()));
    control.close();
    assert_eq!(
        control.push(Utf8Bytes::from_static("e")),
        Err(Refused::Closed)
    );
    assert_eq!(reader.await.unwrap(), ["a", "b", "d"]);
}

#[test]
fn a_full_queue_kicks_only_that_subscriber() {
    let table = table(100);
    let (slow, slow_control) = subscriber(&table, 2, None);
    let (fast, fast_rx) = subscriber(&table, 64, None);
    table.subscribe("k", slow, None).unwrap();
    table.subscribe("k", fast, None).unwrap();
    for _ in 0..5 {
        table.apply("k", publish(b"1")).unwrap();
    }
    let kick = slow_control
        .outbox
        .lock()
        .unwrap()
        .kick
        .clone()
        .expect("slow subscriber kicked");
    assert_eq!(kick.code, crate::protocol::close::CloseCode::SlowConsumer);
    let mut got = 0;
    while fast_rx.try_recv().is_some() {
        got += 1;
    }
    assert_eq!(got, 5);
}

#[test]
fn compare_and_set() {
    let table = table(100);
    table.apply("k", publish(b"1")).unwrap();
    let ok = Publish {
        expected_seq: Some(1),
        ..publish(b"2")
    };
    assert_eq!(table.apply("k", ok).unwrap().seq, 2);
    let stale = Publish {
        expected_seq: Some(1),
        ..publish(b"3")
    };
    assert!(matches!(
        table.apply("k", stale),
        Err(ApplyError::SeqMismatch { seq: 2, .. })
    ));
    let other_epoch = Publish {
        expected_seq: Some(2),
        expected_epoch: "nope",
        ..publish(b"3")
    };
    assert!(matches!(
        table.apply("k", other_epoch),
        Err(ApplyError::SeqMismatch { .. })
    ));
}

#[test]
fn refused_payloads_take_no_seq() {
    let table = KeyTable::new(Limits {
        max_payload: 4,
        ..Limits::default()
    });
    assert!(table.apply("k", publish(b"{bad")).is_err());
    assert!(table.apply("k", publish(b"123456")).is_err());
    assert_eq!(table.apply("k", publish(b"1")).unwrap().seq, 1);
}

#[test]
fn subscriber_limit() {
    let table = KeyTable::new(Limits {
        max_subscribers: 1,
        ..Limits::default()
    });
    let (a, _ra) = subscriber(&table, 2, None);
    let (b, _rb) = subscriber(&table, 2, None);
    table.subscribe("k", a, None).unwrap();
    assert_eq!(
        table.subscribe("k", b, None).unwrap_err(),
        SubscribeError::TooManySubscribers(1)
    );
}

#[test]
fn presence_is_exact_and_announced() {
    let table = table(10);
    let (a, ra) = subscriber(&table, 16, Some("alice"));
    let start = table.subscribe("k", a, None).unwrap();
    assert!(start
        .presence
        .unwrap()
        .as_str()
        .contains(r#""members":[{"id":"alice"}]"#));
    let (b1, rb1) = subscriber(&table, 16, Some("bob"));
    let (b2, rb2) = subscriber(&table, 16, Some("bob"));
    table.subscribe("k", b1, None).unwrap();
    table.subscribe("k", b2, None).unwrap();
    assert_eq!(table.presence("k"), vec!["alice", "bob"]);
    let joined = ra.try_recv().unwrap();
    assert!(
        joined.as_str().contains(r#""joined":[{"id":"bob"}]"#),
        "{}",
        joined.as_str()
    );
    assert!(
        ra.try_recv().is_none(),
        "bob's second connection is not a second join"
    );
    table.unsubscribe(&rb1);
    assert!(ra.try_recv().is_none(), "bob is still there");
    table.unsubscribe(&rb2);
    assert!(ra
        .try_recv()
        .unwrap()
        .as_str()
        .contains(r#""left":[{"id":"bob"}]"#));
    assert_eq!(table.presence("k"), vec!["alice"]);
}

#[test]
fn epochs_are_url_safe_and_distinct() {
    let a = new_epoch();
    assert_eq!(a.len(), 16);
    assert!(valid_epoch(&a));
    assert!(!valid_epoch("a:b") && !valid_epoch(""));
    assert_ne!(a, new_epoch());
}

#[test]
fn presence_counts_connections_per_id_past_the_short_list() {
    let mut p = Presence::default();
    assert!(p.join(&Arc::from("a")));
    assert!(!p.join(&Arc::from("a")));
    // Past the short list, the map takes over and keeps every count.
    for i in 0..Presence::FEW + 3 {
        assert!(p.join(&Arc::from(format!("id{i}"))));
    }
    assert!(p.few.is_empty());
    assert!(!p.join(&Arc::from("a")));
    let mut ids: Vec<&Arc<str>> = p.ids().collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), Presence::FEW + 4);
    assert!(!p.leave("a"));
    assert!(!p.leave("a"));
    assert!(p.leave("a"));
    assert!(!p.leave("a"), "an id with no connection is not left twice");
    for i in 0..Presence::FEW + 3 {
        assert!(p.leave(&format!("id{i}")));
    }
    assert_eq!(p.ids().count(), 0);
    // Empty again: back to the short list.
    assert!(p.join(&Arc::from("b")));
    assert_eq!(p.few.len(), 1);
}

#[test]
fn take_where_removes_moved_keys() {
    let table = table(10);
    table.apply("a", publish(b"1")).unwrap();
    table.apply("b", publish(b"1")).unwrap();
    let taken = table.take_where(|k| k == "a");
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].key, "a");
    assert!(taken[0].subscribers.is_empty());
    assert_eq!(taken[0].snapshot.seq, 1);
    assert_eq!(table.len(), 1);
}

fn succ(id: &str) -> Option<MemberRef> {
    Some(MemberRef {
        id: ringfeed_router::ring::NodeId(id.into()),
        incarnation: "i".into(),
    })
}

fn staged(
    table: &KeyTable,
    data: &[u8],
    to: Option<MemberRef>,
    version: u64,
) -> (u64, ToReplica, oneshot::Receiver<u32>) {
    match table.stage("k", publish(data), to, version).unwrap() {
        Staged::Waiting {
            applied,
            to_replica,
            done,
        } => (applied.seq, to_replica, done),
        Staged::Duplicate(a) => panic!("duplicate {a:?}"),
    }
}

#[test]
fn updates_are_shown_only_once_held_and_in_seq_order() {
    let table = table(100);
    let (s, rx) = subscriber(&table, 16, None);
    table.subscribe("k", s, None).unwrap();
    // The first publish sends the whole (empty) key to the successor.
    let (one, first, mut done1) = staged(&table, b"1", succ("n2"), 1);
    assert!(matches!(first, ToReplica::Snapshot(..)));
    let (two, second, mut done2) = staged(&table, b"2", succ("n2"), 1);
    assert!(matches!(second, ToReplica::Entry(..)));
    let epoch = table.position("k").0;
    // Held out of order: nothing shows until the first is held too.
    table.replicated("k", &epoch, two, &succ("n2").unwrap());
    assert!(rx.try_recv().is_none() && done2.try_recv().is_err());
    assert_eq!(table.position("k").1, 0);
    // An answer from a node that is not the successor does not count.
    table.replicated("k", &epoch, one, &succ("n3").unwrap());
    assert!(rx.try_recv().is_none());
    table.replicated("k", &epoch, one, &succ("n2").unwrap());
    assert_eq!(seq_of(&rx.try_recv().unwrap()), 1);
    assert_eq!(seq_of(&rx.try_recv().unwrap()), 2);
    assert_eq!((done1.try_recv(), done2.try_recv()), (Ok(1), Ok(1)));
    assert_eq!(table.position("k").1, 2);
}

#[test]
fn a_new_successor_gets_the_whole_key_and_an_older_view_cannot_move_it_back() {
    let table = table(100);
    let (one, _, _) = staged(&table, b"1", succ("n2"), 5);
    table.replicated("k", &table.position("k").0, one, &succ("n2").unwrap());
    let (_, _, _) = staged(&table, b"2", succ("n2"), 5);
    // The successor changes on a newer ring: committed history and pending, whole.
    match table.replicate_to("k", succ("n3"), 6) {
        ToReplica::Snapshot(to, snapshot) => {
            assert_eq!(*to, succ("n3").unwrap());
            assert_eq!(snapshot.seq, 1);
            assert_eq!(
                snapshot.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
                vec![1, 2]
            );
        }
        other => panic!("{other:?}"),
    }
    // A publish decided on the older ring still replicates to the newer successor.
    let (_, to, _) = staged(&table, b"3", succ("n2"), 5);
    assert!(
        matches!(to, ToReplica::Entry(ref at, ..) if **at == succ("n3").unwrap()),
        "{to:?}"
    );
}

#[test]
fn without_a_successor_updates_show_at_once() {
    let table = table(100);
    let (_, _, mut pending) = staged(&table, b"1", succ("n2"), 1);
    assert!(pending.try_recv().is_err());
    // The successor left and nobody replaced it: what waited is shown.
    assert!(matches!(
        table.replicate_to("k", None, 2),
        ToReplica::Nothing
    ));
    assert_eq!(pending.try_recv(), Ok(0));
    let (_, _, mut now) = staged(&table, b"2", None, 2);
    assert_eq!(now.try_recv(), Ok(0));
}

#[test]
fn a_restored_key_keeps_its_epoch_and_the_gap_free_run() {
    let table = table(100);
    let frame = |seq: u64| frames::update("k", seq, b"1", "", Limits::default().payload()).unwrap();
    let snapshot = KeySnapshot {
        epoch: "E".into(),
        seq: 3,
        entries: [1, 2, 3, 5]
            .into_iter()
            .map(|seq| LogEntry {
                seq,
                frame: frame(seq),
                idempotency_key: format!("i{seq}"),
            })
            .collect(),
        idempotency: vec![("i2".into(), 2, 0), ("i5".into(), 5, 0)],
        doc: None,
    };
    assert!(table.restore("k", || Some(snapshot)).is_some());
    assert_eq!(table.position("k"), ("E".to_owned(), 3));
    // The window travelled (but not past the gap).
    assert!(matches!(
        table
            .apply(
                "k",
                Publish {
                    idempotency_key: "i2",
                    ..publish(b"1")
                }
            )
            .unwrap(),
        Applied {
            seq: 2,
            duplicate: true,
            ..
        }
    ));
    assert_eq!(
        table
            .apply(
                "k",
                Publish {
                    idempotency_key: "i5",
                    ..publish(b"1")
                }
            )
            .unwrap()
            .seq,
        4
    );
    // A key with history is never overwritten.
    assert!(table.restore("k", || panic!("not taken")).is_none());
}

#[test]
fn a_moved_key_is_retired_for_whoever_still_holds_it() {
    let table = table(100);
    table.apply("k", publish(b"1")).unwrap();
    let entry = table.existing("k").unwrap();
    let moved = table.take_where(|_| true);
    assert_eq!(moved[0].snapshot.seq, 1);
    assert!(entry.lock().unwrap().retired);
    let (s, _rx) = subscriber(&table, 4, None);
    // The map no longer has it: a new request starts afresh (its owner decides).
    assert!(table.subscribe("k", s, None).is_ok());
}
