//! Replies every HTTP endpoint shares: errors with their status, 503 with
//! `Retry-After`, 307 to the owner, and reading a client request.

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderValue, StatusCode};
use ringfeed_router::key::Key;
use serde_json::json;

use crate::config::NonOwner;
use crate::node::Node;
use crate::protocol::params::ClientQuery;
use crate::protocol::redirect::redirect_url;
use crate::session::{self, Placement};
use crate::wire::ToWire;

/// An error answer: `{"error": "…"}` with a status.
#[derive(Debug)]
pub struct ApiError(pub(super) StatusCode, pub(super) String);

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// 503 with `Retry-After`.
pub fn unavailable(message: &str, retry_after_s: u32) -> Response {
    let mut response = ApiError(StatusCode::SERVICE_UNAVAILABLE, message.into()).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    response
}

/// A refusal as HTTP: its status, with `Retry-After` when it is worth retrying later.
pub fn refused(error: &dyn ToWire) -> Response {
    let wire = error.wire();
    let mut response = ApiError(wire.http, error.to_string()).into_response();
    if wire.retry_later() {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(error.retry_after().as_secs_f64().ceil().max(1.0) as u64),
        );
    }
    response
}

/// The span of one plain-HTTP client request (`/v1/sse`, `/v1/poll`): transport and
/// node now, the key once it is read (`record("key", …)`).
pub(super) fn connection_span(transport: &'static str, node: &Node) -> tracing::Span {
    tracing::debug_span!(
        "connection",
        transport,
        node = %node.id,
        key = tracing::field::Empty
    )
}

/// 307 to the same `path` and query on `base` (the owner's HTTP URL), with `rv` set.
pub fn redirect_307(base: &str, path: &str, query: &str, ring_version: u64) -> Response {
    let location = redirect_url(base, path, query, ring_version);
    let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The query and key of a plain-HTTP client request (`/v1/sse`, `/v1/poll`); a bad
/// one is a 400 naming the problem.
pub fn client_request(request: &Request) -> Result<(ClientQuery, Key), ApiError> {
    let query = ClientQuery::parse(request.uri().query()).map_err(ApiError::bad_request)?;
    let raw = query
        .key
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("missing key"))?;
    let key = Key::parse(raw).map_err(|e| ApiError::bad_request(format!("invalid key: {e}")))?;
    Ok((query, key))
}

/// `None` when this node owns `key`; otherwise the answer that sends the client on:
/// a 307 to the same `path` on the owner (or, with `--non-owner proxy`, the owner's
/// own answer, within `within`), or a 503 when no owner is known.
pub async fn elsewhere(
    node: &Node,
    key: &Key,
    query: &ClientQuery,
    path: &str,
    headers: &http::HeaderMap,
    within: std::time::Duration,
) -> Option<Response> {
    match session::place(node, key, query.rv).await {
        Placement::Here => None,
        Placement::Moved { owner, .. } if node.config.non_owner == NonOwner::Proxy => {
            let target = format!("{path}?{}", query.raw);
            Some(super::proxy::forward(node, &owner, &target, headers, within).await)
        }
        Placement::Moved { owner, version } => {
            Some(redirect_307(&owner.http, path, &query.raw, version))
        }
        Placement::Unknown => Some(unavailable("no owner known for this key", 1)),
    }
}
