//! `pub`: stamped payloads through the router (`Publish` / `PublishBatch`), straight
//! to each key's owner node (`--direct-node`: unary `Publish` to the owner's own
//! `Router` service), as pipelined Redis `PUBLISH`es of whole `update` frames (the seed
//! reference's publishers), or as length-prefixed frames to the first relay of P2's
//! same-hop floor (`--relay`), at a target rate or flat out. `done` also reports the
//! round trip of each call (sent → answered: the ack for ringfeed, the `PUBLISH` reply
//! for Redis; `null` for the relay, which answers nothing), so a latency can be split
//! into the part before the ack and the part after it.
//! To a secure router (P10): over TLS trusting `--ca`, each call carrying
//! `authorization: Bearer` with `--api-token`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{anyhow, bail};
use hdrhistogram::Histogram;
use ringfeed_client::routing::RingView;
use ringfeed_proto::v1::router_client::RouterClient;
use ringfeed_proto::v1::{Ack, PublishBatchRequest, PublishRequest};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::{emit, now_ns, payload, stopped};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct PubArgs {
    /// The router's gRPC address (host:port).
    #[arg(long, conflicts_with = "redis")]
    grpc: Option<String>,
    /// With `--grpc`: TLS to the router, trusting the CA certificates in this PEM file.
    #[arg(long, requires = "grpc")]
    ca: Option<std::path::PathBuf>,
    /// With `--grpc`: `authorization: Bearer TOKEN` on every call (a router started
    /// with `--api-tokens-file`).
    #[arg(long, requires = "grpc")]
    api_token: Option<String>,
    /// Publish straight to each key's owner instead of through the router: fetch the
    /// ring from this node (`GET {URL}/v1/ring`, e.g. `http://127.0.0.1:8001`) and send
    /// each unary `Publish` to its key's owner's own `Router` service (every node
    /// serves one on its gRPC port), over one connection per node. Unary only
    /// (`--batch 0`); the ring is read once, at the start.
    #[arg(long, conflicts_with_all = ["grpc", "redis", "relay"])]
    direct_node: Option<String>,
    /// The first relay of P2's same-hop floor (host:port): each update as a big-endian
    /// `u32` length and then `key\n` and the whole `update` frame, over one
    /// connection per worker, nothing answered. Unary only (`--batch 0`).
    #[arg(long, conflicts_with_all = ["grpc", "redis"])]
    relay: Option<String>,
    /// A Redis server (host:port): `PUBLISH {key} {update frame}`, pipelined.
    #[arg(long)]
    redis: Option<String>,
    /// With `--redis`: publish as `@socket.io/redis-emitter` does, to the room named
    /// by the key (`PUBLISH socket.io#/#{key}# <msgpack [uid, packet, opts]>`), for
    /// the Socket.IO peer; subscribers receive `42["update",{…frame…}]`.
    #[arg(long, requires = "redis")]
    socketio: bool,
    /// The keys, as PREFIX*COUNT; updates go round-robin over them.
    #[arg(long)]
    keys: String,
    /// Updates per call (`PublishBatch`, or Redis pipeline depth); 0: unary `Publish`.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Updates per second over all workers; 0: flat out.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// `replicated` (default) or `owner`.
    #[arg(long, default_value = "replicated")]
    ack: String,
    /// Stop after this many updates (0: no limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Stop after this long (0: when stdin says `stop` or closes, or `--count` is done).
    #[arg(long, default_value_t = 0)]
    duration_secs: u64,
}

struct Shared {
    next: AtomicU64,
    published: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    stop: AtomicBool,
    done: tokio::sync::Notify,
}

impl Shared {
    fn failed(&self, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .expect("error lock")
            .get_or_insert_with(|| e.to_string());
    }
}

