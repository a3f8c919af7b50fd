//! `GET /v1/doc/{name}`: the y-websocket protocol (sync step 1 / step 2 / update,
//! awareness and awareness queries, binary frames) on the owner of the key
//! `doc:{name}`, as the stock npm `y-websocket` client speaks it.
//!
//! Built so far (issue 25, started): documents in memory on the owner; a non-owner
//! relays the connection to the owner (stock clients do not follow redirects), for
//! owners reached over plain HTTP so far. Each connection's awareness states are removed when it closes. A
//! malformed message closes that connection only, with 4400 and the reason.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use ringfeed_router::key::Key;
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use yrs::encoding::read::Cursor;
use yrs::sync::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::{ClientID, ReadTxn, Transact, Update};

use super::{refused, unavailable, ApiError};
use crate::node::Node;
use crate::protocol::close::CloseCode;
use crate::protocol::params::ClientQuery;
use crate::session::{self, Placement};
use crate::state::docs::{encode, Room};

/// The largest y-protocol message a client may send (an update or a sync step).
pub(super) const MAX_DOC_MESSAGE: usize = 8 << 20;

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
    // owner (plain HTTP owners only so far), which checks the ticket.
    let upstream = match session::place(&node, &key, query.rv).await {
        Placement::Here => None,
        Placement::Moved { owner, .. } => match owner.http.strip_prefix("http://") {
            Some(host) => {
                let query = request
                    .uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                Some(format!("ws://{host}/v1/doc/{name}{query}"))
            }
            None => {
                return unavailable(
                    "this node does not own the document (relaying over TLS is not built yet)",
                    1,
                )
            }
        },
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
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_DOC_MESSAGE))
            .max_frame_size(Some(MAX_DOC_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        match upstream {
            None => serve(ws, docs.docs.room(key.as_str()), shutdown).await,
            Some(url) => relay(ws, &url, config, shutdown).await,
        }
        drop(permit);
    });
    switching
}

/// Relays a client to the owner at `url`, message for message (one in flight each way:
/// no buffer grows), until either side ends; the owner's close is passed on.
async fn relay<S>(
    mut client: WebSocketStream<S>,
    url: &str,
    config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    shutdown: tokio_util::sync::CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    let mut owner = match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok((owner, _))) => owner,
        _ => {
            let frame = CloseFrame {
                code: WsCloseCode::from(CloseCode::Unavailable as u16),
                reason: "the document's owner cannot be reached; reconnect".into(),
            };
            let _ = client.close(Some(frame)).await;
            return;
        }
    };
    loop {
        tokio::select! {
            message = client.next() => match message {
                Some(Ok(message @ (WsMessage::Binary(_) | WsMessage::Text(_)))) => {
                    if owner.send(message).await.is_err() {
                        break;
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    let _ = owner.close(frame).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            message = owner.next() => match message {
                Some(Ok(message @ (WsMessage::Binary(_) | WsMessage::Text(_)))) => {
                    if client.send(message).await.is_err() {
                        break;
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    let _ = client.close(frame).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            _ = shutdown.cancelled() => break,
        }
    }
    let frame = CloseFrame {
        code: WsCloseCode::from(CloseCode::GoingAway as u16),
        reason: "relay ended; reconnect".into(),
    };
    let _ = client.close(Some(frame)).await;
    let _ = owner.close(None).await;
}

/// One editor's connection, until it ends.
async fn serve<S>(
    mut ws: WebSocketStream<S>,
    room: Arc<Room>,
    shutdown: tokio_util::sync::CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut changes = room.changes.subscribe();
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
    // The awareness clients this connection announced, removed when it ends.
    let mut mine = HashSet::new();
    let ended = loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(WsMessage::Binary(data))) => match handle(&room, &data, &mut mine) {
                    Ok(replies) => {
                        let mut sent = true;
                        for reply in replies {
                            sent = sent && ws.send(WsMessage::Binary(reply.into())).await.is_ok();
                        }
                        if !sent {
                            break None;
                        }
                    }
                    Err(reason) => break Some((CloseCode::BadRequest, reason)),
                },
                Some(Ok(WsMessage::Text(_))) => {
                    break Some((CloseCode::BadRequest, "y-websocket messages are binary".into()))
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            },
            change = changes.recv() => match change {
                Ok(bytes) => {
                    // Every editor shares the one encoded message.
                    if ws.send(WsMessage::Binary(bytes)).await.is_err() {
                        break None;
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    break Some((CloseCode::SlowConsumer, "too far behind the document's changes; reconnect".into()))
                }
                Err(RecvError::Closed) => break None,
            },
            _ = shutdown.cancelled() => break Some((CloseCode::GoingAway, "node shutting down".into())),
        }
    };
    if let Some((code, reason)) = ended {
        let frame = CloseFrame {
            code: WsCloseCode::from(code as u16),
            reason: reason.into(),
        };
        let _ = ws.close(Some(frame)).await;
    }
    // Whoever this connection announced has left.
    if !mine.is_empty() {
        let gone = {
            let mut awareness = room.awareness.lock().unwrap_or_else(|e| e.into_inner());
            for id in &mine {
                awareness.remove_state(*id);
            }
            awareness.update_with_clients(mine.iter().copied())
        };
        if let Ok(update) = gone {
            let _ = room
                .changes
                .send(Bytes::from(encode(&Message::Awareness(update))));
        }
    }
}

/// Applies one client message (several y-protocol messages may share it); the replies
/// to send back. An error is the reason to close the connection.
fn handle(room: &Room, data: &[u8], mine: &mut HashSet<ClientID>) -> Result<Vec<Vec<u8>>, String> {
    let mut decoder = DecoderV1::new(Cursor::new(data));
    let reader = MessageReader::new(&mut decoder);
    let mut replies = Vec::new();
    let mut awareness = room.awareness.lock().unwrap_or_else(|e| e.into_inner());
    for message in reader {
        match message.map_err(|e| format!("malformed y-protocol message: {e}"))? {
            Message::Sync(SyncMessage::SyncStep1(sv)) => {
                let update = awareness.doc().transact().encode_state_as_update_v1(&sv);
                replies.push(encode(&Message::Sync(SyncMessage::SyncStep2(update))));
            }
            Message::Sync(SyncMessage::SyncStep2(update) | SyncMessage::Update(update)) => {
                let update =
                    Update::decode_v1(&update).map_err(|e| format!("malformed update: {e}"))?;
                awareness
                    .doc()
                    .transact_mut()
                    .apply_update(update)
                    .map_err(|e| format!("update not applied: {e}"))?;
            }
            Message::Awareness(update) => {
                mine.extend(update.clients.keys().copied());
                let forwarded = encode(&Message::Awareness(update.clone()));
                awareness
                    .apply_update(update)
                    .map_err(|e| format!("malformed awareness update: {e}"))?;
                let _ = room.changes.send(Bytes::from(forwarded));
            }
            Message::AwarenessQuery => {
                let update = awareness.update().map_err(|e| format!("awareness: {e}"))?;
                replies.push(encode(&Message::Awareness(update)));
            }
            Message::Auth(_) | Message::Custom(..) => {}
        }
    }
    Ok(replies)
}
