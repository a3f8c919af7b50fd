//! Per-key state on the owner: the log (epoch, seq, a bounded buffer of recent updates,
//! the idempotency window), the subscribers, and exact presence.
//!
//! Each key's state sits behind its own short `std::sync::Mutex`, and nothing awaits
//! while holding it. A publish assigns the next seq, encodes the frame once, appends it
//! to the buffer and offers it to every subscriber's bounded queue with `try_send` —
//! all under the lock. That is what gives the guarantees: every subscriber sees seqs in
//! order, and a new subscriber's welcome, replay and first live update line up exactly
//! (the replay snapshot and the registration happen under the same lock). A full queue
//! never blocks the key: that subscriber is kicked with 4408 and resumes with `since`.
//!
//! (docs/design.md suggests one task per key as the single writer. A mutex held only for
//! synchronous work gives the same ordering without a channel hop and a task per key;
//! the replication step that needs awaiting comes with its own ordering, later.)

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::task::AtomicWaker;
use rand::Rng;
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::frames::{self, PayloadError};

const SHARDS: usize = 64;

/// WebSocket close code: slow consumer.
pub const CLOSE_SLOW_CONSUMER: u16 = 4408;

pub use ringfeed_router::key::MAX_IDEMPOTENCY_KEY;

/// The bounds of every key's state.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_payload: usize,
    /// Deepest nesting of a JSON payload.
    pub max_json_depth: usize,
    pub max_subscribers: usize,
    /// Updates kept for resume, at most…
    pub history_len: usize,
    /// …and at most this many bytes of encoded frames.
    pub history_bytes: usize,
    /// Idempotency keys remembered per key (those of the last N updates).
    pub idempotency_window: usize,
}

impl Limits {
    /// The bounds of one payload.
    pub fn payload(&self) -> frames::PayloadLimits {
        frames::PayloadLimits {
            max_payload: self.max_payload,
            max_json_depth: self.max_json_depth,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 64 * 1024,
            max_json_depth: 64,
            max_subscribers: 100_000,
            history_len: 1000,
            history_bytes: 1024 * 1024,
            idempotency_window: 1000,
        }
    }
}

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

/// Where a client wants to continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    /// `None`: read `since` in the current epoch.
    pub epoch: Option<String>,
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

/// How a connection is told to close by someone other than itself.
#[derive(Debug, Clone)]
pub struct Kick {
    /// A frame to send before closing (a `redirect`), if any.
    pub frame: Option<Utf8Bytes>,
    pub code: u16,
    pub reason: String,
}

/// The side of a connection that others can reach: its queue of frames and its kick
/// switch. It also names its key, so a connection holds this one pointer and not a
/// copy of the key; the key finds its subscriber by this control.
///
/// The queue is a `VecDeque` under a lock rather than a tokio `mpsc` channel: it is
/// allocated only once something is queued and grows with what is queued, where a
/// channel costs ~1.5 KiB per connection up front (its cache-padded state and first
/// 32-slot block) — most of an idle connection's cost.
#[derive(Debug)]
pub struct Control {
    /// The key subscribed to. A `Box<str>`: it never grows.
    key: Box<str>,
    /// The queue and the kick, under one lock: a waking reader looks at both.
    outbox: Mutex<Outbox>,
    /// The reader's waker, woken by a push, a close, a kick and its clock: one atomic
    /// swap (a `Notify` would take its waiter lock for each of a hot key's
    /// subscribers, and cost every idle connection its size and a waiter).
    ready: AtomicWaker,
    /// What the client sent in the current second, for its transport's per-second
    /// bounds ([`Control::count_from_client`]): the second in the high half, messages
    /// and control frames in two `u16`s below. Here rather than in the connection's
    /// task, which must stay within its 512-byte cell; one reader and writer.
    from_client: AtomicU64,
    /// When the reader's clock is next due, in ms of the node's clock
    /// ([`crate::node::Node::clock_ms`]): [`Control::NEVER`], or [`Control::FIRED`]
    /// once the node's sweep ([`KeyTable::fire_due`]) found it due. A WebSocket
    /// session keeps its deadlines (next ping, end of the client's silence) here
    /// rather than in a timer of its own, which every idle connection would hold.
    due: AtomicU64,
}

