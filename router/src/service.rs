//! The public `ringfeed.v1.Router` gRPC service.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ringfeed_proto::v1::{self as pb, router_server::Router};
use tonic::{Request, Response, Status};

use crate::api_token::{Gate, TokenError};
use crate::forward::{parse_grpc_timeout, publish_result, Forwarder};
use crate::key;
use crate::ring::Member;

/// The longest deadline a caller may ask for.
const MAX_DEADLINE: Duration = Duration::from_secs(60);

/// Serves `Router` from a [`Forwarder`].
pub struct RouterService {
    forwarder: Arc<Forwarder>,
    /// With tokens, publishing and presence need one of them. Lookups and the ring
    /// stay open: nodes serve the same at `/v1/route` and `/v1/ring`.
    tokens: Option<Gate>,
}

impl RouterService {
    pub fn new(forwarder: Arc<Forwarder>) -> RouterService {
        RouterService {
            forwarder,
            tokens: None,
        }
    }

    /// The service, asking every publish and presence call for one of `tokens`.
    pub fn with_tokens(mut self, tokens: Option<Gate>) -> RouterService {
        self.tokens = tokens;
        self
    }

    /// UNAUTHENTICATED unless the call carries an accepted API token (or none is
    /// configured).
    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let source = request.remote_addr().map(|a| a.ip());
        tokens.check(authorization, source).map_err(|e| match e {
            TokenError::Throttled { .. } => Status::resource_exhausted(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        })
    }

    /// The caller's deadline (`grpc-timeout`), or the configured default.
    fn deadline<T>(&self, request: &Request<T>) -> Instant {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(self.forwarder.config().default_deadline)
            .min(MAX_DEADLINE);
        // Answer a little before the caller gives up, so it sees our status.
        Instant::now() + timeout.mul_f64(0.95)
    }
}

/// The wire form of a member record.
pub fn member_pb(m: &Member) -> pb::Member {
    pb::Member {
        id: m.id.0.clone(),
        incarnation: m.incarnation.clone(),
        grpc: m.grpc.clone(),
        http: m.http.clone(),
        quic: m.quic.clone().unwrap_or_default(),
        quic_sha256: m.quic_sha256.clone().unwrap_or_default(),
        points: m.points,
        state: m.state.as_str().to_owned(),
        version: m.version.clone(),
    }
}

#[tonic::async_trait]
impl Router for RouterService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishReply>, Status> {
        let started = Instant::now();
        self.authenticate(&request)?;
        let deadline = self.deadline(&request);
        let item = request.into_inner();
        let result = self.forwarder.publish(vec![item], deadline).await.pop();
        let result = result.unwrap_or_else(|| Err(Status::internal("no result")));
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.forwarder
            .stats()
            .publish_done(code, started.elapsed().as_secs_f64());
        result.map(Response::new)
    }

    async fn publish_batch(
        &self,
        request: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchReply>, Status> {
        self.authenticate(&request)?;
        let deadline = self.deadline(&request);
        let items = request.into_inner().items;
        let max = self.forwarder.config().max_batch;
        if items.len() > max {
            return Err(Status::invalid_argument(format!(
                "batch has {} items; the limit is {max}",
                items.len()
            )));
        }
        let started = Instant::now();
        let results = self.forwarder.publish(items, deadline).await;
        // A batch's outcome: `ok`, or the code of its first failed item.
        let code = results
            .iter()
            .find_map(|r| r.as_ref().err().map(|s| s.code()))
            .unwrap_or(tonic::Code::Ok);
        self.forwarder
            .stats()
            .publish_done(code, started.elapsed().as_secs_f64());
        Ok(Response::new(pb::PublishBatchReply {
            results: results.into_iter().map(publish_result).collect(),
        }))
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupReply>, Status> {
        let key = request.into_inner().key;
        key::validate(&key).map_err(|e| Status::invalid_argument(format!("invalid key: {e}")))?;
        let view = self.forwarder.membership().view();
        let owner = view
            .ring
            .owner(&key)
            .ok_or_else(|| Status::unavailable("the ring has no active members"))?;
        Ok(Response::new(pb::LookupReply {
            owner: Some(member_pb(owner)),
            ring_version: view.version,
            ring_id: view.ring.id().0.clone(),
        }))
    }

    async fn get_ring(
        &self,
        _request: Request<pb::GetRingRequest>,
    ) -> Result<Response<pb::RingReply>, Status> {
        let view = self.forwarder.membership().view();
        Ok(Response::new(pb::RingReply {
            cluster: self.forwarder.membership().cluster().to_owned(),
            ring_version: view.version,
            ring_id: view.ring.id().0.clone(),
            members: view.ring.members().iter().map(member_pb).collect(),
        }))
    }

    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceReply>, Status> {
        self.authenticate(&request)?;
        let deadline = self.deadline(&request);
        let key = request.into_inner().key;
        self.forwarder
            .presence(&key, deadline)
            .await
            .map(Response::new)
    }

    async fn get_document(
        &self,
        request: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<pb::GetDocumentReply>, Status> {
        self.authenticate(&request)?;
        let deadline = self.deadline(&request);
        let request = request.into_inner();
        self.forwarder
            .document(&request.key, &request.text, deadline)
            .await
            .map(Response::new)
    }
}
