//! Secure mode (`ClusterBuilder::secure`, as `scripts/cluster --secure`): TLS on every
//! listener, mutual TLS between processes, tickets and API tokens — and nothing secret
//! in any process's log.

use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use http_body_util::BodyExt;
use ringfeed_client::{Event, Frame, Subscription};
use ringfeed_cluster_tests::{
    bin_dir, http_get, http_post, tls, Cluster, SECURE_SECRET, SECURE_TOKEN,
};
use ringfeed_proto::v1::{self as pb, node_client::NodeClient, PublishRequest};
use ringfeed_router::tls::{load_identity, load_roots, Tls as ProcessTls};
use ringfeed_router::watch::Watched;
use tokio_rustls::rustls;

use super::{bounded, owner_of, FRAME_TIMEOUT};

/// A ticket for `key` from `base` (https), with every right.
async fn ticket(base: &str, key: &str) -> Result<String> {
    let body =
        format!(r#"{{"sub":"carol","key":"{key}","ttl_s":60,"publish":true,"presence":true}}"#);
    let bearer = format!("Bearer {SECURE_TOKEN}");
    let (status, answer) = http_post(
        &format!("{base}/v1/tickets"),
        &[("authorization", &bearer)],
        &body,
    )
    .await?;
    ensure!(status == 200, "ticket: {status} {answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer)?;
    Ok(answer["ticket"].as_str().context("a ticket")?.to_owned())
}

/// A publish through the router (gRPC over TLS) with the API token.
async fn publish(cluster: &Cluster, key: &str, n: u64) -> Result<u64> {
    let mut request = tonic::Request::new(PublishRequest {
        key: key.into(),
        data: format!(r#"{{"n":{n}}}"#).into_bytes(),
        ..Default::default()
    });
    let bearer = format!("Bearer {SECURE_TOKEN}").parse()?;
    request.metadata_mut().insert("authorization", bearer);
    Ok(cluster
        .router()
        .await?
        .publish(request)
        .await?
        .into_inner()
        .seq)
}

/// The next update's `n`.
async fn next_n(sub: &mut Subscription) -> Result<u64> {
    loop {
        match sub.next_within(FRAME_TIMEOUT).await? {
            Event::Frame(Frame::Update { data, .. }) => {
                return data
                    .and_then(|d| d["n"].as_u64())
                    .ok_or_else(|| anyhow!("an update without n"))
            }
            Event::Frame(_) => {}
            other => return Err(anyhow!("expected an update, got {other:?}")),
        }
    }
}

/// A client of a node's internal service presenting `identity` (`None`: no
/// certificate), trusting the cluster CA.
fn internal_client(
    dir: &std::path::Path,
    identity: Option<&str>,
    grpc: &str,
) -> Result<NodeClient<tonic::transport::Channel>> {
    let identity = match identity {
        Some(name) => Some(Watched::fixed(
            load_identity(
                &dir.join(format!("{name}.pem")),
                &dir.join(format!("{name}.key")),
            )
            .map_err(|e| anyhow!(e))?,
        )),
        None => None,
    };
    let tls = ProcessTls {
        identity,
        roots: Some(load_roots(&dir.join("ca.pem")).map_err(|e| anyhow!(e))?),
    };
    let config = tls.client().map_err(|e| anyhow!(e))?;
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?.timeout(FRAME_TIMEOUT);
    Ok(NodeClient::new(ringfeed_router::tls::channel(
        endpoint,
        grpc,
        config.as_ref(),
    )))
}

/// Every internal RPC, called once: the error of each (or "ok").
async fn call_every_rpc(
    mut client: NodeClient<tonic::transport::Channel>,
    from: &str,
) -> Vec<(String, Result<(), tonic::Status>)> {
    let mut out = Vec::new();
    let ok = |r: Result<(), tonic::Status>| r;
    out.push((
        "Status".into(),
        ok(client
            .status(pb::StatusRequest { from: from.into() })
            .await
            .map(|_| ())),
    ));
    out.push((
        "Deliver".into(),
        ok(client
            .deliver(pb::DeliverRequest::default())
            .await
            .map(|_| ())),
    ));
    out.push((
        "KeyPresence".into(),
        ok(client
            .key_presence(pb::KeyPresenceRequest {
                ring: None,
                key: "k".into(),
            })
            .await
            .map(|_| ())),
    ));
    out.push((
        "Replicate".into(),
        ok(client
            .replicate(pb::ReplicateRequest {
                from: from.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())),
    ));
    out.push((
        "Handoff".into(),
        ok(client
            .handoff(pb::HandoffRequest {
                from: from.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())),
    ));
    out.push((
        "Drain".into(),
        ok(client
            .drain(pb::DrainRequest { node: "n1".into() })
            .await
            .map(|_| ())),
    ));
    // The streams: refused at the call or at their first answer.
    let delivered = match client
        .deliver_stream(tokio_stream::iter(vec![pb::DeliverRequest::default()]))
        .await
    {
        Ok(stream) => stream.into_inner().message().await.map(|_| ()),
        Err(status) => Err(status),
    };
    out.push(("DeliverStream".into(), delivered));
    let replicated = match client
        .replicate_stream(tokio_stream::iter(vec![pb::ReplicateRequest {
            from: from.into(),
            ..Default::default()
        }]))
        .await
    {
        Ok(stream) => stream.into_inner().message().await.map(|_| ()),
        Err(status) => Err(status),
    };
    out.push(("ReplicateStream".into(), replicated));
    out
}

#[tokio::test]
async fn a_secure_cluster_serves_wss_h2_sse_and_grpc_over_tls_and_refuses_peers_without_credentials(
) {
    bounded(async {
        // At debug, so that the log check below sees everything a process might say.
        let mut cluster = Cluster::builder()
            .nodes(3)
            .secure()
            .log("debug")
            .start()
            .await?;
        let dir = cluster.tls_dir().context("a secure cluster")?.to_path_buf();
        let ca = tls().context("the cluster's CA")?;
        let key = "user:secure";
        let owner = owner_of(&cluster, key).await?;
        let base = cluster.node(&owner).http.clone();
        ensure!(base.starts_with("https://"), "the node advertises {base}");
        let mut secrets_seen = vec![SECURE_SECRET.to_owned(), SECURE_TOKEN.to_owned()];

        // wss://, with a ticket; updates published through the router over TLS.
        let ticket1 = ticket(&base, key).await?;
        secrets_seen.push(ticket1.clone());
        // Through another node first: the redirect is followed over wss too.
        let other = cluster
            .nodes
            .iter()
            .find(|n| n.id != owner)
            .context("another node")?;
        let url = format!("{}&ticket={ticket1}&presence=1", other.connect_url(key));
        ensure!(url.starts_with("wss://"), "{url}");
        let mut sub = Subscription::connect_with(&url, Some(&ca)).await?;
        ensure!(sub.redirects == 1, "expected a redirect");
        if let Frame::Welcome {
            resume: Some(resume),
            ..
        } = &sub.welcome
        {
            secrets_seen.push(resume.clone());
        } else {
            return Err(anyhow!("no resume token in {:?}", sub.welcome));
        }
        publish(&cluster, key, 1).await?;
        ensure!(next_n(&mut sub).await? == 1, "the update over wss");
        // A plain ws:// attempt at a TLS listener gets nothing.
        let plain = format!(
            "ws://{}/v1/connect?key={key}",
            base.trim_start_matches("https://")
        );
        ensure!(
            Subscription::connect(&plain).await.is_err(),
            "plain ws to a TLS node"
        );

        // SSE over HTTP/2 (ALPN h2): many streams on one connection.
        let ticket2 = ticket(&base, key).await?;
        secrets_seen.push(ticket2.clone());
        let mut h2 = (*ca.config()).clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        let addr = base.trim_start_matches("https://").to_owned();
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(h2))
            .connect(name, tcp)
            .await?;
        ensure!(
            stream.get_ref().1.alpn_protocol() == Some(b"h2"),
            "ALPN chose HTTP/1.1"
        );
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(conn);
        let mut bodies = Vec::new();
        for _ in 0..8 {
            let request = http::Request::get(format!("{base}/v1/sse?key={key}&ticket={ticket2}"))
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
            let response = sender.send_request(request).await?;
            ensure!(
                response.status() == 200,
                "SSE over h2: {}",
                response.status()
            );
            ensure!(response.version() == http::Version::HTTP_2, "not HTTP/2");
            bodies.push(response.into_body());
        }
        for body in &mut bodies {
            let first = tokio::time::timeout(FRAME_TIMEOUT, body.frame())
                .await?
                .context("a first chunk")??;
            let text = String::from_utf8_lossy(first.data_ref().context("data")?).into_owned();
            ensure!(text.contains(r#""type":"welcome""#), "SSE over h2: {text}");
        }

        // The internal service: nothing without a certificate the CA signed.
        let grpc = cluster.node(&owner).grpc.clone();
        let plain = NodeClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
                .timeout(FRAME_TIMEOUT)
                .connect_lazy(),
        );
        for (rpc, result) in call_every_rpc(plain, "n2").await {
            ensure!(result.is_err(), "plain {rpc} was answered");
        }
        for (rpc, result) in call_every_rpc(internal_client(&dir, None, &grpc)?, "n2").await {
            ensure!(
                result.is_err(),
                "{rpc} without a client certificate was answered"
            );
        }
        // With a certificate: a caller is still only who its certificate says.
        let as_client = internal_client(&dir, Some("client"), &grpc)?;
        for (rpc, result) in call_every_rpc(as_client, "n2").await {
            let code = result.err().map(|s| s.code());
            match rpc.as_str() {
                "Replicate" | "ReplicateStream" | "Handoff" => ensure!(
                    code == Some(tonic::Code::PermissionDenied),
                    "{rpc} claiming n2 with the client's certificate: {code:?}"
                ),
                "Drain" => ensure!(
                    code == Some(tonic::Code::Unauthenticated),
                    "Drain without an API token: {code:?}"
                ),
                _ => {}
            }
        }
        // A node's own certificate, but a forged hand-off: text that is no update frame.
        let peer = cluster
            .nodes
            .iter()
            .find(|n| n.id != owner)
            .context("a peer")?
            .id
            .clone();
        let mut as_peer = internal_client(&dir, Some(&format!("node-{peer}")), &grpc)?;
        let forged = pb::HandoffRequest {
            from: peer.clone(),
            snapshots: vec![pb::ReplicaSnapshot {
                key: key.into(),
                epoch: "forged".into(),
                seq: 99,
                entries: vec![pb::ReplicaEntry {
                    key: key.into(),
                    epoch: "forged".into(),
                    seq: 99,
                    frame: b"arbitrary text served as an update".to_vec(),
                    idempotency_key: String::new(),
                }],
                idempotency: vec![],
                doc: Vec::new(),
            }],
            ..Default::default()
        };
        let reply = as_peer.handoff(forged).await?.into_inner();
        ensure!(
            reply.refused == [key.to_owned()],
            "a forged hand-off was stored: {reply:?}"
        );
        publish(&cluster, key, 2).await?;
        ensure!(
            next_n(&mut sub).await? == 2,
            "the key's history after the forgery"
        );

        // A certificate rotated on a live node: new handshakes see the new one, and the
        // open connection keeps going.
        let before = std::fs::read(dir.join(format!("node-{owner}.pem")))?;
        let made = std::process::Command::new(bin_dir().join("ringfeed-node"))
            .args(["certs", "--out"])
            .arg(&dir)
            .args(["--node", &owner])
            .output()?;
        ensure!(made.status.success(), "reissuing: {made:?}");
        let after = std::fs::read(dir.join(format!("node-{owner}.pem")))?;
        ensure!(before != after, "the certificate did not change");
        let presented = |addr: String| {
            let ca = ca.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
                let tls = tokio_rustls::TlsConnector::from(ca.config())
                    .connect(name, tcp)
                    .await?;
                let certs = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .context("a certificate")?;
                Ok::<_, anyhow::Error>(certs[0].as_ref().to_vec())
            }
        };
        use rustls::pki_types::pem::PemObject;
        let first_der = rustls::pki_types::CertificateDer::from_pem_slice(&after)
            .map_err(|e| anyhow!("{e}"))?
            .as_ref()
            .to_vec();
        ringfeed_cluster_tests::eventually(
            "the node to present its new certificate",
            FRAME_TIMEOUT,
            || {
                let (addr, want) = (addr.clone(), first_der.clone());
                async move { Ok((presented(addr).await? == want).then_some(())) }
            },
        )
        .await;
        publish(&cluster, key, 3).await?;
        ensure!(
            next_n(&mut sub).await? == 3,
            "the open wss connection after the rotation"
        );
        let (status, _) = http_get(&format!("{base}/healthz")).await?;
        ensure!(status == 200, "https /healthz after rotation: {status}");

        // Nothing secret in any log: not the secrets, tokens, tickets or resume tokens.
        sub.close().await;
        drop(bodies);
        for n in &mut cluster.nodes {
            n.terminate(FRAME_TIMEOUT).await.ok();
        }
        let logs = cluster.logs_full();
        ensure!(logs.contains("DEBUG"), "the processes did not log at debug");
        for secret in &secrets_seen {
            ensure!(
                !logs.contains(secret.as_str()),
                "a secret in the logs: {}…",
                &secret[..12]
            );
        }
        Ok(())
    })
    .await
}

/// QUIC in secure mode: the node's certificate is checked against the cluster CA,
/// the owner checks the ticket in `hello` (4401 without one), and `welcome` hands
/// back a resume token that admits the client again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_clients_present_tickets_and_check_the_cluster_ca() {
    use ringfeed_client::quic::{Hello, QuicSubscription, Trust};
    bounded(async {
        let cluster = Cluster::builder().nodes(2).secure().start().await?;
        let ca = cluster.ca().context("a CA")?;
        let key = "secure:quic";
        let owner = owner_of(&cluster, key).await?;
        let node = cluster.node(&owner);
        let addr = node.quic.clone().context("QUIC")?;
        let trust = Trust::Ca(ca);
        let refused = QuicSubscription::connect(
            &addr,
            &Hello {
                key: key.into(),
                ..Hello::default()
            },
            &trust,
        )
        .await;
        match refused {
            Err(ringfeed_client::ClientError::Closed { code: 4401, .. }) => {}
            Err(e) => anyhow::bail!("without a ticket: {e}"),
            Ok(_) => anyhow::bail!("admitted without a ticket"),
        }
        let ticket = ticket(&node.http, key).await?;
        let hello = Hello {
            key: key.into(),
            ticket: Some(ticket),
            ..Hello::default()
        };
        let mut sub = QuicSubscription::connect(&addr, &hello, &trust).await?;
        let Frame::Welcome {
            resume: Some(resume),
            ..
        } = sub.welcome.clone()
        else {
            anyhow::bail!("no resume token in {:?}", sub.welcome);
        };
        publish(&cluster, key, 1).await?;
        match sub.next_within(FRAME_TIMEOUT).await? {
            Event::Frame(Frame::Update { data, .. }) => {
                ensure!(data == Some(serde_json::json!({"n": 1})), "{data:?}")
            }
            other => anyhow::bail!("expected an update, got {other:?}"),
        }
        // The resume token admits it again, in place of the ticket.
        let again = QuicSubscription::connect(
            &addr,
            &Hello {
                key: key.into(),
                resume: Some(resume),
                since: Some(0),
                ..Hello::default()
            },
            &trust,
        )
        .await?;
        ensure!(again.node() == owner);
        Ok(())
    })
    .await
}
