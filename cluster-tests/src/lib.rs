//! A harness for end-to-end tests against real etcd and real ringfeed processes.
//!
//! [`Cluster::builder`] starts an etcd on its own loopback ports and data directory,
//! then N `ringfeed-node` processes and a `ringfeed-router`, all with port 0 (each
//! process prints the addresses it bound). Every process is killed when its handle is
//! dropped — also when a test panics — and the logs of a failed test are printed.
//! Waiting is done with [`eventually`], never with a fixed sleep. [`postgres::Postgres`]
//! starts a private PostgreSQL server the same way.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ringfeed_proto::v1::router_client::RouterClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

pub mod postgres;

/// How long a process may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the workspace's binaries are: `$RINGFEED_BIN_DIR`, else next to this test
/// executable (`target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("RINGFEED_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace binaries first (`cargo build --workspace --bins`, as scripts/test does) or set RINGFEED_BIN_DIR",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Ok(Some(v))` or `timeout` passes; the last error is
/// in the panic message.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met");
    let mut pause = Duration::from_millis(10);
    loop {
        match check().await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A free loopback TCP port (bound once, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A data directory for a test etcd: in memory (`/dev/shm`) where there is one, so that
/// a slow disk's fsyncs cannot stall lease keep-alives on a loaded 2-core machine.
fn etcd_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("ringfeed-etcd-");
        b
    };
    if shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return Ok(dir);
        }
    }
    builder.tempdir()
}

/// A real etcd on loopback, with its own data directory.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub endpoint: String,
    peer_port: u16,
    /// Over TLS: the folder of `ringfeed-node certs` (`etcd.pem`, `client.pem`, `ca.pem`).
    tls: Option<PathBuf>,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Result<Etcd> {
        Etcd::start_with(None).await
    }

    /// Starts etcd, over TLS asking clients for a certificate when `tls` names a folder
    /// of `ringfeed-node certs` with `etcd` and `client` certificates.
    pub async fn start_with(tls: Option<PathBuf>) -> Result<Etcd> {
        let mut dir = etcd_dir()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        for _attempt in 0..3 {
            let (client_port, peer_port) = (free_port(), free_port());
            let mut etcd = Etcd {
                child: None,
                endpoint: format!("{scheme}://127.0.0.1:{client_port}"),
                dir,
                peer_port,
                tls: tls.clone(),
            };
            match etcd.spawn().await {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    eprintln!("etcd did not start ({e:#}); trying other ports");
                    dir = etcd_dir()?;
                }
            }
        }
        bail!("etcd did not start after 3 attempts")
    }

    async fn spawn(&mut self) -> Result<()> {
        let data = self.dir.path().join("data");
        let log = append_to(&self.dir.path().join("etcd.log"))?;
        let client = self.endpoint.clone();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        let mut options = None;
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(tls.join("etcd.pem"))
                .arg("--key-file")
                .arg(tls.join("etcd.key"))
                .arg("--trusted-ca-file")
                .arg(tls.join("ca.pem"))
                .arg("--client-cert-auth");
            let read = |name: &str| std::fs::read(tls.join(name));
            options = Some(
                etcd_client::ConnectOptions::new().with_tls(
                    etcd_client::TlsOptions::new()
                        .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")?))
                        .identity(etcd_client::Identity::from_pem(
                            read("client.pem")?,
                            read("client.key")?,
                        )),
                ),
            );
        }
        let child = command
            .args(["--name", "test", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--logger=zap", "--log-level=warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start etcd (is etcd-server installed? scripts/test installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("etcd exited with {status}");
                }
            }
            if let Ok(mut c) =
                etcd_client::Client::connect([client.as_str()], options.clone()).await
            {
                if c.status().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("etcd not healthy within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops etcd (SIGKILL); its data directory stays for [`Etcd::restart`].
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.spawn().await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

/// A running `ringfeed-node`.
pub struct NodeProc {
    pub id: String,
    child: Option<Child>,
    /// `http://127.0.0.1:port`
    pub http: String,
    /// `127.0.0.1:port`
    pub grpc: String,
    pub incarnation: String,
    /// `127.0.0.1:port` of its QUIC listener, if it has one.
    pub quic: Option<String>,
    log: PathBuf,
    pub started: Instant,
}

impl NodeProc {
    /// Kills the process with SIGKILL: no deregistration, no goodbye to clients.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub async fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("node {} is not running", self.id))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("node {} has no pid", self.id))?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = child.kill().await;
                bail!("node {} did not exit within {within:?} of SIGTERM", self.id)
            }
        }
    }

    /// Waits (bounded) for the process to exit on its own, e.g. after a drain.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("node {} is not running", self.id))?;
        let status = tokio::time::timeout(within, child.wait())
            .await
            .map_err(|_| anyhow!("node {} did not exit within {within:?}", self.id))??;
        self.child = None;
        Ok(status)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The WebSocket URL of `/v1/connect` for `key` on this node.
    pub fn connect_url(&self, key: &str) -> String {
        ringfeed_client::connect_url(&self.http, key, None)
    }
}

