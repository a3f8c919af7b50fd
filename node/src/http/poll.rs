//! `GET /v1/poll`: long polling. Answers as soon as any update after `since` exists
//! (or a `reset` is due), else with an empty list after `wait` seconds. `wait=0` is a
//! plain poll with `ETag: "{epoch}:{seq}"` and 304 on a matching `If-None-Match`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use ringfeed_router::key::Key;

use super::reply::{client_request, connection_span, elsewhere, refused, unavailable, ApiError};
use tracing::Instrument;

use crate::node::Node;
use crate::protocol::params::Resume;
use crate::protocol::params::DEFAULT_WAIT_S;
use crate::state::Catchup;

/// `GET /v1/poll?key=K&since=S[&epoch=E][&wait=SECONDS]`.
pub async fn poll(State(node): State<Arc<Node>>, request: Request) -> Result<Response, ApiError> {
    let span = connection_span("poll", &node);
    serve(node, request).instrument(span).await
}

async fn serve(node: Arc<Node>, request: Request) -> Result<Response, ApiError> {
    let (query, key) = client_request(&request)?;
    tracing::Span::current().record("key", key.as_str());
    let since = query
        .since
        .ok_or_else(|| ApiError::bad_request("missing since (use since=0 the first time)"))?;
    let wait = Duration::from_secs(query.wait.unwrap_or(DEFAULT_WAIT_S));
    let within = wait + Duration::from_secs(10);
    if let Some(answer) =
        elsewhere(&node, &key, &query, "/v1/poll", request.headers(), within).await
    {
        return Ok(answer);
    }
    // The owner checks the ticket, before the key's state is touched.
    let resume = match crate::session::authorize(
        &node,
        &key,
        query.credential(),
        false,
        super::source(&request),
    ) {
        Ok(granted) => granted.map(|g| g.resume),
        Err(e) => return Ok(refused(&e)),
    };
    crate::cluster::follower::promote_if_due(&node, key.as_str(), &node.membership.view());
    let from = Resume {
        since,
        epoch: query.epoch.clone(),
    };
    let max = node.keys.limits().history_len.max(1);

    // Reading a key creates it: past the memory budget only keys held are read.
    let read = || node.keys.read(key.as_str(), &from, max);
    if wait.is_zero() {
        let Some((catchup, _)) = read() else {
            return Ok(over_budget(&node));
        };
        let etag = format!("\"{}:{}\"", catchup.epoch, catchup.seq);
        let unchanged = request
            .headers()
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
        let mut response = if unchanged {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            answer(&key, &catchup, resume.as_deref())
        };
        if let Ok(value) = HeaderValue::from_str(&etag) {
            response.headers_mut().insert(header::ETAG, value);
        }
        return Ok(response);
    }

    // A waiting poll holds a connection: it counts against the limit.
    let _permit = match node.admit() {
        Ok(permit) => permit,
        Err(e) => return Ok(refused(&e)),
    };
    let _held = crate::node::Held::new(&node, crate::node::Transport::Poll);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Reading creates the key: once it has moved away (a drain while this poll
        // waited), a read would make a fresh epoch here. The client polls again, and
        // reaches the new owner.
        if !matches!(
            node.decide(node.membership.view(), key.as_str()),
            crate::node::Decision::Mine(_)
        ) {
            return Ok(unavailable("the key moved; poll again", 1));
        }
        let Some((catchup, mut changes)) = read() else {
            return Ok(over_budget(&node));
        };
        if catchup.reset.is_some() || !catchup.updates.is_empty() {
            return Ok(answer(&key, &catchup, resume.as_deref()));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                // The key's state was replaced (it moved): answer with what we know.
                return Ok(answer(&key, &catchup, resume.as_deref()));
            },
            _ = tokio::time::sleep_until(deadline) => return Ok(answer(&key, &catchup, resume.as_deref())),
            _ = node.shutdown.cancelled() => return Ok(answer(&key, &catchup, resume.as_deref())),
        }
    }
}

/// 503 for a key not held here while the node is past its memory budget; counted.
fn over_budget(node: &Node) -> Response {
    node.counters.refused_memory.fetch_add(1, Ordering::Relaxed);
    unavailable("memory budget reached", 1)
}

/// `{"key","epoch","updates":[…],"seq"}`, a `reset` frame leading `updates` when one
/// is due; `seq` is the position to poll from next.
/// The answer: `{"key","epoch","updates","seq"}`, and with authentication on the
/// `resume` token the next poll presents instead of its ticket.
fn answer(key: &Key, catchup: &Catchup, resume: Option<&str>) -> Response {
    let mut body =
        String::with_capacity(64 + catchup.updates.iter().map(|f| f.len() + 1).sum::<usize>());
    body.push_str(r#"{"key":""#);
    body.push_str(key.as_str());
    body.push_str(r#"","epoch":""#);
    body.push_str(&catchup.epoch);
    body.push_str(r#"","updates":["#);
    let mut first = true;
    if let Some(reset) = &catchup.reset {
        body.push_str(reset.frame(key.as_str(), &catchup.epoch).as_str());
        first = false;
    }
    for frame in &catchup.updates {
        if !first {
            body.push(',');
        }
        body.push_str(frame.as_str());
        first = false;
    }
    body.push_str(r#"],"seq":"#);
    body.push_str(&catchup.position.to_string());
    if let Some(resume) = resume {
        // base64url and dots: nothing to escape.
        body.push_str(r#","resume":""#);
        body.push_str(resume);
        body.push('"');
    }
    body.push('}');
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
