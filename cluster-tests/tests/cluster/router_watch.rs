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