/// A running `ringfeed-router`.
pub struct RouterProc {
    child: Option<Child>,
    /// `127.0.0.1:port`
    pub grpc: String,
    /// `http://127.0.0.1:port`: `/metrics`, `/healthz`, `/readyz`.
    pub http: String,
    log: PathBuf,
}

/// The API token of a [secure](ClusterBuilder::secure) cluster.
pub const SECURE_TOKEN: &str = "api-token-of-a-secure-test-cluster";
/// The ticket secret of a [secure](ClusterBuilder::secure) cluster.
pub const SECURE_SECRET: &str = "ticket-secret-of-a-secure-test-cluster-32-bytes+";

/// The CA of the last secure cluster this process started: the HTTP helpers and
/// [`connect_router`] speak TLS trusting it for `https://` URLs and when it is set.
static CA: std::sync::RwLock<Option<ringfeed_client::Tls>> = std::sync::RwLock::new(None);

/// The CA of the secure cluster this process started, if any.
pub fn tls() -> Option<ringfeed_client::Tls> {
    CA.read().expect("CA lock").clone()
}

/// Builds a [`Cluster`].
pub struct ClusterBuilder {
    secure: bool,
    log: Option<String>,
    nodes: usize,
    lease_ttl: u64,
    node_args: Vec<String>,
    router_args: Vec<String>,
    args_for: HashMap<String, Vec<String>>,
    etcd_proxied: Vec<String>,
}

impl ClusterBuilder {
    /// Node `id` reaches etcd through a [`TcpProxy`] the test can cut
    /// ([`Cluster::etcd_proxy`]).
    pub fn etcd_through_proxy(mut self, id: &str) -> Self {
        self.etcd_proxied.push(id.to_owned());
        self
    }

    /// Everything on, as `scripts/cluster --secure` does: a CA and certificates made by
    /// `ringfeed-node certs` (nodes n1–n9, `router`, `client`), TLS on every listener,
    /// mutual TLS between processes, tickets ([`SECURE_SECRET`]) and API tokens
    /// ([`SECURE_TOKEN`]) on nodes and router.
    pub fn secure(mut self) -> Self {
        self.secure = true;
        self
    }

    /// Every process's `RINGFEED_LOG` (default: the test's own, else `info`; `""`: none).
    pub fn log(mut self, filter: &str) -> Self {
        self.log = Some(filter.to_owned());
        self
    }

    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    pub fn lease_ttl(mut self, seconds: u64) -> Self {
        self.lease_ttl = seconds;
        self
    }

