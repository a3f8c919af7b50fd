//! Ring quality (docs/benchmarks.md P6): 1M random keys over 5 nodes — max/mean keys per node,
//! the share of keys moved when a 6th node joins, and the owner-lookup time.
//!
//! `cargo run --release -p ringfeed-router --example ring_bench [-- --json PATH]`

use std::collections::HashMap;
use std::hint::black_box;
use tokio::time::Instant;

use rand::RngExt;
use ringfeed_router::ring::{Member, MemberState, NodeId, Ring, DEFAULT_POINTS};

const KEYS: usize = 1_000_000;

fn member(id: &str) -> Member {
    Member {
        id: NodeId(id.to_owned()),
        incarnation: "bench".into(),
        grpc: String::new(),
        http: String::new(),
        quic: None,
        quic_sha256: None,
        points: DEFAULT_POINTS,
        state: MemberState::Active,
        version: String::new(),
    }
}

fn main() {
    let json_path = std::env::args().skip_while(|a| a != "--json").nth(1);
    let mut rng = rand::rng();
    let keys: Vec<String> = (0..KEYS)
        .map(|_| format!("user:{:016x}", rng.random::<u64>()))
        .collect();
    let five: Vec<Member> = (1..=5).map(|i| member(&format!("n{i}"))).collect();
    let ring5 = Ring::new(five.clone());
    let ring6 = Ring::new(five.into_iter().chain([member("n6")]));

    let mut load: HashMap<&str, usize> = HashMap::new();
    let mut moved = 0usize;
    let mut moved_elsewhere = 0usize;
    for key in &keys {
        let before = ring5.owner(key).expect("owner");
        *load.entry(before.id.0.as_str()).or_default() += 1;
        let after = ring6.owner(key).expect("owner");
        if before.id != after.id {
            moved += 1;
            if after.id.0 != "n6" {
                moved_elsewhere += 1;
            }
        }
    }
    let mean = KEYS as f64 / 5.0;
    let max = *load.values().max().expect("five nodes") as f64;
    let max_over_mean = max / mean;
    let moved_share = moved as f64 / KEYS as f64;

    // Lookup: hash + binary search, over keys not in cache order.
    let rounds = 3;
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let start = Instant::now();
        for key in &keys {
            black_box(ring5.owner(black_box(key)));
        }
        best = best.min(start.elapsed().as_nanos() as f64 / KEYS as f64);
    }

    let met_balance = max_over_mean <= 1.10;
    let met_moved = (moved_share - 1.0 / 6.0).abs() <= 0.1 / 6.0;
    let met_lookup = best <= 100.0;
    println!("P6 ring quality — {KEYS} random keys, 5 nodes × {DEFAULT_POINTS} points");
    let mut per_node: Vec<_> = load.iter().collect();
    per_node.sort();
    for (id, n) in per_node {
        println!("  {id}: {n} keys ({:.3} of mean)", *n as f64 / mean);
    }
    println!(
        "  max/mean keys per node : {max_over_mean:.3}   (bar ≤ 1.10: {})",
        verdict(met_balance)
    );
    println!(
        "  moved when n6 joins    : {:.4} = {:.3} × 1/6, {} moved between old nodes   (bar 1/6 ± 10%: {})",
        moved_share,
        moved_share * 6.0,
        moved_elsewhere,
        verdict(met_moved)
    );
    println!(
        "  owner lookup           : {best:.1} ns (best of {rounds})   (bar ≤ 100 ns: {})",
        verdict(met_lookup)
    );

    if let Some(path) = json_path {
        let report = serde_json::json!({
            "id": "P6",
            "ringfeed": {
                "keys": KEYS, "nodes": 5, "points_per_node": DEFAULT_POINTS,
                "max_over_mean": max_over_mean, "moved_share": moved_share,
                "moved_between_old_nodes": moved_elsewhere, "lookup_ns": best,
            },
            "bar": {"max_over_mean": 1.10, "moved_share": [1.0 / 6.0 * 0.9, 1.0 / 6.0 * 1.1], "lookup_ns": 100},
            "met": met_balance && met_moved && met_lookup,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json"))
            .expect("write report");
        println!("  wrote {path}");
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}
