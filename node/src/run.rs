//! Wiring a node together, and its shutdown tree.

use std::sync::Arc;
use std::time::Duration;

use ringfeed_proto::v1::node_server::NodeServer;
use ringfeed_router::membership::{Membership, MembershipConfig};
use ringfeed_router::ring::{Member, MemberState, NodeId};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::internal::NodeService;
use crate::node::Node;

/// Runs a node on bound listeners until `shutdown` is cancelled, then: stop accepting,
/// deregister, close every client with 1001, wait up to the grace period.
pub async fn run(
    config: Config,
    http: TcpListener,
    grpc: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    let http_addr = http.local_addr()?;
    let grpc_addr = grpc.local_addr()?;
    let advertise_http = config
        .advertise_http
        .clone()
        .unwrap_or_else(|| format!("http://{http_addr}"));
    let advertise_grpc = config
        .advertise_grpc
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());

    let membership = Membership::start(
        &MembershipConfig {
            endpoints: config.etcd.clone(),
            cluster: config.cluster.clone(),
            lease_ttl: Duration::from_secs(config.lease_ttl),
        },
        &tasks,
        shutdown.clone(),
    )
    .await?;
    let record = Member {
        id: NodeId(config.id.clone()),
        incarnation: String::new(),
        grpc: advertise_grpc.clone(),
        http: advertise_http.clone(),
        quic: None,
        points: config.points,
        state: MemberState::Active,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let grace = config.shutdown_grace();
    let node = Arc::new(Node::new(
        config,
        membership.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));

    // Serve before registering: once the record is in etcd, traffic may come at once.
    tasks.spawn(crate::http::serve(node.clone(), http));
    let grpc_stop = shutdown.clone();
    let service = NodeServer::new(NodeService::new(node.clone()))
        .max_decoding_message_size(256 * 1024 * 1024);
    tasks.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
        let served = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move { grpc_stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "internal gRPC server failed");
        }
    });
    tasks.spawn(node.clone().follow_ring());

    // Registration lives on its own token: it must outlast the client-facing shutdown
    // long enough to deregister.
    let lease_stop = CancellationToken::new();
    let registration = tokio::select! {
        r = membership.register(record, &tasks, lease_stop.clone()) => r?,
        _ = shutdown.cancelled() => {
            lease_stop.cancel();
            tasks.close();
            tasks.wait().await;
            return Ok(());
        }
    };
    node.set_registration(registration.clone());
    let record = registration.record();
    println!(
        "ringfeed-node ready id={} http={} grpc={} incarnation={}",
        record.id, record.http, record.grpc, record.incarnation
    );
    tracing::info!(id = %record.id, http = %record.http, grpc = %record.grpc, "node on the ring");

    shutdown.cancelled().await;
    tracing::info!("shutting down: deregistering and closing clients");
    if let Err(e) = registration.deregister().await {
        tracing::warn!(error = %e, "deregistration failed; the lease will expire instead");
    }
    lease_stop.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing them"
        );
    }
    Ok(())
}
