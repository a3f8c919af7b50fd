//! Every key this node holds: a sharded map of [`KeyState`]s behind short locks.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::clock::now_ms;
use super::log::*;
use super::mailbox::*;
use super::member_ref::MemberRef;
use crate::config::Limits;
use crate::protocol::epoch::new_epoch;
use crate::protocol::frames::{self};
use crate::protocol::params::Resume;
use ringfeed_router::key::MAX_IDEMPOTENCY_KEY;

pub(super) const SHARDS: usize = 64;

pub(super) type KeyRef = Arc<Mutex<KeyState>>;

/// A key this node gave up: its subscribers to redirect, and its state to hand off.
pub struct Moved {
    pub key: String,
    pub subscribers: Vec<Subscriber>,
    pub snapshot: KeySnapshot,
}

/// A map keyed by client-chosen strings. std's SipHash on purpose: keys come from
/// clients, and the lookups are ~2% of a node's CPU in P4's profile — not worth a hash
/// without HashDoS resistance (foldhash was tried and taken out).
pub(super) type StrMap<V> = HashMap<String, V, RandomState>;

/// Every key this node holds state for.
pub struct KeyTable {
    pub(super) shards: Vec<Mutex<StrMap<KeyRef>>>,
    pub(super) hasher: RandomState,
    pub(super) next_subscriber: AtomicU64,
    pub(super) limits: Limits,
    /// Past the memory budget: no new keys (see [`crate::budget`]).
    pub(super) full: AtomicBool,
}

impl KeyTable {
    pub fn new(limits: Limits) -> KeyTable {
        KeyTable {
            shards: (0..SHARDS).map(|_| Mutex::new(StrMap::default())).collect(),
            hasher: RandomState::new(),
            next_subscriber: AtomicU64::new(1),
            limits,
            full: AtomicBool::new(false),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(super) fn shard(&self, key: &str) -> &Mutex<StrMap<KeyRef>> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h % SHARDS]
    }

    pub(super) fn entry(&self, key: &str) -> KeyRef {
        let mut shard = self.shard(key).lock().expect("shard lock poisoned");
        if let Some(e) = shard.get(key) {
            return e.clone();
        }
        let e = Arc::new(Mutex::new(KeyState::new(new_epoch(), now_ms())));
        shard.insert(key.to_owned(), e.clone());
        e
    }

