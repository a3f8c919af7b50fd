//! The memory budget (docs/design.md, *Memory bound*): the node samples its resident set
//! and, past its budget, refuses new keys and new connections (`RESOURCE_EXHAUSTED`,
//! 503, 4429) rather than being killed by the kernel. Keys it already holds, keys handed
//! to it and replicas are never refused: refusing those would lose acknowledged updates.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The node's memory budget and how much of it is used.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    rss: AtomicU64,
    over: AtomicBool,
}

impl MemoryBudget {
    /// A budget of `limit` bytes of resident memory.
    pub fn new(limit: u64) -> MemoryBudget {
        MemoryBudget {
            limit,
            rss: AtomicU64::new(0),
            over: AtomicBool::new(false),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The resident set at the last sample, in bytes.
    pub fn rss(&self) -> u64 {
        self.rss.load(Ordering::Relaxed)
    }

    /// Whether new keys and connections are refused.
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Records a sample: over past the limit, and back under only below 95% of it, so
    /// a node at the edge does not flap.
    pub fn record(&self, rss: u64) -> bool {
        self.rss.store(rss, Ordering::Relaxed);
        let over = if self.over() {
            rss > self.limit / 20 * 19
        } else {
            rss > self.limit
        };
        if over != self.over.swap(over, Ordering::Relaxed) {
            if over {
                tracing::warn!(
                    rss,
                    limit = self.limit,
                    "memory budget reached: refusing new keys and connections"
                );
            } else {
                tracing::info!(rss, limit = self.limit, "back under the memory budget");
            }
        }
        over
    }
}

/// This process's resident set in bytes (`VmRSS`), where /proc has it.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmRSS:")
}

/// The default budget: three quarters of the memory this process may use — the
/// machine's, or its cgroup's limit when that is lower. 4 GiB where neither is known.
pub fn default_limit() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kib_field(&m, "MemTotal:"));
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let usable = match (total, cgroup) {
        (Some(t), Some(c)) => t.min(c),
        (Some(t), None) => t,
        (None, Some(c)) => c,
        (None, None) => 16 << 30,
    };
    usable / 4 * 3
}

/// The value of a `Name:   123 kB` line, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_past_the_limit_and_back_below_95_percent() {
        let budget = MemoryBudget::new(1000);
        assert!(!budget.record(900));
        assert!(!budget.record(1000));
        assert!(budget.record(1001));
        assert!(budget.record(960), "stays over until below 95%");
        assert!(!budget.record(949));
        assert_eq!(budget.rss(), 949);
    }

    #[test]
    fn reads_kib_fields() {
        let status = "Name:\tx\nVmRSS:\t   2048 kB\nVmSwap:\t0 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(2 * 1024 * 1024));
        assert_eq!(kib_field(status, "VmHWM:"), None);
        assert!(rss_bytes().is_some_and(|r| r > 0));
        assert!(default_limit() > 0);
    }
}
