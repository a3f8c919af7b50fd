//! A private PostgreSQL server for a test: its own data directory, port and socket.
//!
//! [`Postgres::start`] finds the server's binaries (`$RINGFEED_PG_BIN`, else `initdb`
//! on `PATH`, else the newest `/usr/lib/postgresql/<version>/bin`, where Debian's
//! `postgresql` package puts them; `scripts/test` installs it), runs `initdb` in a
//! fresh temporary directory (trust authentication, no password, superuser
//! `postgres`), starts `postgres` on `127.0.0.1` on a free port with its Unix socket
//! in that directory, waits (polling, with a deadline) until it accepts connections,
//! creates the database `ringfeed` and returns its URL in [`Postgres::url`]:
//! `postgres://postgres@127.0.0.1:PORT/ringfeed`.
//!
//! PostgreSQL refuses to run as root. When the tests do, `initdb`, `postgres` and
//! `pg_ctl` run as the unprivileged user `postgres` (which the Debian package creates;
//! else `nobody`) through `setpriv`, and the temporary directory is given to it.
//!
//! The server is small (16 MB of shared buffers, 20 connections) and does not sync to
//! disk (`fsync=off`): a crash of the machine would lose its data, which a test does not
//! need. Commits stay synchronous (written to the WAL before they return), so what a
//! transaction committed survives [`Postgres::stop`] and [`Postgres::restart`]. Dropping
//! the [`Postgres`] stops the server (immediate shutdown) and removes its directory.
//! Run as `postgres`, the server also gets SIGQUIT (immediate shutdown) when the thread
//! that started it exits (setpriv's `--pdeathsig`), so that a test process killed before
//! its destructors run (a timeout) leaves no server behind: start it from the test's
//! own thread or a runtime's, not from a short-lived thread.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;

use crate::{append_to, free_port, tail};

/// How long `initdb`, the server's start and `createdb` may each take.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an immediate shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The database superuser, created by `initdb`.
const USER: &str = "postgres";

/// The database [`Postgres::start`] creates.
const DATABASE: &str = "ringfeed";

/// The programs needed from the server's `bin` directory.
const PROGRAMS: [&str; 4] = ["initdb", "pg_ctl", "postgres", "createdb"];

/// A running PostgreSQL server, stopped and deleted when dropped.
pub struct Postgres {
    /// `postgres://postgres@127.0.0.1:PORT/ringfeed`.
    pub url: String,
    /// The loopback TCP port it listens on.
    pub port: u16,
    /// The database superuser (`postgres`); no password.
    pub user: String,
    /// The directory with `initdb`, `pg_ctl`, `postgres` and `createdb`.
    bin: PathBuf,
    /// Holds `data/` (the cluster), the Unix socket and the logs.
    dir: tempfile::TempDir,
    /// The uid and gid the server runs as when the tests run as root.
    run_as: Option<(u32, u32)>,
    /// The postmaster (`setpriv` execs it: same process).
    child: Option<Child>,
}

