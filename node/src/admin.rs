//! `ringfeed-node drain`: asks a running node to drain (as SIGTERM does) and waits until
//! it has exited.

use std::time::Duration;

use tokio::time::Instant;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use ringfeed_proto::v1::{self as pb, node_client::NodeClient};
use ringfeed_router::config::ClusterArgs;
use ringfeed_router::membership::Membership;
use ringfeed_router::ring::NodeId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Drain a running node: it hands off every key, moves its clients, deregisters, exits.
#[derive(Parser, Debug, Clone)]
#[command(name = "ringfeed-node drain", version)]
pub struct DrainArgs {
    /// The id of the node to drain.
    #[arg(long, env = "RINGFEED_NODE_ID")]
    pub id: String,
    /// Where to find the node's record (its internal gRPC address).
    #[command(flatten)]
    pub membership: ClusterArgs,
    /// With a cluster CA, the call is mutual TLS (a certificate the CA signed).
    #[command(flatten)]
    pub tls: ringfeed_router::tls::TlsArgs,
    /// The node's internal gRPC address (host:port); skips the etcd lookup.
    #[arg(long)]
    pub grpc: Option<String>,
    /// Give up waiting for the node to exit after this many seconds (0: do not wait).
    #[arg(long, default_value_t = 120)]
    pub wait_secs: u64,
    /// A file holding the API token to present (its first line), for a node with
    /// authentication on.
    #[arg(long, env = "RINGFEED_API_TOKEN_FILE")]
    pub api_token_file: Option<std::path::PathBuf>,
}

/// Runs `ringfeed-node drain`.
pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    args.membership.validate().map_err(|e| anyhow!(e))?;
    args.tls.validate().map_err(|e| anyhow!(e))?;
    let grpc = match &args.grpc {
        Some(grpc) => grpc.clone(),
        None => lookup(&args).await?,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .with_context(|| format!("bad gRPC address {grpc:?}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let tasks = TaskTracker::new();
    let tls = args
        .tls
        .load(&tasks, CancellationToken::new())
        .map_err(|e| anyhow!(e))?
        .client()
        .map_err(|e| anyhow!(e))?;
    let channel = ringfeed_router::tls::channel(endpoint, &grpc, tls.as_ref());
    let mut client = NodeClient::new(channel);
    let mut request = tonic::Request::new(pb::DrainRequest {
        node: args.id.clone(),
    });
    if let Some(path) = &args.api_token_file {
        let token = ringfeed_router::api_token::read_list("--api-token-file", path)
            .map_err(|e| anyhow!(e))?
            .swap_remove(0);
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow!("--api-token-file: the token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let reply = client
        .drain(request)
        .await
        .map_err(|s| anyhow!("node {} refused the drain: {}", args.id, s.message()))?
        .into_inner();
    println!(
        "draining {} ({} keys, {} connections)",
        reply.node, reply.keys, reply.connections
    );
    if args.wait_secs == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.wait_secs);
    // The node answers Status until it exits; the drain is over when it stops.
    loop {
        let status = client
            .status(pb::StatusRequest {
                from: "ringfeed-node drain".into(),
            })
            .await;
        if status.is_err() {
            println!(
                "node {} drained and exited after {:.1} s",
                args.id,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "node {} still answers after {} s; it keeps draining",
                args.id,
                args.wait_secs
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The node's internal gRPC address, from its record in etcd.
async fn lookup(args: &DrainArgs) -> anyhow::Result<String> {
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let membership = Membership::start(
        &args.membership.membership(Duration::from_secs(5)),
        &tasks,
        stop.clone(),
    )
    .await
    .context("cannot read the ring from etcd")?;
    let found = membership
        .view()
        .ring
        .member(&NodeId(args.id.clone()))
        .map(|m| m.grpc.clone());
    stop.cancel();
    tasks.close();
    found.ok_or_else(|| {
        anyhow!(
            "no node {:?} in cluster {:?} (is it registered?)",
            args.id,
            args.membership.cluster
        )
    })
}
