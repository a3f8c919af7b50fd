//! The router's flags and environment, and the cluster flags every binary shares
//! (docs/configuration.md lists them all).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api_token::{read_list, ApiTokens, Gate};
use crate::membership::{EtcdSecurity, MembershipConfig};
use crate::throttle::Throttle;

/// How many failed authentications a source may make: the flags every process that
/// checks credentials shares.
#[derive(clap::Args, Debug, Clone)]
pub struct FailureArgs {
    /// Failed authentications (bad ticket, bad API token) a source address (an IPv4
    /// address or an IPv6 /64) may make at once before it is refused with 429 / close
    /// 4429 / RESOURCE_EXHAUSTED…
    #[arg(long, env = "RINGFEED_AUTH_FAILURE_BURST", default_value_t = 50)]
    pub auth_failure_burst: u32,
    /// …and how many more it may make per second after that.
    #[arg(long, env = "RINGFEED_AUTH_FAILURE_RATE", default_value_t = 5.0)]
    pub auth_failure_rate: f64,
}

impl FailureArgs {
    /// Checks the settings; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.auth_failure_burst == 0 {
            return Err("--auth-failure-burst must be > 0".into());
        }
        if !(self.auth_failure_rate > 0.0 && self.auth_failure_rate <= 1e6) {
            return Err("--auth-failure-rate must be > 0 (per second)".into());
        }
        Ok(())
    }

    /// The failure budgets these settings describe.
    pub fn throttle(&self) -> Arc<Throttle> {
        Arc::new(Throttle::new(
            self.auth_failure_burst,
            self.auth_failure_rate,
        ))
    }
}

/// The API tokens in `path`, read again whenever the file changes (rotation without
/// a restart), checked with `throttle`. The error names `flag` and never shows a token.
pub fn api_token_gate(
    flag: &'static str,
    path: &std::path::Path,
    throttle: Arc<Throttle>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<Gate, String> {
    let file = path.to_path_buf();
    let tokens = crate::watch::watch(
        "API tokens",
        vec![file.clone()],
        move || Ok(ApiTokens::new(&read_list(flag, &file)?)),
        tasks,
        stop,
    )?;
    Ok(Gate::new(tokens, throttle))
}

/// Where the cluster's records live: the flags every ringfeed binary shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Cluster name; records live under /ringfeed/{cluster}/.
    #[arg(long, env = "RINGFEED_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "RINGFEED_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,
    /// The CA (PEM) that signed etcd's certificate: etcd over TLS (`https://`
    /// endpoints).
    #[arg(long, env = "RINGFEED_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) to present to etcd (with --etcd-key), for an etcd
    /// that asks for one (`--client-cert-auth`).
    #[arg(long, env = "RINGFEED_ETCD_CERT")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, env = "RINGFEED_ETCD_KEY")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// An etcd user, for an etcd with authentication on (with --etcd-password-file).
    #[arg(long, env = "RINGFEED_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// A file whose first line is --etcd-user's password.
    #[arg(long, env = "RINGFEED_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<std::path::PathBuf>,
    /// A TOML file of settings, named as the flags without their dashes
    /// (`max-connections = 19000`): a flag beats its environment variable, which beats
    /// the file, which beats the default. `SIGHUP` makes a process read it again.
    #[arg(long, env = "RINGFEED_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// How logs are written to stderr: `text` for people, or `json` (one object a line,
    /// with the fields of the spans it happened in).
    #[arg(long, env = "RINGFEED_LOG_FORMAT", value_enum, default_value_t = crate::LogFormat::Text)]
    pub log_format: crate::LogFormat,
    /// What is logged: a `tracing` filter, a level (`debug`) or per module
    /// (`ringfeed_node=debug,info`). `SIGHUP` changes it on a running process.
    #[arg(long, env = "RINGFEED_LOG", default_value = "info")]
    pub log: String,
}

impl ClusterArgs {
    /// Checks the cluster name and the endpoints; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err(format!(
                "--cluster {:?} must be non-empty and contain no '/'",
                self.cluster
            ));
        }
        crate::log_filter(&self.log).map_err(|e| format!("--log {:?}: {e}", self.log))?;
        if self.etcd.is_empty() || self.etcd.iter().any(|e| e.is_empty()) {
            return Err("--etcd needs at least one endpoint".into());
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err("--etcd-cert and --etcd-key go together".into());
        }
        if self.etcd_cert.is_some() && self.etcd_ca.is_none() {
            return Err("--etcd-cert needs --etcd-ca (etcd over TLS)".into());
        }
        if self.etcd_user.is_some() != self.etcd_password_file.is_some() {
            return Err("--etcd-user and --etcd-password-file go together".into());
        }
        // Read now, so a missing file is a configuration error before any port is bound.
        self.etcd_security()?;
        Ok(())
    }

    /// What connecting to etcd needs beyond its endpoints, read from the files named.
    pub fn etcd_security(&self) -> Result<EtcdSecurity, String> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let ca = match &self.etcd_ca {
            Some(path) => Some(read("--etcd-ca", path)?),
            None => None,
        };
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some((read("--etcd-cert", cert)?, read("--etcd-key", key)?)),
            _ => None,
        };
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(path)) => {
                let password = read_list("--etcd-password-file", path)?.swap_remove(0);
                Some((user.clone(), password))
            }
            _ => None,
        };
        Ok(EtcdSecurity { ca, identity, user })
    }

    /// The membership these flags name, with leases of `lease_ttl`.
    pub fn membership(&self, lease_ttl: Duration) -> MembershipConfig {
        MembershipConfig {
            endpoints: self.etcd.clone(),
            cluster: self.cluster.clone(),
            lease_ttl,
            // Checked by `validate`, which every binary runs before this.
            security: self.etcd_security().unwrap_or_default(),
        }
    }
}

