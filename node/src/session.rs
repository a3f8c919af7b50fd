//! What every transport does for one client, whatever the wire: decide who owns the
//! key, subscribe with a bounded queue (resuming from `since`), and keep the
//! subscription removed from its key however the connection ends.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ringfeed_router::key::Key;
use ringfeed_router::ring::Member;

use crate::node::{redirect_kick, Decision, Node};
use crate::protocol::params::Resume;
use crate::protocol::ticket::{Claims, Kind, SpendError, TicketError};
use crate::state::{Control, Start, SubscribeError, Subscriber};

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

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401 / close 4401.
    #[error(transparent)]
    Ticket(#[from] TicketError),
    /// Its address is past its failed authentications: 429 / close 4429.
    #[error("too many failed authentications from this address; retry in {retry_after_ms} ms")]
    Throttled { retry_after_ms: u64 },
    /// Too many single-use tickets are live to record another: retry later.
    #[error("too many single-use tickets in use; retry later")]
    Busy,
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
