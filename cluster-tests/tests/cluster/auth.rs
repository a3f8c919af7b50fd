//! Authentication on (`--auth`): every client transport needs a ticket for its key,
//! `POST /v1/tickets` needs an API token, and each refusal is counted by reason.

use anyhow::{anyhow, ensure, Context, Result};
use ringfeed_client::{ClientError, Event, Frame, Subscription};
use ringfeed_cluster_tests::{
    bin_dir, http_get, http_post, http_request, tls, Cluster, SECURE_SECRET as SECRET,
    SECURE_TOKEN as TOKEN,
};

use ringfeed_node::protocol::ticket::{Claims, Kind, Signer};
use ringfeed_proto::v1::PublishRequest;

use super::{bounded, owner_of, FRAME_TIMEOUT};

const OTHER_CLUSTERS_SECRET: &str = "another-clusters-secret-of-at-least-32-bytes";

/// Subscribes at `url` (`wss://`: these clusters are secure).
async fn open(url: &str) -> Result<Subscription, ClientError> {
    Subscription::connect_with(url, tls().as_ref()).await
}

/// A ticket from `base`'s `POST /v1/tickets`.
async fn ticket(base: &str, key: &str, rights: &str) -> Result<String> {
    let body = format!(r#"{{"sub":"alice","key":"{key}","ttl_s":60{rights}}}"#);
    let bearer = format!("Bearer {TOKEN}");
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

/// Connecting to `url` is refused with close 4401.
async fn refused_4401(url: &str, what: &str) -> Result<()> {
    match open(url).await {
        Err(ClientError::Closed { code: 4401, .. }) => Ok(()),
        Err(e) => Err(anyhow!("{what}: expected close 4401, got {e}")),
        Ok(_) => Err(anyhow!("{what}: expected close 4401, got a welcome")),
    }
}

#[tokio::test]
async fn with_auth_on_every_transport_needs_a_ticket_for_its_key() {
    bounded(async {
        // Secure mode: TLS everywhere, tickets, API tokens. A second API token is
        // added to the tokens file, as a rotation would.
        let cluster = Cluster::builder().nodes(2).secure().start().await?;
        let dir = cluster.tls_dir().context("a secure cluster")?.to_path_buf();
        let tokens = dir.join("tokens").display().to_string();
        std::fs::write(&tokens, format!("{TOKEN}\nan-older-token-still-accepted\n"))?;
        cluster.converged().await;
        let key = "user:42";
        let owner = owner_of(&cluster, key).await?;
        let base = cluster.node(&owner).http.clone();

        // API tokens: missing, wrong, and each accepted one.
        let body = format!(r#"{{"sub":"alice","key":"{key}","ttl_s":60}}"#);
        let tickets = format!("{base}/v1/tickets");
        ensure!(http_post(&tickets, &[], &body).await?.0 == 401, "no token");
        let wrong = [("authorization", "Bearer not-a-token")];
        ensure!(
            http_post(&tickets, &wrong, &body).await?.0 == 401,
            "wrong token"
        );
        let older = [("authorization", "Bearer an-older-token-still-accepted")];
        ringfeed_cluster_tests::eventually("the tokens file to be read again", FRAME_TIMEOUT, || {
            let (tickets, body) = (tickets.clone(), body.clone());
            async move { Ok((http_post(&tickets, &older, &body).await?.0 == 200).then_some(())) }
        })
        .await;
        let too_long = format!(r#"{{"sub":"alice","key":"{key}","ttl_s":999999}}"#);
        let bearer = format!("Bearer {TOKEN}");
        let ok = [("authorization", bearer.as_str())];
        ensure!(
            http_post(&tickets, &ok, &too_long).await?.0 == 400,
            "ttl past the maximum"
        );

        let subscribe_only = ticket(&base, key, "").await?;
        let with_presence = ticket(&base, key, r#","presence":true,"publish":true"#).await?;
        let other_key = ticket(&base, "user:43", "").await?;
        let mut forged = subscribe_only.clone().into_bytes();
        let middle = forged.len() / 2;
        forged[middle] = if forged[middle] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged)?;

        // WebSocket: every bad ticket is close 4401.
        let connect = |ticket: &str, extra: &str| {
            format!(
                "{}&ticket={ticket}{extra}",
                cluster.node(&owner).connect_url(key)
            )
        };
        let bare = cluster.node(&owner).connect_url(key);
        refused_4401(&bare, "no ticket").await?;
        refused_4401(&connect(&forged, ""), "a forged ticket").await?;
        refused_4401(&connect(&other_key, ""), "another key's ticket").await?;
        refused_4401(
            &connect(&subscribe_only, "&presence=1"),
            "presence without the right",
        )
        .await?;
        // A ticket signed with another cluster's secret, and one of ours that expired.
        let claims = |exp: u64| Claims {
            sub: "mallory".into(),
            key: key.into(),
            exp,
            publish: true,
            presence: true,
            kind: Kind::Ticket,
            nonce: String::new(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let foreign = Signer::new(&[OTHER_CLUSTERS_SECRET])?.sign(&claims(now + 60));
        let expired = Signer::new(&[SECRET])?.sign(&claims(now - 1));
        refused_4401(&connect(&expired, ""), "an expired ticket").await?;
        refused_4401(&connect(&foreign, ""), "another cluster's ticket").await?;

        // A good ticket subscribes; its subject is the presence id; without the
        // publish right a client publish is refused.
        let mut sub = open(&connect(&subscribe_only, "")).await?;
        sub.publish(&serde_json::json!({"x": 1}), "p1").await?;
        match sub.next_within(FRAME_TIMEOUT).await? {
            Event::Frame(Frame::Nack { code, .. }) => ensure!(code == "forbidden", "nack {code}"),
            other => return Err(anyhow!("expected a nack, got {other:?}")),
        }
        let mut present = open(&connect(&with_presence, "&presence=1")).await?;
        present.publish(&serde_json::json!({"x": 2}), "p2").await?;
        let mut acked = false;
        for _ in 0..4 {
            match present.next_within(FRAME_TIMEOUT).await? {
                Event::Frame(Frame::Ack { .. }) => {
                    acked = true;
                    break;
                }
                Event::Frame(Frame::Presence { .. }) | Event::Frame(Frame::Update { .. }) => {}
                other => return Err(anyhow!("expected an ack, got {other:?}")),
            }
        }
        ensure!(acked, "a publish with the right was not acknowledged");

        // SSE and long polling: 401 without a valid ticket, served with one.
        let sse = format!("{base}/v1/sse?key={key}");
        ensure!(http_get(&sse).await?.0 == 401, "SSE without a ticket");
        ensure!(
            http_get(&format!("{sse}&ticket={forged}")).await?.0 == 401,
            "SSE forged"
        );
        let poll = format!("{base}/v1/poll?key={key}&since=0&wait=0");
        ensure!(http_get(&poll).await?.0 == 401, "poll without a ticket");
        let (status, body) = http_get(&format!("{poll}&ticket={subscribe_only}")).await?;
        ensure!(status == 200, "poll with a ticket: {status} {body}");
        let (status, _) = http_request(&format!("{poll}&ticket={other_key}"), &[]).await?;
        ensure!(status == 401, "poll with another key's ticket");

        // Each refusal is counted by reason.
        let (_, metrics) = http_get(&format!("{base}/metrics")).await?;
        for reason in ["missing", "forged", "expired", "other_key", "no_presence"] {
            let line = format!("ringfeed_tickets_refused_total{{reason=\"{reason}\"}} ");
            let count: u64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&line))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            ensure!(count > 0, "no refusal counted for {reason}");
        }
        ensure!(
            !metrics.contains("ringfeed_api_tokens_refused_total 0"),
            "API token refusals not counted"
        );

        // The router takes a publish only with an API token.
        router_needs_a_token(&cluster, key).await?;

        // Authentication on without its secrets is a configuration error, never an
        // open node.
        let status = std::process::Command::new(bin_dir().join("ringfeed-node"))
            .args(["--id", "x", "--auth", "--api-tokens-file", &tokens])
            .status()?;
        ensure!(
            status.code() == Some(64),
            "--auth without secrets exited with {status}"
        );
        let weak = dir.join("weak");
        std::fs::write(&weak, "short\n")?;
        let status = std::process::Command::new(bin_dir().join("ringfeed-node"))
            .args(["--id", "x", "--auth", "--api-tokens-file", &tokens])
            .args(["--ticket-secrets-file", &weak.display().to_string()])
            .status()?;
        ensure!(
            status.code() == Some(64),
            "a weak secret exited with {status}"
        );
        Ok(())
    })
    .await
}

/// A publish through the router: UNAUTHENTICATED without an API token or with a wrong
/// one, delivered with an accepted one.
async fn router_needs_a_token(cluster: &Cluster, key: &str) -> Result<()> {
    let publish = |token: Option<&str>| {
        let mut request = tonic::Request::new(PublishRequest {
            key: key.into(),
            data: br#"{"via":"router"}"#.to_vec(),
            ..Default::default()
        });
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().expect("ascii");
            request.metadata_mut().insert("authorization", value);
        }
        request
    };
    let mut router = cluster.router().await?;
    for (token, what) in [(None, "no token"), (Some("not-a-token"), "a wrong token")] {
        match router.publish(publish(token)).await {
            Err(status) if status.code() == tonic::Code::Unauthenticated => {}
            other => return Err(anyhow!("router with {what}: {other:?}")),
        }
    }
    let reply = router.publish(publish(Some(TOKEN))).await?.into_inner();
    ensure!(reply.seq > 0, "a publish with a token: {reply:?}");
    Ok(())
}

/// A GET of `url` (`https://`) from the local address `source`: status, and the whole
/// answer.
async fn get_from(source: &str, url: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("https://").context("https")?;
    let (host, path) = rest.split_once('/').context("a path")?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse()?)?;
    let tcp = socket.connect(host.parse()?).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let ca = tls().context("the cluster's CA")?;
    let mut stream = tokio_rustls::TlsConnector::from(ca.config())
        .connect(name, tcp)
        .await?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify: what arrived is the answer.
    let _ = tokio::time::timeout(FRAME_TIMEOUT, stream.read_to_end(&mut raw)).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("a status")?;
    Ok((status, text))
}

/// The `resume` token of a subscription's welcome.
fn resume_of(sub: &Subscription) -> Result<String> {
    match &sub.welcome {
        Frame::Welcome {
            resume: Some(resume),
            ..
        } => Ok(resume.clone()),
        other => Err(anyhow!("no resume token in {other:?}")),
    }
}

#[tokio::test]
async fn single_use_tickets_resume_tokens_through_drain_and_failover_rotation_and_throttling() {
    bounded(async {
        let mut cluster = Cluster::builder()
            .nodes(3)
            .secure()
            .node_args(&[
                "--single-use-tickets",
                "--auth-failure-burst",
                "5",
                "--auth-failure-rate",
                "0.5",
            ])
            .start()
            .await?;
        let dir = cluster.tls_dir().context("a secure cluster")?.to_path_buf();
        let tokens = dir.join("tokens");
        let token_file = dir.join("token");
        cluster.converged().await;
        let key = "doc:resume";
        let owner = owner_of(&cluster, key).await?;
        let base = cluster.node(&owner).http.clone();

        // A single-use ticket admits once; the welcome's resume token admits again.
        let once = ticket(&base, key, "").await?;
        let url = format!("{}&ticket={once}", cluster.node(&owner).connect_url(key));
        let mut sub = open(&url).await?;
        let resume = resume_of(&sub)?;
        ensure!(
            !resume.contains(&once),
            "the resume token is not the ticket"
        );
        refused_4401(&url, "a single-use ticket used twice").await?;
        let resumed = format!("{}&resume={resume}", cluster.node(&owner).connect_url(key));
        open(&resumed).await?.close().await;
        // Non-owners only redirect: a fresh single-use ticket presented to another
        // node first is still good at the owner.
        let other = cluster
            .nodes
            .iter()
            .map(|n| n.id.clone())
            .find(|id| *id != owner)
            .context("another node")?;
        let fresh = ticket(&base, key, "").await?;
        let via_other = format!("{}&ticket={fresh}", cluster.node(&other).connect_url(key));
        let redirected = open(&via_other).await?;
        ensure!(redirected.redirects == 1, "expected one redirect");
        redirected.close().await;

        // Drain is an operator action: refused without the API token…
        let refused = cluster.drain_command(&owner).await?;
        ensure!(
            !refused.status.success(),
            "a drain without a token succeeded"
        );
        ensure!(
            String::from_utf8_lossy(&refused.stderr).contains("API token"),
            "the refusal does not say why: {}",
            String::from_utf8_lossy(&refused.stderr)
        );
        // …done with it; the client it moves is sent its resume token, not its ticket.
        let token_arg = token_file.display().to_string();
        let drain = tokio::spawn({
            let args = ["--api-token-file".to_owned(), token_arg];
            let cluster_name = cluster.name.clone();
            let etcd = cluster.etcd.endpoint.clone();
            let owner = owner.clone();
            let secure = cluster.cli_args();
            async move {
                tokio::process::Command::new(bin_dir().join("ringfeed-node"))
                    .args(["drain", "--id", &owner, "--cluster", &cluster_name])
                    .args(["--etcd", &etcd, "--wait-secs", "30"])
                    .args(&secure)
                    .args(&args)
                    .kill_on_drop(true)
                    .output()
                    .await
            }
        });
        let moved_to = loop {
            match sub.next_within(FRAME_TIMEOUT).await? {
                Event::Frame(Frame::Redirect { url, .. }) => break url,
                Event::Frame(_) => {}
                other => return Err(anyhow!("expected a redirect, got {other:?}")),
            }
        };
        ensure!(
            moved_to.contains("resume=") && !moved_to.contains("ticket="),
            "the redirect carries {moved_to}"
        );
        let output = drain.await??;
        ensure!(
            output.status.success(),
            "drain with a token: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut sub = open(&moved_to).await?;
        let new_owner = match &sub.welcome {
            Frame::Welcome { node, .. } => node.clone(),
            _ => unreachable!(),
        };
        ensure!(new_owner != owner, "still on the drained node");
        let resume = resume_of(&sub)?;

        // SIGKILL the new owner: the resume token gets the client back, through any
        // surviving node, once the key has failed over.
        cluster.node_mut(&new_owner).kill().await;
        let survivor = cluster
            .nodes
            .iter()
            .find(|n| n.id != owner && n.id != new_owner)
            .context("a survivor")?
            .connect_url(key);
        let back = format!("{survivor}&resume={resume}");
        ringfeed_cluster_tests::eventually("the key to fail over", FRAME_TIMEOUT * 6, || {
            let back = back.clone();
            async move { Ok(Some(open(&back).await?)) }
        })
        .await
        .close()
        .await;
        let _ = sub.next_within(std::time::Duration::from_millis(10)).await;

        // API token rotation, without a restart: old and new both work, then the old
        // one is refused once it is removed from the file.
        let survivor_base = cluster
            .nodes
            .iter()
            .find(|n| n.id != owner && n.id != new_owner)
            .context("a survivor")?
            .http
            .clone();
        let tickets_url = format!("{survivor_base}/v1/tickets");
        let body = format!(r#"{{"sub":"bob","key":"{key}","ttl_s":30}}"#);
        let with = |t: &'static str| [("authorization", t)];
        std::fs::write(&tokens, format!("new-token-after-rotation\n{TOKEN}\n"))?;
        ringfeed_cluster_tests::eventually("the new token", FRAME_TIMEOUT, || {
            let (u, b) = (tickets_url.clone(), body.clone());
            async move {
                let new = http_post(&u, &with("Bearer new-token-after-rotation"), &b).await?;
                Ok(Some(new).filter(|(s, _)| *s == 200))
            }
        })
        .await;
        let old_bearer = format!("Bearer {TOKEN}");
        ensure!(
            http_post(&tickets_url, &[("authorization", &old_bearer)], &body)
                .await?
                .0
                == 200,
            "the old token during rotation"
        );
        std::fs::write(&tokens, "new-token-after-rotation\n")?;
        ringfeed_cluster_tests::eventually("the old token refused", FRAME_TIMEOUT, || {
            let (u, b, old) = (tickets_url.clone(), body.clone(), old_bearer.clone());
            async move {
                let answer = http_post(&u, &[("authorization", &old)], &b).await?;
                Ok(Some(answer).filter(|(s, _)| *s == 401))
            }
        })
        .await;

        // Failed authentications from one address: a burst, then 429 with a delay;
        // another address is not affected.
        let poll = format!("{survivor_base}/v1/poll?key={key}&since=0&wait=0&ticket=nonsense");
        let mut statuses = Vec::new();
        for _ in 0..8 {
            statuses.push(get_from("127.0.0.9", &poll).await?);
        }
        ensure!(
            statuses[..3].iter().all(|(s, _)| *s == 401),
            "first failures: {:?}",
            statuses.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        let (status, text) = statuses.last().context("a status")?;
        ensure!(
            *status == 429 && text.to_ascii_lowercase().contains("retry-after:"),
            "past the burst: {status} {text}"
        );
        let (status, _) = get_from("127.0.0.10", &poll).await?;
        ensure!(status == 401, "another address: {status}");
        let (_, metrics) = http_get(&format!("{survivor_base}/metrics")).await?;
        ensure!(
            !metrics.contains("ringfeed_auth_throttled_total 0"),
            "throttling not counted"
        );
        Ok(())
    })
    .await
}

/// Opens `/v1/doc/{name}` at `url` (`wss://`), answering the HTTP status of a refused
/// upgrade, or the first message (the server's sync step 1) of an accepted one.
async fn open_doc(url: &str) -> Result<Result<Vec<u8>, u16>> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Error, Message};
    let tls = tls().context("the cluster CA")?;
    let connector = tokio_tungstenite::Connector::Rustls(tls.config());
    match tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector)).await
    {
        Ok((mut ws, _)) => {
            let first = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
                .await?
                .context("the stream ended")??;
            let Message::Binary(data) = first else {
                return Err(anyhow!("expected a binary message, got {first:?}"));
            };
            Ok(Ok(data.to_vec()))
        }
        Err(Error::Http(response)) => Ok(Err(response.status().as_u16())),
        Err(e) => Err(anyhow!("{url}: {e}")),
    }
}

#[tokio::test]
async fn a_document_editor_needs_a_ticket_on_the_owner_and_through_a_node_that_relays_over_tls() {
    bounded(async {
        let cluster = Cluster::builder().nodes(2).secure().start().await?;
        let key = "doc:secret-plans";
        let owner = owner_of(&cluster, key).await?;
        let base = cluster.node(&owner).http.clone();
        let other = cluster
            .nodes
            .iter()
            .find(|n| n.id != owner)
            .context("another node")?
            .http
            .clone();
        let wss = |http: &str| http.replacen("https://", "wss://", 1);
        for node in [&base, &other] {
            // No ticket, and a ticket for another key: 401, from the owner (relayed).
            let url = format!("{}/v1/doc/secret-plans", wss(node));
            ensure!(open_doc(&url).await? == Err(401), "{url} without a ticket");
            let wrong = ticket(&base, "doc:other", "").await?;
            let url = format!("{}/v1/doc/secret-plans?ticket={wrong}", wss(node));
            ensure!(
                open_doc(&url).await? == Err(401),
                "{url} with another key's ticket"
            );
            // A ticket for the document: the owner's sync step 1 (message 0, sync 0).
            let right = ticket(&base, key, "").await?;
            let url = format!("{}/v1/doc/secret-plans?ticket={right}", wss(node));
            let first = open_doc(&url)
                .await?
                .map_err(|status| anyhow!("{url}: {status}"))?;
            ensure!(first.starts_with(&[0, 0]), "{url}: first message {first:?}");
        }
        Ok(())
    })
    .await
}
