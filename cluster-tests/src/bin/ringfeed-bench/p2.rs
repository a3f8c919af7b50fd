//! P2: latency, unbatched (docs/benchmarks.md). Unary `Publish`, one update per call,
//! paced at two rates — 1,000 publishes/s and half of ringfeed's own maximum unbatched
//! rate — and the time from publish to frame received, p50/p99/p999, for:
//!
//! * ringfeed through the router, and ringfeed published straight to each key's owner
//!   (`pub --direct-node`: every node serves the public `Router` on its gRPC port);
//! * the seed reference and Socket.IO, published through Redis at the same rate;
//! * the same-hop floor: a chain of bare relay processes with as many process hops as
//!   ringfeed's path through the router (see [`RELAYS`]), at the same rate;
//! * one bare hop: the calibration's tokio-tungstenite fan-out, paced to the same rate.
//!
//! Every system runs once per rate per round, rates and systems alternating, for at
//! least [`MIN_RUNS`] rounds; medians are quoted. The bar (ringfeed's p99 ≤ the seed
//! reference's at both rates) is judged for the router path and for the direct path
//! (`met_router`, `met_direct`; `met` is either). The goal: p99 ≤ ½ of the seed
//! reference's and ≤ 1.5× the same-hop floor. Absolute times are reported, not judged.

use std::time::Duration;

use anyhow::{ensure, Result};
use ringfeed_cluster_tests::Cluster;
use serde_json::{json, Map, Value};

use crate::procs::{NodePeer, Peer};
use crate::report::{self, median};
use crate::{
    fanout_run, fmt_rate, ringfeed_urls, start_ringfeed, Args, Publishing, RunResult, Sizes, System,
};

/// Relays in front of the fan-out server in the same-hop floor.
///
/// ringfeed's path through the router crosses five process boundaries on this box:
/// caller → router → owner → successor → owner → subscriber (the owner sends the update
/// to its successor, and fans it out only once the successor's answer — the replica
/// holds it — comes back). The floor crosses as many, with nothing but a read and a
/// write at each stop:
///
/// | ringfeed | same-hop floor |
/// | --- | --- |
/// | publisher → router | publisher → relay 1 |
/// | router → owner | relay 1 → relay 2 |
/// | owner → successor | relay 2 → relay 3 |
/// | successor → owner (the replica's answer) | relay 3 → fan-out server |
/// | owner → subscriber's socket | fan-out server → subscriber's socket |
///
/// So relay 1 stands for the router, relay 2 for the owner, relay 3 for the successor,
/// and the fan-out server for the owner again, writing to each subscriber's socket.
/// `--p2-relays` changes the count (4 would add a hop ringfeed does not have).
pub(crate) const RELAYS: usize = 3;

/// The bar is on medians of at least this many alternating runs (`--smoke` makes one).
const MIN_RUNS: usize = 5;

/// The fixed one of the two rates, publishes/s.
const FIXED_RATE: u64 = 1000;

// The systems, in the order runs alternate.
const ROUTER: usize = 0;
const DIRECT: usize = 1;
const SEED: usize = 2;
const SOCKETIO: usize = 3;
const FLOOR: usize = 4;
const ONE_HOP: usize = 5;

/// A rate measured: its key in the JSON (`1000`, `half_max`, or `given` for
/// `--p2-rate`) and publishes/s.
struct Rate {
    label: &'static str,
    per_s: u64,
}

impl Rate {
    fn text(&self) -> String {
        match self.label {
            "half_max" => format!("{}/s (half max)", self.per_s),
            "given" => format!("{}/s (given)", self.per_s),
            _ => format!("{}/s", self.per_s),
        }
    }
}

/// What one system measured at one rate, run by run.
#[derive(Default)]
struct Series {
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    /// The publisher's call round trip, p99 in ms: ringfeed's ack (after replication),
    /// the peers' Redis reply to `PUBLISH`; none for the relays and the fan-out.
    ack99: Vec<f64>,
    /// How busy the whole box was over the window, % of all cores.
    busy: Vec<f64>,
    receipts: Vec<u64>,
    published: Vec<u64>,
    /// ringfeed only, from the owners' own histograms (bucket bounds, ms): Deliver
    /// (arrival → answer) and replication batches (sent → answered), p99.
    deliver99: Vec<f64>,
    replication99: Vec<f64>,
}

