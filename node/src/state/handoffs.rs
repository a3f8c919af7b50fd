//! Hand-off bookkeeping: after a ring change, which keys wait for which previous
//! owner's marker before this node serves them (see [`crate::cluster::handoff`] for
//! the sending side).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringfeed_router::membership::View;
use ringfeed_router::ring::{NodeId, Ring, RingId};
use tokio::sync::watch;

/// How long a request for a key in flight waits for its previous owner's marker before
/// it is answered UNAVAILABLE / 4503 (the node keeps waiting).
pub const HANDOFF_WAIT: Duration = Duration::from_secs(5);
/// Markers kept for rings this node has not seen yet.
const EARLY_MARKERS: usize = 256;

/// Keys held back until markers come: those whose owner on `ring` was `owner` wait
/// for a marker for ring `marker_ring` from every node in `from`.
struct Block {
    ring: Arc<Ring>,
    owner: NodeId,
    marker_ring: RingId,
    from: HashSet<String>,
}

impl Block {
    fn holds(&self, key: &str) -> bool {
        self.ring.owner(key).is_some_and(|o| o.id == self.owner)
    }
}

/// What this node waits for on the current ring.
#[derive(Default)]
struct Waiting {
    ring: RingId,
    version: u64,
    /// The ring itself.
    current: Option<Arc<Ring>>,
    /// What is still outstanding, from this ring and earlier ones.
    blocks: Vec<Block>,
    /// Markers that came before this node saw their ring: (from, ring id), the most
    /// recent [`EARLY_MARKERS`] kept.
    early: VecDeque<(String, RingId)>,
}

/// Hand-off bookkeeping of one node.
pub struct Handoffs {
    waiting: Mutex<Waiting>,
    changed: watch::Sender<u64>,
}

impl Default for Handoffs {
    fn default() -> Self {
        Handoffs {
            waiting: Mutex::new(Waiting::default()),
            changed: watch::Sender::new(0),
        }
    }
}

