//! `POST /v1/tickets`: a service holding an API token asks for a ticket a client will
//! present for one key (docs/protocol.md *Tickets and authentication*).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderMap, StatusCode};
use ringfeed_router::key;
use serde::Deserialize;
use serde_json::json;

use super::reply::{refused, ApiError};
use crate::node::Node;
use crate::protocol::ticket::{Claims, Kind, MAX_SUBJECT};

/// What a ticket is asked for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TicketRequest {
    sub: String,
    key: String,
    ttl_s: u64,
    #[serde(default)]
    publish: bool,
    #[serde(default)]
    presence: bool,
}

/// Issues a ticket: 404 with authentication off, 401 without a valid API token, 400
/// for a bad request, else `{"ticket","expires_at"}`.
pub(super) async fn issue(
    State(node): State<Arc<Node>>,
    peer: Option<axum::Extension<super::Peer>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(auth) = &node.auth else {
        return ApiError(
            StatusCode::NOT_FOUND,
            "authentication is off on this node".into(),
        )
        .into_response();
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = node.check_api_token(authorization, peer.map(|p| p.0 .0.ip())) {
        return refused(&e);
    }
    let request: TicketRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return ApiError::bad_request(format!("bad ticket request: {e}")).into_response(),
    };
    if let Err(e) = key::validate(&request.key) {
        return ApiError::bad_request(format!("invalid key: {e}")).into_response();
    }
    if request.sub.is_empty() || request.sub.len() > MAX_SUBJECT {
        return ApiError::bad_request(format!("sub must be 1–{MAX_SUBJECT} bytes")).into_response();
    }
    let max = auth.max_ticket_ttl.as_secs();
    if request.ttl_s == 0 || request.ttl_s > max {
        return ApiError::bad_request(format!("ttl_s must be between 1 and {max}")).into_response();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let claims = Claims {
        sub: request.sub,
        key: request.key,
        exp: now + request.ttl_s,
        publish: request.publish,
        presence: request.presence,
        kind: Kind::Ticket,
        nonce: {
            use base64::Engine;
            let bytes: [u8; 12] = rand::random();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        },
    };
    let ticket = auth.signer.get().sign(&claims);
    Json(json!({"ticket": ticket, "expires_at": claims.exp})).into_response()
}
