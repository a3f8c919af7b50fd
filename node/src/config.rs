//! The node's configuration: flags and environment variables, validated before any port
//! is bound. Bad configuration exits with status 64 and a message naming the setting.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ringfeed_router::config::ClusterArgs;
use ringfeed_router::key::MAX_IDEMPOTENCY_KEY;
use ringfeed_router::ring::{DEFAULT_POINTS, MAX_POINTS};

use std::sync::Arc;

use crate::protocol::frames;
use crate::protocol::ticket::Signer;
use ringfeed_router::api_token::{read_list, Gate};
use ringfeed_router::config::{api_token_gate, FailureArgs};
use ringfeed_router::throttle::Throttle;
use ringfeed_router::watch::{watch, Watched};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod docs;
pub use docs::{DocArgs, StoreUrl};
pub mod quic;
pub use quic::{QuicArgs, QuicListen};

/// What authentication needs, loaded at start ([`Config::load_auth`]); the secrets and
/// tokens are read again when their files change.
pub struct Auth {
    /// Signs and verifies tickets and resume tokens.
    pub signer: Arc<Watched<Signer>>,
    /// The API tokens that may ask for tickets and act on the node.
    pub api_tokens: Gate,
    /// Failed authentications by source (tickets and API tokens alike).
    pub throttle: Arc<Throttle>,
    /// The longest validity a ticket is issued with.
    pub max_ticket_ttl: Duration,
    /// How long a `resume` token handed back in `welcome` stays valid.
    pub resume_ttl: Duration,
    /// Single-use tickets: the ones spent on this node, when tickets are single use.
    pub spent: Option<crate::protocol::ticket::Spent>,
}

/// The most a node puts in one request to a peer (a replication batch, a hand-off
/// call) before starting another; one key's snapshot may take it past this, never two.
/// The receiver's decode limit ([`Config::max_grpc_message`]) allows it.
pub const REQUEST_BUDGET: usize = 4 << 20;

/// The most `--history-bytes` may be: a key counts its log's bytes in a `u32`.
pub const MAX_HISTORY_BYTES: usize = 1 << 30;