/// The stateless gRPC router: hashes each key on the ring kept in etcd and forwards the
/// update to its owner.
#[derive(Parser, Debug)]
#[command(name = "ringfeed-router", version)]
pub struct Config {
    #[command(flatten)]
    pub membership: ClusterArgs,
    /// Address the gRPC service listens on (port 0 picks a free one).
    #[arg(long, env = "RINGFEED_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// Address of the HTTP listener: `/metrics`, `/healthz`, `/readyz` (port 0 picks a
    /// free one).
    #[arg(long, env = "RINGFEED_HTTP_LISTEN", default_value = "127.0.0.1:7080")]
    pub http_listen: SocketAddr,
    /// Deadline of a call whose caller sets none, in milliseconds.
    #[arg(long, env = "RINGFEED_PUBLISH_TIMEOUT_MS", default_value_t = 10_000)]
    pub publish_timeout_ms: u64,
    /// Largest payload of one update, in bytes.
    #[arg(long, env = "RINGFEED_MAX_PAYLOAD", default_value_t = 64 * 1024)]
    pub max_payload: usize,
    /// Most items in one PublishBatch.
    #[arg(long, env = "RINGFEED_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,
    /// A file of the API tokens accepted, one a line: with it, Publish, PublishBatch
    /// and Presence need `authorization: Bearer <token>` (else UNAUTHENTICATED);
    /// Lookup and GetRing stay open, as nodes' /v1/route and /v1/ring are.
    #[arg(long, env = "RINGFEED_API_TOKENS_FILE")]
    pub api_tokens_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub failures: FailureArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Runtime worker threads (0: one per core). A router sharing a box's cores with
    /// nodes wants its share: spare workers only wake and park one another.
    #[arg(long, env = "RINGFEED_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

impl Config {
    /// The largest request decoded: a batch of `max_batch` items at the payload limit,
    /// each with its key, content type, idempotency key and epoch at their limits, plus
    /// framing. A larger one is refused (`OUT_OF_RANGE`) before it is read.
    pub fn max_grpc_message(&self) -> usize {
        crate::key::max_batch_message(self.max_batch, self.max_payload)
    }

    /// The API tokens callers must present, if `--api-tokens-file` is set, read again
    /// when the file changes. The error names the setting and never shows a token.
    pub fn load_api_tokens(
        &self,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Option<Gate>, String> {
        let Some(path) = &self.api_tokens_file else {
            return Ok(None);
        };
        api_token_gate(
            "--api-tokens-file",
            path,
            self.failures.throttle(),
            tasks,
            stop,
        )
        .map(Some)
    }

    /// Checks the settings together; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        self.membership.validate()?;
        self.failures.validate()?;
        self.tls.validate()?;
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

/// The settings as they are now (flags, environment, the file), validated: what a
/// process reads again on `SIGHUP`.
pub fn reread<C: clap::Parser>(
    validate: impl FnOnce(&C) -> Result<(), String>,
) -> Result<C, String> {
    let argv = with_config_file(&C::command(), std::env::args_os().collect())?;
    let config = C::try_parse_from(argv).map_err(|e| e.to_string())?;
    validate(&config)?;
    Ok(config)
}

/// The command line a binary runs with once its config file is read: `argv`, plus
/// `--name value` for every setting of the file (`--config FILE`, or `RINGFEED_CONFIG`)
/// that neither `argv` nor the environment sets. So a flag beats its environment
/// variable, which beats the file, which beats the default (docs/configuration.md).
///
/// The file is TOML, one `name = value` per setting, named as the flag without its
/// dashes (`max-connections = 19000`, or `max_connections`); a list is an array. A
/// setting the binary does not have, or a value that is not a scalar or a list of
/// them, is an error naming it. Without a config file, `argv` is returned as it is.
pub fn with_config_file(
    command: &clap::Command,
    argv: Vec<std::ffi::OsString>,
) -> Result<Vec<std::ffi::OsString>, String> {
    let args: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        if a == "--config" {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(str::to_owned)
        }
    });
    let Some(path) = from_args.or_else(|| std::env::var("RINGFEED_CONFIG").ok()) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--config {path}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("--config {path}: not TOML: {e}"))?;
    let given = |flag: &str| {
        args.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let mut out = argv;
    for (name, value) in table {
        let long = name.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| format!("--config {path}: unknown setting `{name}`"))?;
        let flag = format!("--{long}");
        let from_env = arg
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some());
        if given(&flag) || from_env {
            continue;
        }
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        };
        let bad = || {
            format!("--config {path}: `{name}` must be a string, number, boolean or a list of them")
        };
        let takes_value = arg.get_num_args().is_none_or(|n| n.takes_values());
        match &value {
            toml::Value::Boolean(on) if !takes_value => {
                if *on {
                    out.push(flag.into());
                }
            }
            toml::Value::Array(items) => {
                let items: Option<Vec<String>> = items.iter().map(scalar).collect();
                out.push(flag.into());
                out.push(items.ok_or_else(bad)?.join(",").into());
            }
            other => {
                out.push(flag.into());
                out.push(scalar(other).ok_or_else(bad)?.into());
            }
        }
    }
    Ok(out)
}
