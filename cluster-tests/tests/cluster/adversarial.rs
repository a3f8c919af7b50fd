//! The node and router as an attacker finds them: every attack runs against a live
//! three-node cluster while a canary publishes and subscribes on every node and every
//! node's `/healthz` is probed. Each attack checks the refusal it gets; at the end the
//! watch checks that no node left the ring or fenced itself, every probe was answered
//! within a second, and the canary lost nothing and saw nothing out of order.
//!
//! Bounded: a few seconds per attack, loopback only, and each flood stops by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use ringfeed_client::{connect_url, publisher, Event, Frame, Subscription};
use ringfeed_cluster_tests::{flood_pings, http_get, Cluster};
use ringfeed_proto::v1::{node_client::NodeClient, DeliverRequest, PublishRequest};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

use crate::{metric, owner_of, FRAME_TIMEOUT};

/// The connection limit of the nodes under attack (small, so a flood past it is cheap).
const MAX_CONNECTIONS: usize = 100;
/// Past the limit, a node accepts this many more before its reserve (http.rs).
const ACCEPT_SLACK: usize = 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_their_codes_and_disturb_nobody() {
    let run = async {
        let cluster = Cluster::builder()
            .nodes(3)
            .node_args(&[
                "--max-connections",
                &MAX_CONNECTIONS.to_string(),
                "--heartbeat-ms",
                "1000",
                "--client-message-timeout-ms",
                "1500",
                "--handshake-timeout-ms",
                "5000",
            ])
            .start()
            .await?;
        let watch = Watch::start(&cluster).await?;
        let attacks: [(&str, Attack); 11] = [
            ("ping flood", |c| Box::pin(ping_flood(c))),
            ("ping flood on a closing socket", |c| {
                Box::pin(ping_flood_while_closing(c))
            }),
            ("unbounded fields", |c| Box::pin(unbounded_fields(c))),
            ("deep JSON", |c| Box::pin(deep_json(c))),
            ("connection flood", |c| Box::pin(connection_flood(c))),
            ("forged ring version", |c| Box::pin(forged_ring_version(c))),
            ("reused idempotency key", |c| {
                Box::pin(reused_idempotency_key(c))
            }),
            ("huge gRPC messages", |c| Box::pin(huge_grpc_messages(c))),
            ("reflection", |c| Box::pin(reflection(c))),
            ("unfinished message", |c| Box::pin(unfinished_message(c))),
            ("what held before", |c| Box::pin(what_held_before(c))),
        ];
        // Every attack runs even when one fails, so one run shows each that got through.
        let mut failed = Vec::new();
        for (name, attack) in attacks {
            let started = Instant::now();
            match attack(&cluster).await {
                Ok(()) => eprintln!(
                    "attack {name:?}: refused as expected in {:?}",
                    started.elapsed()
                ),
                Err(e) => {
                    eprintln!("attack {name:?} GOT THROUGH: {e:#}");
                    failed.push(format!("{name}: {e:#}"));
                }
            }
        }
        let watched = watch.finish(&cluster).await;
        ensure!(
            failed.is_empty(),
            "attacks got through:\n{}",
            failed.join("\n")
        );
        watched
    };
    match tokio::time::timeout(Duration::from_secs(240), run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("the adversarial suite did not finish within 240 s"),
    }
}

type Attack =
    for<'a> fn(
        &'a Cluster,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;

/// The canary and the health probes, running through every attack.
struct Watch {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    /// Each node's id and incarnation at the start.
    incarnations: Vec<(String, String)>,
    /// The slowest health probe per node.
    slowest: Arc<Mutex<Vec<Duration>>>,
}

