//! Per-key state on the owner: epoch, seq and subscribers.
//!
//! Each key's state sits behind its own short `std::sync::Mutex`: a publish assigns the
//! next seq, encodes the frame once and offers it to every subscriber's bounded queue
//! with `try_send`, all under the lock and without awaiting. Holding the lock across
//! "assign seq → enqueue" is what makes every subscriber see seqs in order, and a new
//! subscriber's `welcome` seq line up exactly with the first update it is sent.
//! A full queue never blocks the key: that subscriber is kicked with 4408.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::frames::{self, PayloadError};

const SHARDS: usize = 64;

/// WebSocket close code: slow consumer.
pub const CLOSE_SLOW_CONSUMER: u16 = 4408;

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("expected seq {expected} in epoch {expected_epoch:?}, but the key is at seq {seq} in epoch {epoch}")]
    SeqMismatch {
        expected: u64,
        expected_epoch: String,
        seq: u64,
        epoch: String,
    },
}

/// A publish as the key sees it.
#[derive(Debug, Clone, Copy)]
pub struct Publish<'a> {
    pub data: &'a [u8],
    pub content_type: &'a str,
    pub expected_seq: Option<u64>,
    pub expected_epoch: &'a str,
}

/// What an applied publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    pub epoch: String,
    pub delivered: u32,
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("key has {0} subscribers, the limit")]
    TooManySubscribers(usize),
}

/// How a connection is told to close by someone other than itself.
#[derive(Debug, Clone)]
pub struct Kick {
    /// A frame to send before closing (a `redirect`), if any.
    pub frame: Option<Utf8Bytes>,
    pub code: u16,
    pub reason: String,
}

/// The side of a connection that others can reach: its queue and its kick switch.
#[derive(Debug)]
pub struct Control {
    kick: Mutex<Option<Kick>>,
    notify: Notify,
}

impl Control {
    pub fn new() -> Arc<Control> {
        Arc::new(Control {
            kick: Mutex::new(None),
            notify: Notify::new(),
        })
    }

    /// Asks the connection to close; the first kick wins.
    pub fn kick(&self, kick: Kick) {
        let mut slot = self.kick.lock().expect("kick lock poisoned");
        if slot.is_none() {
            *slot = Some(kick);
            self.notify.notify_one();
        }
    }

    /// Waits until someone kicks, and returns the kick.
    pub async fn kicked(&self) -> Kick {
        loop {
            if let Some(kick) = self.kick.lock().expect("kick lock poisoned").clone() {
                return kick;
            }
            self.notify.notified().await;
        }
    }
}

/// A subscriber as its key holds it.
#[derive(Debug)]
pub struct Subscriber {
    pub id: u64,
    /// Who it is for presence: the ticket's subject, or a connection id.
    pub presence_id: String,
    /// The query it connected with, to build its redirect.
    pub query: Arc<str>,
    pub tx: mpsc::Sender<Utf8Bytes>,
    pub control: Arc<Control>,
}

/// One key's state.
#[derive(Debug)]
pub struct KeyState {
    pub epoch: String,
    pub seq: u64,
    pub subscribers: Vec<Subscriber>,
}

impl KeyState {
    fn new() -> KeyState {
        KeyState {
            epoch: new_epoch(),
            seq: 0,
            subscribers: Vec::new(),
        }
    }
}

type Entry = Arc<Mutex<KeyState>>;

/// Every key this node holds state for.
pub struct KeyTable {
    shards: Vec<Mutex<HashMap<String, Entry>>>,
    hasher: RandomState,
    next_subscriber: AtomicU64,
    max_payload: usize,
    max_subscribers: usize,
}

