//! What every transport does for one client, whatever the wire: decide who owns the
//! key, subscribe with a bounded queue (resuming from `since`), and keep the
//! subscription removed from its key however the connection ends.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ringfeed_router::key::Key;
use ringfeed_router::ring::Member;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::cluster::replication::{self, PublishError};
use crate::node::{redirect_kick, Decision, Node, Violation};
use crate::protocol::close::CloseCode;
use crate::protocol::frames::{self, ClientFrame, ServerFrame};
use crate::protocol::params::{ClientQuery, Resume};
pub use crate::protocol::ticket::AuthError;
use crate::protocol::ticket::{Claims, Kind, SpendError, TicketError};
use crate::state::{ApplyError, Control, Kick, Publish, Start, SubscribeError, Subscriber};
use crate::wire::ToWire;

/// How long a client's publish may wait for its replica.
const CLIENT_PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a session for a client that asked with `query`, on every transport that
/// holds a connection (WebSocket, QUIC): the key's grammar, the placement, the
/// node's state, the ticket (on the owner, before the key's state is touched), the
/// subscription. A refusal is the [`Kick`] that ends the connection: a `redirect`
/// frame and 4300, or a close code and its reason.
pub async fn open(
    node: &Arc<Node>,
    query: &ClientQuery,
    source: Option<IpAddr>,
) -> Result<Subscription, Kick> {
    let close = |code: CloseCode, reason: String| Kick {
        frame: None,
        code,
        reason,
    };
    let key = match Key::parse(query.key.as_deref().unwrap_or("")) {
        Ok(key) => key,
        Err(e) if query.key.is_none() => {
            return Err(close(CloseCode::BadRequest, format!("missing key ({e})")))
        }
        Err(e) => return Err(close(CloseCode::BadRequest, format!("invalid key: {e}"))),
    };
    tracing::Span::current().record("key", key.as_str());
    // Rare steps are boxed: an async fn's state is as large as its largest await.
    match Box::pin(place(node, &key, query.rv)).await {
        Placement::Here => {}
        Placement::Moved { owner, version } => {
            return Err(redirect_kick(&owner, &query.raw, version))
        }
        Placement::Unknown => {
            return Err(close(
                CloseCode::Unavailable,
                "no owner known for this key".into(),
            ))
        }
    }
    if node.shutdown.is_cancelled() || node.is_draining() {
        return Err(close(CloseCode::Unavailable, "node draining".into()));
    }
    let granted =
        authorize(node, &key, query.credential(), query.presence, source).map_err(|e| {
            tracing::debug!(error = %e, "ticket refused");
            close(e.wire().close, e.close_reason())
        })?;
    let resume = query.resume();
    let sub = subscribe(
        node,
        &key,
        query.raw.clone(),
        resume.as_ref(),
        query.presence,
        granted.as_ref(),
    )
    .map_err(|e| {
        tracing::debug!(error = %e, "subscription refused");
        close(e.wire().close, e.close_reason())
    })?;
    // The shutdown kicks every subscriber: one that subscribed as it began is told
    // here instead.
    if node.shutdown.is_cancelled() {
        return Err(close(CloseCode::GoingAway, "node shutting down".into()));
    }
    tracing::debug!(key = %key, subscriber = sub.id, "subscribed");
    Ok(sub)
}

/// What a subscription starts with, in order, each as one frame: `welcome`, the reset
/// if any, the replay and the presence list.
pub fn start_frames(node: &Node, sub: &Subscription, mut out: impl FnMut(&Utf8Bytes)) {
    let start = &sub.start;
    let c = &start.catchup;
    let key = sub.control().key();
    let welcome = ServerFrame::Welcome {
        key,
        node: &node.id.0,
        epoch: &c.epoch,
        seq: c.seq,
        heartbeat_ms: node.config.heartbeat_ms,
        resume: sub.resume.as_deref(),
    };
    out(&welcome.encode());
    if let Some(reset) = &c.reset {
        out(&reset.frame(key, &c.epoch));
    }
    for frame in &c.updates {
        out(frame);
    }
    if let Some(presence) = &start.presence {
        out(presence);
    }
}

/// The per-second bound `count` (messages, control frames in the second so far)
/// breaks, if any.
pub fn flood(count: (u32, u32), node: &Node) -> Option<Violation> {
    let (messages, controls) = count;
    let live = &node.live;
    if controls > live.client_control_rate.load(Ordering::Relaxed) {
        Some(Violation::ControlFlood)
    } else if messages > live.client_message_rate.load(Ordering::Relaxed) {
        Some(Violation::MessageFlood)
    } else {
        None
    }
}

