//! End-to-end tests: real etcd, real `ringfeed-node` and `ringfeed-router` processes,
//! real sockets. One test binary; `.config/nextest.toml` runs the tests one at a time.

mod adversarial;
mod aioquic;
mod auth;
mod browser_client;
mod browser_doc;
mod browser_tls;
mod chaos;
mod client_routing;
mod config_file;
mod dashboard;
mod delivery;
mod direct;
mod docs;
mod docs_moves;
mod proxy;
mod quic;
mod router_watch;
mod routing;
mod secure;

use std::time::Duration;

use anyhow::{anyhow, Result};
use ringfeed_client::{Event, Frame, Subscription};
use ringfeed_cluster_tests::Cluster;
use ringfeed_proto::v1::LookupRequest;

/// Every test's bound, beyond which it fails rather than hangs.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a test waits for one expected frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn bounded<F: std::future::Future<Output = Result<()>>>(test: F) {
    match tokio::time::timeout(TEST_TIMEOUT, test).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e:#}"),
        Err(_) => panic!("test did not finish within {TEST_TIMEOUT:?}"),
    }
}

/// The owner of `key` by the router's `Lookup`.
pub async fn owner_of(cluster: &Cluster, key: &str) -> Result<String> {
    let mut router = cluster.router().await?;
    let reply = router
        .lookup(LookupRequest { key: key.into() })
        .await?
        .into_inner();
    Ok(reply.owner.ok_or_else(|| anyhow!("no owner"))?.id)
}

/// The next frame, which must be an update: `(seq, data)`.
pub async fn next_update(sub: &mut Subscription) -> Result<(u64, serde_json::Value)> {
    match sub.next_within(FRAME_TIMEOUT).await? {
        Event::Frame(Frame::Update { seq, data, .. }) => Ok((seq, data.unwrap_or_default())),
        other => Err(anyhow!("expected an update, got {other:?}")),
    }
}

pub fn welcome_node(sub: &Subscription) -> String {
    sub.node().to_owned()
}

/// A gauge's or counter's value from a node's `/metrics`.
pub async fn metric(http: &str, name: &str) -> Result<u64> {
    let (status, body) = ringfeed_cluster_tests::http_get(&format!("{http}/metrics")).await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| anyhow!("no {name} in /metrics"))
}

/// A key that `owner` owns on `ring`: the first `{prefix}:{i}` it owns.
pub fn owned_by(ring: &ringfeed_client::routing::RingView, owner: &str, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .find(|k| ring.owner(k).is_some_and(|m| m.id.0 == owner))
        .expect("some key")
}

/// A gRPC request carrying a secure cluster's API token.
pub fn with_token<T>(message: T) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", ringfeed_cluster_tests::SECURE_TOKEN).parse()?,
    );
    Ok(request)
}

/// `state[field]` as a list of numbers (absent or another type: empty).
pub fn numbers(state: &serde_json::Value, field: &str) -> Vec<u64> {
    state[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_u64)
        .collect()
}