impl Postgres {
    /// Starts a new server with an empty database `ringfeed` and waits until it
    /// accepts connections (a second or two).
    pub async fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let run_as = if running_as_root() {
            Some(unprivileged_user()?)
        } else {
            None
        };
        let dir = data_parent()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to uid {uid}", dir.path().display()))?;
        }
        let mut pg = Postgres {
            url: String::new(),
            port: 0,
            user: USER.into(),
            bin,
            dir,
            run_as,
            child: None,
        };
        pg.initdb().await?;
        // The port is free when picked but may be taken before the server binds it.
        let mut last = None;
        for _attempt in 0..3 {
            pg.port = free_port();
            match pg.spawn().await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    eprintln!("postgres did not start on port {} ({e:#})", pg.port);
                    pg.stop();
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            return Err(e.context("postgres did not start after 3 attempts"));
        }
        pg.url = format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", pg.port);
        let mut createdb = Command::new(pg.bin.join("createdb"));
        createdb
            .args(["--no-password", "-h", "127.0.0.1", "-U", USER, "-p"])
            .arg(pg.port.to_string())
            .arg(DATABASE);
        pg.run(createdb, "createdb.log").await?;
        Ok(pg)
    }

    /// Where the cluster's files are (`postgresql.conf`, `postmaster.pid`, …).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of the server's Unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log (its standard error), for a failed test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server (immediate shutdown: no checkpoint, the next start recovers
    /// from the WAL); its data stays for [`Postgres::restart`]. Does nothing when it
    /// is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut pg_ctl = self.command(&self.bin.join("pg_ctl"));
        pg_ctl
            .args(["stop", "-m", "immediate", "-w", "-t"])
            .arg(STOP_TIMEOUT.as_secs().to_string())
            .arg("-D")
            .arg(self.data_dir())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if pg_ctl.status().is_ok_and(|s| s.success()) {
            // pg_ctl waited for the server to remove its pid file: it is exiting.
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port and data (after [`Postgres::stop`]).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn().await
    }

    /// `program`, run as the unprivileged user when the tests run as root.
    fn command(&self, program: &Path) -> Command {
        let mut command = match self.run_as {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--pdeathsig=QUIT", "--"])
                    .arg(program);
                c
            }
            None => Command::new(program),
        };
        command.current_dir(self.dir.path());
        command
    }

    /// Runs `command` to completion with its output in `log`; fails with that log.
    async fn run(&self, mut command: Command, log: &str) -> Result<()> {
        let log = self.dir.path().join(log);
        command
            .stdin(Stdio::null())
            .stdout(append_to(&log)?)
            .stderr(append_to(&log)?);
        let what = format!("{command:?}");
        let mut child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {what}"))?;
        let status = match tokio::time::timeout(START_TIMEOUT, child.wait()).await {
            Ok(status) => status?,
            Err(_) => bail!("{what} did not finish within {START_TIMEOUT:?}"),
        };
        if !status.success() {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{what} exited with {status}:\n{}", tail(&out, 40));
        }
        Ok(())
    }

    /// Creates the cluster in `data/`.
    async fn initdb(&self) -> Result<()> {
        let mut initdb = self.command(&self.bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args(["--auth=trust", "--username", USER])
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"]);
        self.run(initdb, "initdb.log").await
    }

    /// Starts the postmaster on `self.port` and waits until it is ready.
    async fn spawn(&mut self) -> Result<()> {
        let setting = |name: &str, value: &str| ["-c".to_string(), format!("{name}={value}")];
        let mut command = self.command(&self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(setting("listen_addresses", "127.0.0.1"))
            .args(setting("port", &self.port.to_string()))
            .args(setting(
                "unix_socket_directories",
                &self.dir.path().to_string_lossy(),
            ))
            .args(setting("max_connections", "20"))
            .args(setting("shared_buffers", "16MB"))
            .args(setting("fsync", "off"))
            .args(setting("full_page_writes", "off"))
            .args(setting("huge_pages", "off"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(append_to(&self.dir.path().join("postgres.log"))?);
        let child = command
            .spawn()
            .context("cannot start postgres (setpriv missing?)")?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "postgres exited with {status}; log:\n{}",
                        tail(&self.log(), 20)
                    );
                }
            }
            if self.ready(pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres not ready within {START_TIMEOUT:?}; log:\n{}",
                    tail(&self.log(), 20)
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Whether the postmaster `pid` says it accepts connections: the status line of
    /// `postmaster.pid` (what `pg_ctl start -w` reads; PostgreSQL 10 and later).
    fn ready(&self, pid: u32) -> bool {
        let Ok(text) = std::fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().collect();
        lines.first().is_some_and(|l| l.trim() == pid.to_string())
            && lines.get(7).is_some_and(|l| l.trim() == "ready")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("postgres log:\n{}", tail(&self.log(), 40));
        }
        self.stop();
    }
}

/// The directory with PostgreSQL's server programs: `$RINGFEED_PG_BIN`, else the one of
/// `initdb` on `PATH` (symbolic links followed), else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout, not on `PATH`).
pub fn bin_dir() -> Result<PathBuf> {
    let complete = |dir: &Path| PROGRAMS.iter().all(|p| dir.join(p).is_file());
    if let Some(dir) = std::env::var_os("RINGFEED_PG_BIN") {
        let dir = PathBuf::from(dir);
        if !complete(&dir) {
            bail!(
                "RINGFEED_PG_BIN={} lacks one of {PROGRAMS:?}",
                dir.display()
            );
        }
        return Ok(dir);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let Ok(initdb) = std::fs::canonicalize(dir.join("initdb")) else {
            continue;
        };
        if let Some(dir) = initdb.parent().filter(|d| complete(d)) {
            return Ok(dir.to_path_buf());
        }
    }
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL not found (initdb, pg_ctl, postgres, createdb on PATH or in \
             /usr/lib/postgresql/*/bin): install Debian's postgresql (scripts/test does), \
             or set RINGFEED_PG_BIN"
        ),
    }
}

/// Whether this process runs as root (it owns `/proc/self` as its effective user).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of `postgres`, else of `nobody`, from `/etc/passwd`.
fn unprivileged_user() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4 && fields[0] == name {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    return Ok((uid, gid));
                }
            }
        }
    }
    bail!("running as root, and no user postgres or nobody to run PostgreSQL as")
}

/// A temporary directory for a server: in memory (`/dev/shm`) where there is one.
fn data_parent() -> std::io::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("ringfeed-pg-");
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return Ok(dir);
        }
    }
    builder.tempdir()
}
