//! The process clock the key state stamps activity with.

use tokio::time::Instant;

/// Milliseconds since this process first asked: when a key was last active, in 8
/// bytes rather than an `Instant`'s 16 (every key holds one).
pub(crate) fn now_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(ORIGIN.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}
