//! An in-process cluster for tests (its tests: `sim/tests.rs`): nodes in one process and one paused-time runtime,
//! each with its own fixed membership (no etcd) that the test moves ring by ring, and
//! their internal services on an in-memory network. A node can be cut off (its
//! connections severed, as if its process died) and its listener healed.
//!
//! What runs is the node's own code — the ring follower, replication pipes, hand-off,
//! promotion, the internal service — with the clock, etcd and sockets replaced.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ringfeed_proto::v1::{self as pb, node_client::NodeClient, node_server::NodeServer};
use ringfeed_router::membership::Membership;
use ringfeed_router::ring::{Member, MemberState, NodeId, Ring};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::internal::NodeService;
use crate::node::Node;
use crate::peers::memory::Net;
use crate::peers::Peers;

#[cfg(test)]
mod tests;

/// How long a test waits for a condition before it fails (virtual time).
const PATIENCE: Duration = Duration::from_secs(60);

/// One in-process node.
pub(crate) struct Running {
    pub(crate) node: Arc<Node>,
    pub(crate) membership: Membership,
    tasks: TaskTracker,
    /// Stops its internal service.
    serving: CancellationToken,
}

/// Nodes on one in-memory network.
pub(crate) struct Cluster {
    pub(crate) net: Net,
    pub(crate) nodes: Vec<Running>,
}

/// The record of node `id`: its gRPC address on the network is its id.
pub(crate) fn member(id: &str) -> Member {
    Member {
        id: NodeId(id.to_owned()),
        incarnation: format!("{id}-1"),
        grpc: id.to_owned(),
        http: format!("http://{id}"),
        quic: None,
        quic_sha256: None,
        points: 64,
        state: MemberState::Active,
        version: String::new(),
    }
}

impl Cluster {
    /// Nodes `ids`, started on an empty ring and then, like processes registering
    /// together, all on the ring of `ids`.
    pub(crate) fn start(ids: &[&str]) -> Cluster {
        let mut cluster = Cluster {
            net: Net::default(),
            nodes: Vec::new(),
        };
        for id in ids {
            cluster.add(id, &[]);
        }
        cluster.set_ring(ids);
        cluster
    }

    /// Starts node `id`, seeing the ring of `ring` (which it may not be on yet).
    pub(crate) fn add(&mut self, id: &str, ring: &[&str]) {
        let config = Config::parse_from(["ringfeed-node", "--id", id]);
        let membership = Membership::fixed("test", ring.iter().map(|id| member(id)));
        let tasks = TaskTracker::new();
        let node = Arc::new(
            Node::new(
                config,
                membership.clone(),
                CancellationToken::new(),
                tasks.clone(),
            )
            .with_peers(Peers::Memory(self.net.clone())),
        );
        node.set_incarnation(&member(id).incarnation);
        tasks.spawn(crate::cluster::follower::follow_ring(node.clone()));
        tasks.spawn(node.clone().run_clock());
        let running = Running {
            node,
            membership,
            tasks,
            serving: CancellationToken::new(),
        };
        self.serve(&running);
        self.nodes.push(running);
    }

    fn serve(&self, running: &Running) {
        let id = running.node.id.0.clone();
        let service = NodeServer::new(NodeService::new(
            running.node.clone(),
            CancellationToken::new(),
        ));
        let incoming = self.net.listen(&id);
        let stop = running.serving.clone();
        running.tasks.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await;
        });
    }

    /// Node `id`.
    pub(crate) fn node(&self, id: &str) -> &Arc<Node> {
        &self.running(id).node
    }

    fn running(&self, id: &str) -> &Running {
        self.nodes
            .iter()
            .find(|r| r.node.id.0 == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Every node still running now sees the ring of `ids` (the next ring version).
    pub(crate) fn set_ring(&self, ids: &[&str]) {
        let running: Vec<&str> = self.nodes.iter().map(|r| r.node.id.0.as_str()).collect();
        self.set_ring_on(&running, ids);
    }

    /// Nodes `on` (those still running) see the ring of `ids` as their next ring
    /// version; the others do not yet (a watch that lags).
    pub(crate) fn set_ring_on(&self, on: &[&str], ids: &[&str]) {
        for running in &self.nodes {
            let id = running.node.id.0.as_str();
            if on.contains(&id) && !running.node.shutdown.is_cancelled() {
                running
                    .membership
                    .set_members(ids.iter().map(|id| member(id)));
            }
        }
    }

    /// Cuts `id` off the network: connections to it fail and those it had end; the
    /// node itself keeps running (a partitioned process).
    pub(crate) fn cut(&self, id: &str) {
        self.net.cut(id);
    }

    /// Listens for `id` again after a [`cut`](Self::cut).
    pub(crate) fn heal(&self, id: &str) {
        self.serve(self.running(id));
    }

    /// Kills `id`: cut off, its service stopped, its tasks ended.
    pub(crate) async fn kill(&self, id: &str) {
        let running = self.running(id);
        self.net.cut(id);
        running.serving.cancel();
        running.node.shut_down();
        running.tasks.close();
        let _ = tokio::time::timeout(PATIENCE, running.tasks.wait()).await;
    }

    /// Publishes `data` to `key` the way a router does: a `Deliver` to the owner on
    /// `via`'s current ring, with `idempotency_key`. What that node answered.
    pub(crate) async fn deliver(
        &self,
        via: &str,
        key: &str,
        data: &[u8],
        idempotency_key: &str,
    ) -> Result<pb::DeliverResult, tonic::Status> {
        let view = self.node(via).membership.view();
        let mut client = NodeClient::new(self.net.channel(via));
        let request = pb::DeliverRequest {
            ring: Some(pb::RingRef {
                ring_version: view.version,
                ring_id: view.ring.id().0.clone(),
            }),
            items: vec![pb::PublishRequest {
                key: key.to_owned(),
                data: data.to_vec(),
                idempotency_key: idempotency_key.to_owned(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut reply = client.deliver(request).await?.into_inner();
        reply
            .results
            .pop()
            .ok_or_else(|| tonic::Status::internal("no result"))
    }
}

/// Waits, in virtual time, until `done` holds; fails the test after [`PATIENCE`].
pub(crate) async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "not within {PATIENCE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A key that `owner` owns on the ring of `ids` and whose successor there is
/// `successor`.
pub(crate) fn key_placed(ids: &[&str], owner: &str, successor: Option<&str>) -> String {
    let ring = Ring::new(ids.iter().map(|id| member(id)));
    (0..)
        .map(|i| format!("user:{i}"))
        .find(|k| {
            ring.owner(k).is_some_and(|o| o.id.0 == owner)
                && ring.successor(k).map(|s| s.id.0.as_str()) == successor
        })
        .expect("some key is placed so")
}
