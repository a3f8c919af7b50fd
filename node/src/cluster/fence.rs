//! Self-fencing: a node that cannot renew its lease stops accepting before the lease
//! can have expired, and asks its peers what that means.
//!
//! It pauses at (send time of its last keep-alive that etcd answered) + TTL − margin,
//! then, as long as its lease is in doubt, asks every other member of its last ring
//! ([`Status`](ringfeed_proto::v1::node_server::Node::status)) whether it reaches etcd
//! and which ring it holds:
//! * a strict majority of the ring (this node included) has lost etcd too: etcd is down
//!   for everyone, the ring cannot change, so it serves on;
//! * a peer that reaches etcd holds a ring without this node (this incarnation): it is
//!   out — its clients are redirected to their owners on that ring, its keys and
//!   replicas dropped (the replicas on the successors have been promoted), and it
//!   waits paused until its keep-alive finds the lease gone and it joins again, empty;
//! * peers reach etcd and still list it: it stays paused and asks again;
//! * no majority answers: it stays paused, and past a grace period closes its clients
//!   with 4503 (they find the owner through `/v1/route` elsewhere).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ringfeed_proto::v1::{self as pb};
use ringfeed_router::membership::Registration;
use ringfeed_router::ring::{Member, Ring};

use crate::node::{redirect_kick, Node};
use crate::protocol::close::CloseCode;
use crate::state::Kick;
use crate::state::{decide, Answers, Fence};

/// How often the lease is checked (and peers asked while it is in doubt).
const TICK: Duration = Duration::from_millis(100);
/// How long one peer has to answer.
const ASK_TIMEOUT: Duration = Duration::from_millis(300);

/// Whether this node's own keep-alives count as lost: the last one failed (or its
/// stream broke), or nothing was answered for longer than two keep-alive periods
/// (2·TTL/3).
pub fn etcd_lost(node: &Node) -> bool {
    node.registration()
        .is_some_and(|r| !r.lease_healthy() || r.last_ok_sent().elapsed() > r.ttl() * 2 / 3)
}

/// Watches the lease and fences this node when it is in doubt.
///
/// The peers are asked from a little before the pause point (one ask and one tick
/// ahead of it), so that their answer is in by then: when etcd is down for everyone
/// nobody pauses at all, and a node that would pause only because its own keep-alives
/// lag behind its peers' renews first ([`Registration::renew_now`]).
///
/// [`Registration::renew_now`]: ringfeed_router::membership::Registration::renew_now
pub async fn watch(node: Arc<Node>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = Watch::default();
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(registration) = node.registration() else {
            continue;
        };
        let ttl = registration.ttl();
        let margin = (ttl / 4).max(Duration::from_millis(250));
        // The lease cannot expire before `last_ok_sent + ttl`; it is in doubt from
        // `margin` before that, and the peers are asked from one ask and one tick
        // earlier still.
        let in_doubt =
            |ahead: Duration| registration.last_ok_sent().elapsed() + margin + ahead >= ttl;
        let was = node.fence();
        if !in_doubt(ASK_TIMEOUT + TICK) {
            // The lease is sound. A node that was out only serves again once it is on
            // the ring under a new incarnation (its keep-alive re-registers it).
            if was == Fence::Out && node.not_on_own_ring() {
                continue;
            }
            if was != Fence::Serving {
                tracing::info!("lease renewed; serving again");
            }
            watch = Watch::default();
            node.set_fence(Fence::Serving);
            continue;
        }
        if was == Fence::Out {
            continue;
        }
        let (answers, their_ring) = ask_peers(&node).await;
        // Peers reach etcd and still list this node: its own keep-alives may only lag
        // (a dead connection, etcd just back), and one renewal settles it — tried in
        // the time left before the pause point, or, serving because etcd was down for
        // a majority (already past it), within one ask.
        let left = ttl.saturating_sub(registration.last_ok_sent().elapsed() + margin);
        let renewal = if watch.told_majority {
            ASK_TIMEOUT
        } else {
            left.min(ASK_TIMEOUT)
        };
        let decision = match decide(&answers) {
            Fence::Paused
                if answers.answered > answers.lost
                    && !renewal.is_zero()
                    && registration.renew_now(renewal).await =>
            {
                tracing::info!(?answers, "lease renewed on demand");
                Fence::Serving
            }
            decision => decision,
        };
        // Before the pause point only a "serving" answer counts; the rest waits for it.
        if decision != Fence::Serving && !in_doubt(Duration::ZERO) {
            continue;
        }
        let asked = Asked {
            decision,
            was,
            answers,
            their_ring,
            ttl,
        };
        watch.act(&node, registration, asked);
    }
}

/// What the watch remembers between ticks while the lease is in doubt.
#[derive(Default)]
struct Watch {
    paused_since: Option<Instant>,
    closed_clients: bool,
    told_majority: bool,
}

/// One round of asking the peers: what was decided, on what.
struct Asked {
    decision: Fence,
    /// Where fencing stood before.
    was: Fence,
    answers: Answers,
    /// The ring a peer that reaches etcd holds, if one answered with it.
    their_ring: Option<(Ring, u64)>,
    ttl: Duration,
}

