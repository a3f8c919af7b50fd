//! `GET /v1/doc/{name}`: the y-websocket protocol (sync step 1 / step 2 / update,
//! awareness and awareness queries, binary frames) on the owner of the key
//! `doc:{name}`, as the stock npm `y-websocket` client speaks it.
//!
//! A non-owner relays the connection to the owner ([`proxy`]: stock clients follow no
//! redirect); when the document moves, the owner closes its editors (4503) and they
//! reconnect, through any node, to the new one. Each connection's awareness states are
//! removed when it closes. A malformed message (4400), an update over
//! `--doc-max-update` or one growing the document past `--doc-max-bytes` (4413), or
//! awareness past `--doc-awareness-rate` (4429) closes that connection only.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use ringfeed_router::key::Key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use yrs::encoding::read::Cursor;
use yrs::sync::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::DecoderV1;
use yrs::{ClientID, ReadTxn, Transact};

use super::{proxy, refused, unavailable, ApiError};
use crate::cluster::documents;
use crate::cluster::replication::PublishError;
use crate::node::Decision;
use crate::node::Node;
use crate::protocol::close::CloseCode;
use crate::protocol::frames::{self, PayloadError};
use crate::protocol::params::ClientQuery;
use crate::session::{self, Placement};
use crate::state::docs::{encode, Room};
use crate::state::{ApplyError, Publish};

/// Room in a client message beside its largest update (`--doc-max-update`): the
/// y-protocol's headers and other messages sharing it.
const MESSAGE_SLACK: usize = 64 * 1024;

/// `GET /v1/doc/{name}`: checks, then the upgrade.
pub(super) async fn doc(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    mut request: Request,
) -> Response {
    let query = match ClientQuery::parse(request.uri().query()) {
        Ok(query) => query,
        Err(e) => return ApiError::bad_request(e).into_response(),
    };
    let key = match Key::parse(&format!("doc:{name}")) {
        Ok(key) => key,
        Err(e) => {
            return ApiError::bad_request(format!("invalid document name: {e}")).into_response()
        }
    };
    if let Some(refusal) = super::refuse_upgrade(&node, &request) {
        return refusal;
    }
    // Stock clients do not follow redirects: a non-owner relays the connection to the
    // owner (which checks the ticket).
    let upstream = match session::place(&node, &key, query.rv).await {
        Placement::Here => None,
        Placement::Moved { owner, .. } => {
            let query = request
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            Some((
                owner.http.clone(),
                format!("{}/v1/doc/{name}{query}", owner.ws_base()),
            ))
        }
        Placement::Unknown => {
            return unavailable("no owner known for this document", 1);
        }
    };
    if upstream.is_none() {
        if let Err(e) = session::authorize(
            &node,
            &key,
            query.credential(),
            false,
            super::source(&request),
        ) {
            return refused(&e);
        }
    }
    let permit = match node.admit() {
        Ok(permit) => permit,
        Err(e) => return refused(&e),
    };
    let max = node.config.docs.doc_max_update + MESSAGE_SLACK;
    // Small buffers: most editors are idle most of the time (tungstenite's default is
    // 128 KiB each way), and one message is written at a time.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(max);
    // A relayed editor is connected to the owner before its own upgrade is answered,
    // so the owner's refusal (a ticket, a limit) reaches it as the owner's status.
    let owner = match upstream {
        None => None,
        Some((base, url)) => match proxy::dial_ws(&node, &base, &url, config).await {
            Ok(owner) => Some(owner),
            Err(proxy::DialError::Refused(status)) => {
                return ApiError(status, format!("the document's owner answered {status}"))
                    .into_response()
            }
            Err(e) => {
                tracing::debug!(url = %crate::protocol::redirect::redacted(&url), error = %e, "the document's owner cannot be reached");
                return unavailable("the document's owner cannot be reached; retry", 1);
            }
        },
    };
    let (on_upgrade, switching) = match super::switch_protocols(&mut request) {
        Ok(switched) => switched,
        Err(refusal) => return refusal.into_response(),
    };
    let shutdown = node.shutdown.clone();
    let docs = node.clone();
    node.tasks.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let _held = crate::node::Held::new(&docs, crate::node::Transport::Doc);
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        match owner {
            None => serve(ws, &docs, key.as_str(), shutdown).await,
            Some(owner) => proxy::relay(ws, owner, None, shutdown).await,
        }
        drop(permit);
    });
    switching
}

