//! Epochs: the name of one unbroken run of a key's seqs.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngExt;

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

pub(crate) fn epoch_at(millis: u64) -> String {
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
