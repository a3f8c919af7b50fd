//! Delivery guarantees on the owner: resume without gaps over WebSocket, SSE and
//! long-poll; resets that say why; slow consumers; heartbeats; idempotency and CAS;
//! bad input on the client endpoints.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{anyhow, bail, ensure, Result};
use futures_util::StreamExt;
use rand::RngExt;
use ringfeed_client::{connect_url, publisher, Event, Frame, Subscription};
use ringfeed_cluster_tests::{eventually, http_follow, http_request_full, Cluster, SseStream};
use ringfeed_proto::v1::{PresenceRequest, PublishBatchRequest, PublishRequest};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::{bounded, metric, next_update, owner_of, FRAME_TIMEOUT};

const UPDATES: u64 = 1000;

/// Publishes `n` updates `{"n": i}` to `key` through the router, one call each.
pub(super) fn spawn_publisher(
    cluster: &Cluster,
    key: &str,
    n: u64,
) -> tokio::task::JoinHandle<Result<String>> {
    let router = cluster.router_grpc();
    let key = key.to_owned();
    tokio::spawn(async move {
        let mut client = ringfeed_cluster_tests::connect_router(&router).await?;
        let mut epoch = String::new();
        for i in 1..=n {
            let reply = client
                .publish(publisher::json(&key, &json!({"n": i})))
                .await?
                .into_inner();
            ensure!(reply.seq == i, "publish {i} got seq {}", reply.seq);
            epoch = reply.epoch;
        }
        Ok(epoch)
    })
}

/// Five distinct random points in 1..n at which a client drops its connection.
fn drop_points(n: u64) -> BTreeSet<u64> {
    let mut rng = rand::rng();
    let mut points = BTreeSet::new();
    while points.len() < 5 {
        points.insert(rng.random_range(1..n));
    }
    points
}

