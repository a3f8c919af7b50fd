//! Publishing straight to the owner ([`ringfeed_client::direct::Publisher`]): every
//! node serves the public `Router`; a publisher holding the ring sends each update to
//! its owner. Across a node joining and the owner of some keys being killed, no
//! acknowledged update is lost and none is applied twice (retries carry the same
//! idempotency key), as followers' ledgers show.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ringfeed_client::direct::Publisher;
use ringfeed_client::follow::{FollowConfig, FollowEvent, Follower};
use ringfeed_client::publisher;
use ringfeed_client::routing::RingView;
use ringfeed_client::Frame;
use ringfeed_cluster_tests::{eventually, Cluster};
use serde_json::json;

use super::bounded;

const KEYS: usize = 8;

/// What a follower received: `(seq, n)` of each update.
type Ledger = Arc<Mutex<Vec<(u64, u64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_publishing_loses_nothing_and_applies_nothing_twice_across_a_join_and_a_kill() {
    bounded(async {
        let mut cluster = Cluster::builder()
            .nodes(3)
            .lease_ttl(2)
            .node_args(&["--heartbeat-ms", "1000"])
            .start()
            .await?;
        let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
        let keys: Vec<String> = (0..KEYS).map(|i| format!("direct:{i}")).collect();

        // Every node answers the public Router: a lookup on n1's gRPC port.
        let mut on_node = publisher::connect(&cluster.nodes[0].grpc).await?;
        let looked = on_node
            .lookup(ringfeed_proto::v1::LookupRequest {
                key: keys[0].clone(),
            })
            .await?
            .into_inner();
        ensure!(looked.owner.is_some(), "a node's Router answers Lookup");

        // A follower per key, from the start of its log.
        let ledgers: Vec<Ledger> = (0..KEYS).map(|_| Arc::default()).collect();
        let mut followers = Vec::new();
        for (key, ledger) in keys.iter().zip(&ledgers) {
            let mut config = FollowConfig::new(nodes.clone(), key);
            config.since = Some(0);
            let (mut follower, ledger) = (Follower::new(config), ledger.clone());
            followers.push(tokio::spawn(async move {
                loop {
                    if let Ok(FollowEvent::Update(Frame::Update {
                        seq, data: Some(d), ..
                    })) = follower.next().await
                    {
                        let n = d["n"].as_u64().unwrap_or(0);
                        ledger.lock().expect("ledger").push((seq, n));
                    }
                }
            }));
        }

        let mut publisher = Publisher::connect(nodes.clone(), None).await?;
        publisher.deadline = Duration::from_secs(15);
        let mut acked: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        let mut n = 0u64;
        let mut publish_round = |rounds: usize| {
            let keys = keys.clone();
            let mut batch = Vec::new();
            for _ in 0..rounds {
                for (k, key) in keys.iter().enumerate() {
                    n += 1;
                    batch.push((k, publisher::json(key, &json!({"n": n}))));
                }
            }
            batch
        };
        async fn send(
            publisher: &mut Publisher,
            batch: Vec<(usize, ringfeed_proto::v1::PublishRequest)>,
            acked: &mut BTreeMap<usize, BTreeSet<u64>>,
        ) -> Result<()> {
            for (k, item) in batch {
                let n: u64 = serde_json::from_slice::<serde_json::Value>(&item.data)?["n"]
                    .as_u64()
                    .context("n")?;
                if publisher.publish(item).await.is_ok() {
                    acked.entry(k).or_default().insert(n);
                }
            }
            Ok(())
        }
        let batch = publish_round(5);
        send(&mut publisher, batch, &mut acked).await?;

        // A node joins; the publisher's ring is stale until a retry refreshes it, and
        // a node that no longer owns a key forwards it.
        cluster.add_node("n4").await?;
        let batch = publish_round(10);
        send(&mut publisher, batch, &mut acked).await?;
        cluster.converged().await;

        // The owner of the first key is killed; its keys fail over.
        let ring = RingView::fetch(&nodes[0], None).await?;
        let victim = ring.owner(&keys[0]).context("an owner")?.id.0.clone();
        cluster.node_mut(&victim).kill().await;
        let batch = publish_round(10);
        send(&mut publisher, batch, &mut acked).await?;
        let retries = publisher.retries;
        ensure!(
            retries > 0,
            "the kill cost no retry: was anything sent to {victim}?"
        );

        // Every follower ends with every acknowledged update, once, gap-free.
        eventually(
            "followers hold every acknowledged update",
            Duration::from_secs(30),
            || {
                let done = (0..KEYS).all(|k| {
                    let have: BTreeSet<u64> = ledgers[k]
                        .lock()
                        .expect("ledger")
                        .iter()
                        .map(|e| e.1)
                        .collect();
                    acked.get(&k).is_none_or(|owed| owed.is_subset(&have))
                });
                async move { anyhow::Ok(done.then_some(())) }
            },
        )
        .await;
        for (k, ledger) in ledgers.iter().enumerate() {
            let got = ledger.lock().expect("ledger").clone();
            let gap = got.windows(2).find(|w| w[1].0 != w[0].0 + 1);
            ensure!(gap.is_none(), "key {k}: a gap at {gap:?}");
            let unique: BTreeSet<u64> = got.iter().map(|e| e.1).collect();
            ensure!(
                unique.len() == got.len(),
                "key {k}: an update applied twice"
            );
        }
        for follower in followers {
            follower.abort();
        }
        Ok(())
    })
    .await
}
