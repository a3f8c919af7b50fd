//! The dashboard: `GET /` (a static page) and `GET /dashboard.js` (its ES module),
//! which draw the cluster from `GET /v1/dashboard`, a stream of Server-Sent Events each
//! carrying one snapshot of the whole cluster ([`crate::cluster::figures`]).
//! `GET /v1/cluster` answers the latest snapshot once, as JSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue};

use crate::cluster::figures::{Dashboard, Watch};
use crate::node::Node;

use super::reply::unavailable;

/// The page.
const PAGE: &str = include_str!("dashboard.html");
/// Its module.
const MODULE: &str = include_str!("dashboard.js");

/// The page and its module may load nothing from anywhere else, and talk only to this
/// node.
const POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
     style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'";

/// A stream's comment line when nothing else was sent for this long.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// How long `GET /v1/cluster` waits for the first snapshot.
const FIRST_SNAPSHOT: Duration = Duration::from_secs(3);

/// `GET /`.
pub(super) async fn page() -> Response {
    static_file(PAGE, "text/html; charset=utf-8")
}

/// `GET /dashboard.js`.
pub(super) async fn module() -> Response {
    static_file(MODULE, "text/javascript; charset=utf-8")
}

fn static_file(body: &'static str, content_type: &'static str) -> Response {
    let mut response = super::script(body, content_type);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `GET /v1/dashboard`: a snapshot as each is made (about once a second, and at once
/// when the ring changes), each one event whose `data:` is the snapshot's JSON.
pub(super) async fn stream(
    State(node): State<Arc<Node>>,
    Extension(dashboard): Extension<Arc<Dashboard>>,
) -> Response {
    let Ok(watch) = dashboard.watch() else {
        return unavailable("too many dashboards open on this node", 5);
    };
    super::sse::event_stream(axum::body::Body::from_stream(futures_util::stream::unfold(
        (node, watch, true),
        |(node, mut watch, first)| async move {
            let chunk = next_event(&node, &mut watch, first).await?;
            Some((Ok::<_, Infallible>(chunk), (node, watch, false)))
        },
    )))
}

/// The next chunk of a dashboard stream: the snapshot made since the last one (only
/// the latest, however slow the reader), a heartbeat comment, or the end at shutdown.
async fn next_event(node: &Node, watch: &mut Watch, first: bool) -> Option<Bytes> {
    let mut out = BytesMut::new();
    if first {
        out.put_slice(b"retry: 2000\n\n");
        if let Some(snapshot) = watch.snapshots.borrow_and_update().clone() {
            event(&mut out, &snapshot);
        }
        return Some(out.freeze());
    }
    tokio::select! {
        _ = node.shutdown.cancelled() => None,
        changed = watch.snapshots.changed() => {
            changed.ok()?;
            if let Some(snapshot) = watch.snapshots.borrow_and_update().clone() {
                event(&mut out, &snapshot);
            }
            Some(out.freeze())
        }
        _ = tokio::time::sleep(HEARTBEAT) => Some(Bytes::from_static(b": heartbeat\n\n")),
    }
}

fn event(out: &mut BytesMut, snapshot: &Bytes) {
    out.put_slice(b"event: snapshot\ndata: ");
    out.put_slice(snapshot);
    out.put_slice(b"\n\n");
}

/// `GET /v1/cluster`: the latest snapshot, once (waiting for the first when no
/// dashboard was open).
pub(super) async fn once(Extension(dashboard): Extension<Arc<Dashboard>>) -> Response {
    let Ok(mut watch) = dashboard.watch() else {
        return unavailable("too many dashboards open on this node", 5);
    };
    let snapshot =
        tokio::time::timeout(FIRST_SNAPSHOT, watch.snapshots.wait_for(Option::is_some)).await;
    match snapshot {
        Ok(Ok(snapshot)) => {
            let body = snapshot.clone().unwrap_or_default();
            (
                [(header::CONTENT_TYPE, "application/json")],
                axum::body::Body::from(body),
            )
                .into_response()
        }
        _ => unavailable("no snapshot of the cluster yet", 1),
    }
}