#[derive(Debug)]
struct Outbox {
    frames: VecDeque<Utf8Bytes>,
    /// Boxed: a kick (64 bytes) is rare, and every idle connection holds the slot.
    kick: Option<Box<Kick>>,
    /// At most this many frames are queued (a `u32`, packed beside `closed`).
    capacity: u32,
    /// The key let go of the subscriber: nothing more will come.
    closed: bool,
}

impl Outbox {
    /// `Some(Some(frame))`, `Some(None)` once closed and drained, `None` while empty.
    fn next(&mut self) -> Option<Option<Utf8Bytes>> {
        match self.frames.pop_front() {
            Some(frame) => Some(Some(frame)),
            None if self.closed => Some(None),
            None => None,
        }
    }
}

/// What woke a connection's reader ([`Control::poll_ready`]).
#[derive(Debug)]
pub enum Ready {
    /// Someone asked the connection to close.
    Kicked(Kick),
    /// Its clock went off; the reader sets it again.
    Due,
    /// The next queued frame, or `None` once the key let go and the queue is drained.
    Frame(Option<Utf8Bytes>),
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    Closed,
}

impl Control {
    /// No clock set.
    const NEVER: u64 = u64::MAX;
    /// The clock went off.
    const FIRED: u64 = 0;

    /// The control of a subscriber of `key`, with room for `capacity` queued frames.
    pub fn new(key: &str, capacity: usize) -> Arc<Control> {
        Arc::new(Control {
            key: key.into(),
            outbox: Mutex::new(Outbox {
                frames: VecDeque::new(),
                kick: None,
                capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
                closed: false,
            }),
            ready: AtomicWaker::new(),
            from_client: AtomicU64::new(0),
            due: AtomicU64::new(Control::NEVER),
        })
    }

    /// Counts one message from the client in `second` (a control frame if `control`)
    /// and returns the second's counts so far: (messages, control frames). Only the
    /// connection's own task calls it.
    pub fn count_from_client(&self, second: u64, control: bool) -> (u32, u32) {
        let packed = self.from_client.load(Ordering::Relaxed);
        let second = second as u32;
        let (mut messages, mut controls) = if (packed >> 32) as u32 == second {
            ((packed >> 16) as u16, packed as u16)
        } else {
            (0, 0)
        };
        messages = messages.saturating_add(1);
        controls = controls.saturating_add(u16::from(control));
        let packed = (u64::from(second) << 32) | (u64::from(messages) << 16) | u64::from(controls);
        self.from_client.store(packed, Ordering::Relaxed);
        (u32::from(messages), u32::from(controls))
    }

    /// The key subscribed to.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Sets the reader's clock to go off at `at_ms` (ms of the node's clock, from 1).
    pub fn set_due(&self, at_ms: u64) {
        self.due.store(at_ms.max(1), Ordering::Release);
    }

    /// Sets the clock off, and wakes the reader, if it is due by `now_ms`.
    fn fire_if_due(&self, now_ms: u64) {
        let due = self.due.load(Ordering::Acquire);
        if due != Control::FIRED
            && due <= now_ms
            && self
                .due
                .compare_exchange(due, Control::FIRED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.ready.wake();
        }
    }

    /// Asks the connection to close; the first kick wins.
    pub fn kick(&self, kick: Kick) {
        {
            let mut outbox = self.outbox.lock().expect("outbox lock poisoned");
            if outbox.kick.is_some() {
                return;
            }
            outbox.kick = Some(Box::new(kick));
        }
        self.ready.wake();
    }

