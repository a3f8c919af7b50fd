//! The processes a benchmark drives: load generators (JSON lines on stdout) and the
//! peers (Redis + Node.js endpoint servers: the seed reference, Socket.IO).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// One `ringfeed-loadgen` process.
pub(crate) struct Loadgen {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<Value>,
    /// Every `tick` seen so far.
    pub ticks: Vec<Value>,
}

impl Loadgen {
    pub(crate) fn spawn(name: &str, args: &[String]) -> Result<Loadgen> {
        let mut command = Command::new(bin("ringfeed-loadgen"));
        command.args(args);
        Loadgen::spawn_command(name, command)
    }

    /// Any program that speaks the same JSON lines (P9's Node.js editors); an
    /// `{"ev":"error","error":…}` line fails the wait for any other event.
    pub(crate) fn spawn_command(name: &str, mut command: Command) -> Result<Loadgen> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                let program = command
                    .as_std()
                    .get_program()
                    .to_string_lossy()
                    .into_owned();
                format!("cannot start {program} ({name})")
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Ok(Loadgen {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            events,
            ticks: Vec::new(),
        })
    }

    /// Waits for the next event `ev`, keeping ticks on the way.
    pub(crate) async fn wait(&mut self, ev: &str, within: Duration) -> Result<Value> {
        self.wait_any(&[ev], within).await
    }

    /// Waits for the next event that is one of `evs`, keeping ticks on the way.
    pub(crate) async fn wait_any(&mut self, evs: &[&str], within: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let what = evs.join(" or ");
        loop {
            let next = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| anyhow!("{}: no {what} within {within:?}", self.name))?
                .ok_or_else(|| anyhow!("{}: exited before {what}", self.name))?;
            if next["ev"] == "tick" {
                self.ticks.push(next.clone());
            }
            if evs.iter().any(|ev| next["ev"] == *ev) {
                return Ok(next);
            }
            if next["ev"] == "error" {
                bail!("{}: {}", self.name, next["error"]);
            }
        }
    }

    /// Takes the ticks that arrived so far, without waiting.
    pub(crate) fn poll_ticks(&mut self) -> Option<&Value> {
        while let Ok(next) = self.events.try_recv() {
            if next["ev"] == "tick" {
                self.ticks.push(next);
            }
        }
        self.ticks.last()
    }

    pub(crate) async fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{}: stdin closed", self.name))?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Its process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Asks it to stop and returns its `done` event.
    pub(crate) async fn finish(&mut self, within: Duration) -> Result<Value> {
        let _ = self.say("stop").await;
        let done = self.wait("done", within).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        done
    }
}

/// A workspace binary next to this one (`target/release/`).
pub(crate) fn bin(name: &str) -> PathBuf {
    ringfeed_cluster_tests::bin_dir().join(name)
}

/// The resident set of process `pid`, in bytes.
pub(crate) fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    let kib: u64 = line[6..].trim().trim_end_matches("kB").trim().parse()?;
    Ok(kib * 1024)
}

/// The CPU time (user + system) process `pid` has used so far, in ms (`/proc/PID/stat`
/// counts in USER_HZ, 100 per second on Linux); 0 once it is gone.
pub(crate) fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 * 10.0
}

/// The box's busy and total CPU time so far (jiffies, from `/proc/stat`).
fn cpu_times() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .next()
        .ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// The box's busy CPU time so far, in ms over all cores (`/proc/stat` counts in
/// USER_HZ, 100 per second on Linux). The difference of two readings is what every
/// process on the box used between them, the kernel's network work included.
pub(crate) fn busy_ms() -> Result<f64> {
    Ok(cpu_times()?.0 as f64 * 10.0)
}

