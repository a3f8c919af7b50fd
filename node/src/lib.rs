//! A ringfeed node: holds client connections and the state of the keys it owns.
//!
//! The modules are layers; each imports only from its own layer and those below
//! (`cluster-tests/tests/layering.rs` checks it):
//!
//! 1. [`protocol`] — what clients see, stateless: frames, query parameters, close codes,
//!    epochs, redirect URLs. Beside it, leaves: [`budget`] (resident memory),
//!    [`latency`] (histograms), [`peers`] (how peers are reached).
//! 2. [`config`] — flags and environment, validated before a port is bound; owns the
//!    key state's [`Limits`](config::Limits). Beside it, [`store`]: where document
//!    snapshots go (SQLite or PostgreSQL).
//! 3. [`state`] — the per-key state without IO: log and high watermark, idempotency,
//!    presence, connection mailboxes, the key table, replicas, hand-off bookkeeping,
//!    replication queues.
//! 4. [`node`] — the shared [`Node`](node::Node): ownership decisions, readiness,
//!    admission, the connection clock.
//! 5. [`cluster`] — the node among its peers: replication, hand-off, the ring
//!    follower and promotion, self-fencing.
//! 6. Transports and services: [`session`] (what every transport does for a client),
//!    [`ws`] (WebSocket), [`quic`] (QUIC), [`http`] (the listener, SSE, long polling, health and
//!    metrics), [`internal`] (the internal `ringfeed.v1.Node` gRPC service), and
//!    [`wire`]: each refusal's form on every transport.
//! 7. [`run`] — the one place where everything is wired; [`admin`] — `ringfeed-node
//!    drain`; and, in tests, `sim`: nodes in one process on a fixed ring, an in-memory
//!    network and paused time.
//!
//! Data flows one way: transport → key → subscribers' queues → transport.

pub mod admin;
pub mod budget;
pub mod certs;
pub mod cluster;
pub mod config;
pub mod http;
pub mod internal;
pub mod latency;
pub mod node;
pub mod peers;
pub mod protocol;
pub mod quic;
pub mod run;
pub mod session;
#[cfg(test)]
mod sim;
pub mod state;
pub mod store;
pub mod wire;
pub mod ws;