/// A ringfeed node: holds connections and per-key state for the keys it owns.
#[derive(Parser, Debug, Clone)]
#[command(name = "ringfeed-node", version, args_override_self = true)]
pub struct Config {
    /// This node's id on the ring (1–64 bytes of A-Z a-z 0-9 . _ -).
    #[arg(long, env = "RINGFEED_NODE_ID")]
    pub id: String,
    #[command(flatten)]
    pub membership: ClusterArgs,
    #[command(flatten)]
    pub tls: ringfeed_router::tls::TlsArgs,
    /// Address of the HTTP / WebSocket listener (port 0 picks a free one).
    #[arg(long, env = "RINGFEED_HTTP_LISTEN", default_value = "127.0.0.1:8001")]
    pub http_listen: SocketAddr,
    /// Address of the internal gRPC listener (port 0 picks a free one).
    #[arg(long, env = "RINGFEED_GRPC_LISTEN", default_value = "127.0.0.1:7001")]
    pub grpc_listen: SocketAddr,
    /// The HTTP base URL other nodes and clients reach this node at
    /// (default: http:// and the bound address).
    #[arg(long, env = "RINGFEED_ADVERTISE_HTTP")]
    pub advertise_http: Option<String>,
    /// The host:port routers reach the gRPC service at (default: the bound address).
    #[arg(long, env = "RINGFEED_ADVERTISE_GRPC")]
    pub advertise_grpc: Option<String>,
    /// Lease TTL of this node's record, in seconds (2 or more).
    #[arg(long, env = "RINGFEED_LEASE_TTL", default_value_t = 5)]
    pub lease_ttl: u64,
    /// Virtual nodes of this node on the ring.
    #[arg(long, env = "RINGFEED_POINTS", default_value_t = DEFAULT_POINTS)]
    pub points: u32,
    /// Most client connections held at once (WebSocket); stays under the fd limit.
    #[arg(long, env = "RINGFEED_MAX_CONNECTIONS", default_value_t = 19_000)]
    pub max_connections: usize,
    /// Frames queued per subscriber before it is closed as a slow consumer (4408).
    #[arg(long, env = "RINGFEED_SUBSCRIBER_QUEUE", default_value_t = 1024)]
    pub subscriber_queue: usize,
    /// Largest WebSocket frame (and message) a client may send, in bytes.
    #[arg(long, env = "RINGFEED_MAX_FRAME", default_value_t = 64 * 1024)]
    pub max_frame: usize,
    /// Largest payload of one update, in bytes.
    #[arg(long, env = "RINGFEED_MAX_PAYLOAD", default_value_t = 64 * 1024)]
    pub max_payload: usize,
    /// Deepest nesting of arrays and objects in a JSON payload; deeper is refused at
    /// publish (clients' JSON parsers have recursion limits of their own).
    #[arg(long, env = "RINGFEED_MAX_JSON_DEPTH", default_value_t = 64)]
    pub max_json_depth: usize,
    /// Most items in one `Deliver` request from a router (its `PublishBatch` limit):
    /// with the payload limit, it bounds what the internal gRPC service decodes.
    #[arg(long, env = "RINGFEED_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,
    /// Most control frames (WebSocket ping, pong, close) a client may send in one
    /// second; past it the connection is closed with 1008 and counted.
    #[arg(long, env = "RINGFEED_CLIENT_CONTROL_RATE", default_value_t = 20)]
    pub client_control_rate: u32,
    /// Most messages of any kind a client may send in one second; past it the
    /// connection is closed with 1008 and counted.
    #[arg(long, env = "RINGFEED_CLIENT_MESSAGE_RATE", default_value_t = 1000)]
    pub client_message_rate: u32,
    /// A client message (all of its fragments) must arrive within this long of its
    /// first byte, or the connection is closed with 1008 and counted.
    #[arg(
        long,
        env = "RINGFEED_CLIENT_MESSAGE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub client_message_timeout_ms: u64,
    /// SO_SNDBUF of client sockets in bytes; 0 leaves it to the kernel's autotuning.
    /// A small buffer costs less kernel memory per idle connection and makes a client
    /// that stops reading show up as a slow consumer sooner.
    #[arg(long, env = "RINGFEED_SOCKET_SEND_BUFFER", default_value_t = 0)]
    pub socket_send_buffer: usize,
    /// Most subscribers of one key.
    #[arg(
        long,
        env = "RINGFEED_MAX_SUBSCRIBERS_PER_KEY",
        default_value_t = 100_000
    )]
    pub max_subscribers_per_key: usize,
    /// Updates kept per key for resume (count)…
    #[arg(long, env = "RINGFEED_HISTORY_LEN", default_value_t = 1000)]
    pub history_len: usize,
    /// …and bytes of encoded frames.
    #[arg(long, env = "RINGFEED_HISTORY_BYTES", default_value_t = 1024 * 1024)]
    pub history_bytes: usize,
    /// Idempotency keys remembered per key: those of its last N updates.
    #[arg(long, env = "RINGFEED_IDEMPOTENCY_WINDOW", default_value_t = 1000)]
    pub idempotency_window: usize,
    /// A key with no subscriber that nobody published to, joined or read for this long
    /// is dropped by its owner (and its replica by the successor): memory stays bounded.
    /// A later publish starts a new epoch. Keep it well above the longest poll `wait`.
    #[arg(long, env = "RINGFEED_KEY_IDLE_TTL_MS", default_value_t = 300_000)]
    pub key_idle_ttl_ms: u64,
    /// Resident memory (MiB) past which new keys and connections are refused
    /// (`RESOURCE_EXHAUSTED`, 503, 4429); 0: three quarters of the machine's memory or
    /// of the cgroup's limit, whichever is lower.
    #[arg(long, env = "RINGFEED_MEMORY_BUDGET_MB", default_value_t = 0)]
    pub memory_budget_mb: u64,
    /// Testing only: hold every hand-off this long before sending anything, so a test
    /// can kill the node in the middle of one.
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_handoff_delay_ms: u64,
    /// Testing only: answer `DeliverStream` and `ReplicateStream` UNIMPLEMENTED, as a
    /// node of an earlier version does, so its peers' fallback to unary calls is tested.
    #[arg(long, hide = true)]
    pub test_no_stream_rpcs: bool,
    /// Interval of SSE heartbeat comments.
    #[arg(long, env = "RINGFEED_SSE_HEARTBEAT_MS", default_value_t = 15_000)]
    pub sse_heartbeat_ms: u64,
    /// Ends an SSE stream after this long (0: never), so that browsers reconnect —
    /// with `Last-Event-ID`, losing nothing — and long-lived streams rebalance.
    #[arg(long, env = "RINGFEED_SSE_MAX_STREAM_MS", default_value_t = 0)]
    pub sse_max_stream_ms: u64,
    /// Interval of WebSocket control pings; no pong within 1.5× closes the connection.
    #[arg(long, env = "RINGFEED_HEARTBEAT_MS", default_value_t = 30_000)]
    pub heartbeat_ms: u64,
    /// An HTTP request or upgrade not complete within this is dropped.
    #[arg(long, env = "RINGFEED_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// How long shutdown waits for connections to close before forcing them.
    #[arg(long, env = "RINGFEED_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,
    /// Origins allowed for CORS and WebSocket upgrades, comma-separated
    /// (`scheme://host[:port]`, as browsers send them; spaces around entries are
    /// ignored); `*` allows all.
    #[arg(
        long,
        env = "RINGFEED_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = "*",
        value_parser = parse_origin
    )]
    pub allowed_origins: Vec<String>,
    /// Require a ticket from every client for its key, and an API token for
    /// `POST /v1/tickets` (docs/protocol.md *Tickets and authentication*). Needs
    /// --ticket-secrets-file and --api-tokens-file.
    #[arg(long, env = "RINGFEED_AUTH")]
    pub auth: bool,
    /// A file of ticket secrets, one a line, newest first, each at least 32 bytes: the
    /// first signs tickets, every one verifies them (rotation).
    #[arg(long, env = "RINGFEED_TICKET_SECRETS_FILE")]
    pub ticket_secrets_file: Option<std::path::PathBuf>,
    /// A file of the API tokens accepted, one a line (several at once, for rotation).
    #[arg(long, env = "RINGFEED_API_TOKENS_FILE")]
    pub api_tokens_file: Option<std::path::PathBuf>,
    /// The longest validity `POST /v1/tickets` grants, in seconds.
    #[arg(long, env = "RINGFEED_MAX_TICKET_TTL_S", default_value_t = 3600)]
    pub max_ticket_ttl_s: u64,
    /// How long the `resume` token in `welcome` stays valid, in seconds: a client
    /// reconnects and follows redirects with it instead of its ticket.
    #[arg(long, env = "RINGFEED_RESUME_TTL_S", default_value_t = 86400)]
    pub resume_ttl_s: u64,
    /// Each ticket admits one connection: the owner that admits it records it until it
    /// expires (a client reconnects with its `resume` token instead).
    #[arg(long, env = "RINGFEED_SINGLE_USE_TICKETS")]
    pub single_use_tickets: bool,
    #[command(flatten)]
    pub failures: FailureArgs,
    #[command(flatten)]
    pub docs: DocArgs,
    #[command(flatten)]
    pub quic: QuicArgs,
    /// What a node does with a client whose key another node owns: `redirect` it there
    /// (the owner's address, as the ring publishes it), or `proxy` it — connect to the
    /// owner itself and pass everything through, for clusters that clients reach
    /// through one address (a load balancer) and whose nodes have none of their own.
    /// `/v1/doc` is always proxied (stock y-websocket clients follow no redirect).
    #[arg(long, env = "RINGFEED_NON_OWNER", value_enum, default_value_t = NonOwner::Redirect)]
    pub non_owner: NonOwner,
    /// Runtime worker threads (0: one per core). Several nodes sharing a box's cores
    /// each want their share: spare workers only wake and park one another.
    #[arg(long, env = "RINGFEED_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

