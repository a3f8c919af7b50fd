//! One key's log on its owner: seqs, the bounded buffer of recent updates, the
//! updates waiting for the successor (the high watermark), and what a reader is sent.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::idempotency::{Idempotency, SeqDigest};
use super::mailbox::Subscriber;
use super::member_ref::MemberRef;
use super::presence::Presence;
use crate::config::Limits;
use crate::protocol::frames::{self, PayloadError};
use crate::protocol::params::Resume;
use ringfeed_router::key::MAX_IDEMPOTENCY_KEY;

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("idempotency key is {0} bytes; the limit is {MAX_IDEMPOTENCY_KEY}")]
    IdempotencyKeyTooLong(usize),
    #[error("an update with this idempotency key is still being replicated; retry")]
    InFlight,
    #[error("idempotency key already used for a different payload or content type (seq {seq}, within the idempotency window)")]
    IdempotencyConflict { seq: u64 },
    #[error("the key moved to another node; retry")]
    Moved,
    #[error("the node is past its memory budget and takes no new keys")]
    MemoryBudget,
    #[error("expected seq {expected} in epoch {expected_epoch:?}, but the key is at seq {seq} in epoch {epoch}")]
    SeqMismatch {
        expected: u64,
        expected_epoch: String,
        seq: u64,
        epoch: String,
    },
}

/// A publish as the key sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Publish<'a> {
    pub data: &'a [u8],
    pub content_type: &'a str,
    pub expected_seq: Option<u64>,
    pub expected_epoch: &'a str,
    /// Empty: no idempotency.
    pub idempotency_key: &'a str,
}

/// What an applied publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    pub epoch: String,
    pub delivered: u32,
    /// A retry of an update already in the log: nothing was delivered again.
    pub duplicate: bool,
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("key has {0} subscribers, the limit")]
    TooManySubscribers(usize),
    #[error("the key moved to another node")]
    Moved,
    #[error("the node is past its memory budget and takes no new keys")]
    MemoryBudget,
}

/// Why a `since` cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// Updates after `since` have left the buffer.
    HistoryGap,
    /// `since` belongs to another epoch.
    EpochChanged,
    /// `since` is beyond the key's seq.
    SeqAhead,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::HistoryGap => "history_gap",
            ResetReason::EpochChanged => "epoch_changed",
            ResetReason::SeqAhead => "seq_ahead",
        }
    }
}

/// A `reset`: the stream continues after `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    pub reason: ResetReason,
    pub seq: u64,
}

impl Reset {
    pub fn frame(&self, key: &str, epoch: &str) -> Utf8Bytes {
        let frame = json!({"type": "reset", "key": key, "epoch": epoch, "seq": self.seq, "reason": self.reason.as_str()});
        Utf8Bytes::from(frame.to_string())
    }
}

/// What the log can tell a reader who has seen up to `since`.
#[derive(Debug, Clone)]
pub struct Catchup {
    pub epoch: String,
    /// The key's latest seq.
    pub seq: u64,
    pub reset: Option<Reset>,
    /// Update frames after `since` (or after the reset's seq), oldest first.
    pub updates: Vec<Utf8Bytes>,
    /// The position the reader continues from after these updates.
    pub position: u64,
}

/// What a new subscriber is sent before live updates, in this order: `welcome`, the
/// reset if any, the replay, then the presence list if asked for.
#[derive(Debug, Clone)]
pub struct Start {
    pub catchup: Catchup,
    /// The `since` a replay follows from, when the client gave one that is served.
    pub replay_from: Option<u64>,
    pub presence: Option<Utf8Bytes>,
}

/// One logged update.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) seq: u64,
    pub(super) frame: Utf8Bytes,
}

/// An update given a seq, waiting for the successor to hold it.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) seq: u64,
    pub(super) frame: Utf8Bytes,
    pub(super) idempotency_key: String,
    pub(super) acked: bool,
    /// Told the number of subscribers it reached, once shown.
    pub(super) done: Option<oneshot::Sender<u32>>,
}

/// One update as it travels to a replica.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub seq: u64,
    pub frame: Utf8Bytes,
    pub idempotency_key: String,
}