    /// Extra flags for the router.
    pub fn router_args(mut self, args: &[&str]) -> Self {
        self.router_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Extra flags for every node.
    pub fn node_args(mut self, args: &[&str]) -> Self {
        self.node_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Extra flags for node `id` alone (after the common ones, so they win), kept for
    /// its restarts.
    pub fn args_for(mut self, id: &str, args: &[&str]) -> Self {
        self.args_for
            .entry(id.to_owned())
            .or_default()
            .extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub async fn start(mut self) -> Result<Cluster> {
        let tls_dir = tempfile::Builder::new().prefix("ringfeed-tls-").tempdir()?;
        if self.secure {
            self.make_secure(tls_dir.path()).await?;
        }
        let etcd = Etcd::start_with(self.secure.then(|| tls_dir.path().to_path_buf())).await?;
        let mut proxies = HashMap::new();
        for id in &self.etcd_proxied {
            let proxy = TcpProxy::start(etcd.endpoint.trim_start_matches("http://")).await?;
            proxies.insert(id.clone(), proxy);
        }
        let dir = tempfile::Builder::new()
            .prefix("ringfeed-cluster-")
            .tempdir()?;
        let mut cluster = Cluster {
            name: "test".into(),
            lease_ttl: self.lease_ttl,
            node_args: self.node_args,
            router_args: self.router_args,
            log: self.log,
            args_for: self.args_for,
            proxies,
            nodes: Vec::new(),
            router: None,
            dir,
            tls_dir: self.secure.then_some(tls_dir),
            etcd,
        };
        let ids: Vec<String> = (1..=self.nodes).map(|i| format!("n{i}")).collect();
        let starts = ids.iter().map(|id| cluster.spawn_node(id, &[]));
        let nodes = match futures_util::future::try_join_all(starts).await {
            Ok(nodes) => nodes,
            Err(e) => {
                // One node's log rarely says why it waits: show every node's.
                let mut logs = String::new();
                for id in &ids {
                    let path = cluster.dir.path().join(format!("{id}.log"));
                    let log = std::fs::read_to_string(path).unwrap_or_default();
                    logs.push_str(&format!("\n===== {id} =====\n{log}"));
                }
                return Err(e.context(format!(
                    "the cluster did not start; every node's log:{logs}"
                )));
            }
        };
        cluster.nodes = nodes;
        cluster.router = Some(cluster.spawn_router().await?);
        cluster.converged().await;
        Ok(cluster)
    }
}

impl ClusterBuilder {
    /// Makes the certificates and secrets of a secure cluster in `dir` and the flags
    /// that use them.
    async fn make_secure(&mut self, dir: &Path) -> Result<()> {
        let ids: Vec<String> = (1..=9).map(|i| format!("n{i}")).collect();
        let mut certs = Command::new(binary("ringfeed-node"));
        certs.args(["certs", "--out"]).arg(dir);
        for id in &ids {
            certs.args(["--node", id]);
        }
        let made = certs
            .args(["--name", "router", "--name", "client", "--name", "etcd"])
            .output()
            .await?;
        ensure_ok(&made, "ringfeed-node certs")?;
        let file = |name: &str| dir.join(name).display().to_string();
        std::fs::write(dir.join("secrets"), format!("{SECURE_SECRET}\n"))?;
        std::fs::write(dir.join("tokens"), format!("{SECURE_TOKEN}\n"))?;
        std::fs::write(dir.join("token"), format!("{SECURE_TOKEN}\n"))?;
        // etcd over TLS, with the client certificate.
        let etcd = [
            "--etcd-ca",
            &file("ca.pem"),
            "--etcd-cert",
            &file("client.pem"),
            "--etcd-key",
            &file("client.key"),
        ]
        .map(String::from);
        self.node_args.extend(etcd.clone());
        self.router_args.extend(etcd);
        self.node_args.extend(
            [
                "--auth",
                "--ticket-secrets-file",
                &file("secrets"),
                "--api-tokens-file",
                &file("tokens"),
                "--tls-ca",
                &file("ca.pem"),
            ]
            .map(String::from),
        );
        for id in &ids {
            self.args_for.entry(id.clone()).or_default().extend([
                "--tls-cert".to_owned(),
                file(&format!("node-{id}.pem")),
                "--tls-key".to_owned(),
                file(&format!("node-{id}.key")),
            ]);
        }
        self.router_args.extend(
            [
                "--api-tokens-file",
                &file("tokens"),
                "--tls-ca",
                &file("ca.pem"),
                "--tls-cert",
                &file("router.pem"),
                "--tls-key",
                &file("router.key"),
            ]
            .map(String::from),
        );
        let ca = ringfeed_client::Tls::from_ca_file(&dir.join("ca.pem"))?;
        *CA.write().expect("CA lock") = Some(ca);
        Ok(())
    }
}

fn ensure_ok(output: &std::process::Output, what: &str) -> Result<()> {
    if output.status.success() {
        Ok(())
    } else {
        bail!("{what} failed: {}", String::from_utf8_lossy(&output.stderr))
    }
}

/// etcd + nodes + a router, all real processes on loopback.
pub struct Cluster {
    pub name: String,
    pub lease_ttl: u64,
    log: Option<String>,
    node_args: Vec<String>,
    router_args: Vec<String>,
    args_for: HashMap<String, Vec<String>>,
    proxies: HashMap<String, TcpProxy>,
    pub nodes: Vec<NodeProc>,
    router: Option<RouterProc>,
    dir: tempfile::TempDir,
    /// A secure cluster's certificates and secrets (`ca.pem`, `node-{id}.pem`,
    /// `router.pem`, `client.pem` with their keys, `secrets`, `tokens`, `token`).
    tls_dir: Option<tempfile::TempDir>,
    // Dropped last: nodes and routers go first.
    pub etcd: Etcd,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 3,
            lease_ttl: 2,
            node_args: Vec::new(),
            router_args: Vec::new(),
            args_for: HashMap::new(),
            etcd_proxied: Vec::new(),
            secure: false,
            log: None,
        }
    }

    /// Waits until the router and every running node are ready and report the same
    /// ring, with every running node on it.
    pub async fn converged(&self) {
        let router = self.router_grpc();
        let ca = self.ca();
        let nodes: Vec<(String, String)> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| (n.id.clone(), n.http.clone()))
            .collect();
        eventually(
            "the cluster to converge on one ring",
            Duration::from_secs(15),
            || {
                let router = router.clone();
                let nodes = nodes.clone();
                let ca = ca.clone();
                async move {
                    let mut client = connect_router_with(&router, ca.as_ref()).await?;
                    let ring = client
                        .get_ring(ringfeed_proto::v1::GetRingRequest {})
                        .await?
                        .into_inner();
                    let members: Vec<&str> = ring.members.iter().map(|m| m.id.as_str()).collect();
                    if nodes.iter().any(|(id, _)| !members.contains(&id.as_str())) {
                        return Ok(None);
                    }
                    for (_, http) in &nodes {
                        let ready = http_json(&format!("{http}/readyz")).await?;
                        if ready["ready"] != true || ready["ring_id"] != ring.ring_id.as_str() {
                            return Ok(None);
                        }
                    }
                    Ok(Some(()))
                }
            },
        )
        .await;
    }