pub(crate) async fn run(args: PubArgs) -> anyhow::Result<()> {
    let keys: Arc<Vec<String>> = Arc::new(crate::keys(&args.keys)?);
    if keys.is_empty() {
        bail!("no keys");
    }
    let ack = match args.ack.as_str() {
        "replicated" => Ack::Replicated,
        "owner" => Ack::Owner,
        other => bail!("--ack {other}: replicated or owner"),
    };
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        published: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        stop: AtomicBool::new(false),
        done: tokio::sync::Notify::new(),
    });
    let started = Instant::now();
    let per_call = args.batch.max(1) as u64;
    let mut workers: tokio::task::JoinSet<Histogram<u64>> = tokio::task::JoinSet::new();
    if (args.direct_node.is_some() || args.relay.is_some()) && args.batch > 0 {
        bail!("--direct-node and --relay publish one update at a time (--batch 0)");
    }
    if let Some(grpc) = &args.grpc {
        let tls = match &args.ca {
            Some(path) => Some(ringfeed_client::Tls::from_ca_file(path)?),
            None => None,
        };
        let bearer: Option<MetadataValue<Ascii>> = match &args.api_token {
            Some(token) => Some(format!("Bearer {token}").parse()?),
            None => None,
        };
        let client = ringfeed_client::publisher::connect_with(grpc, tls.as_ref())
            .await
            .map_err(|e| anyhow!("cannot reach the router at {grpc}: {e}"))?
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let route = Route::Router(client);
        for _ in 0..args.concurrency.max(1) {
            let (route, keys, shared, args, bearer) = (
                route.clone(),
                keys.clone(),
                shared.clone(),
                args.clone(),
                bearer.clone(),
            );
            workers.spawn(async move {
                grpc_worker(route, keys, shared, args, ack, bearer, per_call, started).await
            });
        }
    } else if let Some(node) = &args.direct_node {
        let route = Route::Owners(Arc::new(owners(node, &keys).await?));
        for _ in 0..args.concurrency.max(1) {
            let (route, keys, shared, args) =
                (route.clone(), keys.clone(), shared.clone(), args.clone());
            workers.spawn(async move {
                grpc_worker(route, keys, shared, args, ack, None, per_call, started).await
            });
        }
    } else if let Some(relay) = &args.relay {
        for _ in 0..args.concurrency.max(1) {
            let stream = tokio::net::TcpStream::connect(relay).await?;
            stream.set_nodelay(true)?;
            let (keys, shared, args) = (keys.clone(), shared.clone(), args.clone());
            workers.spawn(async move { relay_worker(stream, keys, shared, args, started).await });
        }
    } else if let Some(redis) = &args.redis {
        for _ in 0..args.concurrency.max(1) {
            let stream = tokio::net::TcpStream::connect(redis).await?;
            stream.set_nodelay(true)?;
            let (keys, shared, args) = (keys.clone(), shared.clone(), args.clone());
            workers.spawn(async move {
                redis_worker(stream, keys, shared, args, per_call, started).await
            });
        }
    } else {
        bail!("--grpc, --direct-node, --relay or --redis is needed");
    }

    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                emit(json!({
                    "ev": "tick",
                    "at_ns": now_ns(),
                    "published": shared.published.load(Ordering::Relaxed),
                    "errors": shared.errors.load(Ordering::Relaxed),
                }));
            }
        })
    };
    tokio::select! {
        _ = stopped(args.duration_secs) => {}
        _ = shared.done.notified() => {}
    }
    shared.stop.store(true, Ordering::Relaxed);
    // Each call's round trip, in µs, merged over the workers.
    let mut calls = round_trips();
    while let Some(joined) = workers.join_next().await {
        if let Ok(h) = joined {
            calls.add(&h)?;
        }
    }
    ticker.abort();
    // No round trips (the relay answers nothing): null, not 0.
    let us = |q: f64| (!calls.is_empty()).then(|| calls.value_at_quantile(q));
    let secs = started.elapsed().as_secs_f64();
    let published = shared.published.load(Ordering::Relaxed);
    emit(json!({
        "ev": "done",
        "published": published,
        "errors": shared.errors.load(Ordering::Relaxed),
        "error": shared.first_error.lock().expect("error lock").clone(),
        "secs": secs,
        "rate": published as f64 / secs,
        "calls": calls.len(),
        "call_p50_us": us(0.5),
        "call_p99_us": us(0.99),
        "call_p999_us": us(0.999),
    }));
    Ok(())
}

/// A histogram of call round trips in µs, up to a minute.
fn round_trips() -> Histogram<u64> {
    Histogram::new_with_max(60_000_000, 3).expect("valid histogram bounds")
}

/// Records the round trip of a call sent at `sent`.
fn record(calls: &mut Histogram<u64>, sent: Instant) {
    calls.saturating_record(sent.elapsed().as_micros() as u64);
}

/// The index of the next call's first update, once it is due; `None` to stop.
async fn next_call(
    shared: &Shared,
    args: &PubArgs,
    per_call: u64,
    started: Instant,
) -> Option<u64> {
    if shared.stop.load(Ordering::Relaxed) {
        return None;
    }
    let first = shared.next.fetch_add(per_call, Ordering::Relaxed);
    if args.count > 0 && first >= args.count {
        shared.done.notify_one();
        return None;
    }
    if args.rate > 0 {
        let due = started + Duration::from_secs_f64(first as f64 / args.rate as f64);
        tokio::time::sleep_until(due).await;
    }
    Some(first)
}

