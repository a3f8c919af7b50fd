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

/// The filter of every log line, swapped by [`set_log_filter`].
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// `filter` (`--log`) as a `tracing` filter, or why it is not one.
pub fn log_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())
}

/// Logs to stderr in `format`, filtered by `filter` (`--log`, `RINGFEED_LOG`; `info`
/// if it is not a filter). For the binaries.
pub fn init_tracing(format: LogFormat, filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(
        log_filter(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    let _ = LOG_FILTER.set(handle);
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry
            .with(layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init(),
        LogFormat::Json => registry
            .with(layer.json().with_current_span(true).with_span_list(true))
            .init(),
    }
}

/// Changes what is logged from now on (`SIGHUP` with a new `--log`).
pub fn set_log_filter(filter: &str) -> Result<(), String> {
    let filter = log_filter(filter)?;
    LOG_FILTER
        .get()
        .ok_or("logging is not set up")?
        .reload(filter)
        .map_err(|e| e.to_string())
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