    /// Starts a node `id` with extra `args` and waits for its ready line.
    pub async fn spawn_node(&self, id: &str, args: &[&str]) -> Result<NodeProc> {
        let log = self.dir.path().join(format!("{id}.log"));
        let stderr = append_to(&log)?;
        let etcd = match self.proxies.get(id) {
            Some(proxy) => format!("http://{}", proxy.addr),
            None => self.etcd.endpoint.clone(),
        };
        let mut child = Command::new(binary("ringfeed-node"))
            .args(["--id", id, "--cluster", &self.name, "--etcd", &etcd])
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
            ])
            .args(["--lease-ttl", &self.lease_ttl.to_string()])
            // The cluster's own document store, shared by its nodes (one host).
            .arg("--store")
            .arg(format!("sqlite:{}", self.store_path().display()))
            .args(&self.node_args)
            .args(self.args_for.get(id).into_iter().flatten())
            .args(args)
            .env_remove("RINGFEED_LOG")
            .envs(self.log_env())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start ringfeed-node")?;
        let started = Instant::now();
        let line = ready_line(&mut child, "ringfeed-node ready", &log).await?;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("ready line without {name}: {line}"))
        };
        Ok(NodeProc {
            id: id.to_owned(),
            http: field("http")?,
            grpc: field("grpc")?,
            incarnation: field("incarnation")?,
            quic: field("quic").ok().filter(|q| q != "off"),
            child: Some(child),
            log,
            started,
        })
    }

    /// Runs `ringfeed-node drain --id {id}` against this cluster's etcd, as an operator
    /// would; it returns once the node has exited (or gave up waiting).
    pub async fn drain_command(&self, id: &str) -> Result<std::process::Output> {
        self.drain_command_with(id, &[]).await
    }

    /// [`Cluster::drain_command`] with more arguments (an API token file, say).
    pub async fn drain_command_with(
        &self,
        id: &str,
        args: &[&str],
    ) -> Result<std::process::Output> {
        let output = Command::new(binary("ringfeed-node"))
            .args(["drain", "--id", id, "--cluster", &self.name])
            .args(self.cli_args())
            .args(args)
            .args(["--etcd", &self.etcd.endpoint, "--wait-secs", "30"])
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run ringfeed-node drain")?;
        Ok(output)
    }

    /// Starts node `id` again (after a kill or a drain) on the same addresses, in place
    /// in [`Cluster::nodes`] — as a rolling restart would.
    pub async fn restart_node(&mut self, id: &str) -> Result<()> {
        let old = self
            .nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        let http = old.http.trim_start_matches("http://").to_owned();
        let grpc = old.grpc.clone();
        let node = self
            .spawn_node(id, &["--http-listen", &http, "--grpc-listen", &grpc])
            .await?;
        let slot = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        *slot = node;
        Ok(())
    }

    /// Starts a node and adds it to [`Cluster::nodes`].
    pub async fn add_node(&mut self, id: &str) -> Result<&NodeProc> {
        let node = self.spawn_node(id, &[]).await?;
        self.nodes.push(node);
        Ok(self.nodes.last().expect("just pushed"))
    }

    async fn spawn_router(&self) -> Result<RouterProc> {
        let log = self.dir.path().join("router.log");
        let stderr = append_to(&log)?;
        let mut child = Command::new(binary("ringfeed-router"))
            .args([
                "--cluster",
                &self.name,
                "--etcd",
                &self.etcd.endpoint,
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(&self.router_args)
            .env_remove("RINGFEED_LOG")
            .envs(self.log_env())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start ringfeed-router")?;
        let line = ready_line(&mut child, "ringfeed-router ready", &log).await?;
        let grpc = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .ok_or_else(|| anyhow!("router ready line without grpc: {line}"))?
            .to_owned();
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .ok_or_else(|| anyhow!("router ready line without http: {line}"))?
            .to_owned();
        Ok(RouterProc {
            child: Some(child),
            grpc,
            http,
            log,
        })
    }

    /// The proxy between node `id` and etcd (see [`ClusterBuilder::etcd_through_proxy`]).
    pub fn etcd_proxy(&self, id: &str) -> &TcpProxy {
        self.proxies
            .get(id)
            .unwrap_or_else(|| panic!("{id} does not reach etcd through a proxy"))
    }

    pub fn node(&self, id: &str) -> &NodeProc {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn node_mut(&mut self, id: &str) -> &mut NodeProc {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The router's gRPC address.
    /// The router's HTTP base URL (`/metrics`, `/healthz`, `/readyz`).
    pub fn router_http(&self) -> String {
        self.router
            .as_ref()
            .map(|r| r.http.clone())
            .expect("router started")
    }

    pub fn router_grpc(&self) -> String {
        self.router
            .as_ref()
            .map(|r| r.grpc.clone())
            .expect("router started")
    }

    /// A `Router` client.
    pub async fn router(&self) -> Result<RouterClient<Channel>> {
        connect_router_with(&self.router_grpc(), self.ca().as_ref()).await
    }

    /// The node `/v1/route` names as the owner of `key`, asked of `node`.
    pub async fn route(&self, node: &NodeProc, key: &str) -> Result<serde_json::Value> {
        http_json(&format!("{}/v1/route?key={key}", node.http)).await
    }

    /// `/v1/ring` of `node`.
    pub async fn ring(&self, node: &NodeProc) -> Result<serde_json::Value> {
        http_json(&format!("{}/v1/ring", node.http)).await
    }

    /// The flags a command-line tool (`ringfeed-node drain`) needs to reach this
    /// cluster: for a secure one, etcd's CA and the `client` certificate, for etcd and
    /// for mutual TLS with nodes. None for a plain one.
    pub fn cli_args(&self) -> Vec<String> {
        let Some(dir) = self.tls_dir() else {
            return Vec::new();
        };
        let file = |name: &str| dir.join(name).display().to_string();
        let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
        [
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ]
        .map(String::from)
        .to_vec()
    }

    /// A secure cluster's CA (none for a plain one, whatever other clusters this
    /// process started).
    pub fn ca(&self) -> Option<ringfeed_client::Tls> {
        let dir = self.tls_dir()?;
        ringfeed_client::Tls::from_ca_file(&dir.join("ca.pem")).ok()
    }

    /// The SQLite file the cluster's nodes write document snapshots to.
    pub fn store_path(&self) -> std::path::PathBuf {
        self.dir.path().join("docs.sqlite")
    }

    /// A secure cluster's directory of certificates and secrets.
    pub fn tls_dir(&self) -> Option<&Path> {
        self.tls_dir.as_ref().map(|d| d.path())
    }

    /// The router's process id, while it runs.
    pub fn router_pid(&self) -> Option<u32> {
        self.router
            .as_ref()
            .and_then(|r| r.child.as_ref())
            .and_then(Child::id)
    }

    /// The router's log.
    pub fn router_log(&self) -> String {
        self.router
            .as_ref()
            .and_then(|r| std::fs::read_to_string(&r.log).ok())
            .unwrap_or_default()
    }

    /// Every node's and the router's whole log, one after the other.
    pub fn logs_full(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&n.log());
        }
        out.push_str(&self.router_log());
        out
    }

    /// Every process's log, for a failed test.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!("===== {} =====\n{}\n", n.id, tail(&n.log(), 60)));
        }
        if let Some(r) = &self.router {
            let log = std::fs::read_to_string(&r.log).unwrap_or_default();
            out.push_str(&format!("===== router =====\n{}\n", tail(&log, 60)));
        }
        out.push_str(&format!(
            "===== etcd =====\n{}\n",
            tail(&self.etcd.log(), 20)
        ));
        out
    }
}

