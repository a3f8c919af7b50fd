//! The browser client (`GET /client.js`) in headless Chromium: a page that follows a
//! key through a node that does not own it receives every update once, in order,
//! while the owner is drained and then the next owner is SIGKILLed (a ledger of every
//! acknowledged update), and publishes from the page; with WebSocket blocked, it falls
//! back to Server-Sent Events; in a secure cluster with single-use tickets, it
//! subscribes with a ticket, gets its presence list, and comes back after a drain with
//! its resume token.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use ringfeed_client::routing::RingView;
use ringfeed_cluster_tests::{connect_router, http_get, Cluster};
use ringfeed_proto::v1::{PresenceRequest, PublishRequest};
use serde_json::{json, Value};

use super::{bounded, numbers, owned_by, with_token};

const PAGE: &str = include_str!("../../browser/client.html");

fn escape(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Starts the driver on the page for `key` from `node`; it ends once `n = last` arrived,
/// then (with `publish`) publishes from the page. With `tls` (a secure cluster's
/// certificates) Chromium trusts the nodes' keys.
fn drive(
    page: &str,
    node: &str,
    key: &str,
    last: u64,
    extra: &[&str],
    publish: bool,
    tls: Option<&std::path::Path>,
) -> Result<tokio::process::Child> {
    let url = format!(
        "{page}/?node={}&key={}{}",
        escape(node),
        escape(key),
        extra.concat()
    );
    let mut command = tokio::process::Command::new("node");
    command
        .arg("client.mjs")
        .args([url.as_str(), &last.to_string(), "90000"])
        .args(publish.then_some("publish"))
        .current_dir(ringfeed_cluster_tests::browser_dir())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = tls {
        command.env("TLS_DIR", dir);
    }
    command.spawn().map_err(|e| {
        anyhow!("cannot run node (scripts/test installs Node.js packages and Chromium): {e}")
    })
}

/// What the driver says of the page once it ended (bounded); it must have succeeded.
async fn finish(driver: tokio::process::Child) -> Result<Value> {
    let out = tokio::time::timeout(Duration::from_secs(100), driver.wait_with_output())
        .await
        .context("the driver did not finish")??;
    let state: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("driver said {}", String::from_utf8_lossy(&out.stdout)))?;
    ensure!(out.status.success(), "driver failed: {state}");
    Ok(state)
}

/// Waits until the page has subscribed (the key's presence lists it).
async fn subscribed(cluster: &Cluster, key: &str) -> Result<()> {
    let router = cluster.router().await?;
    ringfeed_cluster_tests::eventually("the page to subscribe", Duration::from_secs(30), || {
        let mut router = router.clone();
        let key = key.to_owned();
        async move {
            let presence = router.presence(PresenceRequest { key }).await?.into_inner();
            Ok((!presence.members.is_empty()).then_some(()))
        }
    })
    .await;
    Ok(())
}