impl Watch {
    async fn start(cluster: &Cluster) -> Result<Watch> {
        let stop = Arc::new(AtomicBool::new(false));
        let slowest = Arc::new(Mutex::new(vec![Duration::ZERO; cluster.nodes.len()]));
        let mut tasks = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            // A key this node owns: the canary subscribes on it and publishes to it.
            let key = owned_key(cluster, &node.id).await?;
            tasks.push(tokio::spawn(canary(
                cluster.router_grpc(),
                node.http.clone(),
                key,
                stop.clone(),
            )));
            tasks.push(tokio::spawn(probe(
                node.http.clone(),
                i,
                slowest.clone(),
                stop.clone(),
            )));
        }
        let incarnations = cluster
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.incarnation.clone()))
            .collect();
        Ok(Watch {
            stop,
            tasks,
            incarnations,
            slowest,
        })
    }

    async fn finish(self, cluster: &Cluster) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await??;
        }
        let slowest = self.slowest.lock().expect("probe lock").clone();
        eprintln!("slowest /healthz per node: {slowest:?}");
        for node in &cluster.nodes {
            let ring = cluster.ring(node).await?;
            let members: Vec<(String, String)> = ring["members"]
                .as_array()
                .ok_or_else(|| anyhow!("no members: {ring}"))?
                .iter()
                .map(|m| {
                    (
                        m["id"].as_str().unwrap_or_default().to_owned(),
                        m["incarnation"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            for expected in &self.incarnations {
                ensure!(
                    members.contains(expected),
                    "{} sees {members:?}, not {expected:?}: a node left the ring",
                    node.id
                );
            }
            ensure!(
                metric(&node.http, "ringfeed_fenced_total").await? == 0,
                "{} fenced itself:\n{}",
                node.id,
                node.log()
            );
        }
        Ok(())
    }
}

/// Publishes `{"i": n}` to `key` through the router every 20 ms and subscribes to it
/// through `node`: every acknowledged update must arrive, in order, with no reset.
async fn canary(router: String, node: String, key: String, stop: Arc<AtomicBool>) -> Result<()> {
    let mut sub = Subscription::connect(&connect_url(&node, &key, None)).await?;
    let mut client = ringfeed_cluster_tests::connect_router(&router).await?;
    let mut acked = Vec::new();
    let mut seen = Vec::new();
    let mut publish_at = tokio::time::interval(Duration::from_millis(20));
    let mut n = 0u64;
    let mut next_seq = None;
    loop {
        tokio::select! {
            _ = publish_at.tick() => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                n += 1;
                let reply = client
                    .publish(publisher::json(&key, &json!({ "i": n })))
                    .await
                    .with_context(|| format!("canary publish {n} to {key}"))?
                    .into_inner();
                acked.push(reply.seq);
            }
            event = sub.next_within(FRAME_TIMEOUT) => match event? {
                Event::Frame(Frame::Update { seq, .. }) => {
                    if let Some(expected) = next_seq {
                        ensure!(seq == expected, "canary on {key}: seq {seq} after {}", expected - 1);
                    }
                    next_seq = Some(seq + 1);
                    seen.push(seq);
                }
                Event::Frame(Frame::Pong | Frame::Presence { .. }) => {}
                other => bail!("canary on {key}: {other:?}"),
            },
        }
    }
    // What was acknowledged last still arrives.
    let last = acked.last().copied().unwrap_or(0);
    while seen.last().copied().unwrap_or(0) < last {
        match sub.next_within(FRAME_TIMEOUT).await? {
            Event::Frame(Frame::Update { seq, .. }) => seen.push(seq),
            other => bail!("canary on {key}: {other:?}"),
        }
    }
    for seq in &acked {
        ensure!(
            seen.contains(seq),
            "canary on {key}: acked seq {seq} never arrived"
        );
    }
    ensure!(
        acked.len() > 50,
        "the canary on {key} published only {}",
        acked.len()
    );
    Ok(())
}

/// Probes `node`'s `/healthz` every 200 ms on a fresh connection: each must answer 200
/// within a second.
async fn probe(
    node: String,
    i: usize,
    slowest: Arc<Mutex<Vec<Duration>>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let url = format!("{node}/healthz");
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(1), http_get(&url)).await;
        let took = started.elapsed();
        match answer {
            Ok(Ok((200, _))) => {}
            Ok(Ok((status, body))) => bail!("{url}: {status} {body}"),
            Ok(Err(e)) => bail!("{url}: {e:#}"),
            Err(_) => bail!("{url}: no answer within 1 s"),
        }
        {
            let mut slowest = slowest.lock().expect("probe lock");
            slowest[i] = slowest[i].max(took);
        }
        tokio::time::sleep(Duration::from_millis(200).saturating_sub(took)).await;
    }
    Ok(())
}

