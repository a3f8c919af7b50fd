//! Publishing straight to the owner: a [`Publisher`] holds the ring (from any node's
//! `/v1/ring`) and sends each publish, or each owner's share of a batch, to the owner's
//! own `Router` service (every node serves one), saving the router's hop.
//!
//! Every item carries an idempotency key (one is made when the caller gives none), so a
//! retry cannot apply it twice. A call that fails in transport, or finds the node
//! unavailable, refreshes the ring (from another node if need be) and is retried with
//! jittered back-off until the caller's deadline. A node that no longer owns a key
//! forwards it (it is a router too), so a stale ring costs a hop, never an update.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use ringfeed_proto::v1::router_client::RouterClient;
use ringfeed_proto::v1::{
    publish_result, PublishBatchRequest, PublishReply, PublishRequest, PublishResult,
};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

use ringfeed_router::backoff::Backoff;

use crate::routing::RingView;
use crate::Tls;

/// A publisher that routes itself.
pub struct Publisher {
    /// Nodes to fetch the ring from (`http://…` base URLs).
    nodes: Vec<String>,
    tls: Option<Tls>,
    ring: RingView,
    clients: HashMap<String, RouterClient<Channel>>,
    /// How long a call may take in all, retries included.
    pub deadline: Duration,
    /// Calls retried so far (after a transport failure or an unavailable node).
    pub retries: u64,
    /// Publishes made, for idempotency keys of this publisher's own.
    made: u64,
    prefix: String,
}

impl Publisher {
    /// A publisher on the ring that one of `nodes` publishes.
    pub async fn connect(nodes: Vec<String>, tls: Option<Tls>) -> Result<Publisher, Status> {
        let ring = fetch_ring(&nodes, tls.as_ref()).await?;
        let prefix = format!(
            "direct-{:016x}",
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        );
        Ok(Publisher {
            nodes,
            tls,
            ring,
            clients: HashMap::new(),
            deadline: Duration::from_secs(10),
            retries: 0,
            made: 0,
            prefix,
        })
    }

    /// The ring it routes by.
    pub fn ring(&self) -> &RingView {
        &self.ring
    }

    /// Publishes one update to its key's owner: the owner's answer, or the last error
    /// once the deadline has passed. Errors that retrying cannot fix (a bad key, a
    /// failed compare-and-set, a refused token) are returned at once.
    pub async fn publish(&mut self, mut item: PublishRequest) -> Result<PublishReply, Status> {
        self.name(&mut item);
        let mut results = self.send(vec![item]).await;
        results.pop().and_then(|r| r.result).map_or_else(
            || Err(Status::internal("no result")),
            |r| match r {
                publish_result::Result::Ok(reply) => Ok(reply),
                publish_result::Result::Error(e) => {
                    Err(Status::new(Code::from_i32(e.code as i32), e.message))
                }
            },
        )
    }

    /// Publishes a batch: each owner's items go to it in one `PublishBatch`, owners in
    /// parallel; results come back in the items' order.
    pub async fn publish_batch(&mut self, mut items: Vec<PublishRequest>) -> Vec<PublishResult> {
        for item in &mut items {
            self.name(item);
        }
        self.send(items).await
    }

    /// Gives `item` an idempotency key of ours if it has none.
    fn name(&mut self, item: &mut PublishRequest) {
        if item.idempotency_key.is_empty() {
            self.made += 1;
            item.idempotency_key = format!("{}-{}", self.prefix, self.made);
        }
    }

    /// Sends `items` to their owners, retrying what failed in transport until the
    /// deadline.
    async fn send(&mut self, items: Vec<PublishRequest>) -> Vec<PublishResult> {
        let deadline = Instant::now() + self.deadline;
        let mut results: Vec<Option<PublishResult>> = vec![None; items.len()];
        let mut backoff = Backoff::full_jitter(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let pending: Vec<usize> = (0..items.len()).filter(|&i| results[i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            // Group by owner.
            let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
            for &i in &pending {
                match self.ring.owner(&items[i].key) {
                    Some(owner) => groups.entry(owner.grpc.clone()).or_default().push(i),
                    None => {
                        results[i] = Some(error(Status::unavailable("the ring has no members")))
                    }
                }
            }
            let mut calls = Vec::new();
            for (grpc, indices) in groups {
                let client = self.client(&grpc);
                let batch: Vec<PublishRequest> =
                    indices.iter().map(|&i| items[i].clone()).collect();
                let left = deadline.saturating_duration_since(Instant::now());
                calls.push(async move {
                    let answer = match client {
                        Ok(mut client) => {
                            let mut request =
                                tonic::Request::new(PublishBatchRequest { items: batch });
                            request.set_timeout(left.max(Duration::from_millis(1)));
                            client
                                .publish_batch(request)
                                .await
                                .map(|r| r.into_inner().results)
                        }
                        Err(e) => Err(e),
                    };
                    (grpc, indices, answer)
                });
            }
            let mut failed = false;
            for (grpc, indices, answer) in futures_util::future::join_all(calls).await {
                match answer {
                    Ok(answers) => {
                        for (i, result) in indices.into_iter().zip(answers) {
                            results[i] = Some(result);
                        }
                    }
                    Err(status) if retryable(&status) && Instant::now() < deadline => {
                        self.clients.remove(&grpc);
                        failed = true;
                    }
                    Err(status) => {
                        for i in indices {
                            results[i] = Some(error(status.clone()));
                        }
                    }
                }
            }
            if !failed {
                continue;
            }
            // Refresh the ring (the owner may be gone) and back off, jittered.
            self.retries += 1;
            let pause = backoff.next_pause();
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            if let Ok(ring) = fetch_ring(&self.nodes, self.tls.as_ref()).await {
                if ring.version >= self.ring.version {
                    self.ring = ring;
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| error(Status::deadline_exceeded("no answer in time"))))
            .collect()
    }

    /// The client of the node at `grpc`, connected lazily.
    fn client(&mut self, grpc: &str) -> Result<RouterClient<Channel>, Status> {
        if let Some(client) = self.clients.get(grpc) {
            return Ok(client.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{grpc}"))
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            let host = grpc.rsplit_once(':').map_or(grpc, |(h, _)| h);
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(tls.ca_pem()))
                        .domain_name(host.trim_start_matches('[').trim_end_matches(']')),
                )
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let client = RouterClient::new(endpoint.connect_lazy());
        self.clients.insert(grpc.to_owned(), client.clone());
        Ok(client)
    }
}

/// Failures a retry (after refreshing the ring) can fix.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

fn error(status: Status) -> PublishResult {
    PublishResult {
        result: Some(publish_result::Result::Error(ringfeed_proto::v1::Error {
            code: status.code() as u32,
            message: status.message().to_owned(),
        })),
    }
}

/// The ring from the first of `nodes` that answers.
async fn fetch_ring(nodes: &[String], tls: Option<&Tls>) -> Result<RingView, Status> {
    let mut last = String::from("no node given");
    for node in nodes {
        match RingView::fetch(node, tls).await {
            Ok(ring) => return Ok(ring),
            Err(e) => last = format!("{node}: {e}"),
        }
    }
    Err(Status::unavailable(format!(
        "no node answers /v1/ring ({last})"
    )))
}