impl Handoffs {
    /// A new ring. The keys of every other member of `previous` wait for that member's
    /// marker if its record still exists on `view`; if it vanished (a crash), they wait
    /// for a marker from every other active member instead, since any of them may hold
    /// a replica to offer (sent before its marker). Blocks left from earlier rings whose
    /// sender vanished are turned into the latter kind.
    pub fn begin(&self, me: &NodeId, previous: Arc<Ring>, view: &View) {
        let current = &view.ring;
        let ring = current.id().clone();
        let others: HashSet<String> = current
            .members()
            .iter()
            .filter(|m| m.id != *me && current.is_active(&m.id))
            .map(|m| m.id.0.clone())
            .collect();
        let mut w = self.waiting.lock().expect("handoff lock poisoned");
        let mut blocks = std::mem::take(&mut w.blocks);
        if !current.is_active(me) {
            // Not serving on this ring: nothing to wait for (a joiner starts on its own).
            blocks.clear();
        }
        for b in &mut blocks {
            if b.from
                .iter()
                .any(|id| current.member(&NodeId(id.clone())).is_none())
            {
                b.from = others.clone();
                b.marker_ring = ring.clone();
            }
        }
        for m in previous.members() {
            // An earlier process under this node's id, whose record was replaced by
            // ours in one step (its expiry and our registration seen together), left
            // like any member: its keys wait for every other member's offers of their
            // replicas, not for nothing.
            let earlier_me = m.id == *me
                && current
                    .member(me)
                    .is_some_and(|c| c.incarnation != m.incarnation);
            if (m.id == *me && !earlier_me) || !previous.is_active(&m.id) || !current.is_active(me)
            {
                continue;
            }
            let from = if current.member(&m.id).is_some() && !earlier_me {
                HashSet::from([m.id.0.clone()])
            } else {
                others.clone()
            };
            blocks.push(Block {
                ring: previous.clone(),
                owner: m.id.clone(),
                marker_ring: ring.clone(),
                from,
            });
        }
        for b in &mut blocks {
            b.from
                .retain(|id| !w.early.iter().any(|(f, r)| f == id && *r == b.marker_ring));
        }
        blocks.retain(|b| !b.from.is_empty());
        // Markers for this ring are used up; those for rings not seen yet stay.
        w.early.retain(|(_, r)| *r != ring);
        if !blocks.is_empty() {
            let from: HashSet<&String> = blocks.iter().flat_map(|b| &b.from).collect();
            tracing::info!(ring_id = %ring, ?from, "waiting for hand-offs");
        }
        w.ring = ring;
        w.version = view.version;
        w.current = Some(view.ring.clone());
        w.blocks = blocks;
        drop(w);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Waits until the current ring has `me` on it and no marker is outstanding:
    /// whatever `me` was to receive has been handed over.
    pub async fn settled_on(&self, me: &NodeId) {
        let mut changes = self.changed.subscribe();
        loop {
            {
                let w = self.waiting.lock().expect("handoff lock poisoned");
                if w.blocks.is_empty() && w.current.as_ref().is_some_and(|r| r.is_active(me)) {
                    return;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until no marker is outstanding (true) or the ring is no longer `ring`
    /// (false).
    pub async fn settled(&self, ring: &RingId) -> bool {
        let mut changes = self.changed.subscribe();
        loop {
            {
                let w = self.waiting.lock().expect("handoff lock poisoned");
                if w.ring != *ring {
                    return false;
                }
                if w.blocks.is_empty() {
                    return true;
                }
            }
            if changes.changed().await.is_err() {
                return false;
            }
        }
    }

    /// A receiver that changes whenever the hand-off state does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// `from` has sent everything it gave up (and every replica it offers) on `ring`.
    pub fn marker(&self, from: &str, ring: RingId) {
        let mut w = self.waiting.lock().expect("handoff lock poisoned");
        let mut expected = w.ring == ring;
        for b in &mut w.blocks {
            if b.marker_ring == ring {
                expected = true;
                if b.from.remove(from) {
                    tracing::debug!(%from, ring_id = %ring, owner = %b.owner, "marker");
                }
            }
        }
        let before = w.blocks.len();
        w.blocks.retain(|b| !b.from.is_empty());
        if w.blocks.len() < before {
            tracing::info!(%from, ring_id = %ring, "hand-off complete");
        }
        if !expected {
            w.early.push_back((from.to_owned(), ring));
            if w.early.len() > EARLY_MARKERS {
                w.early.pop_front();
            }
        }
        drop(w);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Whether [`ready`](Self::ready) would answer `true` at once.
    pub fn ready_now(&self, key: &str, view: &View) -> bool {
        let w = self.waiting.lock().expect("handoff lock poisoned");
        let caught_up = w.ring == *view.ring.id() || w.version >= view.version;
        caught_up && !w.blocks.iter().any(|b| b.holds(key))
    }

    /// Waits until this node has taken `view`'s ring into account and nothing `key`
    /// waits for is outstanding; `false` when that did not happen within
    /// [`HANDOFF_WAIT`].
    pub async fn ready(&self, key: &str, view: &View) -> bool {
        if self.ready_now(key, view) {
            return true;
        }
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + HANDOFF_WAIT;
        loop {
            if self.ready_now(key, view) {
                return true;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringfeed_router::ring::{Member, MemberState};

    fn member(id: &str) -> Member {
        Member {
            id: NodeId(id.into()),
            incarnation: format!("inc-{id}"),
            grpc: String::new(),
            http: String::new(),
            quic: None,
            quic_sha256: None,
            points: 64,
            state: MemberState::Active,
            version: String::new(),
        }
    }

    fn view(ids: &[&str], version: u64) -> View {
        View {
            ring: Arc::new(Ring::new(ids.iter().map(|id| member(id)))),
            version,
        }
    }

    /// A key that `owner` owns on `ring`.
    fn key_of(ring: &Ring, owner: &str) -> String {
        (0..)
            .map(|i| format!("k{i}"))
            .find(|k| ring.owner(k).is_some_and(|o| o.id.0 == owner))
            .expect("a key")
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_key_waits_for_its_previous_owners_marker_only() {
        let before = view(&["n1", "n2"], 5);
        let after = view(&["n1", "n2", "n3"], 6);
        let h = Handoffs::default();
        h.begin(&NodeId("n3".into()), before.ring.clone(), &after);
        let from_n1 = key_of(&before.ring, "n1");
        let from_n2 = key_of(&before.ring, "n2");
        h.marker("n2", after.ring.id().clone());
        assert!(h.ready(&from_n2, &after).await, "n2's marker came");
        // n1's has not: held for the bound, then refused (time is paused here).
        assert!(!h.ready(&from_n1, &after).await);
        h.marker("n1", after.ring.id().clone());
        assert!(h.ready(&from_n1, &after).await);
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_marker_survives_the_rings_seen_before_its_own() {
        let r1 = view(&["n1"], 2);
        let r2 = view(&["n1", "n2"], 4);
        let r3 = view(&["n1", "n2", "n3"], 6);
        let h = Handoffs::default();
        // n1's marker for r3 comes before this node (n3) has even seen r2.
        h.marker("n1", r3.ring.id().clone());
        h.begin(&NodeId("n3".into()), r1.ring.clone(), &r2);
        h.begin(&NodeId("n3".into()), r2.ring.clone(), &r3);
        assert!(
            h.ready(&key_of(&r2.ring, "n1"), &r3).await,
            "n1's early marker for r3 was kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_previous_owner_that_dies_mid_hand_off_is_replaced_by_every_replica_holder() {
        let r1 = view(&["n1", "n2", "n3"], 2);
        let r2 = view(&["n1", "n2", "n3", "n4"], 4);
        let r3 = view(&["n2", "n3", "n4"], 6);
        let h = Handoffs::default();
        let me = NodeId("n4".into());
        h.begin(&me, r1.ring.clone(), &r2);
        h.marker("n2", r2.ring.id().clone());
        h.marker("n3", r2.ring.id().clone());
        // n1 dies before its marker: the keys it held wait for n2's and n3's markers on
        // r3 (either may hold their replica, offered before its marker).
        h.begin(&me, r2.ring.clone(), &r3);
        let from_n1 = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| {
                r1.ring.owner(k).is_some_and(|o| o.id.0 == "n1")
                    && r2.ring.owner(k).is_some_and(|o| o.id.0 == "n4")
            })
            .expect("a key that moved from n1 to n4");
        h.marker("n2", r3.ring.id().clone());
        assert!(
            !h.ready(&from_n1, &r3).await,
            "n3 may still offer a replica"
        );
        h.marker("n3", r3.ring.id().clone());
        assert!(h.ready(&from_n1, &r3).await);
        assert!(h.settled(r3.ring.id()).await);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_incarnation_replaced_in_one_step_is_waited_for_like_a_departed_member() {
        let before = view(&["n1", "n2", "n3"], 5);
        // n2 restarted: its old record's expiry and its new registration in one view.
        let after = View {
            ring: Arc::new(Ring::new(["n1", "n2", "n3"].iter().map(|id| Member {
                incarnation: if *id == "n2" {
                    "inc-n2-again".into()
                } else {
                    format!("inc-{id}")
                },
                ..member(id)
            }))),
            version: 6,
        };
        let h = Handoffs::default();
        h.begin(&NodeId("n2".into()), before.ring.clone(), &after);
        let earlier = key_of(&before.ring, "n2");
        // Its keys' replicas are offered by the others: not served before their markers.
        h.marker("n1", after.ring.id().clone());
        assert!(
            !h.ready(&earlier, &after).await,
            "n3 may still offer a replica"
        );
        h.marker("n3", after.ring.id().clone());
        assert!(h.ready(&earlier, &after).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_owner_is_not_waited_for_and_early_markers_count() {
        let before = view(&["n1", "n2", "n3"], 5);
        let after = view(&["n1", "n3"], 6);
        let h = Handoffs::default();
        // n1's marker for the new ring comes before this node sees that ring.
        h.marker("n1", after.ring.id().clone());
        h.begin(&NodeId("n3".into()), before.ring.clone(), &after);
        assert!(
            h.ready(&key_of(&before.ring, "n2"), &after).await,
            "n2 is gone: its keys wait only for replicas offered by n1, whose marker came"
        );
        assert!(
            h.ready(&key_of(&before.ring, "n1"), &after).await,
            "n1's early marker counted"
        );
    }
}