/// The answer to one text frame from a live client (`pong`, `ack`, `nack`), on every
/// transport; an `Err` (its `error` code and message) ends the session.
pub async fn answer(
    node: &Arc<Node>,
    control: &Control,
    text: &str,
) -> Result<Utf8Bytes, (&'static str, String)> {
    let key = control.key();
    let frame = frames::parse_client(text).map_err(|e| (e.code, e.message))?;
    Ok(match frame {
        ClientFrame::Ping => ServerFrame::Pong.encode(),
        ClientFrame::Publish { id, .. } if !control.may_publish() => ServerFrame::Nack {
            id: &id,
            code: "forbidden",
            message: "this connection's ticket does not allow publishing",
        }
        .encode(),
        ClientFrame::Publish { data, id } => {
            let idempotency_key = match &id {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let publish = Publish {
                data: data.get().as_bytes(),
                content_type: "application/json",
                idempotency_key: &idempotency_key,
                ..Publish::default()
            };
            match client_publish(node.clone(), key, publish).await {
                Ok(seq) => ServerFrame::Ack { id: &id, seq }.encode(),
                Err((code, message)) => ServerFrame::Nack {
                    id: &id,
                    code,
                    message: &message,
                }
                .encode(),
            }
        }
    })
}

/// A client's publish, through the key's log like any other: answered once the
/// successor holds it (bounded by [`CLIENT_PUBLISH_TIMEOUT`]).
async fn client_publish(
    node: Arc<Node>,
    key: &str,
    publish: Publish<'_>,
) -> Result<u64, (&'static str, String)> {
    let view = node.membership.view();
    if !matches!(node.decide(view.clone(), key), Decision::Mine(_)) {
        return Err((
            "not_owner",
            "this node no longer owns the key; reconnect".into(),
        ));
    }
    let published = replication::publish(&node, &view, key, publish, true);
    match tokio::time::timeout(CLIENT_PUBLISH_TIMEOUT, published).await {
        Err(_) => Err((
            "timeout",
            "the update was not replicated in time; retry with the same id".into(),
        )),
        Ok(Ok((applied, _))) => Ok(applied.seq),
        Ok(Err(PublishError::Apply(ApplyError::Payload(e)))) => {
            // The payload's own error says what is wrong with it.
            Err(("bad_payload", e.to_string()))
        }
        Ok(Err(e)) => Err((e.wire().nack, e.to_string())),
    }
}

/// Where a client should be.
pub enum Placement {
    /// Here: this node owns the key.
    Here,
    /// At `owner`, as of ring version `version`.
    Moved { owner: Member, version: u64 },
    /// Nowhere known: the ring has no active member.
    Unknown,
}

/// Decides where a client of `key`, redirected here at ring version `rv`, belongs.
pub async fn place(node: &Node, key: &Key, rv: Option<u64>) -> Placement {
    if node.is_fenced() {
        return Placement::Unknown;
    }
    let view = node.view_for(rv, None).await;
    let view = match node.decide(view.clone(), key.as_str()) {
        Decision::Mine(_) if !node.handoffs.ready(key.as_str(), &view).await => {
            return Placement::Unknown
        }
        // The ring may have moved while we waited: decide on the newest view.
        Decision::Mine(_) => node.membership.view(),
        _ => view,
    };
    match node.decide(view, key.as_str()) {
        Decision::Mine(_) => Placement::Here,
        Decision::Elsewhere(view, owner) => Placement::Moved {
            owner,
            version: view.version,
        },
        Decision::Nobody(_) => Placement::Unknown,
    }
}

/// A subscription: what to send first, and the guard that unsubscribes on drop and
/// holds the control (the queue of what follows and the kick switch).
pub struct Subscription {
    pub start: Start,
    /// The subscriber's id.
    pub id: u64,
    /// With authentication on, the resume token its `welcome` carries.
    pub resume: Option<Box<str>>,
    guard: SubscriptionGuard,
}

impl Subscription {
    /// The subscriber's control.
    pub fn control(&self) -> &Arc<Control> {
        self.guard.control()
    }

    /// What a connection keeps once its start has been sent: the control alone. The
    /// caller now unsubscribes ([`crate::state::KeyTable::unsubscribe`]) when the
    /// connection ends, with the node it already holds (one pointer fewer for each).
    pub fn release(self) -> Arc<Control> {
        self.guard.release()
    }
}

/// What an admitted client may do, and the token it reconnects with.
pub struct Granted {
    pub claims: Claims,
    /// The `resume` token `welcome` hands back: the same rights, for longer.
    pub resume: String,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// With authentication on, what the client's `credential` (its resume token, else its
/// ticket) lets it do on `key` (presence only if it asks for presence and the token
/// allows it), and its resume token; `None` with authentication off. Only the owner
/// calls this: a single-use ticket is spent here. A source past its failures is refused
/// unread; refusals are counted by reason, and each counts against its `source`.
pub fn authorize(
    node: &Node,
    key: &Key,
    credential: Option<&str>,
    wants_presence: bool,
    source: Option<IpAddr>,
) -> Result<Option<Granted>, AuthError> {
    let Some(auth) = &node.auth else {
        return Ok(None);
    };
    let at = tokio::time::Instant::now();
    if let Some(wait) = source.and_then(|ip| auth.throttle.check(ip, at)) {
        node.counters.auth_throttled.fetch_add(1, Ordering::Relaxed);
        return Err(AuthError::Throttled {
            retry_after_ms: wait.as_millis().max(1) as u64,
        });
    }
    let now = unix_now();
    let signer = auth.signer.get();
    let refuse = |e: TicketError| {
        node.counters.tickets_refused.count(e);
        if let Some(ip) = source {
            auth.throttle.failed(ip, at);
        }
        AuthError::Ticket(e)
    };
    let claims = signer
        .verify(credential, key.as_str(), now)
        .map_err(refuse)?;
    if wants_presence && !claims.presence {
        return Err(refuse(TicketError::NoPresence));
    }
    if let (Some(spent), Kind::Ticket, Some(ticket)) = (&auth.spent, claims.kind, credential) {
        match spent.spend(ticket, claims.exp, now) {
            Ok(()) => {}
            Err(SpendError::Reused) => return Err(refuse(TicketError::Reused)),
            Err(SpendError::Full) => return Err(AuthError::Busy),
        }
    }
    let resume = signer.sign(&Claims {
        exp: now + auth.resume_ttl.as_secs(),
        kind: Kind::Resume,
        ..claims.clone()
    });
    Ok(Some(Granted { claims, resume }))
}

/// Subscribes a client of `key` on this node.
pub fn subscribe(
    node: &Arc<Node>,
    key: &Key,
    query: Arc<str>,
    resume: Option<&Resume>,
    wants_presence: bool,
    granted: Option<&Granted>,
) -> Result<Subscription, SubscribeError> {
    let claims = granted.map(|g| &g.claims);
    // With authentication, the redirect a kick sends carries the resume token, never
    // the ticket (which may be spent or expired by then).
    let query = match granted {
        Some(granted) => with_resume(&query, &granted.resume),
        None => query,
    };
    crate::cluster::follower::promote_if_due(node, key.as_str(), &node.membership.view());
    let id = node.keys.next_subscriber_id();
    let control = Control::new(key.as_str(), node.config.subscriber_queue);
    control.set_may_publish(claims.is_none_or(|c| c.publish));
    let subscriber = Subscriber {
        id,
        // The ticket's subject, or a connection id without authentication.
        presence_id: claims.map_or_else(
            || Arc::from(format!("c{id}")),
            |c| Arc::from(c.sub.as_str()),
        ),
        wants_presence,
        query: Subscriber::kept_query(&query),
        control: control.clone(),
    };
    let start = node
        .keys
        .subscribe(key.as_str(), subscriber, resume)
        .inspect_err(|e| {
            // Counted here, for every transport alike.
            if *e == SubscribeError::MemoryBudget {
                node.counters.refused_memory.fetch_add(1, Ordering::Relaxed);
            }
        })?;
    let guard = SubscriptionGuard::new(node.clone(), control.clone());
    // The ring may have changed between the decision and the subscription; the ring
    // follower only redirects subscribers it can see, so look once more.
    if let Decision::Elsewhere(view, owner) = node.decide(node.membership.view(), key.as_str()) {
        control.kick(redirect_kick(&owner, &query, view.version));
    }
    Ok(Subscription {
        start,
        id,
        resume: granted.map(|g| g.resume.clone().into_boxed_str()),
        guard,
    })
}

/// `query` with its credentials replaced by `resume`.
pub fn with_resume(query: &str, resume: &str) -> Arc<str> {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name != "ticket" && name != "resume" {
            out.append_pair(&name, &value);
        }
    }
    Arc::from(out.append_pair("resume", resume).finish())
}

/// Removes its subscriber from its key when dropped, however the connection ends,
/// unless [released](SubscriptionGuard::release) to a holder that does so itself.
pub struct SubscriptionGuard {
    pub node: Arc<crate::node::Node>,
    /// `None` once released.
    control: Option<Arc<Control>>,
}

impl SubscriptionGuard {
    /// Guards the subscriber that `control` belongs to.
    pub fn new(node: Arc<crate::node::Node>, control: Arc<Control>) -> SubscriptionGuard {
        SubscriptionGuard {
            node,
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
            self.node.keys.unsubscribe(&control);
        }
    }
}
