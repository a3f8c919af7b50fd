//! Where a key lives and how an update gets there.
//!
//! * [`ring`] — the consistent-hash ring, pure: members → points → owner/successor.
//! * [`key`] — the routing-key grammar.
//! * [`membership`] — the view of the ring (from etcd, or fixed in tests), and a node's
//!   registration under a lease.
//! * [`backoff`] — jittered exponential back-off.
//! * [`api_token`] — the API tokens services and operators present.
//! * [`tls`] — rustls (ring) for listeners and calls between processes, mutual with
//!   the cluster CA.
//! * [`throttle`] — failed authentications per source, a burst then refusals.
//! * [`watch`] — values read from files (tokens, secrets, certificates), read again
//!   when the files change or on `SIGHUP`.
//! * [`forward`] — pooled channels to nodes; per-owner batching; NOT_OWNER catch-up and
//!   jittered retries until the caller's deadline.
//! * [`stats`] — the router's figures (publish latency by outcome, retries, `NOT_OWNER`
//!   catch-ups, per owner calls in flight and lane depth) in the Prometheus format.
//! * [`service`] — the public `ringfeed.v1.Router` gRPC service.
//! * [`observe`] — `/metrics`, `/healthz`, `/readyz` and `grpc.health.v1`.
//! * [`config`] — the `ringfeed-router` binary's flags.
//!
//! Nodes use this crate as a library for the ring and membership; the
//! `ringfeed-router` binary (`src/main.rs`) wires it into a stateless router.

pub mod api_token;
pub mod backoff;
pub mod config;
pub mod forward;
pub mod key;
pub mod membership;
pub mod observe;
pub mod ring;
pub mod service;
pub mod stats;
pub mod throttle;
pub mod tls;
pub mod watch;

/// How the binaries write their logs (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For people, in colour on a terminal.
    #[default]
    Text,
    /// One JSON object a line: time, level, target, message and fields, and the
    /// spans it happened in with their fields.
    Json,
}

/// Logs to stderr in `format`, filtered by `RINGFEED_LOG` (default `info`). For the
/// binaries.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGFEED_LOG")
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// A multi-threaded runtime with `workers` threads (0: tokio's default, one per core).
/// For the binaries.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    builder.enable_all().build()
}