/// `--non-owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NonOwner {
    Redirect,
    Proxy,
}

/// The bounds of every key's state.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_payload: usize,
    /// Deepest nesting of a JSON payload.
    pub max_json_depth: usize,
    pub max_subscribers: usize,
    /// Updates kept for resume, at most…
    pub history_len: usize,
    /// …and at most this many bytes of encoded frames.
    pub history_bytes: usize,
    /// Idempotency keys remembered per key (those of the last N updates).
    pub idempotency_window: usize,
    /// Largest Yjs update to a document.
    pub max_doc_update: usize,
}

impl Limits {
    /// The bounds of one payload.
    pub fn payload(&self) -> frames::PayloadLimits {
        frames::PayloadLimits {
            max_payload: self.max_payload,
            max_json_depth: self.max_json_depth,
            max_doc_update: self.max_doc_update,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 64 * 1024,
            max_json_depth: 64,
            max_subscribers: 100_000,
            history_len: 1000,
            history_bytes: 1024 * 1024,
            idempotency_window: 1000,
            max_doc_update: 4 << 20,
        }
    }
}

impl Config {
    /// Checks every setting; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_membership()?;
        self.validate_limits()?;
        self.validate_timing()?;
        self.validate_http()?;
        self.tls.validate()?;
        self.docs.validate()?;
        self.quic.validate(self.http_listen)?;
        self.validate_auth()
    }

    /// Authentication on needs its secrets: never an open node by mistake.
    fn validate_auth(&self) -> Result<(), String> {
        if self.auth && self.ticket_secrets_file.is_none() {
            return Err(
                "--auth needs --ticket-secrets-file (the secrets tickets are signed with)".into(),
            );
        }
        if self.auth && self.api_tokens_file.is_none() {
            return Err(
                "--auth needs --api-tokens-file (the tokens that may ask for tickets)".into(),
            );
        }
        if self.max_ticket_ttl_s == 0 || self.max_ticket_ttl_s > 7 * 24 * 3600 {
            return Err(format!(
                "--max-ticket-ttl-s {}: between 1 and 604800 (a week)",
                self.max_ticket_ttl_s
            ));
        }
        self.failures.validate()?;
        if self.resume_ttl_s == 0 || self.resume_ttl_s > 30 * 24 * 3600 {
            return Err(format!(
                "--resume-ttl-s {}: between 1 and 2592000 (30 days)",
                self.resume_ttl_s
            ));
        }
        Ok(())
    }

    /// Reads the secrets and tokens authentication needs: `None` with it off. Each file
    /// is read again when it changes (rotation without a restart), by a task on `tasks`
    /// until `stop`. The error names the setting and never shows a secret.
    pub fn load_auth(
        &self,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Option<Auth>, String> {
        if !self.auth {
            return Ok(None);
        }
        let needed = |flag: &str, path: &Option<std::path::PathBuf>| {
            path.clone().ok_or_else(|| format!("--auth needs {flag}"))
        };
        let secrets = needed("--ticket-secrets-file", &self.ticket_secrets_file)?;
        let file = secrets.clone();
        let signer = watch(
            "ticket secrets",
            vec![secrets],
            move || {
                Signer::new(&read_list("--ticket-secrets-file", &file)?)
                    .map_err(|e| format!("--ticket-secrets-file: {e}"))
            },
            tasks,
            stop.clone(),
        )?;
        let throttle = self.failures.throttle();
        let api_tokens = api_token_gate(
            "--api-tokens-file",
            &needed("--api-tokens-file", &self.api_tokens_file)?,
            throttle.clone(),
            tasks,
            stop,
        )?;
        Ok(Some(Auth {
            signer,
            api_tokens,
            throttle,
            max_ticket_ttl: Duration::from_secs(self.max_ticket_ttl_s),
            resume_ttl: Duration::from_secs(self.resume_ttl_s),
            spent: self
                .single_use_tickets
                .then(crate::protocol::ticket::Spent::default),
        }))
    }

    /// The node's identity and its place in the cluster.
    fn validate_membership(&self) -> Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "--id {:?}: 1–64 bytes of A-Z a-z 0-9 . _ -",
                self.id
            ));
        }
        self.membership.validate()?;
        if self.lease_ttl < 2 || self.lease_ttl > 3600 {
            return Err(format!(
                "--lease-ttl {}: between 2 and 3600 seconds",
                self.lease_ttl
            ));
        }
        if self.points == 0 || self.points > MAX_POINTS {
            return Err(format!(
                "--points {}: between 1 and {MAX_POINTS}",
                self.points
            ));
        }
        if self.worker_threads > 1024 {
            return Err(format!(
                "--worker-threads {}: at most 1024",
                self.worker_threads
            ));
        }
        Ok(())
    }

    /// The bounds of connections, frames, payloads and key state.
    fn validate_limits(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("--max-connections must be > 0".into());
        }
        if self.subscriber_queue == 0 || self.subscriber_queue > 1 << 20 {
            return Err(format!(
                "--subscriber-queue {}: between 1 and 1048576",
                self.subscriber_queue
            ));
        }
        if self.max_frame < 1024 || self.max_payload == 0 {
            return Err("--max-frame must be ≥ 1024 and --max-payload > 0".into());
        }
        if self.max_json_depth == 0 || self.max_json_depth > frames::MAX_JSON_DEPTH {
            return Err(format!(
                "--max-json-depth {}: between 1 and {}",
                self.max_json_depth,
                frames::MAX_JSON_DEPTH
            ));
        }
        if self.max_batch == 0 || self.max_batch > 100_000 {
            return Err(format!(
                "--max-batch {}: between 1 and 100000",
                self.max_batch
            ));
        }
        for (name, rate) in [
            ("--client-control-rate", self.client_control_rate),
            ("--client-message-rate", self.client_message_rate),
        ] {
            if rate == 0 || rate >= u32::from(u16::MAX) {
                return Err(format!("{name} {rate}: between 1 and 65534"));
            }
        }
        if self.client_message_timeout_ms < 100 {
            return Err(format!(
                "--client-message-timeout-ms {}: at least 100",
                self.client_message_timeout_ms
            ));
        }
        if self.max_subscribers_per_key == 0 {
            return Err("--max-subscribers-per-key must be > 0".into());
        }
        if self.history_len == 0 || self.history_len > 1_000_000 {
            return Err(format!(
                "--history-len {}: between 1 and 1000000",
                self.history_len
            ));
        }
        if self.history_bytes < self.max_payload.min(1024) || self.history_bytes > MAX_HISTORY_BYTES
        {
            return Err(format!(
                "--history-bytes {}: between {} and {MAX_HISTORY_BYTES} (1 GiB)",
                self.history_bytes,
                self.max_payload.min(1024)
            ));
        }
        if self.idempotency_window > 1_000_000 {
            return Err(format!(
                "--idempotency-window {}: at most 1000000",
                self.idempotency_window
            ));
        }
        Ok(())
    }

    /// Timeouts and periods.
    fn validate_timing(&self) -> Result<(), String> {
        if self.key_idle_ttl_ms < 1000 {
            return Err(format!(
                "--key-idle-ttl-ms {}: at least 1000",
                self.key_idle_ttl_ms
            ));
        }
        if self.sse_heartbeat_ms < 100 {
            return Err(format!(
                "--sse-heartbeat-ms {}: at least 100",
                self.sse_heartbeat_ms
            ));
        }
        if self.heartbeat_ms < 100 {
            return Err(format!(
                "--heartbeat-ms {}: at least 100",
                self.heartbeat_ms
            ));
        }
        if self.handshake_timeout_ms == 0 {
            return Err("--handshake-timeout-ms must be > 0".into());
        }
        Ok(())
    }

    /// Origins and advertised addresses.
    fn validate_http(&self) -> Result<(), String> {
        if self.allowed_origins.is_empty() {
            return Err("--allowed-origins needs at least one origin (or *)".into());
        }
        if let Some(http) = &self.advertise_http {
            if !(http.starts_with("http://") || http.starts_with("https://")) {
                return Err(format!(
                    "--advertise-http {http:?} must start with http:// or https://"
                ));
            }
        } else if self.http_listen.ip().is_unspecified() {
            return Err(
                "--advertise-http is needed when --http-listen is a wildcard address".into(),
            );
        }
        if self.advertise_grpc.is_none() && self.grpc_listen.ip().is_unspecified() {
            return Err(
                "--advertise-grpc is needed when --grpc-listen is a wildcard address".into(),
            );
        }
        Ok(())
    }

    /// The memory budget in bytes.
    pub fn memory_budget(&self) -> u64 {
        match self.memory_budget_mb {
            0 => crate::budget::default_limit(),
            mb => mb.saturating_mul(1 << 20),
        }
    }

    /// The bounds of every key's state.
    pub fn key_limits(&self) -> Limits {
        Limits {
            max_payload: self.max_payload,
            max_json_depth: self.max_json_depth,
            max_subscribers: self.max_subscribers_per_key,
            history_len: self.history_len,
            history_bytes: self.history_bytes,
            idempotency_window: self.idempotency_window,
            max_doc_update: self.docs.doc_max_update,
        }
    }

    /// The largest gRPC message the internal service decodes: a `Deliver` request of
    /// `max_batch` items at the payload limit, or a peer's request (replication,
    /// hand-off) of [`REQUEST_BUDGET`] bytes and one more
    /// key, plus framing. Anything larger is refused before it is read.
    pub fn max_grpc_message(&self) -> usize {
        let deliver = ringfeed_router::key::max_batch_message(self.max_batch, self.max_payload);
        // One key's snapshot: its history (frames), what is in flight (bounded like
        // the history, in practice far less) and its idempotency window.
        let snapshot = (self.history_bytes + self.max_payload)
            .saturating_mul(2)
            .saturating_add(
                self.idempotency_window
                    .saturating_mul(MAX_IDEMPOTENCY_KEY + 24),
            );
        // A document's state rides beside its key's snapshot (twice: a hand-off may
        // carry its last update in the history too).
        let snapshot = snapshot.saturating_add(self.docs.doc_max_bytes.saturating_mul(2));
        let peer = REQUEST_BUDGET.saturating_add(snapshot);
        deliver.max(peer.saturating_add(64 * 1024))
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// Whether a browser on `origin` may use this node.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }
}

