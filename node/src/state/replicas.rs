//! The copies of other owners' keys this node holds as their successor.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::clock::now_ms;
use super::docs::ReplicaDoc;
use super::log::{KeySnapshot, LogEntry};
use super::member_ref::MemberRef;
use super::table::StrMap;
use crate::config::Limits;
use crate::protocol::frames::{self};

/// The copy of another node's key that this node holds as its successor.
#[derive(Debug, Clone)]
pub struct Replica {
    /// The owner that sent it; `None` when not known (a copy another member offered),
    /// which no ring has, so the replica is an orphan to promote.
    pub owner: Option<MemberRef>,
    pub epoch: String,
    /// In seq order, bounded like a log. A queue rather than a map: entries arrive in
    /// order (a retry replaces one in place), and a map's first leaf would cost every
    /// replicated key ~700 bytes.
    pub(super) entries: VecDeque<LogEntry>,
    pub(super) bytes: usize,
    pub(super) idempotency: Vec<(String, u64, u64)>,
    /// When it last changed, for dropping copies nobody updates any more.
    /// When it last changed, in ms of [`clock`](super::clock).
    pub(super) touched: u64,
    /// A `doc:` key's document, with every document update replicated applied.
    pub(super) doc: Option<ReplicaDoc>,
}

impl Replica {
    pub(super) fn new(owner: Option<&MemberRef>, epoch: &str) -> Replica {
        Replica {
            owner: owner.cloned(),
            epoch: epoch.to_owned(),
            entries: VecDeque::new(),
            bytes: 0,
            idempotency: Vec::new(),
            touched: now_ms(),
            doc: None,
        }
    }

    /// The last seq held.
    pub(super) fn seq(&self) -> u64 {
        self.entries.back().map_or(0, |e| e.seq)
    }

    /// The replica as a snapshot, for promotion.
    pub fn into_snapshot(self) -> KeySnapshot {
        let seq = self.seq();
        KeySnapshot {
            epoch: self.epoch,
            seq,
            doc: self.doc.map(|d| d.state()),
            entries: self.entries.into(),
            idempotency: self.idempotency,
        }
    }
}

/// The replicas this node holds for keys it does not own.
pub struct Replicas {
    /// Boxed values: the table grows by doubling while replicas arrive (a new owner's
    /// first publishes), and each growth copies every slot into fresh memory — 32 bytes
    /// a slot rather than a `Replica`'s 152.
    pub(super) map: Mutex<StrMap<Box<Replica>>>,
    pub(super) limits: Limits,
}

impl Replicas {
    pub fn new(limits: Limits) -> Replicas {
        Replicas {
            map: Mutex::new(StrMap::default()),
            limits,
        }
    }

    /// Takes a whole key from `owner`, replacing what was held.
    pub fn snapshot(&self, key: &str, owner: Option<&MemberRef>, snapshot: KeySnapshot) {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        let replica = map
            .entry(key.to_owned())
            .or_insert_with(|| Box::new(Replica::new(owner, &snapshot.epoch)));
        replica.touched = now_ms();
        // A snapshot is the whole key as the owner has it: nothing the replica held
        // beyond it (entries whose callers were told to retry) survives.
        replica.entries.clear();
        replica.bytes = 0;
        if replica.owner.as_ref() != owner {
            replica.owner = owner.cloned();
        }
        replica.doc = key.starts_with("doc:").then(|| {
            let updates = super::docs::snapshot_updates(&snapshot);
            ReplicaDoc::from_updates(updates.iter().map(Vec::as_slice))
        });
        replica.epoch = snapshot.epoch;
        replica.idempotency = snapshot.idempotency;
        for e in snapshot.entries {
            insert_entry(replica, e, &self.limits);
        }
    }

    /// Takes one entry from `owner`.
    pub fn entry(&self, key: &str, owner: Option<&MemberRef>, epoch: &str, entry: LogEntry) {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        let replica = map
            .entry(key.to_owned())
            .or_insert_with(|| Box::new(Replica::new(owner, epoch)));
        replica.touched = now_ms();
        if replica.epoch != epoch {
            replica.entries.clear();
            replica.bytes = 0;
            replica.idempotency.clear();
            replica.doc = None;
            replica.epoch = epoch.to_owned();
        }
        if let Some(update) = frames::doc_update(&entry.frame) {
            replica
                .doc
                .get_or_insert_with(ReplicaDoc::default)
                .apply(&update);
        }
        if replica.owner.as_ref() != owner {
            replica.owner = owner.cloned();
        }
        if !entry.idempotency_key.is_empty() {
            if replica.idempotency.capacity() == 0 {
                replica.idempotency.reserve_exact(1);
            }
            let digest = frames::payload_digest(&entry.frame);
            replica
                .idempotency
                .push((entry.idempotency_key.clone(), entry.seq, digest));
            let excess = replica
                .idempotency
                .len()
                .saturating_sub(self.limits.idempotency_window);
            replica.idempotency.drain(..excess);
        }
        insert_entry(replica, entry, &self.limits);
    }

