//! The internal `ringfeed.v1.Node` gRPC service: deliveries from routers, presence.

use std::sync::Arc;

use ringfeed_proto::v1::{self as pb, deliver_result, key_presence_reply, node_server};
use ringfeed_router::key;
use ringfeed_router::membership::View;
use ringfeed_router::ring::RingId;
use tonic::{Code, Request, Response, Status};

use crate::keys::{ApplyError, Publish};
use crate::node::{Decision, Node};

/// Serves `Node` for one node.
pub struct NodeService {
    node: Arc<Node>,
}

impl NodeService {
    pub fn new(node: Arc<Node>) -> NodeService {
        NodeService { node }
    }

    /// Our view, caught up (bounded) to the caller's ring when it is newer.
    async fn view(&self, ring: Option<&pb::RingRef>) -> Arc<View> {
        match ring {
            Some(r) => {
                let id = RingId(r.ring_id.clone());
                self.node.view_for(Some(r.ring_version), Some(&id)).await
            }
            None => self.node.membership.view(),
        }
    }

    fn apply(&self, view: &Arc<View>, item: &pb::PublishRequest) -> deliver_result::Result {
        if let Err(e) = key::validate(&item.key) {
            return error(Code::InvalidArgument, format!("invalid key: {e}"));
        }
        if !matches!(self.node.decide(view.clone(), &item.key), Decision::Mine(_)) {
            return deliver_result::Result::NotOwner(ring_ref(view));
        }
        let publish = Publish {
            data: &item.data,
            content_type: &item.content_type,
            expected_seq: item.expected_seq,
            expected_epoch: &item.expected_epoch,
            idempotency_key: &item.idempotency_key,
        };
        match self.node.keys.apply(&item.key, publish) {
            Ok(applied) => deliver_result::Result::Ok(pb::PublishReply {
                seq: applied.seq,
                epoch: applied.epoch,
                node: self.node.id.0.clone(),
                delivered: applied.delivered,
                replicated: false,
            }),
            Err(e @ (ApplyError::Payload(_) | ApplyError::IdempotencyKeyTooLong(_))) => {
                error(Code::InvalidArgument, e.to_string())
            }
            Err(e @ ApplyError::SeqMismatch { .. }) => {
                error(Code::FailedPrecondition, e.to_string())
            }
        }
    }
}

fn error(code: Code, message: String) -> deliver_result::Result {
    deliver_result::Result::Error(pb::Error {
        code: code as u32,
        message,
    })
}

fn ring_ref(view: &View) -> pb::RingRef {
    pb::RingRef {
        ring_version: view.version,
        ring_id: view.ring.id().0.clone(),
    }
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn deliver(
        &self,
        request: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverReply>, Status> {
        let request = request.into_inner();
        let view = self.view(request.ring.as_ref()).await;
        let results = request
            .items
            .iter()
            .map(|item| pb::DeliverResult {
                result: Some(self.apply(&view, item)),
            })
            .collect();
        Ok(Response::new(pb::DeliverReply {
            results,
            ring: Some(ring_ref(&view)),
        }))
    }

    async fn key_presence(
        &self,
        request: Request<pb::KeyPresenceRequest>,
    ) -> Result<Response<pb::KeyPresenceReply>, Status> {
        let request = request.into_inner();
        key::validate(&request.key)
            .map_err(|e| Status::invalid_argument(format!("invalid key: {e}")))?;
        let view = self.view(request.ring.as_ref()).await;
        let result = match self.node.decide(view.clone(), &request.key) {
            Decision::Mine(_) => key_presence_reply::Result::Ok(pb::PresenceReply {
                members: self.node.keys.presence(&request.key),
                node: self.node.id.0.clone(),
            }),
            _ => key_presence_reply::Result::NotOwner(ring_ref(&view)),
        };
        Ok(Response::new(pb::KeyPresenceReply {
            result: Some(result),
        }))
    }
}