/// The sum of a labelled counter's series in a node's `/metrics`.
async fn violations(http: &str, bound: &str) -> Result<u64> {
    let (_, body) = http_get(&format!("{http}/metrics")).await?;
    let series = format!("ringfeed_client_violations_total{{bound=\"{bound}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .ok_or_else(|| anyhow!("no {series} in /metrics"))
}

/// A violation counter summed over every node.
async fn all_violations(cluster: &Cluster, bound: &str) -> Result<u64> {
    let mut sum = 0;
    for node in &cluster.nodes {
        sum += violations(&node.http, bound).await?;
    }
    Ok(sum)
}

/// Reads until the server closes; its close code, or 1006 when it only dropped.
async fn close_code<S>(read: &mut S, within: Duration) -> Result<u16>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, read.next()).await {
            Err(_) => bail!("not closed within {within:?}"),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Ok(frame.map_or(1005, |f| u16::from(f.code)))
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return Ok(1006),
        }
    }
}

/// Four connections flood masked pings for up to 3 s; each is closed with 1008.
async fn ping_flood(cluster: &Cluster) -> Result<()> {
    let n1 = &cluster.nodes[0];
    let before = all_violations(cluster, "control_flood").await?;
    let floods = (0..4).map(|i| async move {
        let key = format!("flood:{i}");
        let sub = Subscription::connect(&n1.connect_url(&key)).await?;
        let url = sub.url.clone();
        drop(sub);
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        let (mut write, mut read) = ws.split();
        let flood = flood_pings(&mut write, Duration::from_secs(3));
        let (code, ()) = tokio::join!(close_code(&mut read, Duration::from_secs(10)), flood);
        anyhow::Ok(code?)
    });
    // 1008, or a reset: the node stops reading a flooder soon after its close frame,
    // and a reset arriving before the client read that frame discards it. The count
    // below says which close it was.
    for code in futures_util::future::try_join_all(floods).await? {
        ensure!(
            matches!(code, 1008 | 1006),
            "a ping flood was closed with {code}"
        );
    }
    let after = all_violations(cluster, "control_flood").await?;
    ensure!(
        after >= before + 4,
        "control floods counted {before} → {after}"
    );
    Ok(())
}