    /// Waits until someone kicks, and returns the kick. Waits in the same task as
    /// [`recv`](Self::recv) (one reader, one waker), and costs nothing until polled.
    pub fn kicked(&self) -> impl Future<Output = Kick> + '_ {
        self.wait(|c| {
            c.outbox
                .lock()
                .expect("outbox lock poisoned")
                .kick
                .as_deref()
                .cloned()
        })
    }

    /// What the reader should do next, in the order a live connection takes them: the
    /// kick, then its clock, then the next frame (`None` once closed and drained).
    /// One look and one waker registration for all three: an idle connection waits in
    /// this, polled together with its socket.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Ready> {
        self.poll_look(cx, |c| {
            let mut outbox = c.outbox.lock().expect("outbox lock poisoned");
            if let Some(kick) = outbox.kick.as_deref() {
                return Some(Ready::Kicked(kick.clone()));
            }
            if c.due.load(Ordering::Acquire) == Control::FIRED {
                return Some(Ready::Due);
            }
            outbox.next().map(Ready::Frame)
        })
    }

    /// Waits until `look` finds something, woken by `ready`. A plain `poll_fn`, not an
    /// async fn: an idle SSE stream waits in two of these, and an async fn's state
    /// would keep `look` twice. `look` is handed the control rather than capturing
    /// it, so it takes no room: each wait is one pointer.
    fn wait<'a, T>(
        &'a self,
        look: impl Fn(&Control) -> Option<T> + 'a,
    ) -> impl Future<Output = T> + 'a {
        std::future::poll_fn(move |cx| self.poll_look(cx, &look))
    }

    /// `look`'s find, or `Pending` with the waker registered for the next `ready`.
    fn poll_look<T>(&self, cx: &mut Context<'_>, look: impl Fn(&Control) -> Option<T>) -> Poll<T> {
        if let Some(found) = look(self) {
            return Poll::Ready(found);
        }
        self.ready.register(cx.waker());
        // A wake between the first look and the registration woke nobody: look again.
        match look(self) {
            Some(found) => Poll::Ready(found),
            None => Poll::Pending,
        }
    }

    /// Queues `frame` for the connection's writer.
    pub fn push(&self, frame: Utf8Bytes) -> Result<(), Refused> {
        {
            let mut outbox = self.outbox.lock().expect("outbox lock poisoned");
            if outbox.closed {
                return Err(Refused::Closed);
            }
            if outbox.frames.len() >= outbox.capacity as usize {
                return Err(Refused::Full);
            }
            outbox.frames.push_back(frame);
        }
        self.ready.wake();
        Ok(())
    }

    /// The next queued frame, if one is waiting.
    pub fn try_recv(&self) -> Option<Utf8Bytes> {
        self.next().flatten()
    }

    /// Waits for the next queued frame; `None` once the key let go of the subscriber
    /// and the queue is empty. One reader at a time.
    pub fn recv(&self) -> impl Future<Output = Option<Utf8Bytes>> + '_ {
        self.wait(Control::next)
    }

    /// [`Outbox::next`], under the lock.
    fn next(&self) -> Option<Option<Utf8Bytes>> {
        self.outbox.lock().expect("outbox lock poisoned").next()
    }

    /// Nothing more will be queued; the reader drains what is there, then sees `None`.
    fn close(&self) {
        self.outbox.lock().expect("outbox lock poisoned").closed = true;
        self.ready.wake();
    }
}

/// A subscriber as its key holds it. Dropping it (unsubscribed, or let go with its
/// key) closes its queue.
#[derive(Debug)]
pub struct Subscriber {
    pub id: u64,
    /// Who it is for presence: the ticket's subject, or a connection id. Shared with
    /// the key's presence counts, not copied into them.
    pub presence_id: Arc<str>,
    /// Whether it is sent `presence` frames.
    pub wants_presence: bool,
    /// The query it connected with, to build its redirect; `None` when it said nothing
    /// but the key and a ring version, as most do (see [`Subscriber::kept_query`]).
    pub query: Option<Arc<str>>,
    pub control: Arc<Control>,
}

impl Subscriber {
    /// What a subscriber keeps of the query `raw` it connected with: `None` if `raw`
    /// names nothing but the key and a ring version, since a redirect replaces the
    /// version and can rebuild the key (every idle connection would hold ~50 bytes).
    pub fn kept_query(raw: &Arc<str>) -> Option<Arc<str>> {
        form_urlencoded::parse(raw.as_bytes())
            .any(|(name, _)| name != "key" && name != "rv")
            .then(|| raw.clone())
    }

