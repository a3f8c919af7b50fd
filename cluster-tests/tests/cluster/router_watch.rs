//! The router can be watched: `/healthz`, `/readyz` (false while no owner answers),
//! `/metrics` (publish latency by outcome, retries, per-owner figures) and the standard
//! `grpc.health.v1` service on its gRPC port.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ringfeed_client::publisher;
use ringfeed_cluster_tests::{eventually, http_get, Cluster};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::bounded;

/// The router's `grpc.health.v1` status for `service`.
async fn health(cluster: &Cluster, service: &str) -> Result<ServingStatus> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.router_grpc()))?
            .connect()
            .await?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    Ok(ServingStatus::try_from(reply.status)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_answers_health_readiness_metrics_and_grpc_health_and_is_not_ready_without_owners(
) {
    bounded(async {
        // Leases long enough that killed nodes stay on the ring while we look.
        let mut cluster = Cluster::builder().nodes(2).lease_ttl(30).start().await?;
        let http = cluster.router_http();
        let (status, body) = http_get(&format!("{http}/healthz")).await?;
        ensure!(
            status == 200 && body.trim() == "ok",
            "/healthz {status} {body}"
        );
        eventually("the router ready", Duration::from_secs(10), || {
            let url = format!("{http}/readyz");
            async move { Ok((http_get(&url).await?.0 == 200).then_some(())) }
        })
        .await;
        ensure!(health(&cluster, "").await? == ServingStatus::Serving);
        ensure!(health(&cluster, "ringfeed.v1.Router").await? == ServingStatus::Serving);

        let mut router = cluster.router().await?;
        for i in 0..20 {
            router
                .publish(publisher::json(&format!("watch:{i}"), &json!(i)))
                .await?;
        }
        let bad = router
            .publish(publisher::json("no spaces allowed", &json!(1)))
            .await;
        ensure!(bad.is_err(), "a bad key was accepted");
        let (status, text) = http_get(&format!("{http}/metrics")).await?;
        ensure!(status == 200, "/metrics {status}");
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"ringfeed_router_publish_seconds_count{outcome="ok"} "#))
            .context("the ok publish count")?
            .trim()
            .parse::<u64>()?;
        ensure!(count >= 20, "{count} ok publishes counted");
        for family in [
            r#"ringfeed_router_publish_seconds_count{outcome="invalid_argument"} 1"#,
            "ringfeed_router_retries_total",
            "ringfeed_router_not_owner_total",
            "ringfeed_router_calls_in_flight{node=",
            "ringfeed_router_lane_queued{node=",
        ] {
            ensure!(text.contains(family), "/metrics has no {family}:\n{text}");
        }

        // Every owner gone (their records still on the ring): not ready, NOT_SERVING.
        for node in &mut cluster.nodes {
            node.kill().await;
        }
        eventually("the router not ready", Duration::from_secs(10), || {
            let url = format!("{http}/readyz");
            async move {
                let (status, body) = http_get(&url).await?;
                Ok((status == 503 && body.contains("answers")).then_some(()))
            }
        })
        .await;
        ensure!(health(&cluster, "").await? == ServingStatus::NotServing);
        let (status, _) = http_get(&format!("{http}/healthz")).await?;
        ensure!(status == 200, "alive all along");
        Ok(())
    })
    .await
}

/// `--log-format json`: every line a node and the router write is one JSON object, with
/// the fields of the spans it happened in; a credential in a client's URL is not in
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line_with_span_fields_and_no_credentials() {
    bounded(async {
        let cluster = Cluster::builder()
            .nodes(2)
            .log("debug,h2=info,tower=info,hyper=info,tonic=info,etcd_client=info")
            .node_args(&["--log-format", "json"])
            .router_args(&["--log-format", "json"])
            .start()
            .await?;
        let node = &cluster.nodes[0];
        let secret = "tkt-that-must-not-be-logged";
        let url = format!("{}&ticket={secret}", node.connect_url("json:1"));
        let mut sub = ringfeed_client::Subscription::connect(&url).await?;
        cluster
            .router()
            .await?
            .publish(publisher::json("json:1", &json!(1)))
            .await?;
        let _ = sub.next_within(Duration::from_secs(5)).await?;
        sub.close().await;
        let logs: Vec<String> = cluster.nodes.iter().map(|n| n.log()).collect();
        let mut spans = 0;
        for log in &logs {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("not a JSON object: {line}"))?;
                ensure!(v["level"].is_string() && v["fields"].is_object(), "{line}");
                if v["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["transport"] == "ws"))
                {
                    spans += 1;
                }
            }
            ensure!(!log.contains(secret), "a ticket was logged");
        }
        ensure!(spans > 0, "no line carries the connection span's fields");
        let router_log = cluster.router_log();
        for line in router_log.lines().filter(|l| !l.trim().is_empty()) {
            serde_json::from_str::<serde_json::Value>(line)
                .with_context(|| format!("router: not a JSON object: {line}"))?;
        }
        Ok(())
    })
    .await
}