/// A connection with a bad key floods pings while the node closes it (4400): the node
/// stops waiting for it and it ends.
async fn ping_flood_while_closing(cluster: &Cluster) -> Result<()> {
    let url = format!(
        "{}/v1/connect?key=bad%20key",
        cluster.nodes[1].http.replace("http://", "ws://")
    );
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let (mut write, mut read) = ws.split();
    let flood = flood_pings(&mut write, Duration::from_secs(3));
    let started = Instant::now();
    let (code, ()) = tokio::join!(close_code(&mut read, Duration::from_secs(10)), flood);
    let code = code?;
    ensure!(matches!(code, 4400 | 1006), "closed with {code}");
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "the closing socket was held {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Every field a caller controls is bounded: `INVALID_ARGUMENT`, naming it.
async fn unbounded_fields(cluster: &Cluster) -> Result<()> {
    let mut router = cluster.router().await?;
    let with = |f: &dyn Fn(&mut PublishRequest)| {
        let mut request = publisher::json("fields:1", &json!(1));
        f(&mut request);
        request
    };
    let refused = [
        (
            with(&|r| r.content_type = format!("text/{}", "x".repeat(2 << 20))),
            "content_type",
        ),
        (
            with(&|r| r.content_type = format!("text/{}", "x".repeat(251))),
            "content_type",
        ),
        (
            with(&|r| r.idempotency_key = "i".repeat(257)),
            "idempotency_key",
        ),
        (
            with(&|r| {
                r.expected_seq = Some(0);
                r.expected_epoch = "e".repeat(65);
            }),
            "expected_epoch",
        ),
    ];
    for (request, field) in refused {
        let status = router
            .publish(request)
            .await
            .err()
            .ok_or_else(|| anyhow!("accepted, not refused"))?;
        ensure!(
            status.code() == Code::InvalidArgument,
            "{field}: {status:?}"
        );
        ensure!(status.message().contains(field), "{field}: {status:?}");
    }
    // At the limit: accepted.
    let at_limit = with(&|r| {
        r.content_type = format!("text/{}", "x".repeat(250));
        r.data = b"plain".to_vec();
    });
    router.publish(at_limit).await?;
    Ok(())
}

/// JSON nested past 64 levels is refused at publish, from gRPC and from a WebSocket
/// client; 64 levels are accepted.
async fn deep_json(cluster: &Cluster) -> Result<()> {
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let mut router = cluster.router().await?;
    for depth in [65, 200, 5000] {
        let request = PublishRequest {
            key: "deep:1".into(),
            data: nested(depth).into_bytes(),
            ..Default::default()
        };
        let status = router
            .publish(request)
            .await
            .err()
            .ok_or_else(|| anyhow!("accepted, not refused"))?;
        ensure!(
            status.code() == Code::InvalidArgument,
            "{depth}: {status:?}"
        );
        ensure!(
            status.message().contains("deeper than 64"),
            "{depth}: {status:?}"
        );
    }
    let mut sub = Subscription::connect(&cluster.nodes[0].connect_url("deep:1")).await?;
    router
        .publish(PublishRequest {
            key: "deep:1".into(),
            data: nested(64).into_bytes(),
            ..Default::default()
        })
        .await?;
    match sub.next_within(FRAME_TIMEOUT).await? {
        Event::Frame(Frame::Update { .. }) => {}
        other => bail!("64 levels: {other:?}"),
    }
    // From the client: a nack for a payload too deep, and for one too deep to parse an
    // error frame and 4400.
    sub.send_text(&format!(
        r#"{{"type":"publish","data":{},"id":"d1"}}"#,
        nested(100)
    ))
    .await?;
    match sub.next_within(FRAME_TIMEOUT).await? {
        Event::Frame(Frame::Nack { code, .. }) => ensure!(code == "bad_payload", "{code}"),
        other => bail!("depth 100 from the client: {other:?}"),
    }
    sub.send_text(&format!(
        r#"{{"type":"publish","data":{},"id":"d2"}}"#,
        nested(1000)
    ))
    .await?;
    loop {
        match sub.next_within(FRAME_TIMEOUT).await? {
            Event::Frame(Frame::Error { code, .. }) => ensure!(code == "too_deep", "{code}"),
            Event::Closed { code, .. } => {
                ensure!(code == 4400, "closed with {code}");
                break;
            }
            other => bail!("depth 1000 from the client: {other:?}"),
        }
    }
    Ok(())
}

/// More idle raw TCP connections than the limit and its slack: health is answered
/// within a second all the same, and a WebSocket past the limit gets 503.
async fn connection_flood(cluster: &Cluster) -> Result<()> {
    let n3 = &cluster.nodes[2];
    let addr = n3.http.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS + ACCEPT_SLACK + 150 {
        idle.push(TcpStream::connect(&addr).await?);
    }
    // A client past the budget is told to come back later (checked first: the idle
    // connections hold the budget only until the handshake timeout).
    let (status, _) = http_get(&format!("{}/v1/route?key=a", n3.http)).await?;
    ensure!(status == 503, "a request past the budget answered {status}");
    for _ in 0..5 {
        let started = Instant::now();
        let (status, _) = tokio::time::timeout(
            Duration::from_secs(1),
            http_get(&format!("{}/healthz", n3.http)),
        )
        .await
        .map_err(|_| anyhow!("/healthz took over 1 s under a connection flood"))??;
        ensure!(status == 200, "/healthz answered {status}");
        let (status, _) = tokio::time::timeout(
            Duration::from_secs(1),
            http_get(&format!("{}/metrics", n3.http)),
        )
        .await
        .map_err(|_| anyhow!("/metrics took over 1 s under a connection flood"))??;
        ensure!(status == 200, "/metrics answered {status}");
        eprintln!("health under a connection flood: {:?}", started.elapsed());
    }
    drop(idle);
    Ok(())
}

/// A forged `rv` (newer than any ring, with an unknown ring id) costs at most one etcd
/// read a second, however many requests carry it.
async fn forged_ring_version(cluster: &Cluster) -> Result<()> {
    let n1 = &cluster.nodes[0];
    let before = metric(&n1.http, "ringfeed_ring_fresh_reads_total").await?;
    let started = Instant::now();
    let requests = (0..200).map(|i| {
        let url = format!("{}/v1/route?key=forged:{i}&rv=9223372036854775808", n1.http);
        async move { http_get(&url).await }
    });
    for answer in futures_util::future::join_all(requests).await {
        let (status, body) = answer?;
        ensure!(status == 200, "{status}: {body}");
    }
    let took = started.elapsed();
    let reads = metric(&n1.http, "ringfeed_ring_fresh_reads_total").await? - before;
    let allowed = took.as_secs() + 2;
    ensure!(
        reads <= allowed,
        "{reads} etcd reads for 200 forged requests in {took:?} (at most {allowed})"
    );
    eprintln!("200 forged ring versions in {took:?}: {reads} etcd reads");
    Ok(())
}

/// An idempotency key reused with another payload or content type: `ALREADY_EXISTS`;
/// with the same payload: the original seq.
async fn reused_idempotency_key(cluster: &Cluster) -> Result<()> {
    let mut router = cluster.router().await?;
    let with = |data: &str, content_type: &str| PublishRequest {
        key: "idem:1".into(),
        data: data.as_bytes().to_vec(),
        content_type: content_type.into(),
        idempotency_key: "order-7".into(),
        ..Default::default()
    };
    let first = router.publish(with("1", "")).await?.into_inner();
    let again = router.publish(with("1", "")).await?.into_inner();
    ensure!(again.seq == first.seq, "a retry got seq {}", again.seq);
    for (data, content_type) in [("2", ""), ("1", "text/plain")] {
        let status = router
            .publish(with(data, content_type))
            .await
            .err()
            .ok_or_else(|| anyhow!("accepted, not refused"))?;
        ensure!(status.code() == Code::AlreadyExists, "{status:?}");
        ensure!(status.message().contains("different payload"), "{status:?}");
    }
    Ok(())
}

/// Messages far past the request limits are refused before they are read, by the
/// router and by a node's internal service.
async fn huge_grpc_messages(cluster: &Cluster) -> Result<()> {
    let huge = vec![b'1'; 120 << 20];
    let mut router = cluster.router().await?;
    let calls = (0..2).map(|_| {
        let mut router = router.clone();
        let request = PublishRequest {
            key: "huge:1".into(),
            data: huge.clone(),
            ..Default::default()
        };
        async move { router.publish(request).await }
    });
    for answer in futures_util::future::join_all(calls).await {
        let status = answer
            .err()
            .ok_or_else(|| anyhow!("accepted, not refused"))?;
        ensure!(status.code() == Code::OutOfRange, "router: {status:?}");
        ensure!(
            status.message().contains("decoded message"),
            "router: {status:?}"
        );
    }
    let mut node = NodeClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.nodes[0].grpc))?
            .connect()
            .await?,
    );
    let status = node
        .deliver(DeliverRequest {
            items: vec![PublishRequest {
                key: "huge:1".into(),
                data: huge,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow!("accepted, not refused"))?;
    ensure!(status.code() == Code::OutOfRange, "node: {status:?}");
    ensure!(
        status.message().contains("decoded message"),
        "node: {status:?}"
    );
    // The router still serves.
    router
        .publish(publisher::json("huge:1", &json!("after")))
        .await?;
    Ok(())
}

/// The router's reflection lists the services it serves, not the nodes' internal one.
async fn reflection(cluster: &Cluster) -> Result<()> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.router_grpc()))?
            .connect()
            .await?;
    let mut client = ServerReflectionClient::new(channel);
    let ask = |request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = tokio_stream::iter(vec![ask(MessageRequest::ListServices(String::new()))]);
    let mut answers = client.server_reflection_info(requests).await?.into_inner();
    let mut services = Vec::new();
    while let Some(answer) = answers.message().await? {
        if let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response {
            services = list.service.into_iter().map(|s| s.name).collect();
        }
    }
    // The Node schema: an error, in the stream's status or as an error answer.
    let requests = tokio_stream::iter(vec![ask(MessageRequest::FileContainingSymbol(
        "ringfeed.v1.Node".into(),
    ))]);
    let mut answers = client.server_reflection_info(requests).await?.into_inner();
    let mut node_schema = None;
    loop {
        match answers.message().await {
            Ok(Some(answer)) => match answer.message_response {
                Some(MessageResponse::ErrorResponse(e)) => node_schema = Some(Err(e.error_code)),
                Some(MessageResponse::FileDescriptorResponse(_)) => node_schema = Some(Ok(())),
                _ => {}
            },
            Ok(None) => break,
            Err(status) => {
                node_schema = Some(Err(status.code() as i32));
                break;
            }
        }
    }
    ensure!(
        services.contains(&"ringfeed.v1.Router".to_owned()),
        "{services:?}"
    );
    ensure!(
        !services.iter().any(|s| s == "ringfeed.v1.Node"),
        "{services:?}"
    );
    ensure!(
        matches!(node_schema, Some(Err(_))),
        "the Node schema was answered: {node_schema:?}"
    );
    Ok(())
}

