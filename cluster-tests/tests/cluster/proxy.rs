//! `--non-owner proxy`: clients that know one node only — as behind a load balancer —
//! follow their key across a drain of its owner with no gap, over WebSocket, SSE and
//! long polling, and are never told another node's address.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use ringfeed_client::{connect_url, publisher, Event, Frame, Subscription};
use ringfeed_cluster_tests::{http_request_full, Cluster, SseStream};
use serde_json::json;
use tokio::time::Instant;

use super::delivery::check_exactly_once;
use super::{bounded, owner_of, FRAME_TIMEOUT};

const UPDATES: u64 = 1200;

#[tokio::test]
async fn clients_of_one_proxying_node_follow_their_key_across_a_drain_of_its_owner_with_no_gap() {
    bounded(async {
        let mut cluster = Cluster::builder()
            .nodes(3)
            .node_args(&["--non-owner", "proxy"])
            .start()
            .await?;
        let key = "proxied:feed";
        let owner = owner_of(&cluster, key).await?;
        let entry = cluster
            .nodes
            .iter()
            .find(|n| n.id != owner)
            .ok_or_else(|| anyhow!("another node"))?
            .http
            .clone();

        let ws = tokio::spawn(follow_ws(entry.clone(), key));
        let sse = tokio::spawn(follow_sse(entry.clone(), key));
        let poll = tokio::spawn(follow_poll(entry.clone(), key));
        // Paced, so the drain lands in the middle.
        let router = cluster.router_grpc();
        let publisher = tokio::spawn(async move {
            let mut client = ringfeed_cluster_tests::connect_router(&router).await?;
            for i in 1..=UPDATES {
                let reply = client
                    .publish(publisher::json(key, &json!({"n": i})))
                    .await?
                    .into_inner();
                ensure!(reply.seq == i, "publish {i} got seq {}", reply.seq);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            Ok::<_, anyhow::Error>(())
        });
        // Drain the owner once a third is out.
        let deadline = Instant::now() + Duration::from_secs(30);
        while super::metric(&cluster.node(&owner).http, "ringfeed_published_total").await?
            < UPDATES / 3
        {
            ensure!(Instant::now() < deadline, "the publisher stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = cluster.drain_command(&owner).await?;
        ensure!(
            out.status.success(),
            "drain: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        publisher.await??;
        let new_owner = owner_of(&cluster, key).await?;
        ensure!(new_owner != owner, "the key did not move");
        for (name, seqs) in [
            ("ws", ws.await??),
            ("sse", sse.await??),
            ("poll", poll.await??),
        ] {
            check_exactly_once(&seqs, UPDATES).map_err(|e| anyhow!("{name}: {e}"))?;
        }
        cluster.node_mut(&owner).kill().await;
        Ok(())
    })
    .await
}

/// A WebSocket client of `entry` alone: follows redirects (which must point at
/// `entry`) and reconnects there after any close, resuming.
async fn follow_ws(entry: String, key: &'static str) -> Result<Vec<u64>> {
    let here = entry.replacen("http://", "ws://", 1);
    let mut url = connect_url(&entry, key, Some((0, None)));
    let mut seqs = Vec::new();
    let mut epoch = None::<String>;
    let mut moves = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seqs.last().copied().unwrap_or(0) < UPDATES {
        ensure!(Instant::now() < deadline, "ws stalled at {:?}", seqs.last());
        let mut sub = match Subscription::connect(&url).await {
            Ok(sub) => sub,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Frame::Welcome { epoch: e, .. } = &sub.welcome {
            epoch = Some(e.clone());
        }
        loop {
            match sub.next_within(FRAME_TIMEOUT).await {
                Ok(Event::Frame(Frame::Update { seq, .. })) => {
                    seqs.push(seq);
                    if seq >= UPDATES {
                        break;
                    }
                }
                Ok(Event::Frame(Frame::Redirect {
                    url: next,
                    ring_version,
                    ..
                })) => {
                    // Followed as the protocol says: its URL, with our own position.
                    ensure!(next.starts_with(&here), "told another address: {next}");
                    moves.push(format!("redirect at {:?}", seqs.last()));
                    let since = seqs.last().copied().unwrap_or(0);
                    url = connect_url(&entry, key, Some((since, epoch.as_deref())));
                    url.push_str(&format!("&rv={ring_version}"));
                    break;
                }
                Ok(Event::Frame(_)) => {}
                other => {
                    moves.push(format!("{other:?} at {:?}", seqs.last()));
                    let since = seqs.last().copied().unwrap_or(0);
                    url = connect_url(&entry, key, Some((since, epoch.as_deref())));
                    break;
                }
            }
        }
    }
    // It crossed the drain on this one node.
    ensure!(
        !moves.is_empty(),
        "the WebSocket client never saw its key move"
    );
    eprintln!("ws: moved {moves:?}");
    Ok(seqs)
}

/// An SSE client of `entry` alone, reconnecting there with `Last-Event-ID`.
async fn follow_sse(entry: String, key: &'static str) -> Result<Vec<u64>> {
    let url = format!("{entry}/v1/sse?key={key}&since=0");
    let mut seqs = Vec::new();
    let mut last_id = None::<String>;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seqs.last().copied().unwrap_or(0) < UPDATES {
        ensure!(
            Instant::now() < deadline,
            "sse stalled at {:?}",
            seqs.last()
        );
        let Ok(mut stream) = SseStream::open(&url, last_id.as_deref()).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while let Ok(Some(event)) = stream.next_within(FRAME_TIMEOUT).await {
            let frame: serde_json::Value = serde_json::from_str(&event.data)?;
            if frame["type"] == "update" {
                seqs.push(frame["seq"].as_u64().unwrap_or_default());
                last_id = event.id.clone();
                if seqs.last() == Some(&UPDATES) {
                    break;
                }
            }
        }
    }
    Ok(seqs)
}

/// A long-polling client of `entry` alone: never sees a 307.
async fn follow_poll(entry: String, key: &'static str) -> Result<Vec<u64>> {
    let (mut since, mut epoch) = (0u64, None::<String>);
    let mut seqs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while since < UPDATES {
        ensure!(Instant::now() < deadline, "poll stalled at {since}");
        let mut url = format!("{entry}/v1/poll?key={key}&since={since}&wait=5");
        if let Some(e) = &epoch {
            url.push_str(&format!("&epoch={e}"));
        }
        let (status, _, body) = match http_request_full(&url, &[]).await {
            Ok(answer) => answer,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        ensure!(status != 307, "told another address: {body}");
        if status == 503 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        ensure!(status == 200, "{url}: {status} {body}");
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        epoch = answer["epoch"].as_str().map(str::to_owned);
        for frame in answer["updates"].as_array().into_iter().flatten() {
            ensure!(frame["type"] == "update", "poll got {frame} after {since}");
            let seq = frame["seq"].as_u64().unwrap_or_default();
            ensure!(seq > since, "poll since {since} answered {answer}");
            seqs.push(seq);
        }
        since = answer["seq"]
            .as_u64()
            .ok_or_else(|| anyhow!("no seq in {answer}"))?;
    }
    Ok(seqs)
}