/// A key's whole state as its replica needs it.
#[derive(Debug, Clone)]
pub struct KeySnapshot {
    pub epoch: String,
    /// The seq subscribers have seen.
    pub seq: u64,
    /// The buffered history, then the entries still in flight, in seq order.
    pub entries: Vec<LogEntry>,
    /// The idempotency window, oldest first: key, seq, and its payload's digest
    /// ([`frames::payload_digest`]; 0 when not known).
    pub idempotency: Vec<(String, u64, u64)>,
    /// A `doc:` key's document, as one Yjs update (v1) holding its whole state: it
    /// holds at least every document update the history lost (docs/design.md
    /// *Documents*). Filled in by whoever has the document, not by the key's log.
    pub doc: Option<bytes::Bytes>,
}

impl LogEntry {
    /// About what the entry takes on the wire (with `key` and `epoch` beside it).
    pub fn wire_bytes(&self, key: &str, epoch: &str) -> usize {
        self.frame.len() + self.idempotency_key.len() + key.len() + epoch.len() + 32
    }
}

impl KeySnapshot {
    /// About what the snapshot of `key` takes on the wire.
    pub fn wire_bytes(&self, key: &str) -> usize {
        let entries: usize = self
            .entries
            .iter()
            .map(|e| e.wire_bytes(key, &self.epoch))
            .sum();
        let window: usize = self.idempotency.iter().map(|(id, ..)| id.len() + 24).sum();
        let doc = self.doc.as_ref().map_or(0, |d| d.len());
        entries + window + doc + key.len() + self.epoch.len() + 32
    }
}

/// What must go to the successor after staging an update.
#[derive(Debug)]
pub enum ToReplica {
    /// Nothing: the replica already has everything else, or there is no successor.
    Nothing,
    /// This entry, to the successor the key's replica lives at (shared with the key,
    /// not copied for each publish).
    Entry(Arc<MemberRef>, String, LogEntry),
    /// The successor changed: the whole key, to the new one.
    Snapshot(Arc<MemberRef>, KeySnapshot),
}

/// A staged publish.
#[derive(Debug)]
pub enum Staged {
    /// A retry of an update already shown: the original seq, nothing delivered.
    Duplicate(Applied),
    /// Given a seq; shown once the successor holds it (at once without successor).
    Waiting {
        applied: Applied,
        to_replica: ToReplica,
        done: oneshot::Receiver<u32>,
    },
}

/// One key's state.
#[derive(Debug)]
pub struct KeyState {
    /// A `Box<str>`: every key holds it, and it never grows.
    pub epoch: Box<str>,
    /// The last seq shown to subscribers: every update up to it is held by the
    /// successor too (the high watermark).
    pub seq: u64,
    /// The last seq given out; `seq+1..=next` wait in `pending` for the successor.
    pub(super) next: u64,
    /// `seq+1..=next` in order. A queue rather than a map (the seqs are consecutive),
    /// let go whenever it empties: most keys have nothing in flight most of the time,
    /// and a kept map's first leaf would cost every key ever published to ~900 bytes.
    pub(super) pending: VecDeque<Pending>,
    /// The successor (id, incarnation) that holds this key's replica, if any, and the
    /// ring version that named it: an older view never moves it back.
    pub(super) replica_at: Option<Arc<MemberRef>>,
    pub(super) replica_version: u64,
    /// The key moved away: whoever still holds this state must not use it.
    pub(super) retired: bool,
    pub(super) log: VecDeque<Entry>,
    /// The log's frames' bytes: at most [`crate::config::MAX_HISTORY_BYTES`] and one
    /// frame (a `u32`, packed beside `retired`).
    pub(super) log_bytes: u32,
    /// Made by the first publish that carries an idempotency key.
    pub(super) idempotency: Option<Box<Idempotency>>,
    pub subscribers: Vec<Subscriber>,
    /// Connections per presence id.
    pub(super) present: Presence,
    /// The latest seq, for long polls waiting on the key: made by the first poll and
    /// let go once none waits (a `watch` costs ~300 bytes; most keys are never polled).
    pub(super) changes: Option<watch::Sender<u64>>,
    /// When it was last published to, subscribed to, left or read ([`now_ms`]): an
    /// owner drops a key idle for long enough with no subscriber.
    pub(super) active: u64,
}

