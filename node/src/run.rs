//! Wiring a node together, and its shutdown tree.

use std::sync::Arc;
use std::time::Duration;

use ringfeed_proto::v1::node_server::NodeServer;
use ringfeed_router::membership::{Membership, Registration};
use ringfeed_router::ring::{Member, MemberState, NodeId};
use ringfeed_router::tls::Tls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Auth, Config};
use crate::internal::{LocalDeliver, NodeService};
use crate::node::Node;
use crate::peers::Peers;
use ringfeed_proto::v1::router_server::RouterServer;
use ringfeed_router::forward::{ForwardConfig, Forwarder};
use ringfeed_router::service::RouterService;

/// Runs a node on bound listeners until `stop` is cancelled (SIGTERM), then drains:
/// mark the record `draining` (off the ring), hand every key whole to its new owner,
/// redirect the clients there in paced batches, deregister, and close what is left
/// with 1001 within the grace period. The last node of a cluster has nobody to hand
/// off to: it closes its clients with 1001.
pub async fn run(
    config: Config,
    auth: Option<Auth>,
    tls: Tls,
    http: TcpListener,
    grpc: TcpListener,
    quic: Option<std::net::UdpSocket>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let quic = quic
        .map(|socket| crate::quic::bind(&config, &tls, socket))
        .transpose()?;
    let mut record = own_record(&config, &http, &grpc, tls.identity.is_some())?;
    if let Some(quic) = &quic {
        record.quic = Some(quic.advertised.clone());
        record.quic_sha256 = Some(quic.sha256.clone());
    }
    // Clients: TLS with HTTP/2 or HTTP/1.1 by ALPN. Peers: mutual TLS with the CA.
    let http_tls = tls
        .server(&[b"h2", b"http/1.1"], false)
        .map_err(|e| anyhow::anyhow!(e))?;
    let internal_tls = match &tls.roots {
        Some(_) => tls.server(&[b"h2"], true).map_err(|e| anyhow::anyhow!(e))?,
        None => None,
    };
    let peers = match tls.client().map_err(|e| anyhow::anyhow!(e))? {
        Some(client) => Peers::Tls(client),
        None => Peers::Tcp,
    };
    let membership = Membership::start(
        &config
            .membership
            .membership(Duration::from_secs(config.lease_ttl)),
        &tasks,
        shutdown.clone(),
    )
    .await?;
    let grace = config.shutdown_grace();
    let store_url =
        crate::config::StoreUrl::parse(&config.docs.store).map_err(anyhow::Error::msg)?;
    let store = crate::store::Store::open(&store_url)
        .await
        .map_err(anyhow::Error::msg)?;
    let node = Arc::new(
        Node::new(config, membership.clone(), shutdown.clone(), tasks.clone())
            .with_auth(auth)
            .with_peers(peers)
            .with_store(store),
    );

    // Serve before registering: once the record is in etcd, traffic may come at once.
    let router = public_router(
        &node,
        &record,
        tls.client().map_err(|e| anyhow::anyhow!(e))?,
    );
    tasks.spawn(crate::http::serve(node.clone(), http, http_tls));
    if let Some(quic) = quic {
        tasks.spawn(crate::quic::serve(node.clone(), quic.endpoint));
    }
    serve_internal(&node, grpc, internal_tls, router, stop.clone());
    spawn_upkeep(&node);
    tasks.spawn(reload_on_sighup(node.clone()));

    // Registration lives on its own token: it must outlast the client-facing shutdown
    // long enough to deregister.
    let lease_stop = CancellationToken::new();
    let registration = tokio::select! {
        r = membership.register(record, &tasks, lease_stop.clone()) => r?,
        _ = stop.cancelled() => {
            node.shut_down();
            lease_stop.cancel();
            tasks.close();
            tasks.wait().await;
            return Ok(());
        }
    };
    node.set_registration(registration.clone());
    tasks.spawn(close_transitions(node.clone(), registration.clone()));
    let record = registration.record();
    println!(
        "ringfeed-node ready id={} http={} grpc={} incarnation={} quic={}",
        record.id,
        record.http,
        record.grpc,
        record.incarnation,
        record.quic.as_deref().unwrap_or("off")
    );
    tracing::info!(id = %record.id, http = %record.http, grpc = %record.grpc, "node on the ring");

    stop.cancelled().await;
    drain(&node, &registration).await;
    node.shut_down();
    tracing::info!("shutting down: deregistering and closing clients");
    if let Err(e) = registration.deregister().await {
        tracing::warn!(error = %e, "deregistration failed; the lease will expire instead");
    }
    lease_stop.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing them"
        );
    }
    Ok(())
}

