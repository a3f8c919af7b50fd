//! Routing: every node sends a client to the owner; publishes reach it; the ring
//! follows joins and crashes; bad input is refused without disturbing anyone.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use ringfeed_client::{publisher, Event, Frame, Subscription};
use ringfeed_cluster_tests::{eventually, http_get, Cluster};
use ringfeed_proto::v1::{
    publish_result, GetRingRequest, LookupRequest, PublishBatchRequest, PublishRequest,
};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

use crate::{bounded, metric, next_update, owner_of, welcome_node, FRAME_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sends_a_client_to_the_same_owner() {
    bounded(async {
        let cluster = Cluster::builder().nodes(3).start().await?;
        // Every node's gauges say it is ready, on a ring of 3, with a successor.
        for node in &cluster.nodes {
            let (status, text) = http_get(&format!("{}/metrics", node.http)).await?;
            assert_eq!(status, 200);
            for line in [
                "ringfeed_ready 1",
                "ringfeed_ring_members 3",
                "ringfeed_replicated 1",
                "ringfeed_etcd_lease_ok 1",
            ] {
                assert!(
                    text.lines().any(|l| l == line),
                    "{} /metrics lacks {line:?}:\n{text}",
                    node.id
                );
            }
        }
        for key in ["user:42", "doc:roadmap", "room/7@eu"] {
            let owner = owner_of(&cluster, key).await?;
            for node in &cluster.nodes {
                let route = cluster.route(node, key).await?;
                assert_eq!(
                    route["owner"]["id"], owner,
                    "/v1/route on {} for {key}",
                    node.id
                );
                assert_eq!(route["key"], key);

                // Raw WebSocket: the owner welcomes, others redirect and close 4300.
                let (mut ws, _) = tokio_tungstenite::connect_async(node.connect_url(key)).await?;
                let first = ringfeed_client::read_event(&mut ws).await?;
                if node.id == owner {
                    match first {
                        Event::Frame(Frame::Welcome {
                            node: n,
                            seq: 0,
                            key: k,
                            ..
                        }) => {
                            assert_eq!((n.as_str(), k.as_str()), (owner.as_str(), key));
                        }
                        other => panic!("owner {} sent {other:?}", node.id),
                    }
                } else {
                    let Event::Frame(Frame::Redirect {
                        url,
                        node: to,
                        ring_version,
                        ..
                    }) = first
                    else {
                        panic!("non-owner {} sent {first:?}", node.id);
                    };
                    assert_eq!(to, owner);
                    assert!(url.contains(&format!("rv={ring_version}")), "{url}");
                    assert_eq!(
                        ringfeed_client::read_event(&mut ws).await?,
                        Event::Closed {
                            code: 4300,
                            reason: format!("moved to {owner}")
                        }
                    );
                }
                // Following redirects always ends on the owner.
                let sub = Subscription::connect(&node.connect_url(key)).await?;
                assert_eq!(welcome_node(&sub), owner);
                assert_eq!(sub.redirects, usize::from(node.id != owner));
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_reach_subscribers_in_seq_order_and_batches_exactly_once() {
    bounded(async {
        let cluster = Cluster::builder().nodes(3).start().await?;
        let mut router = cluster.router().await?;

        // One key, unbatched: seq 1, 2, 3… with the right data.
        let key = "feed:1";
        let owner = owner_of(&cluster, key).await?;
        let mut sub = Subscription::connect(&cluster.nodes[0].connect_url(key)).await?;
        for i in 1..=5u64 {
            let reply = router
                .publish(publisher::json(key, &json!({"i": i})))
                .await?
                .into_inner();
            assert_eq!(
                (reply.seq, reply.node.as_str(), reply.delivered),
                (i, owner.as_str(), 1)
            );
            assert_eq!(next_update(&mut sub).await?, (i, json!({"i": i})));
        }
        // The owner timed each of those Deliver requests, and each was acked only once
        // its replication batch was answered: both histograms counted them.
        let owner_http = &cluster
            .nodes
            .iter()
            .find(|n| n.id == owner)
            .expect("owner")
            .http;
        for histogram in ["ringfeed_deliver_seconds", "ringfeed_replication_seconds"] {
            let count = metric(owner_http, &format!("{histogram}_count")).await?;
            assert!(
                count >= 5,
                "{histogram}_count {count} after 5 acked publishes"
            );
            let within_inf =
                metric(owner_http, &format!("{histogram}_bucket{{le=\"+Inf\"}}")).await?;
            assert!(
                within_inf >= count,
                "{histogram}: +Inf bucket {within_inf} < count {count}"
            );
        }

        // 1,000 keys in one PublishBatch: every subscriber gets its update once.
        let keys: Vec<String> = (0..1000).map(|i| format!("batch:{i}")).collect();
        let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
        let mut subs: Vec<Subscription> = futures_util::stream::iter(keys.iter().enumerate())
            .map(|(i, key)| {
                let url = ringfeed_client::connect_url(&nodes[i % nodes.len()], key, None);
                async move { Subscription::connect(&url).await }
            })
            .buffered(64)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;

        let batch = |round: u64| PublishBatchRequest {
            items: keys
                .iter()
                .enumerate()
                .map(|(i, key)| publisher::json(key, &json!({"i": i, "round": round})))
                .collect(),
        };
        for round in 1..=2u64 {
            let reply = router.publish_batch(batch(round)).await?.into_inner();
            assert_eq!(reply.results.len(), keys.len());
            let mut per_node: HashMap<String, usize> = HashMap::new();
            for r in &reply.results {
                match &r.result {
                    Some(publish_result::Result::Ok(ok)) => {
                        assert_eq!((ok.seq, ok.delivered), (round, 1));
                        *per_node.entry(ok.node.clone()).or_default() += 1;
                    }
                    other => panic!("batch item failed: {other:?}"),
                }
            }
            assert_eq!(
                per_node.len(),
                3,
                "keys spread over every node: {per_node:?}"
            );
            // In order per key: round 1's update is followed by round 2's, nothing between.
            let checks = subs.iter_mut().enumerate().map(|(i, sub)| async move {
                let got = next_update(sub).await?;
                anyhow::ensure!(
                    got == (round, json!({"i": i, "round": round})),
                    "key {i}: got {got:?}"
                );
                Ok::<_, anyhow::Error>(())
            });
            futures_util::future::try_join_all(checks).await?;
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_seen_everywhere_within_a_second_and_takes_its_keys() {
    bounded(async {
        let mut cluster = Cluster::builder().nodes(3).start().await?;
        let before = cluster.ring(&cluster.nodes[0]).await?["ring_id"].clone();

        let joined_at = {
            let n4 = cluster.add_node("n4").await?;
            n4.started
        };
        let registered = Instant::now();
        let router_addr = cluster.router_grpc();
        let urls: Vec<String> = cluster.nodes.iter().map(|n| format!("{}/v1/ring", n.http)).collect();
        let ring_id = eventually("every node and the router to report the new ring", Duration::from_secs(5), || {
            let urls = urls.clone();
            let router_addr = router_addr.clone();
            let before = before.clone();
            async move {
                let mut router = ringfeed_cluster_tests::connect_router(&router_addr).await?;
                let ring = router.get_ring(GetRingRequest {}).await?.into_inner();
                if ring.members.len() != 4 || before == ring.ring_id.as_str() {
                    return Ok(None);
                }
                for url in &urls {
                    let view = ringfeed_cluster_tests::http_json(url).await?;
                    if view["ring_id"] != ring.ring_id.as_str() {
                        return Ok(None);
                    }
                }
                Ok(Some(ring.ring_id))
            }
        })
        .await;
        let seen_in = registered.elapsed();
        eprintln!("new ring {ring_id} seen everywhere {seen_in:?} after n4 registered ({:?} after its start)", joined_at.elapsed());
        assert!(seen_in <= Duration::from_secs(1), "ring change took {seen_in:?} to be seen everywhere");

        // Keys n4 now owns are served there.
        let mut router = cluster.router().await?;
        let mut moved = Vec::new();
        for i in 0.. {
            let key = format!("join:{i}");
            if owner_of(&cluster, &key).await? == "n4" {
                moved.push(key);
                if moved.len() == 5 {
                    break;
                }
            }
        }
        for key in &moved {
            let mut sub = Subscription::connect(&cluster.nodes[0].connect_url(key)).await?;
            assert_eq!(welcome_node(&sub), "n4");
            let reply = router.publish(publisher::json(key, &json!("hello"))).await?.into_inner();
            assert_eq!((reply.node.as_str(), reply.delivered), ("n4", 1));
            assert_eq!(next_update(&mut sub).await?.1, json!("hello"));
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_ring_within_its_ttl_and_its_keys_move() {
    bounded(async {
        let mut cluster = Cluster::builder().nodes(3).lease_ttl(2).start().await?;
        let mut key = String::new();
        for i in 0.. {
            key = format!("kill:{i}");
            if owner_of(&cluster, &key).await? == "n3" {
                break;
            }
        }
        let mut sub = Subscription::connect(&cluster.node("n3").connect_url(&key)).await?;
        assert_eq!(welcome_node(&sub), "n3");

        let killed = Instant::now();
        cluster.node_mut("n3").kill().await;
        // A publish sent while the owner is dead waits for the ring to move, then lands.
        let router_addr = cluster.router_grpc();
        let during = {
            let key = key.clone();
            tokio::spawn(async move {
                let mut router = ringfeed_cluster_tests::connect_router(&router_addr).await?;
                let mut request = tonic::Request::new(publisher::json(&key, &json!("during")));
                request.set_timeout(Duration::from_secs(10));
                Ok::<_, anyhow::Error>(router.publish(request).await?.into_inner())
            })
        };
        assert!(matches!(
            sub.next_within(FRAME_TIMEOUT).await?,
            Event::Closed { .. }
        ));

        let urls: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|n| n.id != "n3")
            .map(|n| format!("{}/v1/ring", n.http))
            .collect();
        let router_addr = cluster.router_grpc();
        eventually("n3 to leave every view", Duration::from_secs(10), || {
            let urls = urls.clone();
            let router_addr = router_addr.clone();
            async move {
                let mut router = ringfeed_cluster_tests::connect_router(&router_addr).await?;
                let ring = router.get_ring(GetRingRequest {}).await?.into_inner();
                if ring.members.iter().any(|m| m.id == "n3") {
                    return Ok(None);
                }
                for url in &urls {
                    let view = ringfeed_cluster_tests::http_json(url).await?;
                    if view["members"]
                        .as_array()
                        .is_none_or(|m| m.iter().any(|m| m["id"] == "n3"))
                    {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
        })
        .await;
        let gone_in = killed.elapsed();
        eprintln!(
            "n3 left every view {gone_in:?} after SIGKILL (lease TTL {} s)",
            cluster.lease_ttl
        );
        assert!(
            gone_in <= Duration::from_secs(cluster.lease_ttl + 1),
            "took {gone_in:?}"
        );

        let new_owner = owner_of(&cluster, &key).await?;
        assert_ne!(new_owner, "n3");
        let during = during.await??;
        assert_eq!(
            during.node, new_owner,
            "the publish sent during the outage landed on the new owner"
        );

        let mut sub = Subscription::connect(&cluster.node("n1").connect_url(&key)).await?;
        assert_eq!(welcome_node(&sub), new_owner);
        let mut router = cluster.router().await?;
        let reply = router
            .publish(publisher::json(&key, &json!("after")))
            .await?
            .into_inner();
        assert_eq!(
            (reply.node.as_str(), reply.delivered),
            (new_owner.as_str(), 1)
        );
        assert_eq!(next_update(&mut sub).await?.1, json!("after"));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_code_and_disturbs_nobody() {
    bounded(async {
        let cluster = Cluster::builder().nodes(2).start().await?;
        let n1 = &cluster.nodes[0];

        // WebSocket: invalid or missing key → close 4400.
        for query in ["key=bad%20key", "key=", "key=%C3%BC", "since=1"] {
            let url = format!("{}/v1/connect?{query}", n1.http.replace("http://", "ws://"));
            match Subscription::connect(&url).await {
                Err(ringfeed_client::ClientError::Closed { code: 4400, .. }) => {}
                Err(e) => panic!("{query}: {e}"),
                Ok(_) => panic!("{query}: accepted"),
            }
        }
        let long = "k".repeat(257);
        match Subscription::connect(&n1.connect_url(&long)).await {
            Err(ringfeed_client::ClientError::Closed { code: 4400, reason }) => {
                assert!(reason.contains("257"), "{reason}")
            }
            other => panic!("long key: {:?}", other.map(|_| ())),
        }

        // HTTP: 400 with a JSON error naming the problem.
        for query in ["key=bad%20key", "", "key=a&rv=x"] {
            let (status, body) = http_get(&format!("{}/v1/route?{query}", n1.http)).await?;
            assert_eq!(status, 400, "{query}: {body}");
            let body: serde_json::Value = serde_json::from_str(&body)?;
            assert!(
                body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{body}"
            );
        }
        let (status, _) = http_get(&format!("{}/v1/connect?key=a", n1.http)).await?;
        assert_eq!(status, 426, "a plain GET on /v1/connect");

        // gRPC: INVALID_ARGUMENT naming the problem.
        let mut router = cluster.router().await?;
        let invalid = [
            (
                PublishRequest {
                    key: "bad key".into(),
                    data: b"1".to_vec(),
                    ..Default::default()
                },
                "invalid key",
            ),
            (
                PublishRequest {
                    key: "".into(),
                    data: b"1".to_vec(),
                    ..Default::default()
                },
                "empty",
            ),
            (
                PublishRequest {
                    key: "k".into(),
                    data: vec![b'1'; 64 * 1024 + 1],
                    ..Default::default()
                },
                "limit",
            ),
            (
                PublishRequest {
                    key: "k".into(),
                    data: b"{nope".to_vec(),
                    ..Default::default()
                },
                "JSON",
            ),
        ];
        for (request, needle) in invalid {
            let status = router.publish(request).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(
                status.message().contains(needle),
                "{needle}: {}",
                status.message()
            );
        }
        let status = router
            .lookup(LookupRequest { key: "a b".into() })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        let too_many = PublishBatchRequest {
            items: (0..1001)
                .map(|i| publisher::json(&format!("k{i}"), &json!(1)))
                .collect(),
        };
        assert_eq!(
            router
                .publish_batch(too_many)
                .await
                .expect_err("refused")
                .code(),
            Code::InvalidArgument
        );
        let mixed = PublishBatchRequest {
            items: vec![
                publisher::json("ok:1", &json!(1)),
                publisher::json("bad key", &json!(1)),
                publisher::json("ok:2", &json!(2)),
            ],
        };
        let results = router.publish_batch(mixed).await?.into_inner().results;
        assert!(matches!(
            results[0].result,
            Some(publish_result::Result::Ok(_))
        ));
        match &results[1].result {
            Some(publish_result::Result::Error(e)) => {
                assert_eq!(e.code, Code::InvalidArgument as u32)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            results[2].result,
            Some(publish_result::Result::Ok(_))
        ));

        // Garbage frames close only the sender.
        let key = "garbage:1";
        let mut good = Subscription::connect(&n1.connect_url(key)).await?;
        let owner_url = good.url.clone();
        let garbage: Vec<(Message, u16)> = vec![
            (Message::text("this is not json"), 4400),
            (Message::text(r#"{"type":"shout"}"#), 4400),
            (Message::text(r#"{"no":"type"}"#), 4400),
            (Message::binary(vec![0u8, 1, 2]), 4400),
            (Message::text("x".repeat(70 * 1024)), 4413),
        ];
        for (message, code) in garbage {
            let (mut bad, _) = tokio_tungstenite::connect_async(owner_url.as_str()).await?;
            assert!(matches!(
                ringfeed_client::read_event(&mut bad).await?,
                Event::Frame(Frame::Welcome { .. })
            ));
            let shown = format!("{:.40?}", message);
            bad.send(message).await?;
            loop {
                match ringfeed_client::read_event(&mut bad).await {
                    Ok(Event::Frame(Frame::Error { .. })) => continue,
                    Ok(Event::Closed { code: got, .. }) => {
                        assert_eq!(got, code, "{shown}");
                        break;
                    }
                    Ok(other) => panic!("{shown}: {other:?}"),
                    Err(e) => panic!("{shown}: {e}"),
                }
            }
        }
        // The well-behaved subscriber still receives, and so does a client publish.
        let reply = router
            .publish(publisher::json(key, &json!("still here")))
            .await?
            .into_inner();
        assert_eq!(reply.delivered, 1);
        assert_eq!(next_update(&mut good).await?, (1, json!("still here")));
        good.send_text(r#"{"type":"ping"}"#).await?;
        assert_eq!(
            good.next_within(FRAME_TIMEOUT).await?,
            Event::Frame(Frame::Pong)
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_its_owner_cannot_answer_in_time_is_deadline_exceeded_not_unavailable() {
    bounded(async {
        // Lease TTL 5 s: a stopped node stays on the ring well past the 1 s deadline.
        let mut cluster = Cluster::builder().nodes(2).lease_ttl(5).start().await?;
        let key = "deadline:1";
        let owner = owner_of(&cluster, key).await?;
        let successor = cluster
            .nodes
            .iter()
            .find(|n| n.id != owner)
            .ok_or_else(|| anyhow::anyhow!("two nodes"))?;
        let mut router = cluster.router().await?;
        router.publish(publisher::json(key, &json!(1))).await?;
        // The owner is reachable but cannot answer: its update waits for the stopped
        // successor's copy (ack=replicated).
        let pid = successor
            .pid()
            .ok_or_else(|| anyhow::anyhow!("no pid"))?
            .to_string();
        let signal = |sig: &str| {
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
        };
        anyhow::ensure!(signal("-STOP")?.success());
        let mut request = tonic::Request::new(publisher::json(key, &json!(2)));
        request.set_timeout(Duration::from_secs(1));
        let started = Instant::now();
        let outcome = router.publish(request).await;
        let took = started.elapsed();
        anyhow::ensure!(signal("-CONT")?.success());
        match outcome {
            Err(status) => anyhow::ensure!(
                status.code() == Code::DeadlineExceeded,
                "{:?}: {}",
                status.code(),
                status.message()
            ),
            Ok(reply) => anyhow::bail!("answered while its replica was stopped: {reply:?}"),
        }
        anyhow::ensure!(took < Duration::from_secs(3), "answered after {took:?}");
        // With the successor back, the key takes publishes again.
        router.publish(publisher::json(key, &json!(3))).await?;

        // An owner that is gone (killed, still on the ring for its TTL) refuses every
        // retry until the deadline: no owner reachable, UNAVAILABLE — even though the
        // retries run right up to the deadline.
        cluster.node_mut(&owner).kill().await;
        let mut request = tonic::Request::new(publisher::json(key, &json!(4)));
        request.set_timeout(Duration::from_secs(1));
        match router.publish(request).await {
            Err(status) => anyhow::ensure!(
                status.code() == Code::Unavailable,
                "{:?}: {}",
                status.code(),
                status.message()
            ),
            Ok(reply) => anyhow::bail!("answered by a killed owner: {reply:?}"),
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_stream_rpcs_is_delivered_and_replicated_to_call_by_call() {
    bounded(async {
        // n1 answers DeliverStream and ReplicateStream UNIMPLEMENTED, as an earlier
        // version would in a rolling upgrade: the router and its peers fall back to
        // unary Deliver and Replicate, and nothing is lost or left unreplicated.
        let cluster = Cluster::builder()
            .nodes(3)
            .args_for("n1", &["--test-no-stream-rpcs"])
            .start()
            .await?;
        let mut router = cluster.router().await?;
        let mut owners = HashMap::new();
        let started = Instant::now();
        for i in 0..60 {
            let key = format!("mixed:{i}");
            let reply = router
                .publish(publisher::json(&key, &json!({ "i": i })))
                .await?
                .into_inner();
            assert_eq!(reply.seq, 1, "{key}");
            assert!(reply.replicated, "{key} was acknowledged unreplicated");
            *owners.entry(reply.node).or_insert(0) += 1;
        }
        // A fallback that waited for a stream to time out (2 s) would take 40 s here;
        // falling back at once takes about a second.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "60 publishes took {:?}: a fallback waited for a timeout",
            started.elapsed()
        );
        // Every node owned some of the keys, so each was both delivered to and (as the
        // others' successor) replicated to.
        assert_eq!(owners.len(), 3, "owners: {owners:?}");
        let router_log = cluster.router_log();
        assert!(
            router_log.contains("node has no DeliverStream"),
            "the router never fell back to unary Deliver:\n{}",
            cluster.logs()
        );
        let fell_back = ["n2", "n3"].iter().any(|id| {
            cluster
                .node(id)
                .log()
                .contains("successor has no ReplicateStream")
        });
        assert!(
            fell_back,
            "no node fell back to unary Replicate:\n{}",
            cluster.logs()
        );
        // The others still stream to each other and to the router.
        assert!(
            !cluster
                .node("n1")
                .log()
                .contains("successor has no ReplicateStream"),
            "n1 fell back although its successors have the stream"
        );
        // Each acked publish waited for one replication batch of its own, streamed or
        // call by call: the owners' histograms counted all 60 between them.
        let mut replicated = 0;
        for node in &cluster.nodes {
            replicated += metric(&node.http, "ringfeed_replication_seconds_count").await?;
        }
        assert!(
            replicated >= 60,
            "{replicated} replication batches timed, not 60"
        );
        Ok(())
    })
    .await
}