impl Cluster {
    /// The `RINGFEED_LOG` every process gets; none for an empty filter (the processes'
    /// `--log` comes from their flags or config file then).
    fn log_env(&self) -> Option<(&'static str, String)> {
        let filter = self
            .log
            .clone()
            .or_else(|| std::env::var("RINGFEED_LOG").ok())
            .unwrap_or_else(|| "info".into());
        (!filter.is_empty()).then_some(("RINGFEED_LOG", filter))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if let Some(r) = self.router.as_mut() {
            if let Some(child) = r.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        for n in &mut self.nodes {
            if let Some(child) = n.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

fn append_to(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn ready_line(child: &mut Child, prefix: &str, log: &Path) -> Result<String> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with(prefix) {
                return Ok::<_, std::io::Error>(Some(line));
            }
        }
        Ok(None)
    })
    .await;
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match found {
        Ok(Ok(Some(line))) => Ok(line),
        other => {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("no {prefix:?} line ({other:?}); log:\n{}", tail(&log, 40))
        }
    }
}

/// Connects a `Router` client to `addr`.
pub async fn connect_router(addr: &str) -> Result<RouterClient<Channel>> {
    connect_router_with(addr, tls().as_ref()).await
}

/// A `Router` client for `addr`, over TLS trusting `ca` when given.
pub async fn connect_router_with(
    addr: &str,
    ca: Option<&ringfeed_client::Tls>,
) -> Result<RouterClient<Channel>> {
    Ok(ringfeed_client::publisher::connect_with(addr, ca).await?)
}

/// A POST of `body` (JSON) with extra headers, over TLS for `https://`: status and body.
pub async fn http_post(url: &str, headers: &[(&str, &str)], body: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = host_and_path(url)?;
    let mut stream = dial(host, url.starts_with("https://")).await?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify: what arrived is the answer.
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// A stream of either kind, for the hand-written HTTP helpers.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A connection to `host` (host:port): TLS trusting [`tls`]'s CA when `https`.
async fn dial(host: &str, https: bool) -> Result<Box<dyn Io>> {
    let stream = tokio::net::TcpStream::connect(host).await?;
    if !https {
        return Ok(Box::new(stream));
    }
    let ca = tls().ok_or_else(|| anyhow!("https:// but no secure cluster's CA"))?;
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h).to_owned();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(name)?;
    let tls = tokio_rustls::TlsConnector::from(ca.config())
        .connect(name, stream)
        .await?;
    Ok(Box::new(tls))
}

/// A tiny HTTP/1.1 GET over loopback: status and body.
pub async fn http_get(url: &str) -> Result<(u16, String)> {
    http_request(url, &[]).await
}

/// A GET with extra headers: status and body.
pub async fn http_request(url: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    let (status, _, body) = http_request_full(url, headers).await?;
    Ok((status, body))
}

/// `http://host:port/path?query` → (`host:port`, `/path?query`), also for `https://`.
fn host_and_path(url: &str) -> Result<(&str, String)> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| anyhow!("not an http url: {url}"))?;
    Ok(rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}"))))
}