fn calls_in(args: &PubArgs, first: u64, per_call: u64) -> u64 {
    if args.count > 0 {
        per_call.min(args.count - first)
    } else {
        per_call
    }
}

/// A call's request: `message`, with the API token when there is one (without one,
/// exactly what tonic makes of a bare message).
fn authorized<T>(message: T, bearer: Option<&MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(bearer) = bearer {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
    }
    request
}

/// Where a gRPC worker sends its calls.
#[derive(Clone)]
enum Route {
    /// Everything to the router.
    Router(RouterClient<Channel>),
    /// Each key's publishes to its owner: a client per key (in `--keys` order), one
    /// connection per node shared by its keys.
    Owners(Arc<Vec<RouterClient<Channel>>>),
}

/// A client of each key's owner (in the order of `keys`) on the ring that `node`
/// publishes, one connection per node.
async fn owners(node: &str, keys: &[String]) -> anyhow::Result<Vec<RouterClient<Channel>>> {
    let ring = RingView::fetch(node, None)
        .await
        .map_err(|e| anyhow!("cannot read the ring from {node}: {e}"))?;
    let mut nodes: HashMap<String, RouterClient<Channel>> = HashMap::new();
    let mut by_key = Vec::with_capacity(keys.len());
    for key in keys {
        let owner = ring
            .owner(key)
            .ok_or_else(|| anyhow!("nobody owns {key} on the ring of {node}"))?;
        let client = match nodes.get(&owner.grpc) {
            Some(client) => client.clone(),
            None => {
                let client = ringfeed_client::publisher::connect_with(&owner.grpc, None)
                    .await
                    .map_err(|e| anyhow!("cannot reach {} at {}: {e}", owner.id.0, owner.grpc))?
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20);
                nodes.insert(owner.grpc.clone(), client.clone());
                client
            }
        };
        by_key.push(client);
    }
    Ok(by_key)
}

