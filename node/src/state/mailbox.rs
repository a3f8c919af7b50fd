//! A connection's mailbox: the bounded queue of frames others push to it, its kick
//! switch and deadline, and the subscriber a key holds for it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::protocol::close::CloseCode;
use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// How a connection is told to close by someone other than itself.
#[derive(Debug, Clone)]
pub struct Kick {
    /// A frame to send before closing (a `redirect`), if any.
    pub frame: Option<Utf8Bytes>,
    pub code: CloseCode,
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
    pub(super) key: Box<str>,
    /// The queue and the kick, under one lock: a waking reader looks at both.
    pub(super) outbox: Mutex<Outbox>,
    /// The reader's waker, woken by a push, a close, a kick and its clock: one atomic
    /// swap (a `Notify` would take its waiter lock for each of a hot key's
    /// subscribers, and cost every idle connection its size and a waiter).
    pub(super) ready: AtomicWaker,
    /// What the client sent in the current second, for its transport's per-second
    /// bounds ([`Control::count_from_client`]): the second in the high half, messages
    /// and control frames in two `u16`s below. Here rather than in the connection's
    /// task, which must stay within its 512-byte cell; one reader and writer.
    pub(super) from_client: AtomicU64,
    /// When the reader's clock is next due, in ms of the node's clock
    /// ([`crate::node::Node::clock_ms`]): [`Control::NEVER`], or [`Control::FIRED`]
    /// once the node's sweep ([`KeyTable::fire_due`]) found it due. A WebSocket
    /// session keeps its deadlines (next ping, end of the client's silence) here
    /// rather than in a timer of its own, which every idle connection would hold.
    pub(super) due: AtomicU64,
}

#[derive(Debug)]
pub(super) struct Outbox {
    pub(super) frames: VecDeque<Utf8Bytes>,
    /// Boxed: a kick (64 bytes) is rare, and every idle connection holds the slot.
    pub(super) kick: Option<Box<Kick>>,
    /// At most this many frames are queued (a `u32`, packed beside `closed`).
    pub(super) capacity: u32,
    /// The key let go of the subscriber: nothing more will come.
    pub(super) closed: bool,
    /// Whether the client may publish (its ticket says so, or authentication is off);
    /// in the padding beside `closed`.
    pub(super) may_publish: bool,
}

impl Outbox {
    /// `Some(Some(frame))`, `Some(None)` once closed and drained, `None` while empty.
    pub(super) fn next(&mut self) -> Option<Option<Utf8Bytes>> {
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
                may_publish: true,
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
    /// Whether the client may publish from its connection.
    pub fn may_publish(&self) -> bool {
        self.outbox
            .lock()
            .expect("outbox lock poisoned")
            .may_publish
    }

    /// Sets whether the client may publish (what its ticket allows).
    pub fn set_may_publish(&self, may: bool) {
        self.outbox
            .lock()
            .expect("outbox lock poisoned")
            .may_publish = may;
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Sets the reader's clock to go off at `at_ms` (ms of the node's clock, from 1).
    pub fn set_due(&self, at_ms: u64) {
        self.due.store(at_ms.max(1), Ordering::Release);
    }

    /// Sets the clock off, and wakes the reader, if it is due by `now_ms`.
    pub(super) fn fire_if_due(&self, now_ms: u64) {
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
    pub(super) fn wait<'a, T>(
        &'a self,
        look: impl Fn(&Control) -> Option<T> + 'a,
    ) -> impl Future<Output = T> + 'a {
        std::future::poll_fn(move |cx| self.poll_look(cx, &look))
    }

    /// `look`'s find, or `Pending` with the waker registered for the next `ready`.
    pub(super) fn poll_look<T>(
        &self,
        cx: &mut Context<'_>,
        look: impl Fn(&Control) -> Option<T>,
    ) -> Poll<T> {
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
    pub(super) fn next(&self) -> Option<Option<Utf8Bytes>> {
        self.outbox.lock().expect("outbox lock poisoned").next()
    }

    /// Nothing more will be queued; the reader drains what is there, then sees `None`.
    pub(super) fn close(&self) {
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
    pub(super) fn offer(&self, frame: &Utf8Bytes) -> bool {
        match self.control.push(frame.clone()) {
            Ok(()) => true,
            Err(Refused::Full) => {
                self.control.kick(Kick {
                    frame: None,
                    code: CloseCode::SlowConsumer,
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