/// Waits until the box is quiet — under 15% busy over a quarter of a second — so a
/// run does not share the cores with what the previous one left behind (a peer still
/// draining a backlog of seconds, sockets closing). Gives up after `within`, saying so.
pub(crate) async fn quiet_box(within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (busy0, total0) = cpu_times()?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (busy1, total1) = cpu_times()?;
        let busy = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64;
        if busy < 0.15 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "  the box is still {:.0}% busy after {within:?}; measuring anyway",
                busy * 100.0
            );
            return Ok(());
        }
    }
}

/// A peer that runs as Node.js endpoint processes behind Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    /// The seed reference: `ws` + `ioredis`, a Redis channel per connected key.
    Seed,
    /// Socket.IO with `@socket.io/redis-adapter`, a room per key.
    SocketIo,
}

impl Peer {
    /// Its name in reports and JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::Seed => "seed-reference",
            Peer::SocketIo => "socketio",
        }
    }

    /// What `ringfeed-loadgen sub --target` speaks to it.
    pub(crate) fn target(self) -> &'static str {
        match self {
            Peer::Seed => "ws",
            Peer::SocketIo => "socketio",
        }
    }

    /// Extra `ringfeed-loadgen pub` arguments after `--redis ADDR`.
    pub(crate) fn publish_args(self) -> &'static [&'static str] {
        match self {
            Peer::Seed => &[],
            Peer::SocketIo => &["--socketio"],
        }
    }

    fn server(self) -> &'static str {
        match self {
            Peer::Seed => "seed-reference/server.js",
            Peer::SocketIo => "socketio/server.js",
        }
    }

    fn url(self, port: u16) -> String {
        match self {
            Peer::Seed => format!("ws://127.0.0.1:{port}/v1/connect?key={{key}}"),
            Peer::SocketIo => {
                format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket&key={{key}}")
            }
        }
    }
}

/// A peer running: a Redis server and one Node.js endpoint process per core.
pub(crate) struct NodePeer {
    pub peer: Peer,
    // Dropped (killed) in this order: the endpoints before Redis.
    endpoints: Vec<Child>,
    _redis: Child,
    pub redis_addr: String,
    /// A URL per endpoint, `{key}` standing for the key.
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl NodePeer {
    pub(crate) async fn start(peers_dir: &Path, peer: Peer, endpoints: usize) -> Result<NodePeer> {
        let dir = tempfile::Builder::new()
            .prefix("ringfeed-peer-")
            .tempdir()?;
        let port = ringfeed_cluster_tests::free_port();
        let redis = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--maxclients", "1000", "--loglevel", "warning"])
            // No handicap: Redis would otherwise drop an endpoint's subscription once
            // 8 MB of messages wait for it, and its sockets would get nothing more.
            .args(["--client-output-buffer-limit", "pubsub 0 0 0"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server (Debian's redis-server package)")?;
        let redis_addr = format!("127.0.0.1:{port}");
        ringfeed_cluster_tests::eventually("redis up", Duration::from_secs(10), || {
            let addr = redis_addr.clone();
            async move { Ok(tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())) }
        })
        .await;
        let mut children = Vec::new();
        let mut urls = Vec::new();
        for _ in 0..endpoints {
            let port = ringfeed_cluster_tests::free_port();
            let mut child = Command::new("node")
                .arg(peers_dir.join(peer.server()))
                .env("PORT", port.to_string())
                .env("REDIS", format!("redis://{redis_addr}"))
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start node (Node.js)")?;
            let stdout = child.stdout.take().expect("piped");
            let mut lines = BufReader::new(stdout).lines();
            let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .map_err(|_| anyhow!("{} endpoint did not start", peer.name()))??;
            if !ready.is_some_and(|l| l.starts_with(&format!("{} ready", peer.name()))) {
                bail!("{} endpoint did not say ready", peer.name());
            }
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            children.push(child);
            urls.push(peer.url(port));
        }
        Ok(NodePeer {
            peer,
            _redis: redis,
            redis_addr,
            endpoints: children,
            urls,
            _dir: dir,
        })
    }

    /// The endpoint processes' ids.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.endpoints.iter().filter_map(Child::id).collect()
    }
}
