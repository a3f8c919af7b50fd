//! `ringfeed-node`: one member of a ringfeed cluster.

use std::process::ExitCode;

use clap::Parser;
use ringfeed_node::admin::{self, DrainArgs};
use ringfeed_node::config::{Auth, Config};
use tokio_util::sync::CancellationToken;

/// jemalloc: an idle connection is a dozen small long-lived allocations made between
/// each set-up's short-lived ones, around which glibc's heap fragments (~10% more RSS
/// per connection in P3). Its background thread gives freed memory back within about
/// a second (`.cargo/config.toml`): a 1 MiB document's transient copies (the message,
/// its frame, its echo) otherwise stay resident until the next allocation burst.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // `ringfeed-node certs …` makes a cluster CA and certificates.
    if std::env::args().nth(1).as_deref() == Some("certs") {
        let args = ringfeed_node::certs::CertsArgs::parse_from(
            std::iter::once("ringfeed-node certs".to_owned()).chain(std::env::args().skip(2)),
        );
        ringfeed_router::init_tracing(
            ringfeed_router::LogFormat::Text,
            &std::env::var("RINGFEED_LOG").unwrap_or_else(|_| "info".into()),
        );
        return match ringfeed_node::certs::certs(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringfeed-node certs: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // `ringfeed-node drain …` asks a running node to drain; anything else runs a node.
    if std::env::args().nth(1).as_deref() == Some("drain") {
        let args = DrainArgs::parse_from(
            std::iter::once("ringfeed-node drain".to_owned()).chain(std::env::args().skip(2)),
        );
        if let Err(e) = ringfeed_router::log_filter(&args.membership.log) {
            eprintln!("ringfeed-node drain: bad configuration: --log: {e}");
            return ExitCode::from(64);
        }
        ringfeed_router::init_tracing(args.membership.log_format, &args.membership.log);
        return match runtime(0).map(|rt| rt.block_on(admin::drain(args))) {
            Some(Ok(())) => ExitCode::SUCCESS,
            Some(Err(e)) => {
                eprintln!("ringfeed-node drain: {e:#}");
                ExitCode::FAILURE
            }
            None => ExitCode::FAILURE,
        };
    }
    let config = match parse_config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    ringfeed_router::init_tracing(config.membership.log_format, &config.membership.log);
    if let Err(e) = config.validate() {
        eprintln!("ringfeed-node: bad configuration: {e}");
        return ExitCode::from(64);
    }
    let Some(runtime) = runtime(config.worker_threads) else {
        return ExitCode::FAILURE;
    };
    // Authentication on needs its secrets: a node never starts open by mistake. The
    // tasks that read them again when they change live as long as the process.
    let watchers = tokio_util::task::TaskTracker::new();
    let loaded = runtime.block_on(async { config.load_auth(&watchers, CancellationToken::new()) });
    let auth = match loaded {
        Ok(auth) => auth,
        Err(e) => {
            eprintln!("ringfeed-node: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let loaded = runtime.block_on(async { config.tls.load(&watchers, CancellationToken::new()) });
    let tls = match loaded {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("ringfeed-node: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    match runtime.block_on(start(config, auth, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfeed-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The node's settings: flags, environment, the config file, defaults, in that order.
/// A bad one is exit 64 with a message naming it (help and version exit as clap does).
fn parse_config() -> Result<Config, ExitCode> {
    use clap::CommandFactory;
    let argv = ringfeed_router::config::with_config_file(
        &Config::command(),
        std::env::args_os().collect(),
    )
    .map_err(|e| {
        eprintln!("ringfeed-node: bad configuration: {e}");
        ExitCode::from(64)
    })?;
    Config::try_parse_from(argv).map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            e.exit();
        }
        eprint!("ringfeed-node: bad configuration: {e}");
        ExitCode::from(64)
    })
}

/// The runtime with `workers` threads (0: one per core).
fn runtime(workers: usize) -> Option<tokio::runtime::Runtime> {
    ringfeed_router::runtime(workers)
        .inspect_err(|e| eprintln!("ringfeed-node: cannot start the runtime: {e}"))
        .ok()
}

/// Connections the kernel queues before they are accepted. A moved or failed-over
/// node's clients arrive at once (thousands within milliseconds); with tokio's default
/// of 1,024 the rest see their SYNs dropped and retry a second later. The kernel caps
/// it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

async fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn start(
    config: Config,
    auth: Option<Auth>,
    tls: ringfeed_router::tls::Tls,
) -> anyhow::Result<()> {
    let http = listen(config.http_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --http-listen {}: {e}", config.http_listen))?;
    let grpc = listen(config.grpc_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --grpc-listen {}: {e}", config.grpc_listen))?;
    let quic = ringfeed_node::quic::socket(&config, http.local_addr()?)?;
    // SIGTERM or Ctrl-C asks for a drain.
    let stop = CancellationToken::new();
    tokio::spawn(signal(stop.clone()));
    ringfeed_node::run::run(config, auth, tls, http, grpc, quic, stop).await
}

async fn signal(shutdown: CancellationToken) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        tracing::error!("cannot listen for SIGTERM");
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
}
