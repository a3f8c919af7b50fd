//! QUIC on every node (docs/protocol.md *QUIC*), and the client library's follower:
//! a client at a non-owner is redirected and receives updates; its session survives
//! a change of its address; every kind of bad input closes that connection with a
//! clear code and leaves the node serving; followers over WebSocket and QUIC resume
//! gap-free (a ledger of every acknowledged update) across a drain, a restart and a
//! SIGKILL of the key's owner.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ringfeed_client::follow::{FollowConfig, FollowEvent, Follower, Transport};
use ringfeed_client::publisher;
use ringfeed_client::quic::{self, Hello, QuicSubscription, Trust};
use ringfeed_client::routing::RingView;
use ringfeed_client::{Event, Frame};
use ringfeed_cluster_tests::{eventually, Cluster};
use serde_json::json;

use super::{bounded, FRAME_TIMEOUT};

/// A key the ring gives `owner`.
fn key_owned_by(ring: &RingView, owner: &str, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .find(|k| ring.owner(k).is_some_and(|m| m.id.0 == owner))
        .expect("some key is owned by every member")
}

/// The next frame over QUIC, which must be an update: its data.
async fn next_data(sub: &mut QuicSubscription) -> Result<serde_json::Value> {
    match sub.next_within(FRAME_TIMEOUT).await? {
        Event::Frame(Frame::Update { data, .. }) => Ok(data.unwrap_or_default()),
        other => bail!("expected an update, got {other:?}"),
    }
}

/// The close a raw connection ends with: its application code and reason.
async fn close_of(connection: &quinn::Connection) -> Result<(u64, String)> {
    let closed = tokio::time::timeout(FRAME_TIMEOUT, connection.closed())
        .await
        .context("the node did not close the connection")?;
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => Ok((
            close.error_code.into_inner(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        )),
        other => bail!("closed by {other}, not by the application"),
    }
}

