//! `ringfeed-router`: the stateless gRPC router.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ringfeed_proto::v1::router_server::RouterServer;
use ringfeed_router::forward::{ForwardConfig, Forwarder};
use ringfeed_router::membership::{Membership, MembershipConfig};
use ringfeed_router::service::RouterService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The stateless gRPC router: hashes each key on the ring kept in etcd and forwards the
/// update to its owner.
#[derive(Parser, Debug)]
#[command(name = "ringfeed-router", version)]
struct Config {
    /// Cluster name; records live under /ringfeed/{cluster}/.
    #[arg(long, env = "RINGFEED_CLUSTER", default_value = "default")]
    cluster: String,
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "RINGFEED_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// Address the gRPC service listens on (port 0 picks a free one).
    #[arg(long, env = "RINGFEED_LISTEN", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Deadline of a call whose caller sets none, in milliseconds.
    #[arg(long, env = "RINGFEED_PUBLISH_TIMEOUT_MS", default_value_t = 10_000)]
    publish_timeout_ms: u64,
    /// Largest payload of one update, in bytes.
    #[arg(long, env = "RINGFEED_MAX_PAYLOAD", default_value_t = 64 * 1024)]
    max_payload: usize,
    /// Most items in one PublishBatch.
    #[arg(long, env = "RINGFEED_MAX_BATCH", default_value_t = 1000)]
    max_batch: usize,
    /// Runtime worker threads (0: one per core). A router sharing a box's cores with
    /// nodes wants its share: spare workers only wake and park one another.
    #[arg(long, env = "RINGFEED_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
}

impl Config {
    /// The largest request decoded: a batch of `max_batch` items at the payload limit,
    /// each with its key, content type, idempotency key and epoch at their limits, plus
    /// framing. A larger one is refused (`OUT_OF_RANGE`) before it is read.
    fn max_grpc_message(&self) -> usize {
        ringfeed_router::key::max_batch_message(self.max_batch, self.max_payload)
    }

    fn validate(&self) -> Result<(), String> {
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err(format!(
                "--cluster {:?} must be non-empty and contain no '/'",
                self.cluster
            ));
        }
        if self.etcd.is_empty() || self.etcd.iter().any(|e| e.is_empty()) {
            return Err("--etcd needs at least one endpoint".into());
        }
        if self.publish_timeout_ms == 0 {
            return Err("--publish-timeout-ms must be > 0".into());
        }
        if self.max_payload == 0 || self.max_batch == 0 {
            return Err("--max-payload and --max-batch must be > 0".into());
        }
        if self.max_payload > 64 << 20 || self.max_batch > 100_000 {
            return Err("--max-payload is at most 64 MiB and --max-batch at most 100000".into());
        }
        if self.worker_threads > 1024 {
            return Err(format!(
                "--worker-threads {}: at most 1024",
                self.worker_threads
            ));
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    ringfeed_router::init_tracing();
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("ringfeed-router: bad configuration: {e}");
        return ExitCode::from(64);
    }
    let runtime = match ringfeed_router::runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ringfeed-router: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfeed-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let membership = Membership::start(
        &MembershipConfig {
            endpoints: config.etcd.clone(),
            cluster: config.cluster.clone(),
            lease_ttl: Duration::from_secs(5),
        },
        &tasks,
        shutdown.clone(),
    )
    .await?;
    let forwarder = Arc::new(Forwarder::new(
        membership,
        ForwardConfig {
            max_payload: config.max_payload,
            max_batch: config.max_batch,
            default_deadline: Duration::from_millis(config.publish_timeout_ms),
        },
        tasks.clone(),
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    // Reflection lists what this process serves: the public Router service, not the
    // nodes' internal one.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ringfeed_proto::ROUTER_FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let router = RouterServer::new(RouterService::new(forwarder))
        .max_decoding_message_size(config.max_grpc_message());

    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    println!("ringfeed-router ready grpc={addr}");
    tracing::info!(%addr, cluster = %config.cluster, "router serving");
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself: ours is
    // set here, or every reply larger than a segment waits for a delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let stop = shutdown.clone();
    tonic::transport::Server::builder()
        .add_service(reflection)
        .add_service(router)
        .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
        .await?;
    shutdown.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    Ok(())
}

async fn shutdown_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
