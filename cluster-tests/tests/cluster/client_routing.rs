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

        // `drain` takes n2 off the ring and waits until it has gone.
        let drained = cli(&["drain", "--node", &node, "n2", "--json"]).await?;
        ensure!(drained["gone"] == true, "{drained}");
        let left = RingView::fetch(&node, None).await?;
        ensure!(
            left.ring.members().iter().all(|m| m.id.0 != "n2"),
            "n2 is still on the ring"
        );
        Ok(())
    })
    .await
}
