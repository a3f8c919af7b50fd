//! The settings of collaborative documents (docs/protocol.md *Documents*): their
//! bounds, and the store their snapshots go to.

use clap::Args;

/// `--doc-*` and `--store`.
#[derive(Debug, Clone, Args)]
pub struct DocArgs {
    /// Largest Yjs update to a `doc:` key, in bytes (one y-websocket message, a gRPC
    /// publish, or a returning editor's sync); larger closes the connection with 4413.
    #[arg(long, env = "RINGFEED_DOC_MAX_UPDATE", default_value_t = 4 << 20)]
    pub doc_max_update: usize,
    /// Largest document, in bytes of its encoded state (about): an update that would
    /// grow it past this is refused (4413, `RESOURCE_EXHAUSTED`).
    #[arg(long, env = "RINGFEED_DOC_MAX_BYTES", default_value_t = 32 << 20)]
    pub doc_max_bytes: usize,
    /// Awareness messages one editor may send per second (twice as many in a burst);
    /// past it the connection is closed with 4429.
    #[arg(long, env = "RINGFEED_DOC_AWARENESS_RATE", default_value_t = 30)]
    pub doc_awareness_rate: u32,
    /// Where document snapshots go: `sqlite:PATH` (embedded, the default; nodes on one
    /// host may share the file), `postgres://…` (nodes on several hosts), or `none`
    /// (documents live only in their owner and its successor).
    #[arg(
        long,
        env = "RINGFEED_STORE",
        default_value = "sqlite:ringfeed-docs.sqlite"
    )]
    pub store: String,
    /// How long a changed document waits before its owner snapshots it, in ms: what
    /// losing the owner and its successor together can lose.
    #[arg(long, env = "RINGFEED_SNAPSHOT_INTERVAL_MS", default_value_t = 1000)]
    pub snapshot_interval_ms: u64,
}

impl DocArgs {
    /// Checks the settings; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.doc_max_update < 1024 || self.doc_max_update > 256 << 20 {
            return Err("--doc-max-update: between 1024 and 268435456 (256 MiB)".into());
        }
        if self.doc_max_bytes < self.doc_max_update || self.doc_max_bytes > 1 << 30 {
            return Err("--doc-max-bytes: at least --doc-max-update, at most 1 GiB".into());
        }
        if self.doc_awareness_rate == 0 {
            return Err("--doc-awareness-rate must be > 0".into());
        }
        if !(10..=3_600_000).contains(&self.snapshot_interval_ms) {
            return Err("--snapshot-interval-ms: between 10 and 3600000".into());
        }
        StoreUrl::parse(&self.store).map(|_| ())
    }
}

/// Where snapshots go, as `--store` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    None,
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl StoreUrl {
    /// Reads `--store`.
    pub fn parse(value: &str) -> Result<StoreUrl, String> {
        let value = value.trim();
        if value == "none" {
            Ok(StoreUrl::None)
        } else if let Some(path) = value.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err("--store sqlite: needs a path (sqlite:PATH)".into());
            }
            Ok(StoreUrl::Sqlite(path.into()))
        } else if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            Ok(StoreUrl::Postgres(value.to_owned()))
        } else {
            Err(format!(
                "--store {value:?}: sqlite:PATH, postgres://… or none"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(StoreUrl::parse("none"), Ok(StoreUrl::None));
        assert_eq!(
            StoreUrl::parse("sqlite:/tmp/x.db"),
            Ok(StoreUrl::Sqlite("/tmp/x.db".into()))
        );
        assert!(matches!(
            StoreUrl::parse("postgres://u@127.0.0.1:5432/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        assert!(StoreUrl::parse("sqlite:").is_err());
        assert!(StoreUrl::parse("redis://x").is_err());
    }
}