/// Why an editor's connection ends.
type Ending = Option<(CloseCode, String)>;

/// One editor's connection, until it ends.
async fn serve<S>(
    mut ws: WebSocketStream<S>,
    node: &Arc<Node>,
    key: &str,
    shutdown: tokio_util::sync::CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let room = documents::open(node, key).await;
    let mut editor_queue = room.join();
    // The server's side of the sync: its state vector and who is there.
    let start = {
        let awareness = room.awareness.lock().unwrap_or_else(|e| e.into_inner());
        let sv = awareness.doc().transact().state_vector();
        let mut start = vec![encode(&Message::Sync(SyncMessage::SyncStep1(sv)))];
        if let Ok(update) = awareness.update() {
            start.push(encode(&Message::Awareness(update)));
        }
        start
    };
    for message in start {
        if ws.send(WsMessage::Binary(message.into())).await.is_err() {
            return;
        }
    }
    let mut editor = Editor {
        mine: HashSet::new(),
        awareness: Bucket::new(node.config.docs.doc_awareness_rate),
        messages: Bucket::new(node.config.client_message_rate),
        max_update: node.config.docs.doc_max_update,
    };
    let ended: Ending = loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(WsMessage::Binary(data))) => {
                    let handled = match editor.handle(&room, &data) {
                        Ok(handled) => handled,
                        Err(refusal) => break Some(refusal),
                    };
                    if let Some(refusal) = publish(node, key, handled.updates).await {
                        break Some(refusal);
                    }
                    let mut sent = true;
                    for reply in handled.replies {
                        sent = sent && ws.send(WsMessage::Binary(reply.into())).await.is_ok();
                    }
                    if !sent {
                        break None;
                    }
                }
                Some(Ok(WsMessage::Text(_))) => {
                    break Some((CloseCode::BadRequest, "y-websocket messages are binary".into()))
                }
                Some(Ok(_)) => {}
                Some(Err(WsError::Capacity(_))) => {
                    break Some((CloseCode::TooLarge, format!(
                        "message over the limit ({} bytes of update)", editor.max_update
                    )))
                }
                Some(Err(_)) | None => break None,
            },
            change = editor_queue.changes.recv() => match change {
                Some(bytes) => {
                    // Every editor shares the one encoded message.
                    if ws.send(WsMessage::Binary(bytes)).await.is_err() {
                        break None;
                    }
                }
                None => {
                    break Some((CloseCode::SlowConsumer, "too far behind the document's changes; reconnect".into()))
                }
            },
            _ = room.gone.cancelled() => {
                break Some((CloseCode::Unavailable, "the document moved to another node; reconnect".into()))
            }
            _ = shutdown.cancelled() => break Some((CloseCode::GoingAway, "node shutting down".into())),
        }
    };
    if let Some((code, reason)) = ended {
        if matches!(
            code,
            CloseCode::BadRequest | CloseCode::TooLarge | CloseCode::TooMany | CloseCode::Policy
        ) {
            node.counters.doc_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%key, code = code.code(), %reason, "editor refused");
        }
        let frame = CloseFrame {
            code: WsCloseCode::from(code.code()),
            reason: reason.into(),
        };
        let _ = ws.close(Some(frame)).await;
        // The close handshake: what the client sent meanwhile is read and dropped, so
        // it gets the close frame rather than a reset.
        let drained = async { while let Some(Ok(_)) = ws.next().await {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drained).await;
    }
    // Whoever this connection announced has left.
    if !editor.mine.is_empty() {
        let gone = {
            let mut awareness = room.awareness.lock().unwrap_or_else(|e| e.into_inner());
            for id in &editor.mine {
                awareness.remove_state(*id);
            }
            awareness.update_with_clients(editor.mine.iter().copied())
        };
        drop(editor_queue);
        if let Ok(update) = gone {
            room.send(Bytes::from(encode(&Message::Awareness(update))));
        }
    }
}

