//! Exact presence: connections per presence id.

use std::collections::HashMap;
use std::sync::Arc;

/// Connections per presence id. Most keys have one id (a user's feed), for which a
/// map's smallest table costs ~150 bytes: a short list holds the first few ids, and a
/// map takes over past [`Presence::FEW`].
#[derive(Debug, Default)]
pub(super) struct Presence {
    pub(super) few: Vec<(Arc<str>, usize)>,
    /// Made only past `FEW` ids. Boxed on purpose: an empty map is 48 bytes in every
    /// key, the box 8, and most keys never need it.
    #[allow(clippy::box_collection)]
    pub(super) many: Option<Box<HashMap<Arc<str>, usize>>>,
}

impl Presence {
    pub(super) const FEW: usize = 8;

    /// Counts a connection of `id`; whether it is the id's first.
    pub(super) fn join(&mut self, id: &Arc<str>) -> bool {
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
    pub(super) fn leave(&mut self, id: &str) -> bool {
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
    pub(super) fn ids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.few
            .iter()
            .map(|(id, _)| id)
            .chain(self.many.iter().flat_map(|m| m.keys()))
    }
}
