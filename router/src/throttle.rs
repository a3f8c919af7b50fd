//! Failed authentications per source: a burst, then refusals until the budget refills,
//! so that tickets and API tokens cannot be guessed at line rate and a misconfigured
//! fleet of clients cannot keep a node busy checking bad credentials.
//!
//! A source is an IPv4 address or an IPv6 /64 (a host is usually given a whole /64, so
//! counting single v6 addresses would let it rotate past the limit). At most
//! [`Throttle::MAX_SOURCES`] sources are tracked; past that, sources not seen before
//! share one budget.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Failure budgets by source.
pub struct Throttle {
    burst: f64,
    per_second: f64,
    sources: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    /// Failures left.
    left: f64,
    at: Instant,
}

impl Throttle {
    /// The most sources tracked one by one.
    pub const MAX_SOURCES: usize = 65_536;

    /// `burst` failures at once, refilled at `per_second`.
    pub fn new(burst: u32, per_second: f64) -> Throttle {
        Throttle {
            burst: f64::from(burst.max(1)),
            per_second: per_second.max(0.001),
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// `None` if `source` may try now, else how long it must wait.
    pub fn check(&self, source: IpAddr, now: Instant) -> Option<Duration> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = match sources.get(&Self::source(source)) {
            Some(bucket) => *bucket,
            // Past the table's bound, a newcomer is held to the shared budget.
            None if sources.len() >= Self::MAX_SOURCES => {
                *sources.get(&IpAddr::V6(Ipv6Addr::UNSPECIFIED))?
            }
            None => return None,
        };
        let left = self.refilled(bucket, now);
        (left < 1.0).then(|| Duration::from_secs_f64((1.0 - left) / self.per_second))
    }

    /// Counts one failed authentication from `source`.
    pub fn failed(&self, source: IpAddr, now: Instant) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = Self::source(source);
        if !sources.contains_key(&at) && sources.len() >= Self::MAX_SOURCES {
            sources.retain(|_, b| {
                (b.left + now.saturating_duration_since(b.at).as_secs_f64() * self.per_second)
                    < self.burst
            });
            if sources.len() >= Self::MAX_SOURCES {
                at = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
            }
        }
        let bucket = sources.entry(at).or_insert(Bucket {
            left: self.burst,
            at: now,
        });
        bucket.left = (self.refilled(*bucket, now) - 1.0).max(0.0);
        bucket.at = now;
    }

    /// How many sources are tracked.
    pub fn sources(&self) -> usize {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let since = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.left + since * self.per_second).min(self.burst)
    }

    fn source(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_until_the_budget_refills() {
        let throttle = Throttle::new(3, 2.0);
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(throttle.check(a, now), None);
            throttle.failed(a, now);
        }
        let wait = throttle.check(a, now).expect("past the burst");
        assert_eq!(wait, Duration::from_millis(500));
        // Another source is not affected…
        assert_eq!(throttle.check(b, now), None);
        // …and the first may try again once one failure has refilled.
        assert_eq!(throttle.check(a, now + Duration::from_millis(500)), None);
    }

    #[test]
    fn an_ipv6_prefix_is_one_source_and_the_table_is_bounded() {
        let throttle = Throttle::new(1, 1.0);
        let now = Instant::now();
        throttle.failed("2001:db8::1".parse().unwrap(), now);
        assert!(throttle
            .check("2001:db8::ffff".parse().unwrap(), now)
            .is_some());
        assert!(throttle
            .check("2001:db9::1".parse().unwrap(), now)
            .is_none());

        let many = Throttle::new(1, 1.0);
        for i in 0..(Throttle::MAX_SOURCES as u32 + 10) {
            many.failed(IpAddr::V4(i.into()), now);
        }
        assert_eq!(many.sources(), Throttle::MAX_SOURCES + 1);
        // A newcomer past the limit shares the overflow budget, already spent…
        assert!(many.check(IpAddr::V4(u32::MAX.into()), now).is_some());
        many.failed(IpAddr::V4(u32::MAX.into()), now);
        assert_eq!(many.sources(), Throttle::MAX_SOURCES + 1);
        // …until the tracked sources refill and are forgotten.
        let later = now + Duration::from_secs(2);
        many.failed(IpAddr::V4(u32::MAX.into()), later);
        assert_eq!(many.sources(), 1);
    }
}