impl Series {
    /// Median p50, p99, p999 in ms.
    fn medians(&self) -> [f64; 3] {
        [median(&self.p50), median(&self.p99), median(&self.p999)]
    }

    fn json(&self, hops: bool) -> Value {
        let [p50, p99, p999] = self.medians();
        let mut v = json!({
            "p50_ms": self.p50, "p99_ms": self.p99, "p999_ms": self.p999,
            "median_p50_ms": p50, "median_p99_ms": p99, "median_p999_ms": p999,
            "call_p99_ms": self.ack99, "median_call_p99_ms": median(&self.ack99),
            "box_busy_pct": self.busy, "receipts": self.receipts, "published": self.published,
        });
        if hops {
            v["owner_deliver_p99_le_ms"] = json!(self.deliver99);
            v["owner_replication_p99_le_ms"] = json!(self.replication99);
            v["median_owner_deliver_p99_le_ms"] = json!(median(&self.deliver99));
            v["median_owner_replication_p99_le_ms"] = json!(median(&self.replication99));
        }
        v
    }
}

/// The bar and the goal at one rate, from median p99s (ms).
#[derive(Debug, PartialEq)]
struct Verdict {
    /// ringfeed's p99 ≤ the seed reference's.
    bar: bool,
    /// ringfeed's p99 ≤ ½ the seed reference's and ≤ 1.5× the same-hop floor's.
    goal: bool,
}

fn verdict(ringfeed: f64, seed: f64, floor: f64) -> Verdict {
    // A NaN (nothing measured) fails every comparison.
    Verdict {
        bar: ringfeed <= seed,
        goal: ringfeed <= seed / 2.0 && ringfeed <= 1.5 * floor,
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "not met"
    }
}