/// A GET with extra headers: status, response headers (lower-case names), body.
pub async fn http_request_full(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Vec<(String, String)>, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = host_and_path(url)?;
    let mut stream = dial(host, url.starts_with("https://")).await?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await?;
    // A TLS peer may close without close_notify: what arrived is the answer.
    if let Err(e) = read {
        if raw.is_empty() {
            return Err(e.into());
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP head in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, headers, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET `url` and parse the body as JSON (any status).
pub async fn http_json(url: &str) -> Result<serde_json::Value> {
    let (status, body) = http_get(url).await?;
    serde_json::from_str(&body).with_context(|| format!("{url} answered {status} with {body:?}"))
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: String,
}

/// A streaming SSE reader over a raw HTTP/1.1 connection that follows 307s.
pub struct SseStream {
    reader: BufReader<tokio::net::TcpStream>,
    chunked: bool,
    text: String,
    done: bool,
    /// The URL the stream finally came from.
    pub url: String,
    /// Heartbeat comments seen so far.
    pub comments: usize,
}

impl SseStream {
    /// Opens `url` (with `Last-Event-ID` if given), following up to 3 redirects.
    /// A non-200 answer is an error carrying its status and body.
    pub async fn open(url: &str, last_event_id: Option<&str>) -> Result<SseStream> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut url = url.to_owned();
        for _ in 0..=3 {
            let (host, path) = host_and_path(&url)?;
            let mut stream = tokio::net::TcpStream::connect(host).await?;
            let mut request =
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n");
            if let Some(id) = last_event_id {
                request.push_str(&format!("Last-Event-ID: {id}\r\n"));
            }
            request.push_str("\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut reader = BufReader::new(stream);
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await? == 0 {
                    bail!("{url}: connection closed in the response head");
                }
                if line == "\r\n" {
                    break;
                }
                head.push(line.trim_end().to_owned());
            }
            let status: u16 = head
                .first()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("{url}: no status line"))?;
            let header = |name: &str| {
                head.iter().skip(1).find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
            };
            if status == 307 {
                url = header("location").ok_or_else(|| anyhow!("307 without Location"))?;
                continue;
            }
            if status != 200 {
                let mut body = String::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), reader.read_to_string(&mut body))
                        .await;
                bail!("{url} answered {status}: {body}");
            }
            let chunked =
                header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
            return Ok(SseStream {
                reader,
                chunked,
                text: String::new(),
                done: false,
                url,
                comments: 0,
            });
        }
        bail!("more than 3 redirects")
    }

    /// The next event, or `None` when the server ended the stream.
    pub async fn next_event(&mut self) -> Result<Option<SseEvent>> {
        use tokio::io::AsyncReadExt;
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.to_owned());
                        any = true;
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        event.data.push_str(data);
                        any = true;
                    } else if line.starts_with(':') {
                        self.comments += 1;
                    }
                }
                if any {
                    return Ok(Some(event));
                }
            }
            if self.done {
                return Ok(None);
            }
            if self.chunked {
                let mut size = String::new();
                if self.reader.read_line(&mut size).await? == 0 {
                    self.done = true;
                    continue;
                }
                let n = usize::from_str_radix(size.trim(), 16)
                    .with_context(|| format!("bad chunk size {size:?}"))?;
                if n == 0 {
                    self.done = true;
                    continue;
                }
                let mut chunk = vec![0u8; n + 2];
                self.reader.read_exact(&mut chunk).await?;
                chunk.truncate(n);
                self.text.push_str(&String::from_utf8(chunk)?);
            } else {
                let mut buf = [0u8; 8192];
                let n = self.reader.read(&mut buf).await?;
                if n == 0 {
                    self.done = true;
                } else {
                    self.text.push_str(std::str::from_utf8(&buf[..n])?);
                }
            }
        }
    }

    /// The next event within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Result<Option<SseEvent>> {
        tokio::time::timeout(timeout, self.next_event())
            .await
            .map_err(|_| anyhow!("no SSE event within {timeout:?}"))?
    }
}

