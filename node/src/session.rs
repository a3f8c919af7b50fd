//! What every transport does for one client, whatever the wire: decide who owns the
//! key, subscribe with a bounded queue (resuming from `since`), and keep the
//! subscription removed from its key however the connection ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ringfeed_router::key::Key;
use ringfeed_router::ring::Member;

use crate::node::{redirect_kick, Decision, Node};
use crate::protocol::params::Resume;
use crate::protocol::ticket::{Claims, TicketError};
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

/// With authentication on, the claims of the client's `ticket` for `key` (presence only
/// if it asks for presence and the ticket allows it); `None` with it off. Refusals are
/// counted by reason.
pub fn authorize(
    node: &Node,
    key: &Key,
    ticket: Option<&str>,
    wants_presence: bool,
) -> Result<Option<Claims>, TicketError> {
    let Some(auth) = &node.auth else {
        return Ok(None);
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let checked = auth
        .signer
        .verify(ticket, key.as_str(), now)
        .and_then(|claims| {
            if wants_presence && !claims.presence {
                Err(TicketError::NoPresence)
            } else {
                Ok(claims)
            }
        });
    checked
        .map(Some)
        .inspect_err(|e| node.counters.tickets_refused.count(*e))
}

/// Subscribes a client of `key` on this node.
pub fn subscribe(
    node: &Arc<Node>,
    key: &Key,
    query: Arc<str>,
    resume: Option<&Resume>,
    wants_presence: bool,
    claims: Option<&Claims>,
) -> Result<Subscription, SubscribeError> {
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
    Ok(Subscription { start, id, guard })
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