impl KeyTable {
    pub fn new(max_payload: usize, max_subscribers: usize) -> KeyTable {
        KeyTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            next_subscriber: AtomicU64::new(1),
            max_payload,
            max_subscribers,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Entry>> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h % SHARDS]
    }

    fn entry(&self, key: &str) -> Entry {
        let mut shard = self.shard(key).lock().expect("shard lock poisoned");
        if let Some(e) = shard.get(key) {
            return e.clone();
        }
        let e = Arc::new(Mutex::new(KeyState::new()));
        shard.insert(key.to_owned(), e.clone());
        e
    }

    fn existing(&self, key: &str) -> Option<Entry> {
        self.shard(key)
            .lock()
            .expect("shard lock poisoned")
            .get(key)
            .cloned()
    }

    /// A fresh subscriber id.
    pub fn next_subscriber_id(&self) -> u64 {
        self.next_subscriber.fetch_add(1, Ordering::Relaxed)
    }

    /// Applies a publish: next seq, one encoded frame, offered to every subscriber.
    pub fn apply(&self, key: &str, publish: Publish<'_>) -> Result<Applied, ApplyError> {
        let entry = self.entry(key);
        let mut state = entry.lock().expect("key lock poisoned");
        if let Some(expected) = publish.expected_seq {
            let epoch_ok =
                publish.expected_epoch.is_empty() || publish.expected_epoch == state.epoch;
            if !epoch_ok || expected != state.seq {
                return Err(ApplyError::SeqMismatch {
                    expected,
                    expected_epoch: publish.expected_epoch.to_owned(),
                    seq: state.seq,
                    epoch: state.epoch.clone(),
                });
            }
        }
        let seq = state.seq + 1;
        let frame = frames::update(
            key,
            seq,
            publish.data,
            publish.content_type,
            self.max_payload,
        )?;
        state.seq = seq;
        let mut delivered = 0u32;
        state
            .subscribers
            .retain(|s| match s.tx.try_send(frame.clone()) {
                Ok(()) => {
                    delivered += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.control.kick(Kick {
                        frame: None,
                        code: CLOSE_SLOW_CONSUMER,
                        reason: "slow consumer".into(),
                    });
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        Ok(Applied {
            seq,
            epoch: state.epoch.clone(),
            delivered,
        })
    }

    /// Adds a subscriber to `key`, and queues `welcome(epoch, seq)` for it first, so
    /// that the welcome's seq and the first update it sees line up exactly.
    pub fn subscribe(
        &self,
        key: &str,
        subscriber: Subscriber,
        welcome: impl FnOnce(&str, u64) -> Utf8Bytes,
    ) -> Result<(), SubscribeError> {
        let entry = self.entry(key);
        let mut state = entry.lock().expect("key lock poisoned");
        if state.subscribers.len() >= self.max_subscribers {
            return Err(SubscribeError::TooManySubscribers(state.subscribers.len()));
        }
        // The queue is new and empty, so this cannot fail for lack of room.
        let _ = subscriber.tx.try_send(welcome(&state.epoch, state.seq));
        state.subscribers.push(subscriber);
        Ok(())
    }

    /// Removes subscriber `id` of `key`, if it is still there.
    pub fn unsubscribe(&self, key: &str, id: u64) {
        if let Some(entry) = self.existing(key) {
            entry
                .lock()
                .expect("key lock poisoned")
                .subscribers
                .retain(|s| s.id != id);
        }
    }

    /// The presence ids of every subscriber of `key`.
    pub fn presence(&self, key: &str) -> Vec<String> {
        self.existing(key)
            .map(|e| {
                e.lock()
                    .expect("key lock poisoned")
                    .subscribers
                    .iter()
                    .map(|s| s.presence_id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes every key for which `moved` returns true, and returns them with their
    /// state, so that the caller can redirect their subscribers.
    pub fn take_where(&self, mut moved: impl FnMut(&str) -> bool) -> Vec<(String, KeyState)> {
        let mut taken = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().expect("shard lock poisoned");
            let keys: Vec<String> = shard.keys().filter(|k| moved(k)).cloned().collect();
            for key in keys {
                if let Some(entry) = shard.remove(&key) {
                    let state = std::mem::replace(
                        &mut *entry.lock().expect("key lock poisoned"),
                        KeyState::new(),
                    );
                    taken.push((key, state));
                }
            }
        }
        taken
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("shard lock poisoned").len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A new epoch: 16 random URL-safe characters, never containing `:`.
pub fn new_epoch() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(data: &[u8]) -> Publish<'_> {
        Publish {
            data,
            content_type: "",
            expected_seq: None,
            expected_epoch: "",
        }
    }

    fn subscriber(
        table: &KeyTable,
        queue: usize,
    ) -> (Subscriber, mpsc::Receiver<Utf8Bytes>, Arc<Control>) {
        let (tx, rx) = mpsc::channel(queue);
        let control = Control::new();
        let s = Subscriber {
            id: table.next_subscriber_id(),
            presence_id: "c".into(),
            query: Arc::from("key=k"),
            tx,
            control: control.clone(),
        };
        (s, rx, control)
    }

    #[test]
    fn seqs_count_from_one_and_reach_subscribers_in_order() {
        let table = KeyTable::new(1024, 10);
        let (s, mut rx, _) = subscriber(&table, 16);
        table
            .subscribe("k", s, |_, seq| Utf8Bytes::from(format!("welcome {seq}")))
            .unwrap();
        for i in 1..=3u64 {
            let a = table.apply("k", publish(b"1")).unwrap();
            assert_eq!((a.seq, a.delivered), (i, 1));
        }
        assert_eq!(rx.try_recv().unwrap().as_str(), "welcome 0");
        for i in 1..=3 {
            let v: serde_json::Value =
                serde_json::from_str(rx.try_recv().unwrap().as_str()).unwrap();
            assert_eq!(v["seq"], i);
        }
    }

    #[test]
    fn a_full_queue_kicks_only_that_subscriber() {
        let table = KeyTable::new(1024, 10);
        let (slow, _slow_rx, slow_control) = subscriber(&table, 2);
        let (fast, mut fast_rx, _) = subscriber(&table, 64);
        table
            .subscribe("k", slow, |_, _| Utf8Bytes::from("w"))
            .unwrap();
        table
            .subscribe("k", fast, |_, _| Utf8Bytes::from("w"))
            .unwrap();
        for _ in 0..5 {
            table.apply("k", publish(b"1")).unwrap();
        }
        let kick = slow_control
            .kick
            .lock()
            .unwrap()
            .clone()
            .expect("slow subscriber kicked");
        assert_eq!(kick.code, CLOSE_SLOW_CONSUMER);
        assert_eq!(table.presence("k").len(), 1);
        let mut got = 0;
        while fast_rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 6);
    }

    #[test]
    fn compare_and_set() {
        let table = KeyTable::new(1024, 10);
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
        let table = KeyTable::new(4, 10);
        assert!(table.apply("k", publish(b"{bad")).is_err());
        assert!(table.apply("k", publish(b"123456")).is_err());
        assert_eq!(table.apply("k", publish(b"1")).unwrap().seq, 1);
    }

    #[test]
    fn subscriber_limit() {
        let table = KeyTable::new(4, 1);
        let (a, _ra, _) = subscriber(&table, 2);
        let (b, _rb, _) = subscriber(&table, 2);
        table
            .subscribe("k", a, |_, _| Utf8Bytes::from("w"))
            .unwrap();
        assert_eq!(
            table.subscribe("k", b, |_, _| Utf8Bytes::from("w")),
            Err(SubscribeError::TooManySubscribers(1))
        );
    }

    #[test]
    fn epochs_are_url_safe_and_distinct() {
        let a = new_epoch();
        assert_eq!(a.len(), 16);
        assert!(!a.contains(':'));
        assert_ne!(a, new_epoch());
    }

    #[test]
    fn take_where_removes_moved_keys() {
        let table = KeyTable::new(64, 10);
        table.apply("a", publish(b"1")).unwrap();
        table.apply("b", publish(b"1")).unwrap();
        let taken = table.take_where(|k| k == "a");
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, "a");
        assert_eq!(table.len(), 1);
    }
}