    /// Takes a replica of a departed owner offered by another node: kept if it is newer
    /// (later epoch, else higher seq) than the one held. Its owner is recorded as
    /// unknown, so it is promoted like any orphan.
    pub fn offer(&self, key: &str, snapshot: KeySnapshot) {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        let last = snapshot.entries.last().map_or(0, |e| e.seq);
        if let Some(held) = map.get(key) {
            if (held.epoch.as_str(), held.seq()) >= (snapshot.epoch.as_str(), last) {
                return;
            }
        }
        let mut replica = Replica::new(None, &snapshot.epoch);
        replica.doc = key.starts_with("doc:").then(|| {
            let updates = super::docs::snapshot_updates(&snapshot);
            ReplicaDoc::from_updates(updates.iter().map(Vec::as_slice))
        });
        replica.idempotency = snapshot.idempotency;
        for e in snapshot.entries {
            insert_entry(&mut replica, e, &self.limits);
        }
        map.insert(key.to_owned(), Box::new(replica));
    }

    /// A copy of `key`'s replica as a snapshot, if one is held.
    pub fn copy(&self, key: &str) -> Option<KeySnapshot> {
        let map = self.map.lock().expect("replicas lock poisoned");
        map.get(key).map(|r| r.clone().into_snapshot())
    }

    /// Drops `key`'s replica if `owner` sent it (its owner dropped the key as idle).
    pub fn drop_from(&self, key: &str, owner: Option<&MemberRef>) -> bool {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        if map.get(key).is_some_and(|r| r.owner.as_ref() == owner) {
            map.remove(key);
            return true;
        }
        false
    }

    /// Drops every replica for which `stale` says so, given its key, owner and how long
    /// since it last changed; returns how many went.
    pub fn drop_where(
        &self,
        mut stale: impl FnMut(&str, Option<&MemberRef>, Duration) -> bool,
    ) -> usize {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        let before = map.len();
        let now = now_ms();
        map.retain(|key, r| !stale(key, r.owner.as_ref(), age(now, r.touched)));
        before - map.len()
    }

    /// Every replica's key and owner.
    pub fn owners(&self) -> Vec<(String, Option<MemberRef>)> {
        self.owners_unchanged_for(Duration::ZERO)
    }

    /// The key and owner of every replica that has not changed for `age`.
    pub fn owners_unchanged_for(&self, age: Duration) -> Vec<(String, Option<MemberRef>)> {
        let now = now_ms();
        let map = self.map.lock().expect("replicas lock poisoned");
        map.iter()
            .filter(|(_, r)| age.is_zero() || self::age(now, r.touched) >= age)
            .map(|(k, r)| (k.clone(), r.owner.clone()))
            .collect()
    }

    /// The owner of `key`'s replica, if one is held.
    pub fn owner_of(&self, key: &str) -> Option<Option<MemberRef>> {
        self.map
            .lock()
            .expect("replicas lock poisoned")
            .get(key)
            .map(|r| r.owner.clone())
    }

    pub fn take(&self, key: &str) -> Option<Replica> {
        let taken = self.map.lock().expect("replicas lock poisoned").remove(key);
        taken.map(|replica| *replica)
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("replicas lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub(super) fn insert_entry(replica: &mut Replica, entry: LogEntry, limits: &Limits) {
    replica.bytes += entry.frame.len();
    let entries = &mut replica.entries;
    if entries.capacity() == 0 {
        // Room for exactly one: most keys never get a second.
        entries.reserve_exact(1);
    }
    if entries.back().is_none_or(|last| last.seq < entry.seq) {
        entries.push_back(entry);
    } else {
        match entries.binary_search_by_key(&entry.seq, |e| e.seq) {
            Ok(i) => {
                let old = std::mem::replace(&mut entries[i], entry);
                replica.bytes -= old.frame.len();
            }
            Err(i) => entries.insert(i, entry),
        }
    }
    while replica.entries.len() > limits.history_len
        || (replica.bytes > limits.history_bytes && replica.entries.len() > 1)
    {
        if let Some(old) = replica.entries.pop_front() {
            replica.bytes -= old.frame.len();
        }
    }
}

/// How long ago `then` was, both in ms of [`clock`](super::clock).
fn age(now: u64, then: u64) -> Duration {
    Duration::from_millis(now.saturating_sub(then))
}
