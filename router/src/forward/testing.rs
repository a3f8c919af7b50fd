//! A test node for the forwarder's tests: its `Deliver` records each call and holds
//! it until told to answer.

use std::sync::{Arc, Mutex};

use ringfeed_proto::v1::{self as pb, deliver_result};

use crate::ring::{Member, MemberState, NodeId};
use tonic::Status;

/// The calls a test node saw: each one's ring and its items' keys.
pub(super) type Calls = Mutex<Vec<(pb::RingRef, Vec<String>)>>;

/// A node whose `Deliver` records each call's items and holds every call until
/// told to answer (the lane is a router part; the node here is only its peer).
pub(super) struct HeldNode {
    pub(super) calls: Arc<Calls>,
    pub(super) release: Arc<tokio::sync::Semaphore>,
}

#[tonic::async_trait]
impl pb::node_server::Node for HeldNode {
    async fn deliver(
        &self,
        request: tonic::Request<pb::DeliverRequest>,
    ) -> Result<tonic::Response<pb::DeliverReply>, Status> {
        let request = request.into_inner();
        let keys: Vec<String> = request.items.iter().map(|i| i.key.clone()).collect();
        let ring = request.ring.clone().unwrap_or_default();
        self.calls.lock().unwrap().push((ring, keys.clone()));
        self.release.acquire().await.expect("open").forget();
        // Each item is answered with its key as the epoch, to check the order.
        let results = keys
            .into_iter()
            .map(|key| pb::DeliverResult {
                result: Some(deliver_result::Result::Ok(pb::PublishReply {
                    epoch: key,
                    ..Default::default()
                })),
            })
            .collect();
        Ok(tonic::Response::new(pb::DeliverReply {
            results,
            ring: request.ring,
            ..Default::default()
        }))
    }
    type DeliverStreamStream = futures_util::stream::Empty<Result<pb::DeliverReply, Status>>;
    async fn deliver_stream(
        &self,
        _: tonic::Request<tonic::Streaming<pb::DeliverRequest>>,
    ) -> Result<tonic::Response<Self::DeliverStreamStream>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn key_presence(
        &self,
        _: tonic::Request<pb::KeyPresenceRequest>,
    ) -> Result<tonic::Response<pb::KeyPresenceReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn key_document(
        &self,
        _: tonic::Request<pb::KeyDocumentRequest>,
    ) -> Result<tonic::Response<pb::KeyDocumentReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn replicate(
        &self,
        _: tonic::Request<pb::ReplicateRequest>,
    ) -> Result<tonic::Response<pb::ReplicateReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    type ReplicateStreamStream = futures_util::stream::Empty<Result<pb::ReplicateReply, Status>>;
    async fn replicate_stream(
        &self,
        _: tonic::Request<tonic::Streaming<pb::ReplicateRequest>>,
    ) -> Result<tonic::Response<Self::ReplicateStreamStream>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn handoff(
        &self,
        _: tonic::Request<pb::HandoffRequest>,
    ) -> Result<tonic::Response<pb::HandoffReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn figures(
        &self,
        _: tonic::Request<pb::FiguresRequest>,
    ) -> Result<tonic::Response<pb::FiguresReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn status(
        &self,
        _: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn drain(
        &self,
        _: tonic::Request<pb::DrainRequest>,
    ) -> Result<tonic::Response<pb::DrainReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
}

impl HeldNode {
    /// A node that answers every call at once, served on a loopback port: its
    /// `host:port` and the calls it saw.
    pub(super) async fn serve_open() -> (String, Arc<Calls>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let node = HeldNode {
            calls: calls.clone(),
            release: Arc::new(tokio::sync::Semaphore::new(
                tokio::sync::Semaphore::MAX_PERMITS,
            )),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::node_server::NodeServer::new(node))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr.to_string(), calls)
    }
}

/// An active member `id` whose gRPC address is `grpc`.
pub(super) fn member(id: &str, grpc: &str) -> Member {
    Member {
        id: NodeId(id.into()),
        incarnation: "i".into(),
        grpc: grpc.into(),
        http: String::new(),
        quic: None,
        quic_sha256: None,
        points: 64,
        state: MemberState::Active,
        version: String::new(),
    }
}