/// A client that sends the first 60 KB fragment of a message and never the rest,
/// answering pings all along, is closed with 1008 once the message timeout passes.
async fn unfinished_message(cluster: &Cluster) -> Result<()> {
    let n2 = &cluster.nodes[1];
    let before = violations(&n2.http, "message_timeout").await?;
    let sub = Subscription::connect(&n2.connect_url("unfinished:1")).await?;
    let url = sub.url.clone();
    drop(sub);
    let owner = url
        .split("/v1/")
        .next()
        .unwrap_or_default()
        .replace("ws://", "http://");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let fragment = WsFrame::message(vec![b'x'; 60_000], OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(fragment)).await?;
    let started = Instant::now();
    // Reading answers the heartbeat pings (tungstenite queues the pongs).
    let code = close_code(&mut ws, Duration::from_secs(10)).await?;
    ensure!(
        code == 1008,
        "closed with {code} after {:?}",
        started.elapsed()
    );
    let owner_node = cluster
        .nodes
        .iter()
        .find(|n| n.http == owner)
        .ok_or_else(|| anyhow!("no node at {owner}"))?;
    let counted = violations(&owner_node.http, "message_timeout").await?;
    ensure!(
        owner_node.http != n2.http || counted > before,
        "message timeouts counted {before} → {counted}"
    );
    ensure!(counted >= 1, "no message timeout counted on {owner}");
    eprintln!("unfinished message closed after {:?}", started.elapsed());
    Ok(())
}

