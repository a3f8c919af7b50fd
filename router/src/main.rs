//! `ringfeed-router`: the stateless gRPC router.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ringfeed_proto::v1::router_server::RouterServer;
use ringfeed_router::api_token::Gate;
use ringfeed_router::config::Config;
use ringfeed_router::forward::{ForwardConfig, Forwarder};
use ringfeed_router::membership::Membership;
use ringfeed_router::observe;
use ringfeed_router::service::RouterService;
use ringfeed_router::tls::Tls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn main() -> ExitCode {
    use clap::CommandFactory;
    let argv = match ringfeed_router::config::with_config_file(
        &Config::command(),
        std::env::args_os().collect(),
    ) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("ringfeed-router: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let config = match Config::try_parse_from(argv) {
        Ok(config) => config,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            eprint!("ringfeed-router: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    ringfeed_router::init_tracing(config.membership.log_format, &config.membership.log);
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
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    // Files are read before any port is bound: a bad one is a configuration error.
    let loaded = runtime.block_on(async {
        let tokens = config.load_api_tokens(&tasks, shutdown.clone())?;
        let tls = config.tls.load(&tasks, shutdown.clone())?;
        Ok::<_, String>((tokens, tls))
    });
    let (tokens, tls) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("ringfeed-router: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    match runtime.block_on(run(config, tokens, tls, tasks, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfeed-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    config: Config,
    tokens: Option<Gate>,
    tls: Tls,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let membership = Membership::start(
        &config.membership.membership(Duration::from_secs(5)),
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
            tls: tls.client().map_err(|e| anyhow::anyhow!(e))?,
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
    let router = RouterServer::new(RouterService::new(forwarder.clone()).with_tokens(tokens))
        .max_decoding_message_size(config.max_grpc_message());
    // What operators watch: grpc.health.v1 beside Router, and an HTTP listener.
    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = observe::watch_readiness(forwarder.clone(), health, shutdown.clone());
    let http = tokio::net::TcpListener::bind(config.http_listen).await?;
    let http_addr = http.local_addr()?;
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let app = observe::http(forwarder, readiness);
        let served = axum::serve(http, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the router's HTTP listener failed");
        }
    });

    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    tasks.spawn(reload_on_sighup(
        config.membership.log.clone(),
        shutdown.clone(),
    ));
    println!("ringfeed-router ready grpc={addr} http=http://{http_addr}");
    tracing::info!(%addr, cluster = %config.membership.cluster, "router serving");
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself: ours is
    // set here, or every reply larger than a segment waits for a delayed ACK (~40 ms).
    let stop = shutdown.clone();
    let until = async move { stop.cancelled().await };
    let mut server = tonic::transport::Server::builder();
    let server = server
        .add_service(reflection)
        .add_service(health_service)
        .add_service(router);
    // Callers: gRPC over TLS when the router has a certificate (callers need not
    // present one: they present API tokens).
    match tls
        .server(&[b"h2"], false)
        .map_err(|e| anyhow::anyhow!(e))?
    {
        Some(config) => {
            let incoming =
                ringfeed_router::tls::incoming(listener, config, &tasks, shutdown.clone());
            server.serve_with_incoming_shutdown(incoming, until).await?;
        }
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            server.serve_with_incoming_shutdown(incoming, until).await?;
        }
    }
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

/// On `SIGHUP`, reads the settings again (flags, environment, file) and applies what
/// changes while the router runs: `--log`. The files a setting names (API tokens,
/// certificates) are watched by their own tasks.
async fn reload_on_sighup(mut log: String, shutdown: CancellationToken) {
    let Ok(mut hups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP: settings will not be reloaded");
        return;
    };
    loop {
        tokio::select! {
            _ = hups.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        let config = match ringfeed_router::config::reread(Config::validate) {
            Ok(config) => config,
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: the settings did not load; nothing changed");
                continue;
            }
        };
        let to = config.membership.log;
        if to == log {
            tracing::info!("SIGHUP: settings read again; nothing that changes live changed");
            continue;
        }
        match ringfeed_router::set_log_filter(&to) {
            Ok(()) => {
                tracing::info!(setting = "log", from = %log, to = %to, "SIGHUP: changed");
                log = to;
            }
            Err(e) => tracing::warn!(error = %e, "SIGHUP: the log filter did not change"),
        }
    }
}