/// A node's `/metrics` counts open connections by transport and carries the process's
/// own figures (CPU, memory, file descriptors, threads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_metrics_count_connections_by_transport_and_the_process() {
    use ringfeed_client::quic::{Hello, QuicSubscription, Trust};
    bounded(async {
        let cluster = Cluster::builder().nodes(1).start().await?;
        let node = &cluster.nodes[0];
        let open = |text: &str, transport: &str| -> Option<u64> {
            let prefix = format!("ringfeed_connections_open{{transport=\"{transport}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse().ok())
        };
        let ws = ringfeed_client::Subscription::connect(&node.connect_url("m:1")).await?;
        let ring = ringfeed_client::routing::RingView::fetch(&node.http, None).await?;
        let quic = QuicSubscription::connect(
            node.quic.as_deref().context("QUIC")?,
            &Hello {
                key: "m:2".into(),
                ..Hello::default()
            },
            &Trust::pins_of(&ring),
        )
        .await?;
        let _sse =
            ringfeed_cluster_tests::SseStream::open(&format!("{}/v1/sse?key=m:3", node.http), None)
                .await?;
        let metrics = format!("{}/metrics", node.http);
        eventually("one connection of each", Duration::from_secs(10), || {
            let metrics = metrics.clone();
            async move {
                let text = http_get(&metrics).await?.1;
                Ok((open(&text, "ws") == Some(1)
                    && open(&text, "quic") == Some(1)
                    && open(&text, "sse") == Some(1)
                    && open(&text, "poll") == Some(0)
                    && open(&text, "doc") == Some(0))
                .then_some(()))
            }
        })
        .await;
        let text = http_get(&metrics).await?.1;
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_threads ",
        ] {
            let value: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .with_context(|| format!("no {name}"))?
                .trim()
                .parse()?;
            ensure!(
                value > 0.0 || name.starts_with("process_cpu"),
                "{name}{value}"
            );
        }
        ws.close().await;
        quic.close().await;
        eventually("the closed ones uncounted", Duration::from_secs(10), || {
            let metrics = metrics.clone();
            async move {
                let text = http_get(&metrics).await?.1;
                Ok((open(&text, "ws") == Some(0) && open(&text, "quic") == Some(0)).then_some(()))
            }
        })
        .await;
        Ok(())
    })
    .await
}