impl Watch {
    /// Carries out a decision on a lease in doubt.
    fn act(&mut self, node: &Node, registration: &Registration, asked: Asked) {
        let Asked {
            decision,
            was,
            answers,
            their_ring,
            ttl,
        } = asked;
        match decision {
            Fence::Out => {
                tracing::warn!(
                    ?answers,
                    "the peers hold a ring without this node: moving its clients there"
                );
                if was == Fence::Serving {
                    node.counters.fenced.fetch_add(1, Ordering::Relaxed);
                }
                node.set_fence(Fence::Out);
                if let Some((ring, version)) = their_ring {
                    move_out(node, &ring, version);
                }
            }
            Fence::Serving => {
                if answers.lost * 2 > answers.members && !self.told_majority {
                    tracing::info!(
                        ?answers,
                        "etcd is down for a majority: serving on the last ring"
                    );
                    self.told_majority = true;
                } else if was != Fence::Serving {
                    tracing::info!(?answers, "serving again");
                }
                node.set_fence(Fence::Serving);
                self.paused_since = None;
                self.closed_clients = false;
            }
            Fence::Paused => {
                if was == Fence::Serving {
                    tracing::warn!(
                        ?answers,
                        last_keep_alive_ms =
                            registration.last_ok_sent().elapsed().as_millis() as u64,
                        "lease in doubt: paused, asking the peers again"
                    );
                    node.counters.fenced.fetch_add(1, Ordering::Relaxed);
                }
                node.set_fence(Fence::Paused);
                let since = *self.paused_since.get_or_insert_with(Instant::now);
                if answers.answered * 2 <= answers.members
                    && since.elapsed() >= ttl
                    && !self.closed_clients
                {
                    tracing::warn!(?answers, "no majority answers: closing clients with 4503");
                    node.keys.kick_all(|_| Kick {
                        frame: None,
                        code: CloseCode::Unavailable,
                        reason: "fenced: owner not known here".into(),
                    });
                    self.closed_clients = true;
                }
            }
        }
    }
}

/// Asks every other member of this node's ring; returns the tally and, if a peer
/// that reaches etcd holds a ring without this node, that ring and its version.
async fn ask_peers(node: &Arc<Node>) -> (Answers, Option<(Ring, u64)>) {
    let view = node.membership.view();
    let me = node.registration().map(|r| r.record().incarnation);
    let peers: Vec<Member> = view
        .ring
        .members()
        .iter()
        .filter(|m| m.id != node.id)
        .cloned()
        .collect();
    let mut answers = Answers {
        members: peers.len() + 1,
        answered: 1,
        lost: usize::from(etcd_lost(node)),
        dropped_me: false,
    };
    let asks = peers.iter().map(|m| ask(node, m));
    let mut their_ring = None;
    for reply in futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
    {
        answers.answered += 1;
        if !reply.etcd_ok {
            answers.lost += 1;
            continue;
        }
        // A peer's records are checked as etcd's are: no record may make the ring
        // build more than MAX_POINTS points for one member.
        let members: Vec<Member> = reply
            .members
            .iter()
            .filter_map(|m| serde_json::from_str::<Member>(m).ok())
            .filter(|m| m.points <= ringfeed_router::ring::MAX_POINTS)
            .collect();
        let lists_me = members
            .iter()
            .any(|m| m.id == node.id && Some(&m.incarnation) == me.as_ref());
        if !lists_me {
            answers.dropped_me = true;
            let version = reply.ring.map_or(0, |r| r.ring_version);
            their_ring = Some((Ring::new(members), version));
        }
    }
    (answers, their_ring)
}

async fn ask(node: &Node, peer: &Member) -> Option<pb::StatusReply> {
    let mut client = node.peers.client(&peer.grpc, ASK_TIMEOUT)?;
    let call = async {
        let request = pb::StatusRequest {
            from: node.id.0.clone(),
        };
        client.status(request).await.ok().map(|r| r.into_inner())
    };
    tokio::time::timeout(ASK_TIMEOUT, call).await.ok().flatten()
}

/// Out of the ring: every client goes to its key's owner on `ring`, and this node's
/// keys and replicas are dropped (the ring has promoted their replicas elsewhere).
fn move_out(node: &Node, ring: &Ring, version: u64) {
    let moved = node.keys.take_where(|_| true);
    // Documents go too (their editors reconnect to the new owners, which promoted the
    // replicas); what the store holds stays.
    node.docs.take_where(|_, _| true);
    let mut clients = 0usize;
    for m in &moved {
        let owner = ring.owner(&m.key).filter(|o| o.id != node.id);
        for s in &m.subscribers {
            clients += 1;
            s.control.kick(match owner {
                Some(owner) => redirect_kick(owner, &s.redirect_query(), version),
                None => Kick {
                    frame: None,
                    code: CloseCode::Unavailable,
                    reason: "fenced: owner not known here".into(),
                },
            });
        }
    }
    let replicas = node.replicas.drop_where(|_, _, _| true);
    tracing::warn!(
        keys = moved.len(),
        clients,
        replicas,
        "out of the ring: clients redirected, state dropped"
    );
}

/// What this node tells a peer that asks.
pub fn status(node: &Node) -> pb::StatusReply {
    let view = node.membership.view();
    pb::StatusReply {
        node: node.id.0.clone(),
        etcd_ok: !etcd_lost(node),
        ring: Some(pb::RingRef {
            ring_version: view.version,
            ring_id: view.ring.id().0.clone(),
        }),
        members: view
            .ring
            .members()
            .iter()
            .filter_map(|m| serde_json::to_string(m).ok())
            .collect(),
    }
}