/// This node's member record, with the addresses it advertises (the bound ones unless
/// configured); the incarnation is made at registration.
fn own_record(
    config: &Config,
    http: &TcpListener,
    grpc: &TcpListener,
    https: bool,
) -> anyhow::Result<Member> {
    let scheme = if https { "https" } else { "http" };
    let http_addr = http.local_addr()?;
    let grpc_addr = grpc.local_addr()?;
    Ok(Member {
        id: NodeId(config.id.clone()),
        incarnation: String::new(),
        grpc: config
            .advertise_grpc
            .clone()
            .unwrap_or_else(|| grpc_addr.to_string()),
        http: config
            .advertise_http
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{http_addr}")),
        quic: None,
        quic_sha256: None,
        points: config.points,
        state: MemberState::Active,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// The public `Router` service a node serves beside `Node`, so that any node is a
/// router: publishes it owns are applied in process, the rest forwarded to their
/// owners as the router would (with the node's API tokens, if any).
fn public_router(
    node: &Arc<Node>,
    record: &Member,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> RouterServer<RouterService> {
    let config = ForwardConfig {
        max_payload: node.config.max_payload,
        tls,
        ..ForwardConfig::default()
    };
    // The forwarder's lanes live as long as the node serves.
    let forwarder = Forwarder::new(
        node.membership.clone(),
        config,
        node.tasks.clone(),
        node.shutdown.clone(),
    )
    .with_local(Arc::new(LocalDeliver::new(
        NodeService::new(node.clone(), CancellationToken::new()),
        record.grpc.clone(),
    )));
    let tokens = node.auth.as_ref().map(|a| a.api_tokens.clone());
    RouterServer::new(RouterService::new(Arc::new(forwarder)).with_tokens(tokens))
        .max_decoding_message_size(node.config.max_grpc_message())
}

/// Serves the internal `Node` service and the public `Router` on `grpc` until the node
/// shuts down — over mutual TLS with `tls` — ; a `Drain` call cancels `drain`.
fn serve_internal(
    node: &Arc<Node>,
    grpc: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: RouterServer<RouterService>,
    drain: CancellationToken,
) {
    let stop = node.shutdown.clone();
    let service = NodeServer::new(NodeService::new(node.clone(), drain))
        .max_decoding_message_size(node.config.max_grpc_message());
    let tasks = node.tasks.clone();
    node.tasks.spawn(async move {
        let mut server = tonic::transport::Server::builder();
        let server = server.add_service(service).add_service(router);
        let accepting = stop.clone();
        let until = async move { stop.cancelled().await };
        let served = match tls {
            Some(tls) => {
                let incoming = ringfeed_router::tls::incoming(grpc, tls, &tasks, accepting);
                server.serve_with_incoming_shutdown(incoming, until).await
            }
            None => {
                // `Server::tcp_nodelay` applies only to listeners tonic binds itself:
                // ours is set here, or every reply larger than a segment waits for a
                // delayed ACK.
                let incoming =
                    tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
                server.serve_with_incoming_shutdown(incoming, until).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "internal gRPC server failed");
        }
    });
}

/// On `SIGHUP`, reads the settings again (flags, environment, the config file) and
/// applies what can change while the node runs ([`crate::node::LiveLimits`]), logging
/// each change; a file that does not parse or validate changes nothing.
async fn reload_on_sighup(node: Arc<Node>) {
    let Ok(mut hups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP: settings will not be reloaded");
        return;
    };
    let mut log = node.config.membership.log.clone();
    loop {
        tokio::select! {
            _ = hups.recv() => {}
            _ = node.shutdown.cancelled() => return,
        }
        match ringfeed_router::config::reread(Config::validate) {
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: the settings did not load; nothing changed")
            }
            Ok(config) => {
                let mut changed: Vec<(&str, String, String)> = node
                    .live
                    .update(&config)
                    .into_iter()
                    .map(|(setting, from, to)| (setting, from.to_string(), to.to_string()))
                    .collect();
                if config.membership.log != log {
                    match ringfeed_router::set_log_filter(&config.membership.log) {
                        Ok(()) => {
                            changed.push(("log", log.clone(), config.membership.log.clone()));
                            log = config.membership.log.clone();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "SIGHUP: the log filter did not change")
                        }
                    }
                }
                if changed.is_empty() {
                    tracing::info!(
                        "SIGHUP: settings read again; nothing that changes live changed"
                    );
                }
                for (setting, from, to) in changed {
                    tracing::info!(setting, from, to, "SIGHUP: changed");
                }
            }
        }
    }
}

/// The node's background work: following the ring, sweeping idle state, the
/// connection clock, self-fencing and the memory budget.
fn spawn_upkeep(node: &Arc<Node>) {
    let tasks = &node.tasks;
    tasks.spawn(crate::cluster::follower::follow_ring(node.clone()));
    tasks.spawn(crate::cluster::follower::sweep(node.clone()));
    tasks.spawn(crate::cluster::documents::write_snapshots(node.clone()));
    tasks.spawn(node.clone().run_clock());
    tasks.spawn(crate::cluster::fence::watch(node.clone()));
    tasks.spawn(crate::cluster::follower::watch_memory(node.clone()));
}

/// Ends the transition this node opened (its join, and any re-registration's) once
/// everything it was to receive has been handed over; `end_transition` leaves other
/// nodes' alone. Until etcd takes it: a transition left open would hold every later
/// join and drain for as long as this node lives.
async fn close_transitions(node: Arc<Node>, registration: Registration) {
    let mut changes = node.handoffs.changes();
    loop {
        tokio::select! {
            _ = node.handoffs.settled_on(&node.id) => {}
            _ = node.shutdown.cancelled() => return,
        }
        let mut backoff = ringfeed_router::membership::Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
        );
        while let Err(e) = registration.end_transition().await {
            tracing::warn!(error = %e, "cannot close the transition yet; retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_pause()) => {}
                _ = node.shutdown.cancelled() => return,
            }
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = node.shutdown.cancelled() => return,
        }
    }
}

/// Moves every key and client of this node to the rest of the ring.
async fn drain(node: &Arc<Node>, registration: &Registration) {
    node.set_draining();
    let view = node.membership.view();
    let others = view
        .ring
        .members()
        .iter()
        .any(|m| m.id != node.id && m.state == MemberState::Active);
    if !others {
        tracing::info!("last node of the cluster: nobody to hand off to; closing clients");
        return;
    }
    tracing::info!("draining: leaving the ring");
    if let Err(e) = registration.start_drain(DRAIN_PATIENCE).await {
        tracing::warn!(error = %e, "cannot mark the record draining; closing clients instead");
        return;
    }
    // Wait (bounded) until our own view has us off the ring.
    let mut views = node.membership.subscribe();
    let deadline = tokio::time::Instant::now() + DRAIN_VIEW_WAIT;
    while views.borrow_and_update().ring.is_active(&node.id) {
        if tokio::time::timeout_at(deadline, views.changed())
            .await
            .is_err()
        {
            tracing::warn!("the ring did not show this node draining in time; handing off anyway");
            break;
        }
    }
    let view = node.membership.view();
    let mut moved = node.keys.take_where(|_| true);
    crate::cluster::documents::take_moved(node, &mut moved, |_| true);
    crate::cluster::handoff::hand_off(node.clone(), view, moved, Vec::new()).await;
    // Let redirected clients go before the rest are closed.
    let deadline = tokio::time::Instant::now() + DRAIN_CLIENT_WAIT;
    while node.connections.available_permits() < node.config.max_connections
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a drain waits for another planned change to finish before it starts.
const DRAIN_PATIENCE: Duration = Duration::from_secs(30);
/// How long a drain waits for its own view to show it off the ring.
const DRAIN_VIEW_WAIT: Duration = Duration::from_secs(5);
/// How long a drain waits for redirected clients to leave.
const DRAIN_CLIENT_WAIT: Duration = Duration::from_secs(3);