/// P2 (module docs).
pub(crate) async fn p2(args: &Args, sizes: &Sizes) -> Result<()> {
    ensure!(args.p2_relays >= 1, "--p2-relays: at least 1");
    let runs = if args.smoke {
        args.runs
    } else {
        args.runs.max(MIN_RUNS)
    };
    let keys = format!("p2:*{}", sizes.keys);
    let cluster = start_ringfeed(3).await?;
    let seed = NodePeer::start(&args.peers, Peer::Seed, 2).await?;
    let socketio = NodePeer::start(&args.peers, Peer::SocketIo, 2).await?;
    let systems = [
        System::Ringfeed {
            urls: ringfeed_urls(&cluster),
            router: cluster.router_grpc(),
            direct: None,
            secure: None,
        },
        System::RingfeedDirect {
            urls: ringfeed_urls(&cluster),
            node: cluster.nodes[0].http.clone(),
        },
        seed.system(),
        socketio.system(),
        System::RelayChain {
            relays: args.p2_relays,
        },
        // The better of the two calibrations in every P2 run so far, and the
        // subscribers' own transport: tcp would add a run per round and tell nothing.
        System::Calibration {
            mode: "ws",
            servers: 1,
            workers: 0,
        },
    ];
    let (max_publish, high) = match args.p2_rate {
        Some(rate) => {
            println!("P2: at {FIXED_RATE}/s and at the rate given, {rate} publishes/s (not half of the maximum)");
            (f64::NAN, rate.max(1))
        }
        None => {
            // Ringfeed's own maximum unbatched rate, through the router, with the
            // subscribers connected.
            let max = fanout_run(
                &systems[ROUTER],
                &keys,
                sizes.per_key,
                sizes.sub_procs,
                Publishing {
                    batch: 0,
                    rate: 0,
                    concurrency: 64,
                    count: 0,
                    ack_owner: false,
                },
                Duration::from_secs(2),
                Duration::from_secs(args.window_secs),
            )
            .await?;
            let max_publish = max.rate / sizes.per_key as f64;
            let rate = (max_publish / 2.0).max(10.0) as u64;
            println!(
                "P2: ringfeed's maximum unbatched rate {max_publish:.0} publishes/s ({}); measuring at {FIXED_RATE}/s and {rate}/s",
                fmt_rate(max.rate)
            );
            (max_publish, rate)
        }
    };
    // `--smoke` checks the harness: the half-maximum rate (and the maximum's run) only.
    let mut rates = Vec::new();
    if !args.smoke {
        rates.push(Rate {
            label: "1000",
            per_s: FIXED_RATE,
        });
    }
    rates.push(Rate {
        label: if args.p2_rate.is_some() {
            "given"
        } else {
            "half_max"
        },
        per_s: high,
    });
    let mut series: Vec<Vec<Series>> = rates
        .iter()
        .map(|_| systems.iter().map(|_| Series::default()).collect())
        .collect();
    // The last run of each system at the last rate, for the plot.
    let mut last: Vec<Option<RunResult>> = systems.iter().map(|_| None).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for run in 0..runs {
        for (ri, rate) in rates.iter().enumerate() {
            let publishing = Publishing {
                batch: 0,
                rate: rate.per_s,
                concurrency: 64,
                count: 0,
                ack_owner: false,
            };
            for (i, system) in systems.iter().enumerate() {
                // Only ringfeed's runs publish to the cluster: the owners' histograms
                // between two readings are that run's.
                let hops_before = if i == ROUTER || i == DIRECT {
                    Some(hop_histograms(&cluster).await?)
                } else {
                    None
                };
                let r = fanout_run(
                    system,
                    &keys,
                    sizes.per_key,
                    sizes.sub_procs,
                    publishing,
                    Duration::from_secs(1),
                    Duration::from_secs(args.window_secs),
                )
                .await?;
                let s = &mut series[ri][i];
                let mut hops = String::new();
                if let Some(before) = hops_before {
                    let after = hop_histograms(&cluster).await?;
                    let d99 = bucket_quantile_ms(&before[0], &after[0], 0.99);
                    let r99 = bucket_quantile_ms(&before[1], &after[1], 0.99);
                    hops =
                        format!("; at the owners p99 ≤ {d99} ms Deliver, ≤ {r99} ms replication");
                    s.deliver99.push(d99);
                    s.replication99.push(r99);
                }
                let ms = |q: f64| r.hist.value_at_quantile(q) as f64 / 1000.0;
                let busy_pct = r.box_cpu_ms / (args.window_secs as f64 * 1000.0 * cores) * 100.0;
                let ack = match r.calls_ms {
                    Some([a50, a99, _]) => format!("; ack p50 {a50:.2} / p99 {a99:.2} ms"),
                    None => String::new(),
                };
                println!(
                    "P2 run {}/{runs} at {:>6}/s {:>15}: p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms over {} receipts ({} published); box {busy_pct:.0}% busy{ack}{hops}",
                    run + 1,
                    rate.per_s,
                    system.name(),
                    ms(0.5),
                    ms(0.99),
                    ms(0.999),
                    r.hist.len(),
                    r.published,
                );
                s.p50.push(ms(0.5));
                s.p99.push(ms(0.99));
                s.p999.push(ms(0.999));
                s.busy.push(busy_pct);
                s.receipts.push(r.hist.len());
                s.published.push(r.published);
                if let Some([_, a99, _]) = r.calls_ms {
                    s.ack99.push(a99);
                }
                if ri + 1 == rates.len() {
                    last[i] = Some(r);
                }
            }
        }
    }

    // The verdicts, rate by rate.
    let mut rates_json = Map::new();
    let (mut met_router, mut met_direct) = (true, true);
    let (mut goal_router, mut goal_direct) = (true, true);
    let (mut text_ringfeed, mut text_peers, mut text_calibration) =
        (Vec::new(), Vec::new(), Vec::new());
    for (ri, rate) in rates.iter().enumerate() {
        let m = |i: usize| series[ri][i].medians();
        let (r, d, s, io, f, c) = (
            m(ROUTER),
            m(DIRECT),
            m(SEED),
            m(SOCKETIO),
            m(FLOOR),
            m(ONE_HOP),
        );
        let router = verdict(r[1], s[1], f[1]);
        let direct = verdict(d[1], s[1], f[1]);
        met_router &= router.bar;
        met_direct &= direct.bar;
        goal_router &= router.goal;
        goal_direct &= direct.goal;
        println!(
            "P2 medians at {}: ringfeed via router p50 {:.2} / p99 {:.2} / p999 {:.2} ms, direct to the owner {:.2} / {:.2} / {:.2} ms; seed reference {:.2} / {:.2} / {:.2} ms; Socket.IO p99 {:.2} ms; same-hop floor ({} relays + fan-out) {:.2} / {:.2} / {:.2} ms; one bare hop p99 {:.2} ms → bar (p99 ≤ seed's): router {}, direct {}; goal (≤ ½ seed, ≤ 1.5× floor): router {}, direct {}",
            rate.text(),
            r[0], r[1], r[2], d[0], d[1], d[2], s[0], s[1], s[2], io[1],
            args.p2_relays, f[0], f[1], f[2], c[1],
            yes(router.bar), yes(direct.bar), yes(router.goal), yes(direct.goal),
        );
        let med = |i: usize, v: fn(&Series) -> &Vec<f64>| median(v(&series[ri][i]));
        println!(
            "P2 where it goes at {}: ack p99 (publish → ack, after replication) via router {:.2} ms, direct {:.2} ms (at the owners: Deliver p99 ≤ {} / {} ms, replication ≤ {} / {} ms); seed reference's Redis reply p99 {:.2} ms; box busy: router {:.0}%, direct {:.0}%, seed reference {:.0}%, Socket.IO {:.0}%, floor {:.0}%, one hop {:.0}%",
            rate.text(),
            med(ROUTER, |s| &s.ack99),
            med(DIRECT, |s| &s.ack99),
            med(ROUTER, |s| &s.deliver99),
            med(DIRECT, |s| &s.deliver99),
            med(ROUTER, |s| &s.replication99),
            med(DIRECT, |s| &s.replication99),
            med(SEED, |s| &s.ack99),
            med(ROUTER, |s| &s.busy),
            med(DIRECT, |s| &s.busy),
            med(SEED, |s| &s.busy),
            med(SOCKETIO, |s| &s.busy),
            med(FLOOR, |s| &s.busy),
            med(ONE_HOP, |s| &s.busy),
        );
        let at = rate.text();
        text_ringfeed.push(format!(
            "{at}: p50 {:.2} / p99 {:.2} / p999 {:.2} ms via the router, p99 {:.2} ms direct",
            r[0], r[1], r[2], d[1]
        ));
        text_peers.push(format!(
            "{at}: seed reference p99 {:.2} ms, Socket.IO p99 {:.2} ms",
            s[1], io[1]
        ));
        text_calibration.push(format!(
            "{at}: same-hop floor p99 {:.2} ms (p50 {:.2}, p999 {:.2}), one bare hop p99 {:.2} ms",
            f[1], f[0], f[2], c[1]
        ));
        let mut per_system = Map::new();
        for (i, system) in systems.iter().enumerate() {
            per_system.insert(
                system.name(),
                series[ri][i].json(i == ROUTER || i == DIRECT),
            );
        }
        rates_json.insert(
            rate.label.to_owned(),
            json!({
                "publishes_per_s": rate.per_s,
                "systems": per_system,
                "router": {"bar": router.bar, "goal": router.goal, "ratio_vs_seed_reference_p99": r[1] / s[1], "ratio_vs_floor_p99": r[1] / f[1]},
                "direct": {"bar": direct.bar, "goal": direct.goal, "ratio_vs_seed_reference_p99": d[1] / s[1], "ratio_vs_floor_p99": d[1] / f[1]},
            }),
        );
    }
    let met_by = match (met_router, met_direct) {
        (true, true) => Some("router and direct"),
        (true, false) => Some("router"),
        (false, true) => Some("direct"),
        (false, false) => None,
    };
    // The bar is for 1,000/s and half the maximum: a given rate judges nothing.
    let met = (args.p2_rate.is_none()).then_some(met_router || met_direct);
    println!(
        "P2: bar {} (via router {}, direct {}); goal via router {}, direct {}",
        match met {
            Some(m) => yes(m),
            None => "not judged (a rate was given)",
        },
        yes(met_router),
        yes(met_direct),
        yes(goal_router),
        yes(goal_direct),
    );
    // Median p50/p99/p999 of system `i` at each rate.
    let by_rate = |i: usize| -> Value {
        let mut v = Map::new();
        for (ri, rate) in rates.iter().enumerate() {
            let [p50, p99, p999] = series[ri][i].medians();
            v.insert(
                rate.label.to_owned(),
                json!({"publishes_per_s": rate.per_s, "median_p50_ms": p50, "median_p99_ms": p99, "median_p999_ms": p999}),
            );
        }
        Value::Object(v)
    };
    let rate_list: Vec<u64> = rates.iter().map(|r| r.per_s).collect();
    let result = json!({
        "id": "P2",
        "what": "latency, unbatched Publish at 1,000/s and at half of ringfeed's max rate, 1,000 keys × 10 subscribers, 3 nodes",
        "setup": {"keys": sizes.keys, "subscribers_per_key": sizes.per_key, "nodes": 3, "payload_bytes": 64, "publish_concurrency": 64, "ringfeed_max_publishes_per_s": max_publish, "rates_publishes_per_s": rate_list, "rate_given": args.p2_rate.is_some(), "warmup_secs": 1, "window_secs": args.window_secs, "runs": runs, "ack": "replicated", "seed_endpoints": 2, "socketio_endpoints": 2, "relays": args.p2_relays},
        "ringfeed": {
            "via_router": by_rate(ROUTER),
            "direct": by_rate(DIRECT),
            "met_router": met_router,
            "met_direct": met_direct,
            "goal_router": goal_router,
            "goal_direct": goal_direct,
        },
        "peers": {"seed-reference": by_rate(SEED), "socketio": by_rate(SOCKETIO)},
        "calibration": {
            "same_hop_floor": {
                "what": format!("publisher → {} bare relay processes → a bare tokio-tungstenite fan-out → the same subscribers, at the same rate: as many process hops as ringfeed's path through the router (caller → router → owner → successor → owner → subscriber), nothing but a read and a write at each", args.p2_relays),
                "relays": args.p2_relays,
                "process_hops": args.p2_relays + 2,
                "medians": by_rate(FLOOR),
            },
            "one_hop": {
                "what": "the bare tokio-tungstenite fan-out alone (one process, one write per message) paced to the same rate, to the same sockets",
                "name": systems[ONE_HOP].name(),
                "medians": by_rate(ONE_HOP),
            },
        },
        "rates": rates_json,
        "bar": "at 1,000/s and at half the max: p99 ≤ the seed reference's p99 (medians of ≥ 5 alternating runs); goal ≤ ½ of it and ≤ 1.5× the same-hop floor",
        "met": met,
        "met_router": met_router,
        "met_direct": met_direct,
        "met_by": met_by,
        "goal_met": goal_router || goal_direct,
        "goal_router": goal_router,
        "goal_direct": goal_direct,
        "summary_ringfeed": text_ringfeed.join("; "),
        "summary_peers": text_peers.join("; "),
        "summary_calibration": text_calibration.join("; "),
        "machine": report::machine(),
    });
    report::write_json(&args.out, "P2", &result)?;
    let latency: Vec<(String, Vec<(f64, f64)>)> = systems
        .iter()
        .zip(&last)
        .filter_map(|(s, r)| Some((s.name(), report::cdf(&r.as_ref()?.hist))))
        .collect();
    let throughput: Vec<(String, Vec<(f64, f64)>)> = systems
        .iter()
        .zip(&last)
        .filter_map(|(s, r)| Some((s.name(), r.as_ref()?.series.clone())))
        .collect();
    let shown = rates.last().expect("a rate").text();
    report::plot(
        &args.out.join("P2.svg"),
        &format!("P2: unbatched latency at {shown}, last run"),
        &throughput,
        &latency,
    )?;
    drop((seed, socketio));
    drop(cluster);
    Ok(())
}