    /// The query its redirect carries on (the redirect replaces any `rv`).
    pub fn redirect_query(&self) -> Cow<'_, str> {
        match &self.query {
            Some(query) => Cow::Borrowed(query),
            None => Cow::Owned(
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("key", self.control.key())
                    .finish(),
            ),
        }
    }

    /// Queues `frame`; a full queue kicks the subscriber as a slow consumer.
    fn offer(&self, frame: &Utf8Bytes) -> bool {
        match self.control.push(frame.clone()) {
            Ok(()) => true,
            Err(Refused::Full) => {
                self.control.kick(Kick {
                    frame: None,
                    code: CLOSE_SLOW_CONSUMER,
                    reason: "slow consumer".into(),
                });
                false
            }
            Err(Refused::Closed) => false,
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.control.close();
    }
}

/// One logged update.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    frame: Utf8Bytes,
}

/// An update given a seq, waiting for the successor to hold it.
#[derive(Debug)]
struct Pending {
    seq: u64,
    frame: Utf8Bytes,
    idempotency_key: String,
    acked: bool,
    /// Told the number of subscribers it reached, once shown.
    done: Option<oneshot::Sender<u32>>,
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
        entries + window + key.len() + self.epoch.len() + 32
    }
}

/// The most a node puts in one request to a peer (a replication batch, a hand-off
/// call) before starting another; one key's snapshot may take it past this, never two.
/// The receiver's decode limit ([`crate::config::Config::max_grpc_message`]) allows it.
pub const REQUEST_BUDGET: usize = 4 << 20;

/// What must go to the successor after staging an update.
#[derive(Debug)]
pub enum ToReplica {
    /// Nothing: the replica already has everything else, or there is no successor.
    Nothing,
    /// This entry, to the successor the key's replica lives at (shared with the key,
    /// not copied for each publish).
    Entry(Arc<(String, String)>, String, LogEntry),
    /// The successor changed: the whole key, to the new one.
    Snapshot(Arc<(String, String)>, KeySnapshot),
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
    next: u64,
    /// `seq+1..=next` in order. A queue rather than a map (the seqs are consecutive),
    /// let go whenever it empties: most keys have nothing in flight most of the time,
    /// and a kept map's first leaf would cost every key ever published to ~900 bytes.
    pending: VecDeque<Pending>,
    /// The successor (id, incarnation) that holds this key's replica, if any, and the
    /// ring version that named it: an older view never moves it back.
    replica_at: Option<Arc<(String, String)>>,
    replica_version: u64,
    /// The key moved away: whoever still holds this state must not use it.
    retired: bool,
    log: VecDeque<Entry>,
    /// The log's frames' bytes: at most [`crate::config::MAX_HISTORY_BYTES`] and one
    /// frame (a `u32`, packed beside `retired`).
    log_bytes: u32,
    /// Made by the first publish that carries an idempotency key.
    idempotency: Option<Box<Idempotency>>,
    pub subscribers: Vec<Subscriber>,
    /// Connections per presence id.
    present: Presence,
    /// The latest seq, for long polls waiting on the key: made by the first poll and
    /// let go once none waits (a `watch` costs ~300 bytes; most keys are never polled).
    changes: Option<watch::Sender<u64>>,
    /// When it was last published to, subscribed to, left or read ([`now_ms`]): an
    /// owner drops a key idle for long enough with no subscriber.
    active: u64,
}

impl KeyState {
    fn new() -> KeyState {
        KeyState {
            epoch: new_epoch().into(),
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
            active: now_ms(),
        }
    }