/// Writes `bytes` on a new stream of `connection`.
async fn send_raw(connection: &quinn::Connection, bytes: &[u8]) -> Result<()> {
    let (mut send, _recv) = connection.open_bi().await?;
    send.write_all(bytes).await?;
    // Keep the stream open: the node answers by closing the connection.
    std::mem::forget(send);
    Ok(())
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_client_at_a_non_owner_is_redirected_receives_updates_and_keeps_its_session_across_an_address_change(
) {
    bounded(async {
        let cluster = Cluster::builder().nodes(3).start().await?;
        let ring = RingView::fetch(&cluster.nodes[0].http, None).await?;
        for member in ring.ring.members() {
            ensure!(
                member.quic.is_some() && member.quic_sha256.as_ref().is_some_and(|d| d.len() == 64),
                "member record without QUIC: {member:?}"
            );
        }
        let key = key_owned_by(&ring, "n2", "quic");
        let n1 = cluster.node("n1").quic.clone().context("n1 serves QUIC")?;
        let hello = Hello {
            key: key.clone(),
            ..Hello::default()
        };
        let mut sub = QuicSubscription::connect(&n1, &hello, &Trust::pins_of(&ring)).await?;
        ensure!(
            sub.node() == "n2" && sub.redirects == 1,
            "welcomed by {} after {} redirects",
            sub.node(),
            sub.redirects
        );

        let mut router = cluster.router().await?;
        router
            .publish(publisher::json(&key, &json!({"n": 1})))
            .await?;
        ensure!(next_data(&mut sub).await? == json!({"n": 1}));

        // Connection migration: the client's UDP socket changes; the session goes on.
        let before = sub.connection().stable_id();
        sub.rebind(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
        router
            .publish(publisher::json(&key, &json!({"n": 2})))
            .await?;
        ensure!(next_data(&mut sub).await? == json!({"n": 2}));
        sub.publish(&json!({"n": 3}), "from-the-client").await?;
        let mut acked = false;
        let mut got_own = false;
        while !(acked && got_own) {
            match sub.next_within(FRAME_TIMEOUT).await? {
                Event::Frame(Frame::Ack { .. }) => acked = true,
                Event::Frame(Frame::Update { data, .. }) if data == Some(json!({"n": 3})) => {
                    got_own = true
                }
                other => bail!("after the rebind: {other:?}"),
            }
        }
        ensure!(
            sub.connection().stable_id() == before,
            "a new connection was made"
        );
        sub.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_quic_input_closes_only_that_connection_with_a_clear_code() {
    bounded(async {
        let cluster = Cluster::builder()
            .nodes(1)
            .node_args(&["--client-message-timeout-ms", "500"])
            .start()
            .await?;
        let node = &cluster.nodes[0];
        let addr = node.quic.clone().context("QUIC")?;
        let ring = RingView::fetch(&node.http, None).await?;
        let trust = Trust::pins_of(&ring);

        // A good client, subscribed all along: it must not notice the others.
        let hello = Hello {
            key: "quic:calm".into(),
            ..Hello::default()
        };
        let mut calm = QuicSubscription::connect(&addr, &hello, &trust).await?;

        // A wrong ALPN fails the handshake (TLS alert no_application_protocol).
        match quic::dial(&addr, &trust, b"h3").await {
            Err(e) => ensure!(
                e.to_string().contains("no_application_protocol") || e.to_string().contains("120"),
                "wrong ALPN refused with {e}"
            ),
            Ok(_) => bail!("a wrong ALPN was accepted"),
        }
        // A certificate the ring does not publish is refused by the client.
        let stranger = Trust::Pins(BTreeSet::from(["00".repeat(32)]));
        ensure!(
            quic::dial(&addr, &stranger, quic::ALPN).await.is_err(),
            "an unpinned certificate was trusted"
        );

        let cases: [(&str, Vec<u8>, u64); 4] = [
            ("not JSON", framed(b"not json"), 4400),
            ("not a hello", framed(br#"{"type":"ping"}"#), 4400),
            (
                "a bad key",
                framed(br#"{"type":"hello","key":"no spaces"}"#),
                4400,
            ),
            (
                "a length over the limit",
                vec![0xff, 0xff, 0xff, 0xff],
                4413,
            ),
        ];
        for (what, bytes, code) in cases {
            let (_endpoint, connection) = quic::dial(&addr, &trust, quic::ALPN).await?;
            send_raw(&connection, &bytes).await?;
            let (got, reason) = close_of(&connection).await.context(what)?;
            ensure!(
                got == code,
                "{what}: closed with {got} ({reason}), expected {code}"
            );
        }
        // Half a frame, then silence: the message timeout (1008).
        let (_endpoint, connection) = quic::dial(&addr, &trust, quic::ALPN).await?;
        let hello_frame = framed(br#"{"type":"hello","key":"quic:half"}"#);
        let (mut send, _recv) = connection.open_bi().await?;
        send.write_all(&hello_frame).await?;
        send.write_all(&[0, 0, 0, 50, b'{']).await?;
        let (got, reason) = close_of(&connection).await.context("half a frame")?;
        ensure!(got == 1008, "half a frame: closed with {got} ({reason})");

        // A second stream on a live session: 4400.
        let mut two = QuicSubscription::connect(
            &addr,
            &Hello {
                key: "quic:two".into(),
                ..Hello::default()
            },
            &trust,
        )
        .await?;
        send_raw(two.connection(), b"\0\0\0\x02{}").await?;
        match two.next_within(FRAME_TIMEOUT).await? {
            Event::Closed { code: 4400, reason } => {
                ensure!(reason.contains("one stream"), "{reason}")
            }
            other => bail!("a second stream: {other:?}"),
        }

        // The node is unaffected: the calm client still receives, a new one subscribes.
        let mut router = cluster.router().await?;
        router
            .publish(publisher::json("quic:calm", &json!("still here")))
            .await?;
        ensure!(next_data(&mut calm).await? == json!("still here"));
        let fresh = QuicSubscription::connect(
            &addr,
            &Hello {
                key: "quic:new".into(),
                ..Hello::default()
            },
            &trust,
        )
        .await?;
        ensure!(fresh.node() == "n1");
        let (status, _) =
            ringfeed_cluster_tests::http_get(&format!("{}/readyz", node.http)).await?;
        ensure!(status == 200, "readyz {status}");
        Ok(())
    })
    .await
}

/// What a follower received: the `(seq, n)` of every update, in order; or what the
/// publisher had acknowledged: `(0, n)`.
type Ledger = Arc<Mutex<Vec<(u64, u64)>>>;

/// Runs `follower` until dropped, writing each update's `n` to the ledger.
fn record(
    follower: Follower,
    ledger: Ledger,
    failed: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = follow(follower, ledger, failed.clone()).await {
            failed.lock().expect("failures").push(format!("{e:#}"));
        }
    })
}

async fn follow(
    mut follower: Follower,
    ledger: Ledger,
    events: Arc<Mutex<Vec<String>>>,
) -> Result<()> {
    {
        loop {
            match follower.next().await? {
                FollowEvent::Update(Frame::Update {
                    seq,
                    data: Some(data),
                    ..
                }) => {
                    let n = data["n"].as_u64().context("n")?;
                    ledger.lock().expect("ledger").push((seq, n));
                }
                FollowEvent::Reset(frame) => bail!("a reset: {frame:?}"),
                other => events.lock().expect("events").push(format!("{other:?}")),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_over_websocket_and_quic_miss_nothing_and_see_nothing_twice_across_a_drain_a_restart_and_a_kill(
) {
    bounded(async {
        // Heartbeats every second: a QUIC client hears nothing from a killed node (no
        // RST over UDP) and notices by the idle timeout, 1.5 heartbeats.
        let mut cluster = Cluster::builder()
            .nodes(3)
            .lease_ttl(2)
            .node_args(&["--heartbeat-ms", "1000"])
            .start()
            .await?;
        let ring = RingView::fetch(&cluster.nodes[0].http, None).await?;
        let key = key_owned_by(&ring, "n2", "ledger");
        let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
        let mut ledgers = Vec::new();
        let mut tasks = Vec::new();
        let failed: Arc<Mutex<Vec<String>>> = Arc::default();
        for (transport, direct) in [(Transport::WebSocket, false), (Transport::Quic, false), (Transport::WebSocket, true)] {
            let mut config = FollowConfig::new(nodes.clone(), &key);
            config.transport = transport;
            config.direct = direct;
            config.since = Some(0);
            let ledger = Ledger::default();
            tasks.push(record(Follower::new(config), ledger.clone(), failed.clone()));
            ledgers.push(ledger);
        }

        // A publisher, one at a time; only acknowledged updates are owed.
        let acked: Ledger = Ledger::default();
        let stop = tokio_util_free_flag();
        let publishing = {
            let (acked, stop, key) = (acked.clone(), stop.clone(), key.clone());
            let router = cluster.router_grpc();
            tokio::spawn(async move {
                let mut router = ringfeed_cluster_tests::connect_router(&router).await?;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let request = ringfeed_proto::v1::PublishRequest {
                        idempotency_key: format!("ledger-{n}"),
                        ..publisher::json(&key, &json!({"n": n}))
                    };
                    if router.publish(request).await.is_ok() {
                        acked.lock().expect("acked").push((0, n));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                anyhow::Ok(())
            })
        };
        let caught_up = |ledgers: &Vec<Ledger>, acked: &Ledger| {
            let last = acked.lock().expect("acked").last().map_or(0, |a| a.1);
            ledgers
                .iter()
                .all(|l| l.lock().expect("ledger").iter().any(|&(_, n)| n >= last))
        };
        let wait_for_traffic = |what: &'static str| {
            let (ledgers, acked, failed) = (ledgers.clone(), acked.clone(), failed.clone());
            async move {
                let target = acked.lock().expect("acked").len() + 20;
                eventually(what, Duration::from_secs(30), || {
                    let published = acked.lock().expect("acked").len();
                    let ok = published >= target && caught_up(&ledgers, &acked);
                    let last: Vec<_> = ledgers
                        .iter()
                        .map(|l| l.lock().expect("ledger").last().copied())
                        .collect();
                    let failed = failed.lock().expect("failures").clone();
                    async move {
                        match ok {
                            true => Ok(Some(())),
                            false => Err(anyhow::anyhow!(
                                "{published} acknowledged of {target}; followers at {last:?}; failed: {failed:?}"
                            )),
                        }
                    }
                })
                .await;
            }
        };
        wait_for_traffic("traffic before the drain").await;
        // The owner drains.
        cluster.node_mut("n2").terminate(Duration::from_secs(20)).await?;
        wait_for_traffic("traffic after the drain").await;
        // It comes back: the key moves back to it.
        cluster.restart_node("n2").await?;
        cluster.converged().await;
        wait_for_traffic("traffic after the restart").await;
        // Whoever owns it now is killed.
        let owner = RingView::fetch(&cluster.nodes[0].http, None)
            .await?
            .owner(&key)
            .context("an owner")?
            .id
            .0
            .clone();
        cluster.node_mut(&owner).kill().await;
        wait_for_traffic("traffic after the kill").await;

        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        publishing.await??;
        eventually("every follower has every acknowledged update", Duration::from_secs(30), || {
            let ok = caught_up(&ledgers, &acked);
            async move { anyhow::Ok(ok.then_some(())) }
        })
        .await;
        let owed: BTreeSet<u64> = acked.lock().expect("acked").iter().map(|a| a.1).collect();
        for (i, ledger) in ledgers.iter().enumerate() {
            let got = ledger.lock().expect("ledger").clone();
            // Gap-free: every seq after the first, one after the one before.
            let gap = got.windows(2).find(|w| w[1].0 != w[0].0 + 1);
            ensure!(gap.is_none(), "follower {i}: seq {:?} after {:?}", gap.map(|w| w[1]), gap.map(|w| w[0]));
            let have: BTreeSet<u64> = got.iter().map(|g| g.1).collect();
            ensure!(have.len() == got.len(), "follower {i}: an update twice");
            let missing: Vec<_> = owed.difference(&have).take(10).collect();
            ensure!(missing.is_empty(), "follower {i} missed acknowledged updates {missing:?}");
        }
        for task in tasks {
            task.abort();
        }
        Ok(())
    })
    .await
}

fn tokio_util_free_flag() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_client_that_stops_reading_is_closed_4408_and_presence_works_as_on_websocket() {
    bounded(async {
        let cluster = Cluster::builder()
            .nodes(1)
            .node_args(&["--subscriber-queue", "64"])
            .start()
            .await?;
        let node = &cluster.nodes[0];
        let addr = node.quic.clone().context("QUIC")?;
        let trust = Trust::pins_of(&RingView::fetch(&node.http, None).await?);

        // Presence: asked for in `hello`, the list follows `welcome`.
        let hello = Hello {
            key: "quic:room".into(),
            presence: true,
            ..Hello::default()
        };
        let mut member = QuicSubscription::connect(&addr, &hello, &trust).await?;
        match member.next_within(FRAME_TIMEOUT).await? {
            Event::Frame(Frame::Presence {
                members: Some(m), ..
            }) => {
                ensure!(m.len() == 1, "presence lists {m:?}")
            }
            other => bail!("expected the presence list, got {other:?}"),
        }

        // A client that reads nothing: its stream's window fills, then its queue.
        let hello = Hello {
            key: "quic:slow".into(),
            ..Hello::default()
        };
        let mut slow = QuicSubscription::connect(&addr, &hello, &trust).await?;
        let mut router = cluster.router().await?;
        let big = "x".repeat(60_000);
        for i in 0..40 {
            let items = (0..10)
                .map(|j| publisher::json("quic:slow", &json!({"i": i * 10 + j, "pad": big})))
                .collect();
            router
                .publish_batch(ringfeed_proto::v1::PublishBatchRequest { items })
                .await?;
        }
        // It reads at last: what was sent, then the close.
        let code = loop {
            match slow.next_within(FRAME_TIMEOUT).await? {
                Event::Closed { code, .. } => break code,
                Event::Frame(_) => {}
                other => bail!("{other:?}"),
            }
        };
        ensure!(code == 4408, "the slow client was closed with {code}");
        // The other client is unaffected.
        router
            .publish(publisher::json("quic:room", &json!("still")))
            .await?;
        ensure!(next_data(&mut member).await? == json!("still"));
        Ok(())
    })
    .await
}
