//! A key's idempotency window.

use std::collections::{HashMap, VecDeque};

/// A key's idempotency window: the seq each remembered idempotency key got. Boxed in
/// [`KeyState`] and made by the first publish that carries a key (the router gives
/// every publish one) or by restoring a key that had one. Most keys see few updates: a short window is searched in
/// order, and a map indexes it only past [`Idempotency::FEW`] — a map's smallest table
/// and a second copy of each key would cost every key published to ~300 bytes.
#[derive(Debug, Default)]
pub(super) struct Idempotency {
    /// The keys with their seqs and payload digests, oldest first.
    pub(super) order: VecDeque<(Box<str>, u64, u64)>,
    /// Made once the window holds more than `FEW`. Boxed on purpose: an empty map is
    /// 48 bytes in every window, the box 8.
    #[allow(clippy::box_collection)]
    pub(super) index: Option<Box<HashMap<Box<str>, SeqDigest>>>,
}

/// The seq an idempotency key got, and its payload's digest.
pub(super) type SeqDigest = (u64, u64);

impl Idempotency {
    pub(super) const FEW: usize = 8;

    /// The seq that `id` got and its payload's digest, if the window holds it.
    pub(super) fn get(&self, id: &str) -> Option<SeqDigest> {
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
    pub(super) fn remember(&mut self, id: String, seq: u64, digest: u64, window: usize) {
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
    pub(super) fn oldest_first(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.order.iter().map(|(k, s, d)| (&**k, *s, *d))
    }
}