/// Logs an editor's updates on the key, in order; each is applied to the document
/// and sent to the editors once the successor holds it. A refusal closes the editor
/// (which syncs again when it reconnects: nothing it holds is lost).
async fn publish(node: &Arc<Node>, key: &str, updates: Vec<Vec<u8>>) -> Ending {
    for update in updates {
        let view = node.membership.view();
        let view = match node.decide(view, key) {
            Decision::Mine(view) => view,
            _ => {
                return Some((
                    CloseCode::Unavailable,
                    "the document moved to another node; reconnect".into(),
                ))
            }
        };
        let publish = Publish {
            data: &update,
            content_type: frames::YJS_UPDATE,
            ..Publish::default()
        };
        if let Err(e) = documents::publish(node, &view, key, publish).await {
            let code = match &e {
                PublishError::Apply(ApplyError::Payload(
                    PayloadError::TooLarge(..) | PayloadError::DocumentFull(_),
                )) => CloseCode::TooLarge,
                PublishError::Apply(ApplyError::Payload(_)) => CloseCode::BadRequest,
                PublishError::Apply(ApplyError::MemoryBudget) => CloseCode::TooMany,
                _ => CloseCode::Unavailable,
            };
            return Some((code, e.to_string()));
        }
    }
    None
}

/// What one editor's connection keeps.
struct Editor {
    /// The awareness clients it announced, removed when it ends.
    mine: HashSet<ClientID>,
    /// Its awareness messages that change something.
    awareness: Bucket,
    /// All its messages (`--client-message-rate`, as on `/v1/connect`).
    messages: Bucket,
    max_update: usize,
}

/// What one client message asks for: replies to it, and updates to log.
struct Handled {
    replies: Vec<Vec<u8>>,
    updates: Vec<Vec<u8>>,
}

impl Editor {
    /// Reads one client message (several y-protocol messages may share it). An error
    /// is the code and reason to close the connection with.
    fn handle(&mut self, room: &Room, data: &[u8]) -> Result<Handled, (CloseCode, String)> {
        if !self.messages.take() {
            return Err((
                CloseCode::Policy,
                "more messages a second than --client-message-rate".into(),
            ));
        }
        let bad = |reason: String| (CloseCode::BadRequest, reason);
        crate::protocol::ysync::check(data)
            .map_err(|e| bad(format!("malformed y-protocol message: {e}")))?;
        let mut decoder = DecoderV1::new(Cursor::new(data));
        let reader = MessageReader::new(&mut decoder);
        let mut handled = Handled {
            replies: Vec::new(),
            updates: Vec::new(),
        };
        let mut awareness = room.awareness.lock().unwrap_or_else(|e| e.into_inner());
        for message in reader {
            match message.map_err(|e| bad(format!("malformed y-protocol message: {e}")))? {
                Message::Sync(SyncMessage::SyncStep1(sv)) => {
                    let update =
                        crate::protocol::ysync::encode_state(&awareness.doc().transact(), &sv);
                    handled
                        .replies
                        .push(encode(&Message::Sync(SyncMessage::SyncStep2(update))));
                }
                Message::Sync(SyncMessage::SyncStep2(update) | SyncMessage::Update(update)) => {
                    if update.len() > self.max_update {
                        return Err((
                            CloseCode::TooLarge,
                            format!(
                                "an update of {} bytes; the limit is {}",
                                update.len(),
                                self.max_update
                            ),
                        ));
                    }
                    let decoded = frames::decode_yjs(&update)
                        .map_err(|e| bad(format!("malformed update: {e}")))?;
                    if !decoded.is_empty() {
                        handled.updates.push(update);
                    }
                }
                Message::Awareness(update) => {
                    // Stock clients echo every awareness update they receive; an echo
                    // changes nothing, and is neither counted nor sent on.
                    let sent = update.clone();
                    let changed = awareness
                        .apply_update_summary(update)
                        .map_err(|e| bad(format!("malformed awareness update: {e}")))?;
                    if changed.is_none() {
                        continue;
                    }
                    if !self.awareness.take() {
                        return Err((
                            CloseCode::TooMany,
                            "too many awareness changes; slow down".into(),
                        ));
                    }
                    self.mine.extend(sent.clients.keys().copied());
                    room.send(Bytes::from(encode(&Message::Awareness(sent))));
                }
                Message::AwarenessQuery => {
                    let update = awareness
                        .update()
                        .map_err(|e| bad(format!("awareness: {e}")))?;
                    handled.replies.push(encode(&Message::Awareness(update)));
                }
                Message::Auth(_) | Message::Custom(..) => {}
            }
        }
        Ok(handled)
    }
}

/// A token bucket: `rate` a second, up to twice that at once.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate) * 2.0,
            at: tokio::time::Instant::now(),
        }
    }

    /// Takes one token, if there is one.
    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.at = now;
        self.tokens = (self.tokens + refill).min(self.rate * 2.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