/// What held before this suite, kept holding: malformed and oversized frames, a
/// slowloris, request smuggling, bad parameters, and the connection limit.
async fn what_held_before(cluster: &Cluster) -> Result<()> {
    let n1 = &cluster.nodes[0];
    // Malformed and oversized frames close only their sender.
    for (message, expected) in [
        (Message::text("not json"), 4400),
        (Message::binary(vec![1u8, 2, 3]), 4400),
        (Message::text("x".repeat(70 * 1024)), 4413),
    ] {
        let sub = Subscription::connect(&n1.connect_url("held:1")).await?;
        let url = sub.url.clone();
        drop(sub);
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        ws.send(message).await?;
        let code = close_code(&mut ws, FRAME_TIMEOUT).await?;
        ensure!(code == expected, "closed with {code}, not {expected}");
    }
    // Bad parameters: 400 naming them.
    for query in ["key=a&since=x", "key=a&wait=61", "key=bad%20key"] {
        let (status, body) = http_get(&format!("{}/v1/poll?{query}", n1.http)).await?;
        ensure!(status == 400, "{query}: {status} {body}");
    }
    // A slowloris: a request that never ends is dropped after the handshake timeout.
    let addr = n1.http.trim_start_matches("http://");
    let mut slow = TcpStream::connect(addr).await?;
    slow.write_all(b"GET /v1/route?key=a HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let started = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await {
            Err(_) => bail!("a slowloris was held past 10 s"),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) => {}
        }
        if slow.write_all(b"X-a: b\r\n").await.is_err() {
            break;
        }
    }
    ensure!(started.elapsed() < Duration::from_secs(10));
    // Smuggling: two lengths that disagree are a 400, and nothing behind them is
    // taken for a request.
    let mut smuggle = TcpStream::connect(addr).await?;
    smuggle
        .write_all(
            b"POST /v1/tickets HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
              Content-Length: 30\r\n\r\nabcdGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), smuggle.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        answer.starts_with("HTTP/1.1 400"),
        "smuggling: {answer:.200}"
    );
    ensure!(
        !answer.contains("\r\n\r\nok"),
        "a smuggled request was served: {answer:.400}"
    );
    // The connection limit: past it, 503 with Retry-After before any upgrade.
    let url = connect_url(&n1.http, &owned_key(cluster, &n1.id).await?, None);
    let mut held = Vec::new();
    let refused = loop {
        ensure!(
            held.len() <= MAX_CONNECTIONS,
            "{} connections held",
            held.len()
        );
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => held.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => break response,
            Err(e) => bail!("{e}"),
        }
    };
    ensure!(refused.status() == 503, "{:?}", refused.status());
    ensure!(refused.headers().contains_key("retry-after"), "{refused:?}");
    // The canary's own subscription holds one place on its node.
    ensure!(
        held.len() >= MAX_CONNECTIONS - 1,
        "refused after {}",
        held.len()
    );
    Ok(())
}

/// A key `node` owns.
async fn owned_key(cluster: &Cluster, node: &str) -> Result<String> {
    for k in 0..1000 {
        let key = format!("owned:{k}");
        if owner_of(cluster, &key).await? == node {
            return Ok(key);
        }
    }
    bail!("no key owned by {node}")
}