/// The nodes' latency histograms (`ringfeed_deliver_seconds`,
/// `ringfeed_replication_seconds`) summed over `cluster`: per histogram, the cumulative
/// count at each bucket bound (seconds, `+Inf` as infinity), in the nodes' order: low
/// to high.
async fn hop_histograms(cluster: &Cluster) -> Result<[Vec<(f64, u64)>; 2]> {
    let names = ["ringfeed_deliver_seconds", "ringfeed_replication_seconds"];
    let mut sums: [Vec<(f64, u64)>; 2] = Default::default();
    for node in &cluster.nodes {
        let (status, text) =
            ringfeed_cluster_tests::http_get(&format!("{}/metrics", node.http)).await?;
        ensure!(status == 200, "{} /metrics answered {status}", node.id);
        for line in text.lines() {
            for (i, name) in names.iter().enumerate() {
                let Some(rest) = line
                    .strip_prefix(name)
                    .and_then(|r| r.strip_prefix("_bucket{le=\""))
                else {
                    continue;
                };
                let Some((le, count)) = rest.split_once("\"} ") else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse()?
                };
                let count: u64 = count.trim().parse()?;
                match sums[i].iter_mut().find(|b| b.0 == le) {
                    Some(bucket) => bucket.1 += count,
                    None => sums[i].push((le, count)),
                }
            }
        }
    }
    Ok(sums)
}