    /// Refuses to create keys (publishes and subscriptions to keys not held yet) while
    /// `full`; keys already held, handed over or promoted are unaffected.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::Relaxed);
    }

    /// The entry of `key`, created only while the node is under its memory budget.
    pub(super) fn entry_within_budget(&self, key: &str) -> Option<KeyRef> {
        if !self.full.load(Ordering::Relaxed) {
            return Some(self.entry(key));
        }
        self.existing(key)
    }

    pub(super) fn existing(&self, key: &str) -> Option<KeyRef> {
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

    /// Stages a publish: a retry of a remembered idempotency key answers with the
    /// original seq; otherwise the update gets the next seq and waits until the
    /// successor (`successor`: id and incarnation, `None` without one) holds it — only
    /// then is it logged and shown to subscribers, in seq order.
    /// (`version`: the ring version that named the successor.)
    pub fn stage(
        &self,
        key: &str,
        publish: Publish<'_>,
        successor: Option<MemberRef>,
        version: u64,
    ) -> Result<Staged, ApplyError> {
        if publish.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApplyError::IdempotencyKeyTooLong(
                publish.idempotency_key.len(),
            ));
        }
        let entry = self
            .entry_within_budget(key)
            .ok_or(ApplyError::MemoryBudget)?;
        let mut state = entry.lock().expect("key lock poisoned");
        state.active = now_ms();
        if state.retired {
            return Err(ApplyError::Moved);
        }
        // The frame is made first: it checks the payload, and a reused idempotency
        // key is a retry only if it carries the same payload.
        let seq = state.next + 1;
        let frame = frames::update(
            key,
            seq,
            publish.data,
            publish.content_type,
            self.limits.payload(),
        )?;
        if !publish.idempotency_key.is_empty() {
            let digest = || frames::payload_digest(&frame);
            if let Some((seq, known)) = state.seq_of(publish.idempotency_key) {
                // 0: a window restored from a peer that did not send digests.
                if known != 0 && known != digest() {
                    return Err(ApplyError::IdempotencyConflict { seq });
                }
                return Ok(Staged::Duplicate(Applied {
                    seq,
                    epoch: state.epoch.to_string(),
                    delivered: 0,
                    duplicate: true,
                }));
            }
            if let Some(p) = state
                .pending
                .iter()
                .find(|p| p.idempotency_key == publish.idempotency_key)
            {
                if frames::payload_digest(&p.frame) != digest() {
                    return Err(ApplyError::IdempotencyConflict { seq: p.seq });
                }
                return Err(ApplyError::InFlight);
            }
        }
        if let Some(expected) = publish.expected_seq {
            let epoch_ok =
                publish.expected_epoch.is_empty() || *publish.expected_epoch == *state.epoch;
            if !epoch_ok || expected != state.next {
                return Err(ApplyError::SeqMismatch {
                    expected,
                    expected_epoch: publish.expected_epoch.to_owned(),
                    seq: state.next,
                    epoch: state.epoch.to_string(),
                });
            }
        }
        state.next = seq;
        let (done_tx, done) = oneshot::channel();
        let log_entry = LogEntry {
            seq,
            frame: frame.clone(),
            idempotency_key: publish.idempotency_key.to_owned(),
        };
        state.pending.push_back(Pending {
            seq,
            frame,
            idempotency_key: publish.idempotency_key.to_owned(),
            acked: false,
            done: Some(done_tx),
        });
        let to_replica = match state.replicate_to(successor, version, &self.limits) {
            ToReplica::Nothing => match state.replica_at.clone() {
                Some(to) => ToReplica::Entry(to, state.epoch.to_string(), log_entry),
                None => {
                    // No successor: nothing to wait for.
                    if let Some(p) = state.pending_mut(seq) {
                        p.acked = true;
                    }
                    state.advance(&self.limits);
                    ToReplica::Nothing
                }
            },
            snapshot => snapshot,
        };
        let applied = Applied {
            seq,
            epoch: state.epoch.to_string(),
            delivered: 0,
            duplicate: false,
        };
        Ok(Staged::Waiting {
            applied,
            to_replica,
            done,
        })
    }

    /// Successor `by` holds `seq` of `key` in `epoch`: show what can be shown. An
    /// answer from a node that is no longer the key's successor does not count: the
    /// new one has been sent the key whole and answers for it.
    pub fn replicated(&self, key: &str, epoch: &str, seq: u64, by: &MemberRef) {
        let Some(entry) = self.existing(key) else {
            return;
        };
        let mut state = entry.lock().expect("key lock poisoned");
        if *state.epoch != *epoch || state.replica_at.as_deref() != Some(by) {
            return;
        }
        if let Some(p) = state.pending_mut(seq) {
            p.acked = true;
        }
        state.advance(&self.limits);
    }

    /// The replica refused the key's updates (it does not see this node as the owner):
    /// nothing in flight will be shown; their callers are told to retry.
    pub fn abort_pending(&self, key: &str) {
        let Some(entry) = self.existing(key) else {
            return;
        };
        let mut state = entry.lock().expect("key lock poisoned");
        state.pending = VecDeque::new();
        state.next = state.seq;
        state.replica_at = None;
    }

    /// Points `key`'s replica at `successor`; what the new one must be sent.
    pub fn replicate_to(&self, key: &str, successor: Option<MemberRef>, version: u64) -> ToReplica {
        let Some(entry) = self.existing(key) else {
            return ToReplica::Nothing;
        };
        let mut state = entry.lock().expect("key lock poisoned");
        state.replicate_to(successor, version, &self.limits)
    }

    /// Forgets where `key`'s replica lives, so that the next look sends it whole.
    pub fn forget_replica(&self, key: &str) {
        if let Some(entry) = self.existing(key) {
            let mut state = entry.lock().expect("key lock poisoned");
            state.replica_at = None;
            state.replica_version = 0;
        }
    }

    /// Every key held, for a walk over them.
    pub fn keys(&self) -> Vec<String> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .expect("shard lock poisoned")
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Installs a snapshot as the state of `key` (this node is its new owner), if the
    /// key has no history here yet. The snapshot is taken (`take`) only under the key's
    /// lock, once it is clear it will be used, so two callers cannot race one of them
    /// into a fresh epoch. Returns the subscribers that had connected to a fresh state
    /// meanwhile, to be sent back so they resume in the restored epoch.
    pub fn restore(
        &self,
        key: &str,
        take: impl FnOnce() -> Option<KeySnapshot>,
    ) -> Option<Vec<Subscriber>> {
        let entry = self.entry(key);
        let mut state = entry.lock().expect("key lock poisoned");
        if state.next > 0 || state.retired {
            return None;
        }
        let restored = KeyState::restored(take()?, &self.limits, now_ms());
        let fresh = std::mem::replace(&mut *state, restored);
        Some(fresh.subscribers)
    }

    /// Whether `key` has a log here (an update was given a seq, or it was restored).
    pub fn has_history(&self, key: &str) -> bool {
        self.existing(key)
            .is_some_and(|e| e.lock().expect("key lock poisoned").next > 0)
    }

    /// Applies a publish with no successor to wait for (tests).
    #[cfg(test)]
    pub fn apply(&self, key: &str, publish: Publish<'_>) -> Result<Applied, ApplyError> {
        match self.stage(key, publish, None, 0)? {
            Staged::Duplicate(applied) => Ok(applied),
            Staged::Waiting {
                mut applied,
                mut done,
                ..
            } => {
                applied.delivered = done.try_recv().expect("shown at once without successor");
                Ok(applied)
            }
        }
    }

    /// Adds a subscriber to `key` and returns what it is sent before live updates.
    /// The snapshot and the registration happen under the key's lock, so the replay
    /// and the live updates neither overlap nor leave a gap.
    pub fn subscribe(
        &self,
        key: &str,
        subscriber: Subscriber,
        resume: Option<&Resume>,
    ) -> Result<Start, SubscribeError> {
        let entry = self
            .entry_within_budget(key)
            .ok_or(SubscribeError::MemoryBudget)?;
        let mut state = entry.lock().expect("key lock poisoned");
        state.active = now_ms();
        if state.retired {
            return Err(SubscribeError::Moved);
        }
        if state.subscribers.len() >= self.limits.max_subscribers {
            return Err(SubscribeError::TooManySubscribers(state.subscribers.len()));
        }
        let catchup = state.catchup(resume, usize::MAX);
        let replay_from = match (&catchup.reset, resume) {
            (None, Some(r)) => Some(r.since),
            _ => None,
        };
        if state.present.join(&subscriber.presence_id) {
            state.announce(key, &[&*subscriber.presence_id], &[], subscriber.id);
        }
        let presence = subscriber.wants_presence.then(|| state.presence_frame(key));
        if state.subscribers.capacity() == 0 {
            // Most keys (a user's feed) have one subscriber: no room for four.
            state.subscribers.reserve_exact(1);
        }
        state.subscribers.push(subscriber);
        Ok(Start {
            catchup,
            replay_from,
            presence,
        })
    }

    /// Removes the subscriber whose control is `control` from its key, if it is still
    /// there, and tells the others who left.
    pub fn unsubscribe(&self, control: &Control) {
        let key = control.key();
        let Some(entry) = self.existing(key) else {
            return;
        };
        let mut state = entry.lock().expect("key lock poisoned");
        state.active = now_ms();
        let Some(at) = state
            .subscribers
            .iter()
            .position(|s| std::ptr::eq(&*s.control, control))
        else {
            return;
        };
        let gone = state.subscribers.swap_remove(at);
        let last_of_id = state.present.leave(&gone.presence_id);
        if last_of_id {
            state.announce(key, &[], &[&*gone.presence_id], gone.id);
        }
    }

    /// What a reader at `resume` has missed, at most `max` updates, and a receiver
    /// that changes when the key's seq does (for long polls); `None` for a key not held
    /// here while the node is past its memory budget (a read creates the key).
    pub fn read(
        &self,
        key: &str,
        resume: &Resume,
        max: usize,
    ) -> Option<(Catchup, watch::Receiver<u64>)> {
        let entry = self.entry_within_budget(key)?;
        let mut state = entry.lock().expect("key lock poisoned");
        state.active = now_ms();
        let seq = state.seq;
        let changes = state
            .changes
            .get_or_insert_with(|| watch::Sender::new(seq))
            .subscribe();
        Some((state.catchup(Some(resume), max), changes))
    }

    /// The latest `(epoch, seq)` of `key`.
    pub fn position(&self, key: &str) -> (String, u64) {
        let entry = self.entry(key);
        let state = entry.lock().expect("key lock poisoned");
        (state.epoch.to_string(), state.seq)
    }

    /// The epoch and the latest seq shown of `key`, if this node holds it (unlike
    /// [`position`](Self::position), which makes the key).
    pub fn held_position(&self, key: &str) -> Option<(String, u64)> {
        let entry = self.existing(key)?;
        let state = entry.lock().expect("key lock poisoned");
        Some((state.epoch.to_string(), state.seq))
    }

    /// The presence ids of every connection of `key`, sorted, each once.
    pub fn presence(&self, key: &str) -> Vec<String> {
        let Some(entry) = self.existing(key) else {
            return Vec::new();
        };
        let state = entry.lock().expect("key lock poisoned");
        let mut ids: Vec<String> = state.present.ids().map(|id| id.to_string()).collect();
        ids.sort();
        ids
    }

    /// Removes every key for which `moved` returns true and returns their subscribers,
    /// so that the caller can redirect them. The state is retired in place: anyone who
    /// still holds it sees that and does not use it. What was in flight is dropped (its
    /// callers are told to retry, and land on the new owner).
    pub fn take_where(&self, mut moved: impl FnMut(&str) -> bool) -> Vec<Moved> {
        let mut taken = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().expect("shard lock poisoned");
            let keys: Vec<String> = shard.keys().filter(|k| moved(k)).cloned().collect();
            for key in keys {
                if let Some(entry) = shard.remove(&key) {
                    let mut state = entry.lock().expect("key lock poisoned");
                    state.retired = true;
                    state.pending = VecDeque::new();
                    state.next = state.seq;
                    let snapshot = state.snapshot();
                    taken.push(Moved {
                        key,
                        subscribers: std::mem::take(&mut state.subscribers),
                        snapshot,
                    });
                }
            }
        }
        taken
    }

    /// Drops every key idle for `ttl` — no subscriber, nothing in flight, nobody
    /// publishing to, joining, leaving or reading it — and returns each with the
    /// successor that holds its replica, to be told to drop it too. A later publish
    /// starts a new epoch; a client resuming the old one gets `reset`.
    /// Keys for which `keep` says so stay (a document with editors: they are not
    /// subscribers of the key).
    pub fn drop_idle(
        &self,
        ttl: Duration,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<(String, Option<MemberRef>)> {
        let mut dropped = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().expect("shard lock poisoned");
            shard.retain(|key, entry| {
                let mut state = entry.lock().expect("key lock poisoned");
                let idle = state.subscribers.is_empty()
                    && state.pending.is_empty()
                    && u128::from(now_ms().saturating_sub(state.active)) >= ttl.as_millis()
                    && !keep(key);
                if idle {
                    state.retired = true;
                    dropped.push((key.clone(), state.replica_at.as_deref().cloned()));
                }
                !idle
            });
        }
        dropped
    }

    /// Kicks every subscriber of every key with what `kick` makes for that key.
    pub fn kick_all(&self, kick: impl Fn(&str) -> Kick) {
        for shard in &self.shards {
            let entries: Vec<(String, KeyRef)> = shard
                .lock()
                .expect("shard lock poisoned")
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            for (key, entry) in entries {
                let state = entry.lock().expect("key lock poisoned");
                for s in &state.subscribers {
                    s.control.kick(kick(&key));
                }
            }
        }
    }

    /// Sets off the clock of every subscriber due by `now_ms` (see
    /// [`Control::set_due`]). One sweep of the table serves every connection's
    /// heartbeat; key locks are taken one at a time, after the shard's.
    pub fn fire_due(&self, now_ms: u64) {
        let mut entries: Vec<KeyRef> = Vec::new();
        for shard in &self.shards {
            entries.extend(shard.lock().expect("shard lock poisoned").values().cloned());
            for entry in entries.drain(..) {
                let state = entry.lock().expect("key lock poisoned");
                for s in &state.subscribers {
                    s.control.fire_if_due(now_ms);
                }
            }
        }
    }

    /// Calls `each(key, epoch, seq, subscribers)` for every key held, each key's lock
    /// held only for its call (for the hot-key view).
    pub fn activity(&self, mut each: impl FnMut(&str, &str, u64, usize)) {
        for shard in &self.shards {
            let keys: Vec<(String, KeyRef)> = shard
                .lock()
                .expect("shard lock poisoned")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (key, state) in keys {
                let state = state.lock().expect("key lock poisoned");
                each(&key, &state.epoch, state.seq, state.subscribers.len());
            }
        }
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