pub(super) fn check_exactly_once(seqs: &[u64], n: u64) -> Result<()> {
    let expected: Vec<u64> = (1..=n).collect();
    if seqs != expected.as_slice() {
        let missing: Vec<u64> = expected
            .iter()
            .filter(|s| !seqs.contains(s))
            .copied()
            .take(10)
            .collect();
        bail!(
            "got {} updates, missing {missing:?}…, first out of order at {:?}",
            seqs.len(),
            seqs.windows(2).position(|w| w[1] != w[0] + 1)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_without_gaps_over_websocket_sse_and_long_poll() {
    bounded(async {
        let cluster = Cluster::builder().nodes(2).start().await?;
        let entry = cluster.nodes[0].http.clone();

        // WebSocket: reconnect with since + epoch at five random points.
        let key = "resume:ws";
        let points = drop_points(UPDATES);
        let mut sub = Subscription::connect(&connect_url(&entry, key, None)).await?;
        let Frame::Welcome { epoch, seq: 0, .. } = sub.welcome.clone() else {
            bail!("welcome {:?}", sub.welcome)
        };
        let publisher = spawn_publisher(&cluster, key, UPDATES);
        let mut seqs = Vec::new();
        let mut reconnects = 0;
        while seqs.last().copied().unwrap_or(0) < UPDATES {
            let (seq, data) = next_update(&mut sub).await?;
            ensure!(data == json!({"n": seq}), "seq {seq} carried {data}");
            seqs.push(seq);
            if points.contains(&seq) {
                sub.close().await;
                sub = Subscription::connect(&connect_url(&entry, key, Some((seq, Some(&epoch)))))
                    .await?;
                reconnects += 1;
            }
        }
        assert_eq!(publisher.await??, epoch);
        check_exactly_once(&seqs, UPDATES)?;
        assert_eq!(reconnects, 5);
        eprintln!(
            "ws: {} updates exactly once across {reconnects} reconnects at {points:?}",
            seqs.len()
        );

        // SSE: reconnect with Last-Event-ID (through the non-owner's 307 when there is one).
        let key = "resume:sse";
        let points = drop_points(UPDATES);
        let sse_url = format!("{entry}/v1/sse?key={key}");
        let mut stream = SseStream::open(&sse_url, None).await?;
        let welcome = stream
            .next_within(FRAME_TIMEOUT)
            .await?
            .ok_or_else(|| anyhow!("no welcome"))?;
        let welcome_json: serde_json::Value = serde_json::from_str(&welcome.data)?;
        ensure!(welcome_json["type"] == "welcome", "{welcome:?}");
        let epoch = welcome_json["epoch"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(welcome.id, Some(format!("{epoch}:0")));
        let publisher = spawn_publisher(&cluster, key, UPDATES);
        let mut seqs = Vec::new();
        let mut last_id = welcome.id.clone();
        while seqs.last().copied().unwrap_or(0) < UPDATES {
            let event = stream
                .next_within(FRAME_TIMEOUT)
                .await?
                .ok_or_else(|| anyhow!("stream ended"))?;
            let frame: serde_json::Value = serde_json::from_str(&event.data)?;
            if frame["type"] == "welcome" {
                continue;
            }
            ensure!(frame["type"] == "update", "unexpected {frame}");
            let seq = frame["seq"].as_u64().unwrap_or_default();
            ensure!(
                event.id == Some(format!("{epoch}:{seq}")),
                "event id {:?} for seq {seq}",
                event.id
            );
            seqs.push(seq);
            last_id = event.id.clone();
            if points.contains(&seq) {
                stream = SseStream::open(&sse_url, last_id.as_deref()).await?;
            }
        }
        publisher.await??;
        check_exactly_once(&seqs, UPDATES)?;
        eprintln!(
            "sse: {} updates exactly once across 5 reconnects (last id {last_id:?})",
            seqs.len()
        );

        // Long poll: every answer is a reconnect; some are plain polls (wait=0).
        let key = "resume:poll";
        let publisher = spawn_publisher(&cluster, key, UPDATES);
        let (mut since, mut epoch) = (0u64, None::<String>);
        let mut seqs = Vec::new();
        let mut rng = rand::rng();
        let deadline = Instant::now() + Duration::from_secs(60);
        while since < UPDATES {
            ensure!(Instant::now() < deadline, "long poll stalled at {since}");
            let wait = if rng.random_bool(0.2) { 0 } else { 5 };
            let mut url = format!("{entry}/v1/poll?key={key}&since={since}&wait={wait}");
            if let Some(e) = &epoch {
                url.push_str(&format!("&epoch={e}"));
            }
            let (status, _, body) = http_follow(&url, &[]).await?;
            ensure!(status == 200, "{url}: {status} {body}");
            let answer: serde_json::Value = serde_json::from_str(&body)?;
            epoch = answer["epoch"].as_str().map(str::to_owned);
            for frame in answer["updates"]
                .as_array()
                .ok_or_else(|| anyhow!("no updates in {answer}"))?
            {
                ensure!(frame["type"] == "update", "unexpected {frame}");
                seqs.push(frame["seq"].as_u64().unwrap_or_default());
            }
            since = answer["seq"]
                .as_u64()
                .ok_or_else(|| anyhow!("no seq in {answer}"))?;
        }
        publisher.await??;
        check_exactly_once(&seqs, UPDATES)?;
        eprintln!("poll: {} updates exactly once", seqs.len());
        Ok(())
    })
    .await;
}

/// Reads frames until one satisfies `want`, failing on anything else but `welcome`.
async fn expect_frame(
    sub: &mut Subscription,
    what: &str,
    want: impl Fn(&Frame) -> bool,
) -> Result<Frame> {
    match sub.next_within(FRAME_TIMEOUT).await? {
        Event::Frame(f) if want(&f) => Ok(f),
        other => bail!("expected {what}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_say_why_and_live_updates_follow() {
    bounded(async {
        let cluster = Cluster::builder()
            .nodes(2)
            .node_args(&["--history-len", "10"])
            .start()
            .await?;
        let entry = cluster.nodes[0].http.clone();
        let key = "reset:1";
        let mut router = cluster.router().await?;
        let mut epoch = String::new();
        for i in 1..=30u64 {
            epoch = router
                .publish(publisher::json(key, &json!(i)))
                .await?
                .into_inner()
                .epoch;
        }
        let mut seq = 30u64;

        // An evicted since: history_gap, what is left (21..30), then live.
        let mut sub =
            Subscription::connect(&connect_url(&entry, key, Some((5, Some(&epoch))))).await?;
        assert!(
            matches!(&sub.welcome, Frame::Welcome { seq: 30, .. }),
            "{:?}",
            sub.welcome
        );
        let reset = expect_frame(&mut sub, "reset", |f| matches!(f, Frame::Reset { .. })).await?;
        assert_eq!(
            reset,
            Frame::Reset {
                key: key.into(),
                epoch: epoch.clone(),
                seq: 20,
                reason: "history_gap".into()
            }
        );
        for expected in 21..=30 {
            assert_eq!(next_update(&mut sub).await?.0, expected);
        }
        seq += 1;
        router.publish(publisher::json(key, &json!(seq))).await?;
        assert_eq!(next_update(&mut sub).await?.0, seq);

        // A since beyond the current seq, or in a foreign epoch: the reason, then live.
        for (since, their_epoch, reason) in [
            (100, epoch.as_str(), "seq_ahead"),
            (3, "someOtherEpoch", "epoch_changed"),
        ] {
            let url = connect_url(&entry, key, Some((since, Some(their_epoch))));
            let mut sub = Subscription::connect(&url).await?;
            let reset =
                expect_frame(&mut sub, "reset", |f| matches!(f, Frame::Reset { .. })).await?;
            assert_eq!(
                reset,
                Frame::Reset {
                    key: key.into(),
                    epoch: epoch.clone(),
                    seq,
                    reason: reason.into()
                }
            );
            seq += 1;
            router.publish(publisher::json(key, &json!(seq))).await?;
            assert_eq!(next_update(&mut sub).await?.0, seq);
        }

        // The same over long poll (reset leads `updates`) and SSE (Last-Event-ID).
        let (status, _, body) = http_follow(
            &format!("{entry}/v1/poll?key={key}&since=5&epoch={epoch}&wait=0"),
            &[],
        )
        .await?;
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        let updates = answer["updates"].as_array().cloned().unwrap_or_default();
        assert_eq!(updates[0]["reason"], "history_gap", "{answer}");
        assert_eq!(updates.len(), 11);
        assert_eq!(answer["seq"], seq);
        let mut stream = SseStream::open(
            &format!("{entry}/v1/sse?key={key}"),
            Some("someOtherEpoch:3"),
        )
        .await?;
        let welcome = stream
            .next_within(FRAME_TIMEOUT)
            .await?
            .ok_or_else(|| anyhow!("no welcome"))?;
        assert_eq!(welcome.id, Some(format!("{epoch}:{seq}")));
        let reset = stream
            .next_within(FRAME_TIMEOUT)
            .await?
            .ok_or_else(|| anyhow!("no reset"))?;
        assert_eq!(reset.id, Some(format!("{epoch}:{seq}")));
        assert!(reset.data.contains("epoch_changed"), "{reset:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_4408_and_resumes_without_loss() {
    bounded(async {
        const N: u64 = 5000;
        const FAST: usize = 100;
        let cluster = Cluster::builder()
            .nodes(2)
            .node_args(&["--subscriber-queue", "256", "--socket-send-buffer", "16384", "--history-len", "100000", "--history-bytes", "268435456"])
            .start()
            .await?;
        let key = "slow:1";
        let owner = cluster.node(&owner_of(&cluster, key).await?).http.clone();
        let url = connect_url(&owner, key, None);

        // The slow one: a small receive buffer, and it stops reading after its welcome.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let stream = socket.connect(owner.trim_start_matches("http://").parse()?).await?;
        let (mut slow, _) = tokio_tungstenite::client_async(url.as_str(), stream).await?;
        let welcome = ringfeed_client::read_event(&mut slow).await?;
        let Event::Frame(Frame::Welcome { epoch, .. }) = welcome else { bail!("{welcome:?}") };

        let mut fast = Vec::new();
        for _ in 0..FAST {
            fast.push(Subscription::connect(&url).await?);
        }
        let readers: Vec<_> = fast
            .into_iter()
            .map(|mut sub| {
                tokio::spawn(async move {
                    let mut next = 1;
                    while next <= N {
                        let (seq, _) = next_update(&mut sub).await?;
                        ensure!(seq == next, "fast subscriber got {seq}, expected {next}");
                        next += 1;
                    }
                    Ok::<_, anyhow::Error>(Instant::now())
                })
            })
            .collect();

        let payload = "x".repeat(100);
        let mut router = cluster.router().await?;
        let started = Instant::now();
        for batch in 0..N / 100 {
            let items = (0..100).map(|i| publisher::json(key, &json!({"i": batch * 100 + i, "pad": payload}))).collect();
            router.publish_batch(PublishBatchRequest { items }).await?;
        }
        let published_in = started.elapsed();
        let mut slowest = Duration::ZERO;
        for reader in readers {
            slowest = slowest.max(reader.await??.duration_since(started));
        }
        eprintln!(
            "published {N} updates in {published_in:?}; all {FAST} fast subscribers had all of them after {slowest:?} ({:.0} updates/s each)",
            N as f64 / slowest.as_secs_f64()
        );

        // Now the slow one reads: what it had, then 4408.
        let mut seqs = Vec::new();
        let closed = loop {
            match tokio::time::timeout(FRAME_TIMEOUT, ringfeed_client::read_event(&mut slow)).await?? {
                Event::Frame(Frame::Update { seq, .. }) => seqs.push(seq),
                Event::Frame(other) => bail!("slow consumer got {other:?}"),
                Event::Unreadable { error, .. } => bail!("slow consumer got {error}"),
                Event::Closed { code, reason } => break (code, reason),
            }
        };
        assert_eq!(closed.0, 4408, "{closed:?}");
        let had = seqs.len() as u64;
        ensure!(had < N, "the slow consumer was never behind");
        eprintln!("slow consumer closed with {closed:?} after {had} updates");
        // It resumes from its last seq and has every update.
        let last = seqs.last().copied().unwrap_or(0);
        let mut sub = Subscription::connect(&connect_url(&owner, key, Some((last, Some(&epoch))))).await?;
        while seqs.last().copied().unwrap_or(0) < N {
            seqs.push(next_update(&mut sub).await?.0);
        }
        check_exactly_once(&seqs, N)?;
        Ok(())
    })
    .await;
}

/// A raw WebSocket client that never answers pings: frames as (opcode, payload).
/// `behind` goes out in the same write as the upgrade request, before any answer.
async fn raw_ws(http: &str, key: &str, behind: &[u8]) -> Result<tokio::net::TcpStream> {
    let host = http.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let mut request = format!(
        "GET /v1/connect?key={key} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(behind);
    stream.write_all(&request).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    ensure!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Ok(stream)
}

/// Reads one unmasked server frame: (opcode, payload).
async fn raw_frame(stream: &mut tokio::net::TcpStream) -> Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 2];
    if stream.read_exact(&mut head).await.is_err() {
        return Ok(None);
    }
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).await?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).await?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len)?];
    stream.read_exact(&mut payload).await?;
    Ok(Some((head[0] & 0x0f, payload)))
}

/// A masked client frame (RFC 6455 §5.3) with FIN set.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(
                &u16::try_from(n)
                    .expect("test frames are small")
                    .to_be_bytes(),
            );
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The next frame: a text frame's JSON, any other frame's payload as a JSON string.
async fn raw_text(stream: &mut tokio::net::TcpStream) -> Result<(u8, serde_json::Value)> {
    match tokio::time::timeout(FRAME_TIMEOUT, raw_frame(stream)).await?? {
        Some((0x1, payload)) => Ok((0x1, serde_json::from_slice(&payload)?)),
        Some((opcode, payload)) => Ok((opcode, json!(String::from_utf8_lossy(&payload)))),
        None => bail!("the connection ended"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_frames_behind_the_handshake_or_split_across_writes_are_read_whole() {
    bounded(async {
        let cluster = Cluster::builder().nodes(1).start().await?;
        // The request, a control ping and a JSON ping in one write: the frames arrive
        // with the handshake and must not be lost with hyper's read buffer.
        let mut behind = client_frame(0x9, b"early");
        behind.extend(client_frame(0x1, br#"{"type":"ping"}"#));
        let mut stream = raw_ws(&cluster.nodes[0].http, "wire:1", &behind).await?;
        let (opcode, welcome) = raw_text(&mut stream).await?;
        ensure!(
            opcode == 0x1 && welcome["type"] == "welcome",
            "first frame {opcode:#x} {welcome}"
        );
        ensure!(
            raw_text(&mut stream).await? == (0xA, json!("early")),
            "the control ping is answered"
        );
        ensure!(
            raw_text(&mut stream).await? == (0x1, json!({"type": "pong"})),
            "the JSON ping is answered"
        );

        // A publish of ~6 KB, written in three pieces: read whole, acked and delivered
        // to its sender.
        let big = "x".repeat(6000);
        let publish = client_frame(
            0x1,
            json!({"type": "publish", "data": big, "id": "big"})
                .to_string()
                .as_bytes(),
        );
        for piece in publish.chunks(publish.len() / 3 + 1) {
            stream.write_all(piece).await?;
            stream.flush().await?;
        }
        let mut answers = Vec::new();
        for _ in 0..2 {
            let (opcode, frame) = raw_text(&mut stream).await?;
            ensure!(opcode == 0x1, "unexpected control frame {opcode:#x}");
            answers.push(frame);
        }
        answers.sort_by_key(|f| f["type"].as_str().unwrap_or_default().to_owned());
        ensure!(
            answers[0]["type"] == "ack" && answers[0]["id"] == "big",
            "{}",
            answers[0]
        );
        ensure!(
            answers[1]["type"] == "update" && answers[1]["data"] == json!(big),
            "update of {} bytes",
            answers[1].to_string().len()
        );

        // The client's close is answered with a close before the connection ends.
        stream
            .write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
            .await?;
        match tokio::time::timeout(FRAME_TIMEOUT, raw_frame(&mut stream)).await?? {
            Some((0x8, payload)) => ensure!(
                payload.starts_with(&1000u16.to_be_bytes()),
                "close {payload:?}"
            ),
            other => bail!("expected the close answered, got {other:?}"),
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_says_so_on_the_socket_and_redirects_what_it_no_longer_owns() {
    bounded(async {
        let mut cluster = Cluster::builder().nodes(2).start().await?;
        // Another planned change in progress holds n2's drain before it leaves the ring
        // (planned changes go one at a time), so n2 is draining and still the owner of
        // its keys for as long as this test keeps the transition open.
        let mut etcd = etcd_client::Client::connect([cluster.etcd.endpoint.as_str()], None).await?;
        let transition = format!("/ringfeed/{}/transition", cluster.name);
        etcd.put(
            transition.as_str(),
            r#"{"kind":"join","node":"test","from_ring_id":"","from_ring_version":0}"#,
            None,
        )
        .await?;
        let mut n2_key = None;
        let mut n1_key = None;
        for i in 0..200 {
            let key = format!("draining:{i}");
            match owner_of(&cluster, &key).await?.as_str() {
                "n2" => n2_key = n2_key.or(Some(key)),
                _ => n1_key = n1_key.or(Some(key)),
            }
        }
        let (n2_key, n1_key) = n2_key
            .zip(n1_key)
            .ok_or_else(|| anyhow!("keys of both nodes"))?;
        let n2 = cluster.node("n2");
        let pid = n2.pid().ok_or_else(|| anyhow!("n2 has no pid"))?;
        ensure!(std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?
            .success());
        let http = n2.http.clone();
        eventually("n2 draining (not ready)", Duration::from_secs(10), || {
            let http = http.clone();
            async move {
                let (status, _) =
                    ringfeed_cluster_tests::http_get(&format!("{http}/readyz")).await?;
                Ok((status != 200).then_some(()))
            }
        })
        .await;
        // A key it still owns: upgraded, then close 4503 (ask /v1/route elsewhere), not
        // an HTTP 503, which docs/protocol.md keeps for the connection limit.
        match Subscription::connect(&n2.connect_url(&n2_key)).await {
            Err(ringfeed_client::ClientError::Closed { code: 4503, reason }) => {
                ensure!(reason.contains("draining"), "close reason {reason:?}")
            }
            Err(e) => bail!("{n2_key} on draining n2: {e}"),
            Ok(sub) => bail!("{n2_key} subscribed on draining n2 at {}", sub.node()),
        }
        // A key of the other node: redirected there as by any node (4300).
        let sub = Subscription::connect(&n2.connect_url(&n1_key)).await?;
        ensure!(
            sub.node() == "n1" && sub.redirects == 1,
            "served by {} after {} redirects",
            sub.node(),
            sub.redirects
        );
        // The transition ends; n2 leaves the ring and exits.
        etcd.delete(transition.as_str(), None).await?;
        let status = cluster
            .node_mut("n2")
            .wait_exit(Duration::from_secs(40))
            .await?;
        ensure!(status.success(), "n2 exited with {status}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_closes_every_websocket_client_with_1001_without_waiting_out_the_grace() {
    bounded(async {
        // The last node of its cluster: nobody to hand its keys to, so SIGTERM closes
        // its clients. A session waits on its own kick, not on a node-wide token.
        let mut cluster = Cluster::builder()
            .nodes(1)
            .node_args(&["--shutdown-grace-ms", "30000"])
            .start()
            .await?;
        let mut readers = Vec::new();
        for i in 0..3 {
            let mut sub =
                Subscription::connect(&cluster.nodes[0].connect_url(&format!("bye:{i}"))).await?;
            // Read while the node shuts down: the client answers the close as it reads.
            readers.push(tokio::spawn(async move {
                sub.next_within(Duration::from_secs(15)).await
            }));
        }
        let started = Instant::now();
        let status = cluster
            .node_mut("n1")
            .terminate(Duration::from_secs(20))
            .await?;
        let exited_after = started.elapsed();
        ensure!(status.success(), "n1 exited with {status}");
        for reader in readers {
            match reader.await? {
                Ok(Event::Closed { code: 1001, reason }) => {
                    ensure!(reason.contains("shutting down"), "close reason {reason:?}")
                }
                other => bail!("expected a 1001 close, got {other:?}"),
            }
        }
        // A session left waiting would have held the exit for the 30 s grace.
        ensure!(
            exited_after < Duration::from_secs(10),
            "the node took {exited_after:?} to exit"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_dropped_within_one_and_a_half_heartbeats() {
    bounded(async {
        let heartbeat = Duration::from_millis(400);
        let cluster = Cluster::builder().nodes(1).node_args(&["--heartbeat-ms", "400"]).start().await?;
        let node = &cluster.nodes[0];

        let mut dead = raw_ws(&node.http, "hb:1", &[]).await?;
        let connected = Instant::now();
        let mut pings = 0;
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(5), raw_frame(&mut dead)).await?? {
                Some((0x9, _)) => pings += 1,
                Some((0x8, payload)) => break Some(payload),
                Some(_) => {}
                None => break None,
            }
        };
        let dropped_after = connected.elapsed();
        eprintln!("silent peer: {pings} ping(s), dropped after {dropped_after:?} (heartbeat {heartbeat:?})");
        assert!(pings >= 1, "the server pinged before giving up");
        let code = close.as_ref().filter(|p| p.len() >= 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
        assert_eq!(code, Some(1001));
        assert!(dropped_after <= heartbeat.mul_f64(1.5) + Duration::from_millis(250), "took {dropped_after:?}");

        // A client that answers pings (tungstenite does) stays for many heartbeats.
        let mut alive = Subscription::connect(&node.connect_url("hb:2")).await?;
        // Nothing but pings (answered by tungstenite) for four heartbeats.
        match alive.next_within(heartbeat * 4).await {
            Err(ringfeed_client::ClientError::Timeout) => {}
            Ok(Event::Closed { code, reason }) => bail!("a live client was closed: {code} {reason}"),
            other => bail!("unexpected {other:?}"),
        }
        let mut router = cluster.router().await?;
        router.publish(publisher::json("hb:2", &json!("still"))).await?;
        assert_eq!(next_update(&mut alive).await?.1, json!("still"));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_apply_once_and_compare_and_set_reports_the_current_seq() {
    bounded(async {
        let cluster = Cluster::builder().nodes(2).start().await?;
        let key = "idem:1";
        let mut sub = Subscription::connect(&cluster.nodes[0].connect_url(key)).await?;
        let mut router = cluster.router().await?;
        let request = |data: serde_json::Value, id: &str| PublishRequest {
            idempotency_key: id.into(),
            ..publisher::json(key, &data)
        };

        let first = router
            .publish(request(json!("once"), "order-1"))
            .await?
            .into_inner();
        let retry = router
            .publish(request(json!("once"), "order-1"))
            .await?
            .into_inner();
        assert_eq!((first.seq, first.delivered), (1, 1));
        assert_eq!(
            (retry.seq, retry.epoch.as_str(), retry.delivered),
            (1, first.epoch.as_str(), 0)
        );
        let batch = PublishBatchRequest {
            items: vec![
                request(json!("once"), "order-1"),
                request(json!("twice"), "order-2"),
            ],
        };
        let results = router.publish_batch(batch).await?.into_inner().results;
        let seqs: Vec<u64> = results
            .iter()
            .filter_map(|r| match &r.result {
                Some(ringfeed_proto::v1::publish_result::Result::Ok(ok)) => Some(ok.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(next_update(&mut sub).await?, (1, json!("once")));
        assert_eq!(next_update(&mut sub).await?, (2, json!("twice")));

        // Client publishes: `id` is the idempotency key; the sender gets the update too.
        for _ in 0..2 {
            sub.publish(&json!("from-client"), "c-1").await?;
            let ack = expect_frame(&mut sub, "ack", |f| {
                matches!(f, Frame::Ack { .. } | Frame::Update { .. })
            })
            .await?;
            match ack {
                Frame::Ack { id, seq } => assert_eq!((id, seq), (json!("c-1"), 3)),
                Frame::Update { seq, .. } => {
                    assert_eq!(seq, 3);
                    let ack =
                        expect_frame(&mut sub, "ack", |f| matches!(f, Frame::Ack { .. })).await?;
                    assert_eq!(
                        ack,
                        Frame::Ack {
                            id: json!("c-1"),
                            seq: 3
                        }
                    );
                }
                _ => unreachable!(),
            }
        }
        sub.publish(&json!("next"), "c-2").await?;
        let mut got = Vec::new();
        while got.len() < 2 {
            match sub.next_within(FRAME_TIMEOUT).await? {
                Event::Frame(f @ (Frame::Ack { .. } | Frame::Update { .. })) => got.push(f),
                other => bail!("{other:?}"),
            }
        }
        assert!(
            got.iter()
                .any(|f| matches!(f, Frame::Update { seq: 4, .. })),
            "one update per distinct id: {got:?}"
        );

        // Compare-and-set.
        let cas = |seq: u64, epoch: &str| PublishRequest {
            expected_seq: Some(seq),
            expected_epoch: epoch.into(),
            ..publisher::json(key, &json!("cas"))
        };
        let ok = router.publish(cas(4, &first.epoch)).await?.into_inner();
        assert_eq!(ok.seq, 5);
        let status = router
            .publish(cas(4, &first.epoch))
            .await
            .expect_err("stale CAS refused");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(
            status.message().contains("seq 5") && status.message().contains(&first.epoch),
            "{}",
            status.message()
        );
        let status = router
            .publish(cas(5, "otherEpoch"))
            .await
            .expect_err("foreign epoch refused");
        assert_eq!(status.code(), Code::FailedPrecondition);

        // Presence from the owner: the one subscriber.
        let presence = router
            .presence(PresenceRequest { key: key.into() })
            .await?
            .into_inner();
        assert_eq!(presence.members.len(), 1, "{presence:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_input_gets_its_answer_and_the_node_keeps_serving() {
    bounded(async {
        let cluster = Cluster::builder().nodes(1).node_args(&["--handshake-timeout-ms", "1000"]).start().await?;
        let node = &cluster.nodes[0];
        let http = node.http.clone();

        // Malformed parameters: 400 with a JSON body naming them.
        let cases = [
            ("/v1/sse?key=k&since=x", vec![], "since"),
            ("/v1/sse?key=k&epoch=a:b", vec![], "epoch"),
            ("/v1/sse?key=k", vec![("Last-Event-ID", "garbage")], "Last-Event-ID"),
            ("/v1/sse?since=1", vec![], "key"),
            ("/v1/poll?key=k&since=0&wait=61", vec![], "wait"),
            ("/v1/poll?key=k&since=0&wait=soon", vec![], "wait"),
            ("/v1/poll?key=k", vec![], "since"),
            ("/v1/poll?key=bad%20key&since=0", vec![], "key"),
        ];
        for (path, headers, needle) in cases {
            let (status, _, body) = http_request_full(&format!("{http}{path}"), &headers).await?;
            assert_eq!(status, 400, "{path}: {body}");
            let error: serde_json::Value = serde_json::from_str(&body)?;
            let message = error["error"].as_str().unwrap_or_default();
            assert!(message.contains(needle), "{path}: {message}");
        }
        // Over WebSocket the same is a close 4400 that says which.
        match Subscription::connect(&format!("{}/v1/connect?key=k&since=x", http.replace("http://", "ws://"))).await {
            Err(ringfeed_client::ClientError::Closed { code: 4400, reason }) => assert!(reason.contains("since"), "{reason}"),
            other => bail!("since=x over WebSocket: {:?}", other.map(|_| ())),
        }

        // 1,000 connections that never finish their handshake are dropped after the
        // handshake timeout, while everyone else is served.
        let host = http.trim_start_matches("http://").to_owned();
        let mut stalled = Vec::new();
        for i in 0..1000 {
            let mut s = tokio::net::TcpStream::connect(&host).await?;
            if i % 2 == 0 {
                s.write_all(b"GET /v1/connect?key=stall HTTP/1.1\r\nHost: x\r\n").await?;
            }
            stalled.push(s);
        }
        let opened = Instant::now();
        let mut sub = Subscription::connect(&node.connect_url("calm:1")).await?;
        let mut router = cluster.router().await?;
        router.publish(publisher::json("calm:1", &json!("served"))).await?;
        assert_eq!(next_update(&mut sub).await?.1, json!("served"));
        let served_in = opened.elapsed();
        let drops = futures_util::stream::iter(stalled)
            .map(|mut s| async move {
                let mut buf = [0u8; 256];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return Ok::<_, anyhow::Error>(Instant::now()),
                        Ok(_) => {}
                    }
                }
            })
            .buffer_unordered(1000)
            .collect::<Vec<_>>()
            .await;
        let mut last = opened;
        for d in drops {
            last = last.max(d?);
        }
        let all_dropped = last.duration_since(opened);
        eprintln!("1000 stalled handshakes dropped within {all_dropped:?}; a normal client was served after {served_in:?}");
        assert!(all_dropped < Duration::from_secs(5), "took {all_dropped:?}");
        router.publish(publisher::json("calm:1", &json!("after"))).await?;
        assert_eq!(next_update(&mut sub).await?.1, json!("after"));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_answer_503_before_the_upgrade() {
    bounded(async {
        let cluster = Cluster::builder()
            .nodes(1)
            .node_args(&["--max-connections", "20"])
            .start()
            .await?;
        let node = &cluster.nodes[0];
        let mut held = Vec::new();
        for i in 0..20 {
            held.push(Subscription::connect(&node.connect_url(&format!("limit:{i}"))).await?);
        }
        match tokio_tungstenite::connect_async(node.connect_url("limit:x")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
                assert!(response.headers().contains_key("retry-after"));
            }
            other => bail!("over the limit: {:?}", other.map(|_| ())),
        }
        let (status, head, _) = http_request_full(
            &format!("{}/v1/poll?key=limit:1&since=0&wait=1", node.http),
            &[],
        )
        .await?;
        assert_eq!(status, 503);
        assert!(head.iter().any(|(k, _)| k == "retry-after"));
        // Health checks still answer, and a freed slot is usable again.
        let (status, _, _) = http_request_full(&format!("{}/healthz", node.http), &[]).await?;
        assert_eq!(status, 200);
        ensure!(metric(&node.http, "ringfeed_refused_connections_total").await? >= 2);
        // A one-node cluster has no successor: publishes say so, and so does a counter.
        let reply = cluster
            .router()
            .await?
            .publish(publisher::json("limit:0", &json!(1)))
            .await?
            .into_inner();
        ensure!(!reply.replicated, "{reply:?}");
        ensure!(metric(&node.http, "ringfeed_replicated").await? == 0);
        ensure!(metric(&node.http, "ringfeed_unreplicated_total").await? == 1);
        held.pop().expect("held").close().await;
        ringfeed_cluster_tests::eventually("a freed slot", Duration::from_secs(5), || {
            let url = node.connect_url("limit:again");
            async move { Ok(Subscription::connect(&url).await.ok().map(|_| ())) }
        })
        .await;
        // Each ended session gave back exactly its one place: with 20 held again, the
        // next is refused.
        let url = node.connect_url("limit:back");
        let back =
            ringfeed_cluster_tests::eventually("the 20th place", Duration::from_secs(5), || {
                let url = url.clone();
                async move { Ok(Subscription::connect(&url).await.ok()) }
            })
            .await;
        held.push(back);
        match tokio_tungstenite::connect_async(node.connect_url("limit:y")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503);
            }
            other => bail!("over the limit again: {:?}", other.map(|_| ())),
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eventsource_in_chromium_follows_a_307_across_origins_and_resumes_without_a_gap() {
    bounded(async {
        const N: u64 = 300;
        let cluster = Cluster::builder()
            .nodes(2)
            .node_args(&["--sse-max-stream-ms", "1500"])
            .start()
            .await?;
        let mut key = String::new();
        for i in 0.. {
            key = format!("browser:{i}");
            if owner_of(&cluster, &key).await? == "n2" {
                break;
            }
        }
        // The page comes from its own origin; its EventSource points at n1, which does
        // not own the key and answers 307 to n2, a third origin.
        let page =
            ringfeed_cluster_tests::serve_page(include_str!("../../browser/sse.html")).await?;
        let src = format!("{}/v1/sse?key={key}", cluster.node("n1").http);
        let page_url = format!("{page}/?src={}", url_escape(&src));
        let driver = tokio::process::Command::new("node")
            .arg("sse.mjs")
            .args([page_url.as_str(), &N.to_string(), "60000"])
            .current_dir(ringfeed_cluster_tests::browser_dir())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                anyhow!(
                    "cannot run node (scripts/test installs Node.js packages and Chromium): {e}"
                )
            })?;

        let mut router = cluster.router().await?;
        ringfeed_cluster_tests::eventually(
            "the browser to subscribe",
            Duration::from_secs(30),
            || {
                let mut router = router.clone();
                let key = key.clone();
                async move {
                    let presence = router.presence(PresenceRequest { key }).await?.into_inner();
                    Ok((!presence.members.is_empty()).then_some(()))
                }
            },
        )
        .await;
        // Spread the updates over several of the server's 1.5 s stream lifetimes.
        let mut ticks = tokio::time::interval(Duration::from_millis(15));
        for i in 1..=N {
            ticks.tick().await;
            let reply = router
                .publish(publisher::json(&key, &json!({"n": i})))
                .await?
                .into_inner();
            ensure!(reply.node == "n2" && reply.seq == i, "{reply:?}");
        }
        let output =
            tokio::time::timeout(Duration::from_secs(90), driver.wait_with_output()).await??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "browser driver failed ({}): {stdout}",
            output.status
        );
        let state: serde_json::Value = serde_json::from_str(stdout.trim())?;
        let seqs: Vec<u64> = state["seqs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_u64())
            .collect();
        eprintln!(
            "chromium: {} updates, {} opens, {} resets",
            seqs.len(),
            state["opens"],
            state["resets"]
        );
        check_exactly_once(&seqs, N)?;
        assert!(
            state["opens"].as_u64().unwrap_or(0) >= 2,
            "the server closed the stream and the browser came back: {state}"
        );
        assert_eq!(state["resets"], 0);
        Ok(())
    })
    .await;
}

/// Percent-encodes a URL for use as a query value.
fn url_escape(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_memory_budget_a_node_refuses_new_keys_and_connections_and_keeps_serving() {
    bounded(async {
        // A budget of 1 MiB: any real process is past it from the first sample.
        let cluster = Cluster::builder()
            .nodes(1)
            .node_args(&["--memory-budget-mb", "1"])
            .start()
            .await?;
        let node = &cluster.nodes[0];
        eventually("the node past its budget", Duration::from_secs(10), || {
            let http = node.http.clone();
            async move {
                Ok((metric(&http, "ringfeed_memory_over_budget").await? == 1).then_some(()))
            }
        })
        .await;
        ensure!(metric(&node.http, "ringfeed_memory_resident_bytes").await? > 1 << 20);
        match tokio_tungstenite::connect_async(node.connect_url("budget:1")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                ensure!(response.status() == 503, "{:?}", response.status());
                ensure!(response.headers().contains_key("retry-after"));
            }
            other => bail!("past the budget: {:?}", other.map(|_| ())),
        }
        let mut router = cluster.router().await?;
        match router.publish(publisher::json("budget:1", &json!(1))).await {
            Err(status) => ensure!(
                status.code() == Code::ResourceExhausted,
                "{:?}: {}",
                status.code(),
                status.message()
            ),
            Ok(reply) => bail!("a new key past the budget: {reply:?}"),
        }
        // A poll would create the key too, so a plain poll is refused; a waiting poll
        // holds a connection, so admission refuses it first (for a held key too).
        for wait in [0, 1] {
            let url = format!("{}/v1/poll?key=budget:2&since=0&wait={wait}", node.http);
            let (status, headers, body) = http_request_full(&url, &[]).await?;
            ensure!(status == 503, "poll wait={wait}: {status} {body}");
            ensure!(
                headers.iter().any(|(k, _)| k == "retry-after"),
                "{headers:?}"
            );
            ensure!(body.contains("memory budget"), "{body}");
        }
        // The node keeps answering and says why it refuses.
        let (status, _, _) = http_request_full(&format!("{}/healthz", node.http), &[]).await?;
        ensure!(status == 200);
        ensure!(metric(&node.http, "ringfeed_refused_memory_total").await? >= 4);
        ensure!(metric(&node.http, "ringfeed_keys").await? == 0);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_key_is_dropped_with_its_replica_and_its_old_epoch_is_reset() {
    bounded(async {
        let cluster = Cluster::builder()
            .nodes(2)
            .node_args(&["--key-idle-ttl-ms", "1000"])
            .start()
            .await?;
        let key = "idle:1";
        let owner = owner_of(&cluster, key).await?;
        let successor = cluster.nodes.iter().find(|n| n.id != owner).expect("two nodes");
        let owner = cluster.node(&owner);
        let mut router = cluster.router().await?;
        let first = router
            .publish(publisher::json(key, &json!(1)))
            .await?
            .into_inner();
        ensure!(first.replicated, "{first:?}");
        ensure!(metric(&owner.http, "ringfeed_keys").await? == 1);
        ensure!(metric(&successor.http, "ringfeed_replicas").await? == 1);

        // A subscribed key is never idle, however long nobody publishes.
        let mut sub = Subscription::connect(&connect_url(&owner.http, key, None)).await?;
        let held = Instant::now();
        while held.elapsed() < Duration::from_secs(3) {
            ensure!(
                metric(&owner.http, "ringfeed_keys").await? == 1,
                "a key with a subscriber was dropped"
            );
            let _ = sub.next_within(Duration::from_millis(250)).await;
        }
        drop(sub);

        // Without subscribers and publishes it goes, and so does its replica.
        eventually("the idle key and its replica dropped", Duration::from_secs(20), || {
            let (o, s) = (owner.http.clone(), successor.http.clone());
            async move {
                let keys = metric(&o, "ringfeed_keys").await?;
                let replicas = metric(&s, "ringfeed_replicas").await?;
                Ok((keys == 0 && replicas == 0).then_some(()))
            }
        })
        .await;

        // A later publish starts a new epoch; a client resuming the old one is reset.
        let second = router
            .publish(publisher::json(key, &json!(2)))
            .await?
            .into_inner();
        ensure!(second.epoch != first.epoch && second.seq == 1, "{second:?}");
        let mut sub = Subscription::connect(&connect_url(
            &owner.http,
            key,
            Some((first.seq, Some(&first.epoch))),
        ))
        .await?;
        let reset = expect_frame(&mut sub, "reset", |f| matches!(f, Frame::Reset { .. })).await?;
        ensure!(
            matches!(&reset, Frame::Reset { reason, epoch, .. } if reason == "epoch_changed" && *epoch == second.epoch),
            "{reset:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drains_transition_stays_open_until_the_node_has_left() {
    bounded(async {
        let mut cluster = Cluster::builder().nodes(3).start().await?;
        // A client that ignores its redirect keeps n2's drain going a while (a drain
        // waits up to 3 s for its clients to leave).
        let mut key = String::new();
        for i in 0.. {
            key = format!("long-drain:{i}");
            if owner_of(&cluster, &key).await? == "n2" {
                break;
            }
        }
        let (stubborn, _) =
            tokio_tungstenite::connect_async(cluster.node("n2").connect_url(&key)).await?;
        let (_write, mut read) = stubborn.split();
        read.next().await.ok_or_else(|| anyhow!("no welcome"))??;

        let mut etcd = etcd_client::Client::connect([cluster.etcd.endpoint.as_str()], None).await?;
        let record = format!("/ringfeed/{}/nodes/n2", cluster.name);
        let transition = format!("/ringfeed/{}/transition", cluster.name);
        let pid = cluster
            .node("n2")
            .pid()
            .ok_or_else(|| anyhow!("n2 has no pid"))?;
        ensure!(std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?
            .success());
        // Both keys read in one transaction (one revision) until n2's record is gone:
        // while it says draining, the drain's transition stands.
        let started = Instant::now();
        let mut draining_reads = 0;
        loop {
            ensure!(started.elapsed() < Duration::from_secs(30), "n2 never left");
            let reply = etcd
                .txn(etcd_client::Txn::new().and_then([
                    etcd_client::TxnOp::get(record.as_str(), None),
                    etcd_client::TxnOp::get(transition.as_str(), None),
                ]))
                .await?;
            let value = |i: usize| -> Option<serde_json::Value> {
                match reply.op_responses().get(i)? {
                    etcd_client::TxnOpResponse::Get(get) => {
                        serde_json::from_slice(get.kvs().first()?.value()).ok()
                    }
                    _ => None,
                }
            };
            let (member, open) = (value(0), value(1));
            match member {
                None if draining_reads > 0 => break,
                None => bail!("n2's record went before it was seen draining"),
                Some(m) if m["state"] == "draining" => {
                    ensure!(
                        open.as_ref()
                            .is_some_and(|t| t["kind"] == "drain" && t["node"] == "n2"),
                        "n2 still draining, but the transition is {open:?} \
                         ({draining_reads} reads after the drain began)"
                    );
                    draining_reads += 1;
                }
                Some(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ensure!(
            draining_reads >= 10,
            "the drain lasted {draining_reads} reads"
        );
        let exit = cluster
            .node_mut("n2")
            .wait_exit(Duration::from_secs(30))
            .await?;
        ensure!(exit.success(), "n2 exited with {exit}");
        drop(read);
        Ok(())
    })
    .await;
}