impl KeyState {
    /// A key with no history yet, starting epoch `epoch`, active at `now` (ms of
    /// [`clock`](super::clock)). The key state reads no clock of its own.
    pub(super) fn new(epoch: String, now: u64) -> KeyState {
        KeyState {
            epoch: epoch.into(),
            seq: 0,
            next: 0,
            pending: VecDeque::new(),
            replica_at: None,
            replica_version: 0,
            retired: false,
            log: VecDeque::new(),
            log_bytes: 0,
            idempotency: None,
            subscribers: Vec::new(),
            present: Presence::default(),
            changes: None,
            active: now,
        }
    }

    /// Tells waiting long polls that the seq moved; forgets the `watch` once none waits.
    pub(super) fn changed(&mut self) {
        if let Some(changes) = &self.changes {
            if changes.receiver_count() == 0 {
                self.changes = None;
            } else {
                changes.send_replace(self.seq);
            }
        }
    }

    /// Shows every pending update the successor holds, in seq order, up to the first
    /// that it does not.
    pub(super) fn advance(&mut self, limits: &Limits) {
        let mut moved = false;
        while let Some(p) = self.pending.front() {
            if p.seq != self.seq + 1 || !p.acked {
                break;
            }
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let seq = p.seq;
            let delivered = self
                .subscribers
                .iter()
                .filter(|s| s.offer(&p.frame))
                .count();
            self.seq = seq;
            self.append(seq, p.frame, p.idempotency_key, limits);
            if let Some(done) = p.done {
                let _ = done.send(u32::try_from(delivered).unwrap_or(u32::MAX));
            }
            moved = true;
        }
        if self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
        if moved {
            self.changed();
        }
    }

    /// The update in flight with `seq`, if any.
    pub(super) fn pending_mut(&mut self, seq: u64) -> Option<&mut Pending> {
        let first = self.pending.front()?.seq;
        let p = self
            .pending
            .get_mut(usize::try_from(seq.checked_sub(first)?).ok()?)?;
        (p.seq == seq).then_some(p)
    }

    /// The whole key for a new replica: history, window, and what is in flight.
    pub(super) fn snapshot(&self) -> KeySnapshot {
        let seq_of: HashMap<u64, &str> = self
            .idempotency
            .iter()
            .flat_map(|window| window.oldest_first())
            .map(|(k, s, _)| (s, k))
            .collect();
        let mut entries: Vec<LogEntry> = self
            .log
            .iter()
            .map(|e| LogEntry {
                seq: e.seq,
                frame: e.frame.clone(),
                idempotency_key: seq_of
                    .get(&e.seq)
                    .map_or_else(String::new, |k| (*k).to_owned()),
            })
            .collect();
        entries.extend(self.pending.iter().map(|p| LogEntry {
            seq: p.seq,
            frame: p.frame.clone(),
            idempotency_key: p.idempotency_key.clone(),
        }));
        let idempotency = self
            .idempotency
            .iter()
            .flat_map(|window| window.oldest_first())
            .map(|(k, s, d)| (k.to_owned(), s, d))
            .collect();
        KeySnapshot {
            epoch: self.epoch.to_string(),
            seq: self.seq,
            entries,
            idempotency,
            doc: None,
        }
    }

    /// Points the key's replica at `successor`; what the new one must be sent.
    pub(super) fn replicate_to(
        &mut self,
        successor: Option<MemberRef>,
        version: u64,
        limits: &Limits,
    ) -> ToReplica {
        if self.replica_at.as_deref() == successor.as_ref() || version < self.replica_version {
            return ToReplica::Nothing;
        }
        self.replica_version = version;
        self.replica_at = successor.map(Arc::new);
        match self.replica_at.clone() {
            Some(to) => ToReplica::Snapshot(to, self.snapshot()),
            None => {
                // Nobody to wait for: show what was waiting.
                for p in &mut self.pending {
                    p.acked = true;
                }
                self.advance(limits);
                ToReplica::Nothing
            }
        }
    }

    /// A key's state rebuilt for its new owner from a snapshot (its replica, or what
    /// its previous owner handed off): same epoch, and the longest run of entries
    /// without a gap.
    pub(super) fn restored(snapshot: KeySnapshot, limits: &Limits, now: u64) -> KeyState {
        let mut state = KeyState::new(snapshot.epoch, now);
        let mut expected = None;
        for e in snapshot.entries {
            if expected.is_some_and(|x| x != e.seq) {
                break;
            }
            state.append(e.seq, e.frame, String::new(), limits);
            state.seq = e.seq;
            expected = Some(e.seq + 1);
        }
        // A snapshot with no entries still knows its seq (its history was trimmed away).
        if expected.is_none() {
            state.seq = snapshot.seq;
        }
        for (id, seq, digest) in snapshot.idempotency {
            if seq <= state.seq && state.seq_of(&id).is_none() {
                state.remember(id, seq, digest, limits.idempotency_window);
            }
        }
        state.next = state.seq;
        state.changed();
        state
    }