    /// Tells waiting long polls that the seq moved; forgets the `watch` once none waits.
    fn changed(&mut self) {
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
    fn advance(&mut self, limits: &Limits) {
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
    fn pending_mut(&mut self, seq: u64) -> Option<&mut Pending> {
        let first = self.pending.front()?.seq;
        let p = self
            .pending
            .get_mut(usize::try_from(seq.checked_sub(first)?).ok()?)?;
        (p.seq == seq).then_some(p)
    }

    /// The whole key for a new replica: history, window, and what is in flight.
    fn snapshot(&self) -> KeySnapshot {
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
        }
    }

    /// Points the key's replica at `successor`; what the new one must be sent.
    fn replicate_to(
        &mut self,
        successor: Option<(String, String)>,
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
    fn restored(snapshot: KeySnapshot, limits: &Limits) -> KeyState {
        let mut state = KeyState::new();
        state.epoch = snapshot.epoch.into();
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
    fn catchup(&self, resume: Option<&Resume>, max: usize) -> Catchup {
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

    fn append(&mut self, seq: u64, frame: Utf8Bytes, idempotency_key: String, limits: &Limits) {
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
    fn seq_of(&self, id: &str) -> Option<SeqDigest> {
        self.idempotency.as_ref()?.get(id)
    }

    /// Remembers that idempotency key `id` got `seq` for a payload of `digest`,
    /// forgetting the oldest past `window`.
    fn remember(&mut self, id: String, seq: u64, digest: u64, window: usize) {
        self.idempotency
            .get_or_insert_with(Box::default)
            .remember(id, seq, digest, window);
    }

    fn presence_frame(&self, key: &str) -> Utf8Bytes {
        let mut ids: Vec<&Arc<str>> = self.present.ids().collect();
        ids.sort();
        let members: Vec<_> = ids.into_iter().map(|id| json!({"id": &**id})).collect();
        Utf8Bytes::from(json!({"type": "presence", "key": key, "members": members}).to_string())
    }

    fn announce(&self, key: &str, joined: &[&str], left: &[&str], except: u64) {
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

/// A key's idempotency window: the seq each remembered idempotency key got. Boxed in
/// [`KeyState`] and made by the first publish that carries a key (the router gives
/// every publish one) or by restoring a key that had one. Most keys see few updates: a short window is searched in
/// order, and a map indexes it only past [`Idempotency::FEW`] — a map's smallest table
/// and a second copy of each key would cost every key published to ~300 bytes.
#[derive(Debug, Default)]
struct Idempotency {
    /// The keys with their seqs and payload digests, oldest first.
    order: VecDeque<(Box<str>, u64, u64)>,
    /// Made once the window holds more than `FEW`. Boxed on purpose: an empty map is
    /// 48 bytes in every window, the box 8.
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<Box<str>, SeqDigest>>>,
}

/// The seq an idempotency key got, and its payload's digest.
type SeqDigest = (u64, u64);

impl Idempotency {
    const FEW: usize = 8;

    /// The seq that `id` got and its payload's digest, if the window holds it.
    fn get(&self, id: &str) -> Option<SeqDigest> {
        match &self.index {
            Some(index) => index.get(id).copied(),
            None => self
                .order
                .iter()
                .rev()
                .find(|(k, _, _)| **k == *id)
                .map(|&(_, seq, digest)| (seq, digest)),
        }
    }

    /// Remembers that `id` got `seq` for a payload of `digest`, forgetting the oldest
    /// past `window`.
    fn remember(&mut self, id: String, seq: u64, digest: u64, window: usize) {
        if self.order.capacity() == 0 {
            // Room for exactly one: most keys never get a second.
            self.order.reserve_exact(1);
        }
        let id: Box<str> = id.into();
        if let Some(index) = &mut self.index {
            index.insert(id.clone(), (seq, digest));
        }
        self.order.push_back((id, seq, digest));
        while self.order.len() > window {
            let Some((old, old_seq, _)) = self.order.pop_front() else {
                break;
            };
            if let Some(index) = &mut self.index {
                if index.get(&old).is_some_and(|&(seq, _)| seq == old_seq) {
                    index.remove(&old);
                }
            }
        }
        if self.index.is_none() && self.order.len() > Self::FEW {
            let index = self
                .order
                .iter()
                .map(|(k, s, d)| (k.clone(), (*s, *d)))
                .collect();
            self.index = Some(Box::new(index));
        }
    }

    /// The window, oldest first.
    fn oldest_first(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.order.iter().map(|(k, s, d)| (&**k, *s, *d))
    }
}

/// Connections per presence id. Most keys have one id (a user's feed), for which a
/// map's smallest table costs ~150 bytes: a short list holds the first few ids, and a
/// map takes over past [`Presence::FEW`].
#[derive(Debug, Default)]
struct Presence {
    few: Vec<(Arc<str>, usize)>,
    /// Made only past `FEW` ids. Boxed on purpose: an empty map is 48 bytes in every
    /// key, the box 8, and most keys never need it.
    #[allow(clippy::box_collection)]
    many: Option<Box<HashMap<Arc<str>, usize>>>,
}

impl Presence {
    const FEW: usize = 8;

    /// Counts a connection of `id`; whether it is the id's first.
    fn join(&mut self, id: &Arc<str>) -> bool {
        if self.many.is_none() {
            if let Some((_, n)) = self.few.iter_mut().find(|(i, _)| i == id) {
                *n += 1;
                return false;
            }
            if self.few.len() < Self::FEW {
                if self.few.capacity() == 0 {
                    self.few.reserve_exact(1);
                }
                self.few.push((id.clone(), 1));
                return true;
            }
            self.many = Some(Box::new(
                std::mem::take(&mut self.few).into_iter().collect(),
            ));
        }
        let many = self.many.get_or_insert_with(Box::default);
        let n = many.entry(id.clone()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Uncounts a connection of `id`; whether it was the id's last.
    fn leave(&mut self, id: &str) -> bool {
        if let Some(at) = self.few.iter().position(|(i, _)| **i == *id) {
            self.few[at].1 -= 1;
            if self.few[at].1 == 0 {
                self.few.swap_remove(at);
                return true;
            }
            return false;
        }
        let Some(many) = self.many.as_mut() else {
            return false;
        };
        let last = match many.get_mut(id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                many.remove(id);
                true
            }
            None => false,
        };
        if many.is_empty() {
            // Back to the short list.
            self.many = None;
        }
        last
    }

    /// Every id with a connection, each once, in no order.
    fn ids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.few
            .iter()
            .map(|(id, _)| id)
            .chain(self.many.iter().flat_map(|m| m.keys()))
    }
}

type KeyRef = Arc<Mutex<KeyState>>;

/// A key this node gave up: its subscribers to redirect, and its state to hand off.
pub struct Moved {
    pub key: String,
    pub subscribers: Vec<Subscriber>,
    pub snapshot: KeySnapshot,
}

/// A map keyed by client-chosen strings. std's SipHash on purpose: keys come from
/// clients, and the lookups are ~2% of a node's CPU in P4's profile — not worth a hash
/// without HashDoS resistance (foldhash was tried and taken out).
type StrMap<V> = HashMap<String, V, RandomState>;

/// Every key this node holds state for.
pub struct KeyTable {
    shards: Vec<Mutex<StrMap<KeyRef>>>,
    hasher: RandomState,
    next_subscriber: AtomicU64,
    limits: Limits,
    /// Past the memory budget: no new keys (see [`crate::budget`]).
    full: AtomicBool,
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

    fn shard(&self, key: &str) -> &Mutex<StrMap<KeyRef>> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h % SHARDS]
    }

    fn entry(&self, key: &str) -> KeyRef {
        let mut shard = self.shard(key).lock().expect("shard lock poisoned");
        if let Some(e) = shard.get(key) {
            return e.clone();
        }
        let e = Arc::new(Mutex::new(KeyState::new()));
        shard.insert(key.to_owned(), e.clone());
        e
    }

    /// Refuses to create keys (publishes and subscriptions to keys not held yet) while
    /// `full`; keys already held, handed over or promoted are unaffected.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::Relaxed);
    }

    /// The entry of `key`, created only while the node is under its memory budget.
    fn entry_within_budget(&self, key: &str) -> Option<KeyRef> {
        if !self.full.load(Ordering::Relaxed) {
            return Some(self.entry(key));
        }
        self.existing(key)
    }

    fn existing(&self, key: &str) -> Option<KeyRef> {
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
        successor: Option<(String, String)>,
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
    pub fn replicated(&self, key: &str, epoch: &str, seq: u64, by: &(String, String)) {
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
    pub fn replicate_to(
        &self,
        key: &str,
        successor: Option<(String, String)>,
        version: u64,
    ) -> ToReplica {
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

    /// Installs `replica` as the state of `key` (this node is its new owner). Returns
    /// the subscribers that had connected to a fresh state meanwhile, to be sent back
    /// so they resume in the promoted epoch; `None` when the key already has history
    /// here and the replica is not used.
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
        let restored = KeyState::restored(take()?, &self.limits);
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
    pub fn drop_idle(&self, ttl: Duration) -> Vec<(String, Option<(String, String)>)> {
        let mut dropped = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().expect("shard lock poisoned");
            shard.retain(|key, entry| {
                let mut state = entry.lock().expect("key lock poisoned");
                let idle = state.subscribers.is_empty()
                    && state.pending.is_empty()
                    && u128::from(now_ms().saturating_sub(state.active)) >= ttl.as_millis();
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

/// The copy of another node's key that this node holds as its successor.
#[derive(Debug, Clone)]
pub struct Replica {
    /// The owner that sent it.
    pub owner: String,
    pub epoch: String,
    /// In seq order, bounded like a log. A queue rather than a map: entries arrive in
    /// order (a retry replaces one in place), and a map's first leaf would cost every
    /// replicated key ~700 bytes.
    entries: VecDeque<LogEntry>,
    bytes: usize,
    idempotency: Vec<(String, u64, u64)>,
    /// When it last changed, for dropping copies nobody updates any more.
    touched: Instant,
}

impl Replica {
    fn new(owner: &str, epoch: &str) -> Replica {
        Replica {
            owner: owner.to_owned(),
            epoch: epoch.to_owned(),
            entries: VecDeque::new(),
            bytes: 0,
            idempotency: Vec::new(),
            touched: Instant::now(),
        }
    }

    /// The last seq held.
    fn seq(&self) -> u64 {
        self.entries.back().map_or(0, |e| e.seq)
    }

    /// The replica as a snapshot, for promotion.
    pub fn into_snapshot(self) -> KeySnapshot {
        let seq = self.seq();
        KeySnapshot {
            epoch: self.epoch,
            seq,
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
    map: Mutex<StrMap<Box<Replica>>>,
    limits: Limits,
}

impl Replicas {
    pub fn new(limits: Limits) -> Replicas {
        Replicas {
            map: Mutex::new(StrMap::default()),
            limits,
        }
    }

    /// Takes a whole key from `owner`, replacing what was held.
    pub fn snapshot(&self, key: &str, owner: &str, snapshot: KeySnapshot) {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        let replica = map
            .entry(key.to_owned())
            .or_insert_with(|| Box::new(Replica::new(owner, &snapshot.epoch)));
        replica.touched = Instant::now();
        // A snapshot is the whole key as the owner has it: nothing the replica held
        // beyond it (entries whose callers were told to retry) survives.
        replica.entries.clear();
        replica.bytes = 0;
        if replica.owner != owner {
            replica.owner = owner.to_owned();
        }
        replica.epoch = snapshot.epoch;
        replica.idempotency = snapshot.idempotency;
        for e in snapshot.entries {
            insert_entry(replica, e, &self.limits);
        }
    }

    /// Takes one entry from `owner`.
    pub fn entry(&self, key: &str, owner: &str, epoch: &str, entry: LogEntry) {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        let replica = map
            .entry(key.to_owned())
            .or_insert_with(|| Box::new(Replica::new(owner, epoch)));
        replica.touched = Instant::now();
        if replica.epoch != epoch {
            replica.entries.clear();
            replica.bytes = 0;
            replica.idempotency.clear();
            replica.epoch = epoch.to_owned();
        }
        if replica.owner != owner {
            replica.owner = owner.to_owned();
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
    /// unknown (`""`), which is never on a ring, so it is promoted like any orphan.
    pub fn offer(&self, key: &str, snapshot: KeySnapshot) {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        let last = snapshot.entries.last().map_or(0, |e| e.seq);
        if let Some(held) = map.get(key) {
            if (held.epoch.as_str(), held.seq()) >= (snapshot.epoch.as_str(), last) {
                return;
            }
        }
        let mut replica = Replica::new("", &snapshot.epoch);
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
    pub fn drop_from(&self, key: &str, owner: &str) -> bool {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        if map.get(key).is_some_and(|r| r.owner == owner) {
            map.remove(key);
            return true;
        }
        false
    }

    /// Drops every replica for which `stale` says so, given its key, owner and how long
    /// since it last changed; returns how many went.
    pub fn drop_where(&self, mut stale: impl FnMut(&str, &str, Duration) -> bool) -> usize {
        let mut map = self.map.lock().expect("replicas lock poisoned");
        let before = map.len();
        map.retain(|key, r| !stale(key, &r.owner, r.touched.elapsed()));
        before - map.len()
    }

    /// Every replica's key and owner.
    pub fn owners(&self) -> Vec<(String, String)> {
        self.owners_unchanged_for(Duration::ZERO)
    }

    /// The key and owner of every replica that has not changed for `age`.
    pub fn owners_unchanged_for(&self, age: Duration) -> Vec<(String, String)> {
        let map = self.map.lock().expect("replicas lock poisoned");
        map.iter()
            .filter(|(_, r)| age.is_zero() || r.touched.elapsed() >= age)
            .map(|(k, r)| (k.clone(), r.owner.clone()))
            .collect()
    }

    /// The owner of `key`'s replica, if one is held.
    pub fn owner_of(&self, key: &str) -> Option<String> {
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

fn insert_entry(replica: &mut Replica, entry: LogEntry, limits: &Limits) {
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

/// Removes its subscriber from its key when dropped, however the connection ends,
/// unless [released](SubscriptionGuard::release) to a holder that does so itself.
pub struct SubscriptionGuard {
    pub table: Arc<crate::node::Node>,
    /// `None` once released.
    control: Option<Arc<Control>>,
}

impl SubscriptionGuard {
    /// Guards the subscriber that `control` belongs to.
    pub fn new(table: Arc<crate::node::Node>, control: Arc<Control>) -> SubscriptionGuard {
        SubscriptionGuard {
            table,
            control: Some(control),
        }
    }

    /// The subscriber's control.
    pub fn control(&self) -> &Arc<Control> {
        self.control
            .as_ref()
            .expect("a guard is not used once released")
    }

    /// Hands over the control, and with it the duty to unsubscribe
    /// ([`KeyTable::unsubscribe`]) when the connection ends.
    pub fn release(mut self) -> Arc<Control> {
        self.control.take().expect("a guard is released once")
    }
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        if let Some(control) = self.control.take() {
            self.table.keys.unsubscribe(&control);
        }
    }
}

/// Milliseconds since this process first asked: when a key was last active, in 8
/// bytes rather than an `Instant`'s 16 (every key holds one).
fn now_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(ORIGIN.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A new epoch: 16 URL-safe characters, never containing `:` — 8 that encode the
/// wall-clock milliseconds in an alphabet whose byte order is its digit order, then 8
/// random ones. Unique like a random string, and two epochs of one key compare in the
/// order they were started (up to clock skew between nodes), so a node offered two
/// replicas of a key keeps the newer.
pub fn new_epoch() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    epoch_at(millis)
}

fn epoch_at(millis: u64) -> String {
    const ORDERED: &[u8] = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let time = (0..8)
        .rev()
        .map(|i| ORDERED[((millis >> (6 * i)) & 63) as usize] as char);
    let random = (0..8).map(|_| ORDERED[rng.random_range(0..ORDERED.len())] as char);
    time.chain(random).collect()
}

/// Whether `epoch` could be one of ours: 1–64 URL-safe characters.
pub fn valid_epoch(epoch: &str) -> bool {
    !epoch.is_empty()
        && epoch.len() <= 64
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        replicas.offer("k", snapshot("B", 5));
        replicas.offer("k", snapshot("B", 3));
        assert_eq!(replicas.copy("k").map(|s| s.seq), Some(5));
        replicas.offer("k", snapshot("A", 9));
        assert_eq!(replicas.copy("k").map(|s| s.seq), Some(5), "older epoch");
        replicas.offer("k", snapshot("C", 1));
        assert_eq!(replicas.copy("k").map(|s| s.epoch), Some("C".into()));
        assert_eq!(replicas.owner_of("k").as_deref(), Some(""));
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
            crate::node::redirect_url("ws://h:1", "/v1/connect", &s.redirect_query(), 9)
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
            replicas.entry("k", "n1", "e", entry(seq, data));
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
        assert_eq!(kick.code, CLOSE_SLOW_CONSUMER);
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

    fn succ(id: &str) -> Option<(String, String)> {
        Some((id.to_owned(), format!("inc-{id}")))
    }

    fn staged(
        table: &KeyTable,
        data: &[u8],
        to: Option<(String, String)>,
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
        let frame =
            |seq: u64| frames::update("k", seq, b"1", "", Limits::default().payload()).unwrap();
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
}
