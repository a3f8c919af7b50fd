//! Latency histograms for `/metrics`: fixed buckets, lock-free recording, rendered in
//! the Prometheus text format (cumulative `_bucket{le=…}`, `_sum`, `_count`).
//!
//! Recording is one clock read by the caller and two relaxed atomic adds here, so the
//! hot paths (a `Deliver` request, a replication batch) can afford it.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Upper bounds of the buckets, in µs: 100 µs … 10 s, then `+Inf`.
const BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A histogram of durations.
#[derive(Debug, Default)]
pub struct Latency {
    /// Per bucket, not cumulative; the last one is `+Inf`.
    counts: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    /// Counts one duration.
    pub fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US.partition_point(|&bound| bound < us);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Starts timing: the time until the returned guard is dropped is counted, also when
    /// it is dropped early (a timeout dropping the future that holds it), so the slowest
    /// cases are not the ones left out.
    pub fn start(&self) -> Timer<'_> {
        Timer {
            latency: self,
            started: Instant::now(),
        }
    }

    /// Appends the histogram as Prometheus metric `name` (in seconds) to `out`.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            match BOUNDS_US.get(i) {
                Some(&us) => {
                    let le = us as f64 / 1e6;
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Counts the time from [`Latency::start`] until it is dropped.
#[must_use = "the time is counted when the timer is dropped"]
pub struct Timer<'a> {
    latency: &'a Latency,
    started: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.latency.record(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(latency: &Latency) -> String {
        let mut out = String::new();
        latency.render("t_seconds", "test", &mut out);
        out
    }

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let latency = Latency::default();
        latency.record(Duration::from_micros(40));
        latency.record(Duration::from_micros(100)); // on the bound: counts as ≤ 100 µs
        latency.record(Duration::from_micros(101));
        latency.record(Duration::from_millis(3));
        latency.record(Duration::from_secs(60)); // past the last bound
        let text = rendered(&latency);
        for line in [
            "# TYPE t_seconds histogram",
            "t_seconds_bucket{le=\"0.0001\"} 2",
            "t_seconds_bucket{le=\"0.00025\"} 3",
            "t_seconds_bucket{le=\"0.0025\"} 3",
            "t_seconds_bucket{le=\"0.005\"} 4",
            "t_seconds_bucket{le=\"10\"} 4",
            "t_seconds_bucket{le=\"+Inf\"} 5",
            "t_seconds_count 5",
            "t_seconds_sum 60.003241",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
    }

    #[test]
    fn a_timer_counts_once_when_dropped_even_unfinished() {
        let latency = Latency::default();
        {
            let _timer = latency.start();
            assert!(rendered(&latency).contains("t_seconds_count 0\n"));
        }
        // A future holding a timer, dropped before it finished (as a timeout does).
        let future = async {
            let _timer = latency.start();
            std::future::pending::<()>().await;
        };
        let mut future = Box::pin(future);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(std::future::Future::poll(future.as_mut(), &mut cx).is_pending());
        drop(future);
        assert!(rendered(&latency).contains("t_seconds_count 2\n"));
    }

    #[test]
    fn an_empty_histogram_renders_zeros() {
        let text = rendered(&Latency::default());
        assert!(text.contains("t_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert!(text.contains("t_seconds_sum 0\nt_seconds_count 0\n"));
    }
}