/// A GET that follows up to 3 redirects: status, headers, body.
pub async fn http_follow(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Vec<(String, String)>, String)> {
    let mut url = url.to_owned();
    for _ in 0..=3 {
        let (status, head, body) = http_request_full(&url, headers).await?;
        if status == 307 {
            url = head
                .iter()
                .find(|(k, _)| k == "location")
                .map(|(_, v)| v.clone())
                .ok_or_else(|| anyhow!("307 without Location"))?;
            continue;
        }
        return Ok((status, head, body));
    }
    bail!("more than 3 redirects")
}

/// Serves `html` at `/` (any path) on a loopback port of its own — a page of another
/// origin than every node. Returns its base URL; the server stops when the test's
/// runtime does.
pub async fn serve_page(html: &'static str) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                // Read the head, then answer whatever was asked with the page.
                while reader.read_line(&mut line).await.is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = reader.get_mut().write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

/// The folder of the browser tests' Node.js driver (`cluster-tests/browser`).
pub fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// A TCP proxy on loopback that a test can cut: then every connection through it is
/// dropped and new ones are accepted but never answered (a network partition).
pub struct TcpProxy {
    /// `127.0.0.1:port` to connect to instead of the target.
    pub addr: String,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `target` (`host:port`).
    pub async fn start(target: &str) -> Result<TcpProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (cut, _) = tokio::sync::watch::channel(false);
        let target = target.to_owned();
        let cuts = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = cuts.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    if *cut.borrow_and_update() {
                        // Black-holed: held open, never answered, until restored.
                        let _ = cut.wait_for(|c| !*c).await;
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Ok(TcpProxy { addr, cut, task })
    }

    /// Drops every connection through the proxy; new ones hang.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends masked WebSocket pings as fast as `write` takes them, for `lasting` or until
/// the socket fails (the node closed it): a ping flood, for the adversarial suite and
/// `examples/pingflood`.
pub async fn flood_pings<W>(write: &mut W, lasting: Duration)
where
    W: futures_util::Sink<tokio_tungstenite::tungstenite::Message> + Unpin,
{
    use futures_util::SinkExt;
    let until = Instant::now() + lasting;
    while Instant::now() < until {
        for _ in 0..256 {
            let ping = tokio_tungstenite::tungstenite::Message::Ping(vec![7u8; 16].into());
            if write.feed(ping).await.is_err() {
                return;
            }
        }
        if write.flush().await.is_err() {
            return;
        }
    }
}