/// Publishes `n` until it is acknowledged (the same idempotency key each time).
async fn publish_acked(router: &str, key: &str, n: u64) -> Result<()> {
    let mut client = connect_router(router).await?;
    for _ in 0..20 {
        let request = PublishRequest {
            idempotency_key: format!("page-{n}"),
            ..ringfeed_client::publisher::json(key, &json!({"n": n}))
        };
        if client.publish(request).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(anyhow!("update {n} was never acknowledged"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_with_client_js_misses_nothing_across_a_drain_and_a_kill_and_publishes() {
    bounded(async {
        const LAST: u64 = 150;
        let mut cluster = Cluster::builder().nodes(3).lease_ttl(2).start().await?;
        // The module is served with its declarations, to any origin.
        let (status, js) = http_get(&format!("{}/client.js", cluster.nodes[0].http)).await?;
        ensure!(
            status == 200 && js.contains("export function subscribe"),
            "/client.js {status}"
        );
        let (status, dts) = http_get(&format!("{}/client.d.ts", cluster.nodes[0].http)).await?;
        ensure!(
            status == 200 && dts.contains("export function subscribe"),
            "/client.d.ts {status}"
        );

        let ring = RingView::fetch(&cluster.nodes[0].http, None).await?;
        let key = owned_by(&ring, "n2", "page");
        let page = ringfeed_cluster_tests::serve_page(PAGE).await?;
        let driver = drive(&page, &cluster.node("n1").http, &key, LAST, &[], true, None)?;
        subscribed(&cluster, &key).await?;
        let router = cluster.router_grpc();
        for n in 1..=LAST {
            publish_acked(&router, &key, n).await?;
            if n == LAST / 3 {
                // The owner drains (its clients are redirected).
                cluster
                    .node_mut("n2")
                    .terminate(Duration::from_secs(20))
                    .await?;
            }
            if n == 2 * LAST / 3 {
                // Whoever owns it now dies.
                let owner = RingView::fetch(&cluster.node("n1").http, None)
                    .await?
                    .owner(&key)
                    .context("an owner")?
                    .id
                    .0
                    .clone();
                cluster.node_mut(&owner).kill().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let state = finish(driver).await?;
        let ns = numbers(&state, "ns");
        ensure!(
            ns == (1..=LAST).collect::<Vec<_>>(),
            "the page received {ns:?}"
        );
        let seqs = numbers(&state, "seqs");
        ensure!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "seqs with a gap: {seqs:?}"
        );
        ensure!(
            state["published"].as_u64().is_some_and(|s| s > LAST),
            "publish from the page: {state}"
        );
        ensure!(state["resets"] == 0, "{state}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_websocket_blocked_the_page_falls_back_to_server_sent_events() {
    bounded(async {
        const LAST: u64 = 20;
        let cluster = Cluster::builder().nodes(2).start().await?;
        let ring = RingView::fetch(&cluster.nodes[0].http, None).await?;
        let key = owned_by(&ring, "n2", "sse-page");
        let page = ringfeed_cluster_tests::serve_page(PAGE).await?;
        let driver = drive(
            &page,
            &cluster.node("n1").http,
            &key,
            LAST,
            &["&blockws=1"],
            false,
            None,
        )?;
        subscribed(&cluster, &key).await?;
        let router = cluster.router_grpc();
        for n in 1..=LAST {
            publish_acked(&router, &key, n).await?;
        }
        let state = finish(driver).await?;
        ensure!(state["transports"] == json!(["sse"]), "{state}");
        let ns = numbers(&state, "ns");
        ensure!(ns == (1..=LAST).collect::<Vec<_>>(), "{ns:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tickets_on_a_page_subscribes_with_one_sees_presence_and_resumes_after_a_drain() {
    bounded(async {
        const LAST: u64 = 40;
        // Secure: TLS everywhere, tickets, and each ticket admits one connection, so
        // the page's reconnect after the drain can only be its resume token's doing.
        let page = ringfeed_cluster_tests::serve_page(PAGE).await?;
        let mut cluster = Cluster::builder()
            .nodes(3)
            .lease_ttl(2)
            .secure()
            .node_args(&["--single-use-tickets", "--allowed-origins", &page])
            .start()
            .await?;
        let tls_dir = cluster.tls_dir().context("a secure cluster")?.to_path_buf();
        let n1 = cluster.node("n1").http.clone();
        ensure!(n1.starts_with("https://"), "{n1}");
        let ring = RingView::fetch(&n1, cluster.ca().as_ref()).await?;
        let key = owned_by(&ring, "n2", "ticketed");
        // The application's backend asks for the ticket with its API token.
        let body =
            json!({"sub": "alice", "key": key, "ttl_s": 60, "presence": true, "publish": true});
        let (status, answer) = ringfeed_cluster_tests::http_post(
            &format!("{n1}/v1/tickets"),
            &[(
                "authorization",
                &format!("Bearer {}", ringfeed_cluster_tests::SECURE_TOKEN),
            )],
            &body.to_string(),
        )
        .await?;
        ensure!(status == 200, "POST /v1/tickets: {status} {answer}");
        let ticket: Value = serde_json::from_str(&answer)?;
        let ticket = ticket["ticket"].as_str().context("a ticket")?;

        let ticket = format!("&ticket={}&presence=1", escape(ticket));
        let driver = drive(&page, &n1, &key, LAST, &[&ticket], true, Some(&tls_dir))?;
        // Subscribed: the ticket's subject is present on the owner.
        let router = cluster.router().await?;
        ringfeed_cluster_tests::eventually("alice to be present", Duration::from_secs(30), || {
            let (mut router, key) = (router.clone(), key.clone());
            async move {
                let presence = router
                    .presence(with_token(PresenceRequest { key })?)
                    .await?
                    .into_inner();
                Ok(presence.members.iter().any(|m| m == "alice").then_some(()))
            }
        })
        .await;
        for n in 1..=LAST {
            let mut acked = false;
            for _ in 0..20 {
                let request = PublishRequest {
                    idempotency_key: format!("ticketed-{n}"),
                    ..ringfeed_client::publisher::json(&key, &json!({"n": n}))
                };
                if router.clone().publish(with_token(request)?).await.is_ok() {
                    acked = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            ensure!(acked, "update {n} was never acknowledged");
            if n == LAST / 2 {
                cluster
                    .node_mut("n2")
                    .terminate(Duration::from_secs(20))
                    .await?;
            }
        }
        let state = finish(driver).await?;
        let ns = numbers(&state, "ns");
        ensure!(
            ns == (1..=LAST).collect::<Vec<_>>(),
            "the page received {ns:?}"
        );
        ensure!(state["errors"] == json!([]), "{state}");
        // It moved off n2 (a second open), which the spent ticket could not have done.
        let nodes = state["nodes"].as_array().context("nodes")?;
        ensure!(nodes.len() >= 2, "one connection only: {state}");
        // Its presence list named its own subject.
        let presence = state["presence"].as_array().context("presence")?;
        ensure!(
            presence.iter().any(|p| p["members"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["id"] == "alice"))),
            "no presence list with alice: {state}"
        );
        ensure!(
            state["published"].as_u64().is_some_and(|s| s > LAST),
            "publish from the page: {state}"
        );
        Ok(())
    })
    .await
}
