//! What an operator watches on a router: an HTTP listener with `/metrics`, `/healthz`
//! and `/readyz`, and the standard `grpc.health.v1` service on the gRPC port.
//!
//! Ready means: the router has a ring with an active member, and at least one active
//! member answers on its gRPC port. Members are probed (a TCP connect, bounded) once a
//! second by one task, so a flood of `/readyz` calls costs nothing but a read.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::forward::Forwarder;
use crate::ring::MemberState;
use crate::stats::NodeLabel;

/// How often members are probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The router's readiness, as last probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// `reachable` of `active` members answered.
    Ready {
        reachable: usize,
        active: usize,
    },
    NotReady(String),
}

/// Probes the members of `forwarder`'s ring until `stop`, publishing the readiness on
/// the returned channel and to `health` (the `""` and `ringfeed.v1.Router` services of
/// `grpc.health.v1`).
pub fn watch_readiness(
    forwarder: Arc<Forwarder>,
    health: HealthReporter,
    stop: CancellationToken,
) -> watch::Receiver<Readiness> {
    let (tx, rx) = watch::channel(Readiness::NotReady("not probed yet".into()));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.cancelled() => return,
            }
            let now = probe(&forwarder).await;
            let status = match now {
                Readiness::Ready { .. } => ServingStatus::Serving,
                Readiness::NotReady(_) => ServingStatus::NotServing,
            };
            if *tx.borrow() != now {
                tracing::info!(readiness = ?now, "router readiness changed");
            }
            health.set_service_status("", status).await;
            health
                .set_service_status("ringfeed.v1.Router", status)
                .await;
            tx.send_replace(now);
        }
    });
    rx
}

/// One probe of every active member's gRPC port.
async fn probe(forwarder: &Forwarder) -> Readiness {
    let view = forwarder.membership().view();
    let active: Vec<String> = view
        .ring
        .members()
        .iter()
        .filter(|m| m.state == MemberState::Active)
        .map(|m| m.grpc.clone())
        .collect();
    if active.is_empty() {
        return Readiness::NotReady("the ring has no active member".into());
    }
    let probes = active.iter().map(|grpc| async move {
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(grpc)).await,
            Ok(Ok(_))
        )
    });
    let reachable = futures_util::future::join_all(probes)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    if reachable == 0 {
        return Readiness::NotReady(format!(
            "none of the {} active members answers",
            active.len()
        ));
    }
    Readiness::Ready {
        reachable,
        active: active.len(),
    }
}

#[derive(Clone)]
struct Shared {
    forwarder: Arc<Forwarder>,
    readiness: watch::Receiver<Readiness>,
}

/// The router's HTTP endpoints.
pub fn http(forwarder: Arc<Forwarder>, readiness: watch::Receiver<Readiness>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such endpoint\n") })
        .with_state(Shared {
            forwarder,
            readiness,
        })
}

async fn readyz(State(shared): State<Shared>) -> Response {
    match shared.readiness.borrow().clone() {
        Readiness::Ready { reachable, active } => (
            StatusCode::OK,
            format!("ready: {reachable} of {active} active members answer\n"),
        )
            .into_response(),
        Readiness::NotReady(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(shared): State<Shared>) -> Response {
    let stats = shared.forwarder.stats();
    for (node, queued) in shared.forwarder.lane_depths() {
        stats
            .lane_queued
            .get_or_create(&NodeLabel { node })
            .set(queued as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        stats.encode(),
    )
        .into_response()
}
