//! A ringfeed node: holds client connections and the state of the keys it owns.
//!
//! * [`config`] — flags and environment, validated before a port is bound.
//! * [`node`] — shared state, ownership decisions, and following the ring.
//! * [`keys`] — per-key state: epoch, seq, subscribers with bounded queues.
//! * [`frames`] — the JSON frames of the client protocol.
//! * [`http`] — the HTTP listener: WebSocket upgrades, `/v1/route`, `/v1/ring`, health.
//! * [`params`] — the query parameters of the client endpoints.
//! * [`session`] — what every transport does for a client: place, subscribe, resume.
//! * [`ws`] — one WebSocket session.
//! * [`sse`] — Server-Sent Events (`/v1/sse`).
//! * [`poll`] — long polling (`/v1/poll`).
//! * [`replication`] — owner → successor replication with a high watermark.
//! * [`handoff`] — keys move with their state on planned ring changes.
//! * [`internal`] — the internal `ringfeed.v1.Node` gRPC service.
//! * [`run`] — wiring and graceful shutdown.
//! * [`admin`] — `ringfeed-node drain`: ask a running node to drain.
//! * [`budget`] — the memory budget: past it, new keys and connections are refused.
//! * [`fence`] — self-fencing when the lease is in doubt.
//! * [`latency`] — latency histograms for `/metrics`.
//!
//! Data flows one way: transport → key → subscribers' queues → transport.

pub mod admin;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod http;
pub mod internal;
pub mod latency;
pub mod node;
pub mod protocol;
pub mod run;
pub mod session;
pub mod state;
pub mod ws;
