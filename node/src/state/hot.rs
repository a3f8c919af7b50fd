//! The hottest keys of a node: the top keys by update rate (between two samples of
//! every key's seq) and by subscribers. Sampled on demand, at most once a second
//! ([`HotKeys::sample`]), so the view costs nothing while nobody looks.

use std::collections::HashMap;

use tokio::time::{Duration, Instant};

use super::KeyTable;

/// The least time between two samples: a faster asker gets the last one again.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// How many keys each list holds at most.
pub const TOP: usize = 20;

/// One sample's view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hot {
    /// The time between the two samples the rates come from, in ms (0: no rates yet).
    pub window_ms: u64,
    /// `(key, updates per second)`, hottest first.
    pub by_rate: Vec<(String, f64)>,
    /// `(key, subscribers)`, most first.
    pub by_subscribers: Vec<(String, usize)>,
}

/// The last sample of every key's position, and the view made from it.
#[derive(Debug, Default)]
pub struct HotKeys {
    /// key → (epoch, seq) at `at`.
    seen: HashMap<String, (Box<str>, u64)>,
    at: Option<Instant>,
    last: Hot,
}

impl HotKeys {
    /// The view now: a new sample of `table` if the last is older than
    /// [`MIN_INTERVAL`], else the last view.
    pub fn sample(&mut self, table: &KeyTable, now: Instant) -> Hot {
        if self
            .at
            .is_some_and(|at| now.saturating_duration_since(at) < MIN_INTERVAL)
        {
            return self.last.clone();
        }
        let elapsed = self.at.map(|at| now.saturating_duration_since(at));
        let mut seen = HashMap::with_capacity(self.seen.len());
        let mut rates = Vec::new();
        let mut subscribed = Vec::new();
        table.activity(|key, epoch, seq, subscribers| {
            if let Some(elapsed) = elapsed {
                let before = self.seen.get(key);
                // Same epoch: the seqs count its updates; a new epoch starts at 0.
                let updates = match before {
                    Some((e, s)) if &**e == epoch => seq.saturating_sub(*s),
                    _ => seq,
                };
                if updates > 0 && !elapsed.is_zero() {
                    rates.push((key.to_owned(), updates as f64 / elapsed.as_secs_f64()));
                }
            }
            if subscribers > 0 {
                subscribed.push((key.to_owned(), subscribers));
            }
            seen.insert(key.to_owned(), (Box::from(epoch), seq));
        });
        rates.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rates.truncate(TOP);
        subscribed.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        subscribed.truncate(TOP);
        self.seen = seen;
        self.at = Some(now);
        self.last = Hot {
            window_ms: elapsed.map_or(0, |e| e.as_millis() as u64),
            by_rate: rates,
            by_subscribers: subscribed,
        };
        self.last.clone()
    }
}
