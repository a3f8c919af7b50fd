//! Values read from files and read again when the files change, without a restart:
//! API tokens, ticket secrets, TLS certificates. The files are looked at once a second
//! (size, modification time, inode) and on `SIGHUP`; a file that changed is loaded
//! whole, and a load that fails keeps the value in use (and says why in the log), so a
//! half-written file never leaves a process without credentials.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// A value loaded from files, replaced when they change.
pub struct Watched<T> {
    current: RwLock<Arc<T>>,
    /// How many times it has been replaced.
    reloads: std::sync::atomic::AtomicU64,
}

impl<T> Watched<T> {
    /// A value that never changes (tests, or nothing to watch).
    pub fn fixed(value: T) -> Arc<Watched<T>> {
        Arc::new(Watched {
            current: RwLock::new(Arc::new(value)),
            reloads: Default::default(),
        })
    }

    /// The value in use.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times the value has been replaced since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self, value: T) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<T> std::fmt::Debug for Watched<T> {
    /// Never the value (it may be a secret).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Watched(reloads: {})", self.reloads())
    }
}

/// What a file looks like from outside: whether it changed.
type Stamp = Option<(u64, SystemTime, u64)>;

fn stamp(path: &PathBuf) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.len(), meta.modified().ok()?, inode))
}

/// Loads `what` from `paths` with `load` now (an error is returned, naming the
/// setting), then again whenever one of the files changes or the process gets
/// `SIGHUP`, until `stop`.
pub fn watch<T, F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    load: F,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<Arc<Watched<T>>, String>
where
    T: Send + Sync + 'static,
    F: Fn() -> Result<T, String> + Send + Sync + 'static,
{
    let mut stamps: Vec<Stamp> = paths.iter().map(stamp).collect();
    let watched = Watched::fixed(load()?);
    watched
        .reloads
        .store(0, std::sync::atomic::Ordering::Relaxed);
    let out = watched.clone();
    tasks.spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hangup = async {
                match &mut hup {
                    Some(hup) => {
                        hup.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let forced = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => false,
                _ = hangup => true,
            };
            let now: Vec<Stamp> = paths.iter().map(stamp).collect();
            if !forced && now == stamps {
                continue;
            }
            stamps = now;
            match load() {
                Ok(value) => {
                    watched.set(value);
                    tracing::info!(what, "reloaded");
                }
                Err(e) => tracing::warn!(what, error = %e, "reload failed; keeping the one in use"),
            }
        }
    });
    Ok(out)
}
