//! `GET /v1/sse`: Server-Sent Events. Every frame is one event whose `data:` is the
//! frame's JSON and whose `id:` is `{epoch}:{seq}` — for an update its seq, for
//! `welcome` and `reset` the position the stream continues from — so an EventSource
//! resumes exactly where it was with `Last-Event-ID` (which wins over `since`/`epoch`).
//! A comment line goes out every heartbeat; a kick (slow consumer, moved) ends the
//! stream, and the browser's reconnect lands on the owner through a 307.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, StatusCode};
use ringfeed_router::key::Key;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::reply::{client_request, connection_span, elsewhere, refused, unavailable, ApiError};
use tracing::Instrument;

use crate::node::{Held, Node, Transport};
use crate::protocol::frames::{self, ServerFrame};
use crate::protocol::params::last_event_id;
use crate::session::{self, Subscription};

/// The reconnection delay the stream asks EventSource to use (the SSE `retry:` field).
const RETRY_MS: u64 = 1000;

/// Most queued frames put into one chunk of the response body.
const MAX_EVENTS_PER_CHUNK: usize = 256;

/// `GET /v1/sse?key=K[&since=S&epoch=E]`.
pub async fn sse(State(node): State<Arc<Node>>, request: Request) -> Result<Response, ApiError> {
    let span = connection_span("sse", &node);
    serve(node, request).instrument(span).await
}

async fn serve(node: Arc<Node>, request: Request) -> Result<Response, ApiError> {
    let (query, key) = client_request(&request)?;
    tracing::Span::current().record("key", key.as_str());
    let resume = match request.headers().get("last-event-id") {
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| ApiError::bad_request("invalid Last-Event-ID"))?;
            Some(last_event_id(value).map_err(ApiError::bad_request)?)
        }
        None => query.resume(),
    };
    let within = Duration::from_secs(10);
    if let Some(answer) = elsewhere(&node, &key, &query, "/v1/sse", request.headers(), within).await
    {
        return Ok(answer);
    }
    if node.shutdown.is_cancelled() || node.is_draining() {
        return Ok(unavailable("node is draining", 1));
    }
    // The owner checks the ticket, before the key's state is touched.
    let granted = match session::authorize(
        &node,
        &key,
        query.credential(),
        false,
        super::source(&request),
    ) {
        Ok(granted) => granted,
        Err(e) => return Ok(refused(&e)),
    };
    let permit = match node.admit() {
        Ok(permit) => permit,
        Err(e) => return Ok(refused(&e)),
    };
    let subscribed = session::subscribe(
        &node,
        &key,
        query.raw.clone(),
        resume.as_ref(),
        false,
        granted.as_ref(),
    );
    let sub = match subscribed {
        Ok(sub) => sub,
        Err(e) => return Ok(refused(&e)),
    };
    let first = start_events(&node, &key, &sub);
    let ends_at = (node.config.sse_max_stream_ms > 0).then(|| {
        tokio::time::Instant::now() + Duration::from_millis(node.config.sse_max_stream_ms)
    });
    let stream = EventStream {
        node: node.clone(),
        sub,
        first: Some(first),
        ends_at,
        _permit: permit,
        _held: Held::new(&node, Transport::Sse),
    };
    Ok(event_stream(Body::from_stream(
        futures_util::stream::unfold(stream, EventStream::next_chunk),
    )))
}

/// A `text/event-stream` answer of `body`, neither cached nor buffered by a proxy.
pub(super) fn event_stream(body: Body) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `welcome`, the reset, the replay — as one chunk.
fn start_events(node: &Node, key: &Key, sub: &Subscription) -> Bytes {
    let c = &sub.start.catchup;
    let mut out = BytesMut::new();
    out.put_slice(format!("retry: {RETRY_MS}\n\n").as_bytes());
    let welcome = ServerFrame::Welcome {
        key: key.as_str(),
        node: &node.id.0,
        epoch: &c.epoch,
        seq: c.seq,
        heartbeat_ms: node.config.sse_heartbeat_ms,
        resume: sub.resume.as_deref(),
    }
    .encode();
    // The welcome's id is where the stream continues from: `since` when a replay
    // follows, else the seq it reports (or the reset's, when one follows).
    let welcome_at = sub
        .start
        .replay_from
        .or(c.reset.as_ref().map(|r| r.seq))
        .unwrap_or(c.seq);
    event(&mut out, &c.epoch, Some(welcome_at), &welcome);
    if let Some(reset) = &c.reset {
        event(
            &mut out,
            &c.epoch,
            Some(reset.seq),
            &reset.frame(key.as_str(), &c.epoch),
        );
    }
    for frame in &c.updates {
        event(
            &mut out,
            &c.epoch,
            frames::update_seq(frame.as_str()),
            frame,
        );
    }
    out.freeze()
}

fn event(out: &mut BytesMut, epoch: &str, seq: Option<u64>, frame: &Utf8Bytes) {
    if let Some(seq) = seq {
        out.put_slice(b"id: ");
        out.put_slice(epoch.as_bytes());
        out.put_u8(b':');
        out.put_slice(seq.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"data: ");
    out.put_slice(frame.as_str().as_bytes());
    out.put_slice(b"\n\n");
}

struct EventStream {
    node: Arc<Node>,
    sub: Subscription,
    first: Option<Bytes>,
    /// When the stream is ended for the client to reconnect, if ever.
    ends_at: Option<tokio::time::Instant>,
    _permit: OwnedSemaphorePermit,
    /// Counted as an open SSE connection while it lasts.
    _held: Held,
}

impl EventStream {
    /// The next chunk of the body: queued events (coalesced), a heartbeat comment, or
    /// the end of the stream on a kick or shutdown.
    async fn next_chunk(mut self) -> Option<(Result<Bytes, Infallible>, EventStream)> {
        if let Some(first) = self.first.take() {
            return Some((Ok(first), self));
        }
        let heartbeat = Duration::from_millis(self.node.config.sse_heartbeat_ms);
        let epoch = self.sub.start.catchup.epoch.clone();
        tokio::select! {
            biased;
            _ = self.sub.control().kicked() => None,
            _ = self.node.shutdown.cancelled() => None,
            _ = sleep_until_opt(self.ends_at) => None,
            frame = self.sub.control().recv() => {
                let frame = frame?;
                let mut out = BytesMut::new();
                event(&mut out, &epoch, frames::update_seq(frame.as_str()), &frame);
                for _ in 1..MAX_EVENTS_PER_CHUNK {
                    match self.sub.control().try_recv() {
                        Some(frame) => event(&mut out, &epoch, frames::update_seq(frame.as_str()), &frame),
                        None => break,
                    }
                }
                Some((Ok(out.freeze()), self))
            }
            _ = tokio::time::sleep(heartbeat) => Some((Ok(Bytes::from_static(b": heartbeat\n\n")), self)),
        }
    }
}

/// Sleeps until `at`, or forever when there is no `at`.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