/// One `--allowed-origins` entry: `*`, `null`, or `http(s)://host[:port]` with no path
/// — what a browser's `Origin` header can be — trimmed and lower-cased.
fn parse_origin(raw: &str) -> Result<String, String> {
    let origin = raw.trim().to_ascii_lowercase();
    if origin == "*" || origin == "null" {
        return Ok(origin);
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("{raw:?} is not an origin: it starts with http:// or https://"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!(
            "{raw:?} is not an origin: scheme://host[:port], with no path or trailing slash"
        ));
    }
    Ok(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::parse_from(["ringfeed-node", "--id", "n1"])
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(base().validate(), Ok(()));
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = base();
        c.lease_ttl = 1;
        assert!(c.validate().unwrap_err().contains("--lease-ttl"));
        let mut c = base();
        c.id = "n 1".into();
        assert!(c.validate().unwrap_err().contains("--id"));
        let mut c = base();
        c.worker_threads = 5000;
        assert!(c.validate().unwrap_err().contains("--worker-threads"));
        let mut c = base();
        c.http_listen = "0.0.0.0:1".parse().unwrap();
        assert!(c.validate().unwrap_err().contains("--advertise-http"));
        let mut c = base();
        c.points = 0;
        assert!(c.validate().unwrap_err().contains("--points"));
        let mut c = base();
        c.history_bytes = MAX_HISTORY_BYTES + 1;
        assert!(c.validate().unwrap_err().contains("--history-bytes"));
        c.history_bytes = MAX_HISTORY_BYTES;
        assert_eq!(c.validate(), Ok(()));
        let mut c = base();
        c.max_json_depth = 0;
        assert!(c.validate().unwrap_err().contains("--max-json-depth"));
        let mut c = base();
        c.client_message_timeout_ms = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("--client-message-timeout-ms"));
    }

    #[test]
    fn the_grpc_decode_limit_follows_the_request_limits() {
        let c = base();
        let limit = c.max_grpc_message();
        // Room for a full batch at the payload limit, and for a hand-off with a
        // document at its limit…
        assert!(limit >= 1000 * 64 * 1024);
        assert!(limit >= 2 * c.docs.doc_max_bytes);
        // …and nowhere near the 256 MiB it used to be.
        assert!(limit < 80 << 20, "{limit}");
        // Smaller limits, a smaller bound (a peer's request budget, 4 MiB, and one
        // key's snapshot are its floor).
        let mut small = base();
        small.max_payload = 1024;
        small.max_batch = 10;
        small.history_bytes = 64 * 1024;
        small.docs.doc_max_update = 32 * 1024;
        small.docs.doc_max_bytes = 64 * 1024;
        assert!(
            small.max_grpc_message() < 6 << 20,
            "{}",
            small.max_grpc_message()
        );
    }

    #[test]
    fn origins() {
        let mut c = base();
        assert!(c.origin_allowed("https://a.example"));
        c.allowed_origins = vec!["https://a.example".into()];
        assert!(c.origin_allowed("https://a.example"));
        assert!(!c.origin_allowed("https://b.example"));
        // Entries are trimmed and checked as a browser would send them.
        let parsed = Config::try_parse_from([
            "ringfeed-node",
            "--id",
            "n1",
            "--allowed-origins",
            "https://a.example, HTTP://B.example:8080",
        ])
        .unwrap();
        assert!(parsed.origin_allowed("http://b.example:8080"));
        assert!(parsed.origin_allowed("https://a.example"));
        for bad in [
            "https://a.example/",
            "a.example",
            "https://a.example/app",
            "ws://a.example",
        ] {
            assert!(
                Config::try_parse_from(["ringfeed-node", "--id", "n1", "--allowed-origins", bad])
                    .is_err(),
                "{bad}"
            );
        }
    }
}
