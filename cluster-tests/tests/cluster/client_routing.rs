//! A client that routes itself: the owner it computes from the ring a node publishes
//! agrees with the cluster for many keys, before and after a node joins; what the ring
//! said a join would move is what moves; the CLI's `route`, `ring`, `simulate` and
//! `drain`.

use anyhow::{ensure, Context, Result};
use ringfeed_client::routing::RingView;
use ringfeed_cluster_tests::{bin_dir, Cluster};
use ringfeed_proto::v1::LookupRequest;
use serde_json::Value;

use super::bounded;

const KEYS: usize = 1000;

/// How many of `keys` the client's owner and the router's `Lookup` agree on.
async fn agreeing(cluster: &Cluster, view: &RingView, keys: &[String]) -> Result<usize> {
    let mut router = cluster.router().await?;
    let mut agree = 0;
    for key in keys {
        let theirs = router
            .lookup(LookupRequest { key: key.clone() })
            .await?
            .into_inner()
            .owner
            .context("an owner")?
            .id;
        let ours = view.owner(key).context("an owner here")?.id.0.clone();
        agree += usize::from(ours == theirs);
    }
    Ok(agree)
}

async fn cli(args: &[&str]) -> Result<Value> {
    let out = tokio::process::Command::new(bin_dir().join("ringfeed"))
        .args(args)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "ringfeed {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test]
async fn a_client_computes_every_owner_as_the_cluster_does_before_and_after_a_join_and_the_cli_simulates_moves(
) {
    bounded(async {
        let mut cluster = Cluster::builder().nodes(3).start().await?;
        let node = cluster.nodes[0].http.clone();
        let keys: Vec<String> = (0..KEYS).map(|i| format!("user:{i}")).collect();
        let before = RingView::fetch(&node, None).await?;
        let agree = agreeing(&cluster, &before, &keys).await?;
        ensure!(
            agree == KEYS,
            "{agree} of {KEYS} owners agree before the join"
        );

        // What the ring says a join of n4 moves, against what moves.
        let points = ringfeed_router::ring::DEFAULT_POINTS;
        let predicted: f64 = before
            .ring
            .moves_to(&before.with("n4", points))
            .iter()
            .filter(|(from, to, _)| from != to)
            .map(|m| m.2)
            .sum();
        let said = cli(&["simulate", "--node", &node, "--add", "n4", "--json"]).await?;
        let simulated = said["moved_share"].as_f64().context("moved_share")?;
        ensure!(
            (simulated - predicted).abs() < 1e-9,
            "{simulated} vs {predicted}"
        );

        cluster.add_node("n4").await?;
        cluster.converged().await;
        let after = RingView::fetch(&node, None).await?;
        ensure!(after.version > before.version, "the ring did not move");
        let agree = agreeing(&cluster, &after, &keys).await?;
        ensure!(
            agree == KEYS,
            "{agree} of {KEYS} owners agree after the join"
        );
        let moved = keys
            .iter()
            .filter(|k| before.owner(k).map(|m| &m.id) != after.owner(k).map(|m| &m.id))
            .count() as f64
            / KEYS as f64;
        ensure!(
            (moved - predicted).abs() < 0.05,
            "{moved} of the keys moved; the ring said {predicted}"
        );
        ensure!(
            keys.iter().all(|k| {
                let (b, a) = (before.owner(k), after.owner(k));
                b.map(|m| &m.id) == a.map(|m| &m.id) || a.is_some_and(|m| m.id.0 == "n4")
            }),
            "a key moved somewhere other than the joining node"
        );

        // The CLI: the ring's shares add up; removing a member moves exactly its share;
        // `route` agrees with the cluster.
        let ring = cli(&["ring", "--node", &node, "--json"]).await?;
        let members = ring["members"].as_array().context("members")?;
        ensure!(members.len() == 4, "{ring}");
        let total: f64 = members.iter().filter_map(|m| m["share"].as_f64()).sum();
        ensure!((total - 1.0).abs() < 1e-6, "shares add up to {total}");
        let n2 = members
            .iter()
            .find(|m| m["id"] == "n2")
            .and_then(|m| m["share"].as_f64())
            .context("n2's share")?;
        let gone = cli(&["simulate", "--node", &node, "--remove", "n2", "--json"]).await?;
        let moved = gone["moved_share"].as_f64().context("moved_share")?;
        ensure!(
            (moved - n2).abs() < 1e-9,
            "removing n2 moves {moved}, its share is {n2}"
        );
        let route = cli(&["route", "--node", &node, "user:7", "--json"]).await?;
        ensure!(route["owner"] == route["node_says"], "{route}");
        ensure!(
            route["owner"].as_str() == after.owner("user:7").map(|m| m.id.0.as_str()),
            "{route}"
        );

        // `simulate --remove n2` against what moves when n2 really drains: 300 keys
        // made (a publish each), n2's share of them counted by the simulation from
        // each node's live key count, then the others' counts after the drain.
        let mut router = cluster.router().await?;
        for i in 0..300 {
            let key = format!("count:{i}");
            router
                .publish(ringfeed_client::publisher::json(
                    &key,
                    &serde_json::json!(i),
                ))
                .await?;
        }
        let live = |cluster: &Cluster, skip: &'static str| {
            let nodes: Vec<(String, String)> = cluster
                .nodes
                .iter()
                .filter(|n| n.is_running() && n.id != skip)
                .map(|n| (n.id.clone(), n.http.clone()))
                .collect();
            async move {
                let mut counts = std::collections::BTreeMap::new();
                for (id, http) in nodes {
                    counts.insert(id, super::metric(&http, "ringfeed_keys").await?);
                }
                anyhow::Ok(counts)
            }
        };
        let before = live(&cluster, "").await?;
        let total: u64 = before.values().sum();
        ensure!(total >= 300, "{before:?}");
        let gone = cli(&["simulate", "--node", &node, "--remove", "n2", "--json"]).await?;
        let predicted: u64 = gone["moves"]
            .as_array()
            .context("moves")?
            .iter()
            .filter_map(|m| m["keys"].as_u64())
            .sum();
        ensure!(
            predicted == before["n2"],
            "simulate says {predicted} keys move; n2 holds {}",
            before["n2"]
        );

        // `drain` takes n2 off the ring and waits until it has gone.
        let drained = cli(&["drain", "--node", &node, "n2", "--json"]).await?;
        ensure!(drained["gone"] == true, "{drained}");
        let left = RingView::fetch(&node, None).await?;
        ensure!(
            left.ring.members().iter().all(|m| m.id.0 != "n2"),
            "n2 is still on the ring"
        );
        let after = ringfeed_cluster_tests::eventually(
            "the drained keys counted on their new owners",
            std::time::Duration::from_secs(20),
            || {
                let counts = live(&cluster, "n2");
                async move {
                    let counts = counts.await?;
                    let others: u64 = counts.values().sum();
                    Ok((others == total).then_some(counts))
                }
            },
        )
        .await;
        // What each node received, against the simulation's split (estimated from
        // shares: within a few keys).
        for m in gone["moves"].as_array().context("moves")? {
            let to = m["to"].as_str().context("to")?;
            let estimate = m["keys"].as_u64().context("keys")? as i64;
            let got = after[to] as i64 - before[to] as i64;
            ensure!(
                (got - estimate).abs() <= 12.max(estimate / 4),
                "{to} received {got} keys; the simulation estimated {estimate}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_cli_follows_a_key_over_quic_and_publishes_straight_to_the_owner() {
    bounded(async {
        let cluster = Cluster::builder().nodes(2).start().await?;
        let node = cluster.nodes[0].http.clone();
        let key = "cli:quic";
        let bin = bin_dir().join("ringfeed");
        // `pub --direct`: DATA, a file, and standard input.
        let first = cli(&[
            "pub",
            "--direct",
            "--node",
            &node,
            key,
            r#"{"n":1}"#,
            "--json",
        ])
        .await?;
        ensure!(first["seq"] == 1, "{first}");
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), r#"{"n":2}"#)?;
        let path = file.path().to_string_lossy().into_owned();
        let second = cli(&[
            "pub", "--direct", "--node", &node, key, "--file", &path, "--json",
        ])
        .await?;
        ensure!(second["seq"] == 2, "{second}");
        let mut stdin_pub = tokio::process::Command::new(&bin)
            .args(["pub", "--direct", "--node", &node, key, "-", "--json"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = stdin_pub.stdin.take().context("stdin")?;
            stdin.write_all(br#"{"n":3}"#).await?;
        }
        let out = stdin_pub.wait_with_output().await?;
        ensure!(out.status.success(), "pub - failed");
        // A failed compare-and-set is an error, with a clear message.
        let refused = tokio::process::Command::new(&bin)
            .args([
                "pub",
                "--direct",
                "--node",
                &node,
                key,
                "4",
                "--expect-seq",
                "99",
            ])
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        ensure!(
            !refused.status.success() && stderr.contains("seq"),
            "CAS: {stderr}"
        );
        // Through the router too.
        let router = cluster.router_grpc();
        let via = cli(&["pub", "--router", &router, key, r#"{"n":4}"#, "--json"]).await?;
        ensure!(via["seq"] == 4, "{via}");

        // `sub --quic --since 0` replays the four and stops after them.
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tokio::process::Command::new(&bin)
                .args([
                    "sub", "--node", &node, key, "--quic", "--since", "0", "--count", "4",
                ])
                .output(),
        )
        .await??;
        ensure!(
            out.status.success(),
            "sub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|f| f["data"]["n"].as_u64())
            .collect();
        ensure!(ns == [1, 2, 3, 4], "sub printed {ns:?}");
        Ok(())
    })
    .await
}