#[allow(clippy::too_many_arguments)]
async fn grpc_worker(
    mut route: Route,
    keys: Arc<Vec<String>>,
    shared: Arc<Shared>,
    args: PubArgs,
    ack: Ack,
    bearer: Option<MetadataValue<Ascii>>,
    per_call: u64,
    started: Instant,
) -> Histogram<u64> {
    let mut calls = round_trips();
    let request = |i: u64| PublishRequest {
        key: keys[(i % keys.len() as u64) as usize].clone(),
        data: payload(args.payload).into_bytes(),
        content_type: "application/json".into(),
        ack: ack as i32,
        ..Default::default()
    };
    while let Some(first) = next_call(&shared, &args, per_call, started).await {
        let n = calls_in(&args, first, per_call);
        if args.batch == 0 {
            let mut owner;
            let client = match &mut route {
                Route::Router(client) => client,
                Route::Owners(by_key) => {
                    owner = by_key[(first % keys.len() as u64) as usize].clone();
                    &mut owner
                }
            };
            let sent = Instant::now();
            let reply = client
                .publish(authorized(request(first), bearer.as_ref()))
                .await;
            record(&mut calls, sent);
            match reply {
                Ok(_) => {
                    shared.published.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => shared.failed(format!("{:?}: {}", e.code(), e.message())),
            }
        } else {
            let Route::Router(client) = &mut route else {
                unreachable!("--direct-node is unary only");
            };
            let items = (first..first + n).map(request).collect();
            let sent = Instant::now();
            let reply = client
                .publish_batch(authorized(PublishBatchRequest { items }, bearer.as_ref()))
                .await;
            record(&mut calls, sent);
            match reply {
                Ok(reply) => {
                    let mut ok = 0;
                    for r in reply.into_inner().results {
                        match r.result {
                            Some(ringfeed_proto::v1::publish_result::Result::Ok(_)) => ok += 1,
                            Some(ringfeed_proto::v1::publish_result::Result::Error(e)) => {
                                shared.failed(format!("code {}: {}", e.code, e.message))
                            }
                            None => shared.failed("empty result"),
                        }
                    }
                    shared.published.fetch_add(ok, Ordering::Relaxed);
                }
                Err(e) => shared.failed(format!("{:?}: {}", e.code(), e.message())),
            }
        }
    }
    calls
}

/// `PUBLISH key frame` pipelined `per_call` deep: the frame is the whole `update` the
/// seed reference's endpoints forward as is.
async fn redis_worker(
    stream: tokio::net::TcpStream,
    keys: Arc<Vec<String>>,
    shared: Arc<Shared>,
    args: PubArgs,
    per_call: u64,
    started: Instant,
) -> Histogram<u64> {
    let mut calls = round_trips();
    let (read, mut write) = stream.into_split();
    let mut replies = tokio::io::BufReader::new(read);
    let mut buf = Vec::with_capacity(256 * per_call as usize);
    let mut line = String::new();
    while let Some(first) = next_call(&shared, &args, per_call, started).await {
        let n = calls_in(&args, first, per_call);
        buf.clear();
        for i in first..first + n {
            let key = &keys[(i % keys.len() as u64) as usize];
            let frame = update_frame(key, i + 1, &payload(args.payload));
            if args.socketio {
                let channel = format!("socket.io#/#{key}#");
                let message = socketio_emit(key, &frame);
                buf.extend_from_slice(
                    format!(
                        "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{channel}\r\n${}\r\n",
                        channel.len(),
                        message.len()
                    )
                    .as_bytes(),
                );
                buf.extend_from_slice(&message);
                buf.extend_from_slice(b"\r\n");
            } else {
                buf.extend_from_slice(
                    format!(
                        "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{key}\r\n${}\r\n{frame}\r\n",
                        key.len(),
                        frame.len()
                    )
                    .as_bytes(),
                );
            }
        }
        let sent = Instant::now();
        if let Err(e) = write.write_all(&buf).await {
            shared.failed(e);
            return calls;
        }
        for _ in 0..n {
            line.clear();
            match replies.read_line(&mut line).await {
                Ok(0) | Err(_) => {
                    shared.failed("redis closed the connection");
                    return calls;
                }
                Ok(_) if line.starts_with(':') => {
                    shared.published.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => shared.failed(line.trim().to_owned()),
            }
        }
        record(&mut calls, sent);
    }
    calls
}

/// The `update` frame a subscriber receives for update `seq` of `key`.
fn update_frame(key: &str, seq: u64, data: &str) -> String {
    format!("{{\"type\":\"update\",\"key\":\"{key}\",\"seq\":{seq},\"data\":{data}}}")
}

/// Frames of `key\n{update frame}` to the first relay of the same-hop floor, one per
/// update as it falls due: nothing is answered, so there are no round trips to record.
async fn relay_worker(
    mut stream: tokio::net::TcpStream,
    keys: Arc<Vec<String>>,
    shared: Arc<Shared>,
    args: PubArgs,
    started: Instant,
) -> Histogram<u64> {
    while let Some(i) = next_call(&shared, &args, 1, started).await {
        let key = &keys[(i % keys.len() as u64) as usize];
        let body = format!(
            "{key}\n{}",
            update_frame(key, i + 1, &payload(args.payload))
        );
        if let Err(e) = stream
            .write_all(&crate::relay::frame(body.as_bytes()))
            .await
        {
            shared.failed(e);
            break;
        }
        shared.published.fetch_add(1, Ordering::Relaxed);
    }
    round_trips()
}

/// The message `@socket.io/redis-emitter` publishes for `io.to(room).emit("update",
/// frame)`: msgpack `[uid, {type: 2 (EVENT), data: ["update", frame], nsp: "/"},
/// {rooms: [room], except: [], flags: {}}]`, which every `@socket.io/redis-adapter`
/// holding the room decodes and broadcasts to it.
fn socketio_emit(room: &str, frame: &str) -> Vec<u8> {
    let frame: serde_json::Value = serde_json::from_str(frame).expect("frames are JSON");
    let message = json!([
        "ringfeed-loadgen",
        { "type": 2, "data": ["update", frame], "nsp": "/" },
        { "rooms": [room], "except": [], "flags": {} },
    ]);
    rmp_serde::to_vec(&message).expect("JSON values encode as msgpack")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketio_messages_are_what_the_redis_emitter_publishes() {
        let frame = r#"{"type":"update","key":"k:1","seq":3,"data":{"ts":17,"p":"x"}}"#;
        let bytes = socketio_emit("k:1", frame);
        let decoded: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(decoded[1]["type"], 2, "an EVENT packet");
        assert_eq!(decoded[1]["nsp"], "/");
        assert_eq!(decoded[1]["data"][0], "update");
        assert_eq!(decoded[1]["data"][1]["data"]["ts"], 17);
        assert_eq!(decoded[2]["rooms"], json!(["k:1"]));
        // A msgpack array of three, not a map: the adapter destructures it.
        assert_eq!(bytes[0], 0x93);
    }
}
