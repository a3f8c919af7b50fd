//! Jittered exponential back-off, for retries against etcd and peers.

use std::time::Duration;

use rand::RngExt;

/// Jittered exponential back-off.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
    /// Full jitter: a pause anywhere below the ceiling, not in its upper half.
    full: bool,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            current: base,
            full: false,
        }
    }

    /// Full jitter: each pause uniform below a ceiling that starts at `base` and
    /// doubles up to `max` (clients reconnecting at once spread out the most).
    pub fn full_jitter(base: Duration, max: Duration) -> Backoff {
        Backoff {
            full: true,
            ..Backoff::new(base, max)
        }
    }

    /// The next pause: uniformly random in [current/2, current], then doubles.
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        if self.full {
            return ceiling.mul_f64(rand::rng().random::<f64>());
        }
        let half = ceiling / 2;
        half + ceiling.mul_f64(rand::rng().random::<f64>() * 0.5)
    }

    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let pauses: Vec<Duration> = (0..6).map(|_| b.next_pause()).collect();
        assert!(pauses[0] >= Duration::from_millis(50) && pauses[0] <= Duration::from_millis(100));
        for p in &pauses[3..] {
            assert!(*p >= Duration::from_millis(200) && *p <= Duration::from_millis(400));
        }
        b.reset();
        assert!(b.next_pause() <= Duration::from_millis(100));
    }
}