/// `docs/metrics.md` lists every metric a node and a router export, as their `/metrics`
/// describe them (`# HELP`, `# TYPE`). `RINGFEED_UPDATE_DOCS=1` rewrites the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_doc_lists_every_metric_the_processes_export() {
    bounded(async {
        let cluster = Cluster::builder().nodes(1).start().await?;
        // One publish through the router, so that its per-owner families have members
        // (an empty family writes no HELP line).
        cluster
            .router()
            .await?
            .publish(publisher::json("metrics:1", &json!(1)))
            .await?;
        let mut rows = Vec::new();
        for (process, url) in [
            ("node", format!("{}/metrics", cluster.nodes[0].http)),
            ("router", format!("{}/metrics", cluster.router_http())),
        ] {
            let text = http_get(&url).await?.1;
            let mut kinds = std::collections::BTreeMap::new();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# TYPE ") {
                    if let Some((name, kind)) = rest.split_once(' ') {
                        kinds.insert(name.to_owned(), kind.to_owned());
                    }
                }
            }
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# HELP ") {
                    let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                    let kind = kinds.get(name).cloned().unwrap_or_default();
                    // OpenMetrics names counters without `_total` in HELP/TYPE.
                    let shown = if kind == "counter" && !name.ends_with("_total") {
                        format!("{name}_total")
                    } else {
                        name.to_owned()
                    };
                    rows.push(format!(
                        "| `{shown}` | {process} | {kind} | {} |",
                        help.trim_end_matches('.').replace('|', "\\|")
                    ));
                }
            }
        }
        let doc = format!(
            "# Metrics\n\n\
             Every node serves `GET /metrics` on its HTTP port, and every router on its HTTP\n\
             listener (`--http-listen`), in the Prometheus text format (the router's in\n\
             OpenMetrics). This list is generated from what the processes export\n\
             (`RINGFEED_UPDATE_DOCS=1 cargo nextest run -p ringfeed-cluster-tests --test\n\
             cluster the_metrics_doc`), and a test fails when they differ.\n\n\
             | metric | process | type | what |\n| --- | --- | --- | --- |\n{}\n",
            rows.join("\n")
        );
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
        if std::env::var_os("RINGFEED_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &doc)?;
        }
        let written = std::fs::read_to_string(&path).unwrap_or_default();
        ensure!(
            written == doc,
            "docs/metrics.md is not what the processes export; run with RINGFEED_UPDATE_DOCS=1"
        );
        Ok(())
    })
    .await
}

/// Under a skewed load — three keys at 100× the rate of fifty others — the hot-key view
/// (`ringfeed top`, from every node's `/v1/hot`) names the three, and a node's
/// `/metrics` carries them as hot-key gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_key_view_names_the_keys_under_a_skewed_load() {
    bounded(async {
        let cluster = Cluster::builder().nodes(3).start().await?;
        let node = cluster.nodes[0].http.clone();
        let hot: Vec<String> = (0..3).map(|i| format!("celebrity:{i}")).collect();
        let cold: Vec<String> = (0..50).map(|i| format!("fan:{i}")).collect();
        // Subscribers: a crowd on one hot key.
        let mut crowd = Vec::new();
        for _ in 0..5 {
            crowd.push(
                ringfeed_client::Subscription::connect(&cluster.nodes[0].connect_url(&hot[0]))
                    .await?,
            );
        }
        let router = cluster.router_grpc();
        let load = {
            let (hot, cold) = (hot.clone(), cold.clone());
            tokio::spawn(async move {
                let mut client = ringfeed_cluster_tests::connect_router(&router).await?;
                // 100 rounds a second for 6 s: each hot key every round (100/s), each
                // cold key once a second (1/s).
                for round in 0..600u64 {
                    let mut items: Vec<_> = hot
                        .iter()
                        .map(|k| publisher::json(k, &json!(round)))
                        .collect();
                    if round % 100 < 50 {
                        let k = &cold[(round % 100) as usize];
                        items.push(publisher::json(k, &json!(round)));
                    }
                    client
                        .publish_batch(ringfeed_proto::v1::PublishBatchRequest { items })
                        .await?;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                anyhow::Ok(())
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let out = tokio::process::Command::new(ringfeed_cluster_tests::bin_dir().join("ringfeed"))
            .args([
                "top",
                "--node",
                &node,
                "--once",
                "--json",
                "--count",
                "3",
                "--interval-secs",
                "2",
            ])
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "top: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let top: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut named: Vec<String> = top["by_rate"]
            .as_array()
            .context("by_rate")?
            .iter()
            .filter_map(|k| k["key"].as_str().map(str::to_owned))
            .collect();
        named.sort();
        ensure!(named == hot, "top named {named:?}: {top}");
        ensure!(
            top["by_subscribers"][0]["key"] == hot[0].as_str()
                && top["by_subscribers"][0]["subscribers"] == 5,
            "{top}"
        );
        // The hot-key gauges on the owner of celebrity:0.
        let owner = super::owner_of(&cluster, &hot[0]).await?;
        let metrics = http_get(&format!("{}/metrics", cluster.node(&owner).http))
            .await?
            .1;
        ensure!(
            metrics.contains(&format!(
                "ringfeed_hot_key_updates_per_second{{key=\"{}\"}}",
                hot[0]
            )),
            "no hot-key gauge for {}",
            hot[0]
        );
        load.await??;
        drop(crowd);
        Ok(())
    })
    .await
}