/// The bucket bound (ms) under which quantile `q` of what was counted between two
/// readings of a cumulative histogram falls: an upper bound, as fine as the buckets.
fn bucket_quantile_ms(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
            (le, n.saturating_sub(was))
        })
        .collect();
    let total = delta.last().map_or(0, |d| d.1);
    if total == 0 {
        return f64::NAN;
    }
    let want = (q * total as f64).ceil() as u64;
    delta
        .iter()
        .find(|d| d.1 >= want)
        .map_or(f64::INFINITY, |d| d.0 * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_quantile_counts_only_what_came_between_the_readings() {
        let before = [(0.001, 10), (0.005, 10), (f64::INFINITY, 10)];
        // 100 new: 90 under 1 ms, 9 more under 5 ms, 1 past the last bound.
        let after = [(0.001, 100), (0.005, 109), (f64::INFINITY, 110)];
        assert_eq!(bucket_quantile_ms(&before, &after, 0.5), 1.0);
        assert_eq!(bucket_quantile_ms(&before, &after, 0.9), 1.0);
        assert_eq!(bucket_quantile_ms(&before, &after, 0.99), 5.0);
        assert_eq!(bucket_quantile_ms(&before, &after, 1.0), f64::INFINITY);
        assert!(
            bucket_quantile_ms(&after, &after, 0.99).is_nan(),
            "nothing new"
        );
    }

    #[test]
    fn the_bar_is_the_seed_p99_and_the_goal_half_of_it_within_the_floor() {
        assert_eq!(
            verdict(2.0, 2.0, 1.0),
            Verdict {
                bar: true,
                goal: false
            }
        );
        assert_eq!(
            verdict(1.0, 2.0, 1.0),
            Verdict {
                bar: true,
                goal: true
            }
        );
        // Half the seed's, but more than 1.5× the floor's.
        assert_eq!(
            verdict(1.0, 2.0, 0.6),
            Verdict {
                bar: true,
                goal: false
            }
        );
        assert_eq!(
            verdict(2.1, 2.0, 9.0),
            Verdict {
                bar: false,
                goal: false
            }
        );
        assert_eq!(
            verdict(f64::NAN, 2.0, 9.0),
            Verdict {
                bar: false,
                goal: false
            }
        );
    }
}