    /// What a reader at `resume` has missed (at most `max` updates).
    pub(super) fn catchup(&self, resume: Option<&Resume>, max: usize) -> Catchup {
        let mut out = Catchup {
            epoch: self.epoch.to_string(),
            seq: self.seq,
            reset: None,
            updates: Vec::new(),
            position: self.seq,
        };
        let Some(resume) = resume else { return out };
        if resume.epoch.as_deref().is_some_and(|e| *e != *self.epoch) {
            out.reset = Some(Reset {
                reason: ResetReason::EpochChanged,
                seq: self.seq,
            });
            return out;
        }
        if resume.since > self.seq {
            out.reset = Some(Reset {
                reason: ResetReason::SeqAhead,
                seq: self.seq,
            });
            return out;
        }
        let first = self.log.front().map_or(self.seq + 1, |e| e.seq);
        let mut from = resume.since;
        if from + 1 < first {
            // Part of what was asked for is gone: say so, then give what is left.
            out.reset = Some(Reset {
                reason: ResetReason::HistoryGap,
                seq: first - 1,
            });
            from = first - 1;
        }
        let skip = usize::try_from(from + 1 - first).unwrap_or(usize::MAX);
        out.updates = self
            .log
            .iter()
            .skip(skip)
            .take(max)
            .map(|e| e.frame.clone())
            .collect();
        out.position = from + out.updates.len() as u64;
        out
    }

    pub(super) fn append(
        &mut self,
        seq: u64,
        frame: Utf8Bytes,
        idempotency_key: String,
        limits: &Limits,
    ) {
        if !idempotency_key.is_empty() && limits.idempotency_window > 0 {
            let digest = frames::payload_digest(&frame);
            self.remember(idempotency_key, seq, digest, limits.idempotency_window);
        }
        let bytes = |frame: &Utf8Bytes| u32::try_from(frame.len()).unwrap_or(u32::MAX);
        self.log_bytes = self.log_bytes.saturating_add(bytes(&frame));
        if self.log.capacity() == 0 {
            // Room for exactly one: most keys never get a second.
            self.log.reserve_exact(1);
        }
        self.log.push_back(Entry { seq, frame });
        while self.log.len() > limits.history_len
            || (self.log_bytes as usize > limits.history_bytes && self.log.len() > 1)
        {
            if let Some(old) = self.log.pop_front() {
                self.log_bytes = self.log_bytes.saturating_sub(bytes(&old.frame));
            }
        }
    }

    /// The seq that idempotency key `id` got and its payload's digest, if the window
    /// remembers it.
    pub(super) fn seq_of(&self, id: &str) -> Option<SeqDigest> {
        self.idempotency.as_ref()?.get(id)
    }

    /// Remembers that idempotency key `id` got `seq` for a payload of `digest`,
    /// forgetting the oldest past `window`.
    pub(super) fn remember(&mut self, id: String, seq: u64, digest: u64, window: usize) {
        self.idempotency
            .get_or_insert_with(Box::default)
            .remember(id, seq, digest, window);
    }

    pub(super) fn presence_frame(&self, key: &str) -> Utf8Bytes {
        let mut ids: Vec<&Arc<str>> = self.present.ids().collect();
        ids.sort();
        let members: Vec<_> = ids.into_iter().map(|id| json!({"id": &**id})).collect();
        Utf8Bytes::from(json!({"type": "presence", "key": key, "members": members}).to_string())
    }

    pub(super) fn announce(&self, key: &str, joined: &[&str], left: &[&str], except: u64) {
        let to_json = |ids: &[&str]| ids.iter().map(|id| json!({"id": id})).collect::<Vec<_>>();
        let frame = Utf8Bytes::from(
            json!({"type": "presence", "key": key, "joined": to_json(joined), "left": to_json(left)}).to_string(),
        );
        for s in self
            .subscribers
            .iter()
            .filter(|s| s.wants_presence && s.id != except)
        {
            s.offer(&frame);
        }
    }
}
