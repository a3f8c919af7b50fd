//! What recording one latency costs: the node's own lock-free histogram
//! (`ringfeed_node::latency::Latency`) against `prometheus-client`'s `Histogram`, alone
//! and behind a labelled `Family` lookup (what a per-outcome histogram needs), with
//! every worker thread recording into the same one, as the node's tasks do.
//!
//!   cargo run --release -p ringfeed-node --example histogram_cost [RECORDS_PER_THREAD] [THREADS]
//!
//! Prints ns per record, per thread.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use ringfeed_node::latency::Latency;

/// The node's bucket bounds, in seconds.
const BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Runs `record(i)` `n` times on each of `threads` threads at once; ns per call.
fn time(threads: usize, n: u64, record: impl Fn(u64) + Send + Sync + 'static) -> f64 {
    let record = Arc::new(record);
    #[allow(clippy::disallowed_types)] // a wall clock outside any runtime
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let record = record.clone();
            std::thread::spawn(move || {
                for i in 0..n {
                    record(black_box(i.wrapping_mul(2654435761).wrapping_add(t as u64)));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a worker");
    }
    started.elapsed().as_nanos() as f64 / n as f64
}

/// A spread of latencies, 50 µs … ~13 ms.
fn took(i: u64) -> Duration {
    Duration::from_micros(50 + i % 13_000)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000_000);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    println!("{n} records per thread, {threads} threads, ns per record per thread:");

    let ours = Arc::new(Latency::default());
    let h = ours.clone();
    let t = time(threads, n, move |i| h.record(took(i)));
    println!("  ringfeed latency::Latency           {t:6.1}");

    let theirs = Arc::new(Histogram::new(BOUNDS));
    let h = theirs.clone();
    let t = time(threads, n, move |i| h.observe(took(i).as_secs_f64()));
    println!("  prometheus-client Histogram         {t:6.1}");

    let family = Arc::new(
        Family::<Vec<(&'static str, &'static str)>, Histogram>::new_with_constructor(|| {
            Histogram::new(BOUNDS)
        }),
    );
    let f = family.clone();
    let t = time(threads, n, move |i| {
        f.get_or_create(&vec![("outcome", "ok")])
            .observe(took(i).as_secs_f64())
    });
    println!("  prometheus-client Family<outcome>   {t:6.1}");
}
