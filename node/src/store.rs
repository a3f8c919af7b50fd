//! Where document snapshots go (docs/design.md *Documents*): SQLite, embedded (the
//! default: no server to run), or PostgreSQL (nodes on several hosts).
//!
//! A snapshot is a document's whole state as one Yjs update. Writes merge with what
//! the store holds (in one transaction), so two nodes writing the same document — an
//! old owner's last write landing after its new owner's first — never lose each
//! other's edits: a document's states only grow, and their union is the document.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Mutex as AsyncMutex;
use yrs::{Doc, StateVector, Transact};

use crate::config::StoreUrl;

/// How long one store call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A snapshot store.
#[derive(Clone)]
pub enum Store {
    /// Documents live only in their owner and its successor.
    None,
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    Postgres(Arc<Postgres>),
}

/// A PostgreSQL store: one connection, made again when it breaks.
pub struct Postgres {
    url: String,
    client: AsyncMutex<Option<tokio_postgres::Client>>,
}

const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS ringfeed_documents (
    key TEXT PRIMARY KEY,
    state BLOB NOT NULL,
    updated_ms INTEGER NOT NULL,
    node TEXT NOT NULL
)";

const POSTGRES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS ringfeed_documents (
    key TEXT PRIMARY KEY,
    state BYTEA NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    node TEXT NOT NULL
)";

impl Store {
    /// Opens the store `url` names, making its table if needed. An error names what
    /// failed (the node does not start without the store it was told to use).
    pub async fn open(url: &StoreUrl) -> Result<Store, String> {
        match url {
            StoreUrl::None => Ok(Store::None),
            StoreUrl::Sqlite(path) => {
                let path = path.clone();
                let conn = tokio::task::spawn_blocking(move || open_sqlite(&path))
                    .await
                    .map_err(|e| e.to_string())??;
                Ok(Store::Sqlite(Arc::new(Mutex::new(conn))))
            }
            StoreUrl::Postgres(url) => {
                let pg = Postgres {
                    url: url.clone(),
                    client: AsyncMutex::new(None),
                };
                // Several nodes starting at once may race to make the table: one wins.
                let mut last = String::new();
                for _ in 0..3 {
                    match pg
                        .with_client(|c| Box::pin(c.batch_execute(POSTGRES_SCHEMA)))
                        .await
                    {
                        Ok(()) => return Ok(Store::Postgres(Arc::new(pg))),
                        Err(e) => last = e,
                    }
                }
                Err(format!("PostgreSQL store: {last}"))
            }
        }
    }

    /// Whether snapshots go anywhere.
    pub fn is_none(&self) -> bool {
        matches!(self, Store::None)
    }

    /// `key`'s last snapshot, if any.
    pub async fn load(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let call = async {
            match self {
                Store::None => Ok(None),
                Store::Sqlite(conn) => {
                    let conn = conn.clone();
                    let key = key.to_owned();
                    tokio::task::spawn_blocking(move || {
                        let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                        sqlite_load(&conn, &key).map_err(|e| format!("SQLite store: {e}"))
                    })
                    .await
                    .map_err(|e| e.to_string())?
                }
                Store::Postgres(pg) => {
                    let key = key.to_owned();
                    pg.with_client(move |c| {
                        Box::pin(async move {
                            let row = c
                                .query_opt(
                                    "SELECT state FROM ringfeed_documents WHERE key = $1",
                                    &[&key],
                                )
                                .await?;
                            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
                        })
                    })
                    .await
                }
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| "the store did not answer in time".to_owned())?
    }

    /// Writes `state` as `key`'s snapshot, merged with the one held.
    pub async fn save(&self, key: &str, state: &[u8], node: &str) -> Result<(), String> {
        let call = async {
            match self {
                Store::None => Ok(()),
                Store::Sqlite(conn) => {
                    let conn = conn.clone();
                    let (key, state, node) = (key.to_owned(), state.to_vec(), node.to_owned());
                    tokio::task::spawn_blocking(move || {
                        let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                        sqlite_save(&mut conn, &key, &state, &node)
                            .map_err(|e| format!("SQLite store: {e}"))
                    })
                    .await
                    .map_err(|e| e.to_string())?
                }
                Store::Postgres(pg) => {
                    let (key, state, node) = (key.to_owned(), state.to_vec(), node.to_owned());
                    pg.with_client(move |c| {
                        Box::pin(async move {
                            let tx = c.transaction().await?;
                            let held = tx
                                .query_opt(
                                    "SELECT state FROM ringfeed_documents WHERE key = $1 FOR UPDATE",
                                    &[&key],
                                )
                                .await?
                                .map(|r| r.get::<_, Vec<u8>>(0));
                            let merged = merge(held.as_deref(), &state);
                            tx.execute(
                                "INSERT INTO ringfeed_documents (key, state, node) VALUES ($1, $2, $3)
                                 ON CONFLICT (key) DO UPDATE SET state = $2, node = $3, updated_at = now()",
                                &[&key, &merged, &node],
                            )
                            .await?;
                            tx.commit().await
                        })
                    })
                    .await
                }
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| "the store did not answer in time".to_owned())?
    }
}

impl Postgres {
    /// Runs `f` on the connection, connecting first if there is none; a failed call
    /// drops the connection, so the next one connects again.
    async fn with_client<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut tokio_postgres::Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    ) -> Result<T, String> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "PostgreSQL store connection ended");
                }
            });
            *slot = Some(client);
        }
        let client = slot.as_mut().expect("connected above");
        let result = f(client).await;
        if result.is_err() {
            *slot = None;
        }
        result.map_err(|e| e.to_string())
    }
}

fn open_sqlite(path: &Path) -> Result<rusqlite::Connection, String> {
    let fail = |e: rusqlite::Error| format!("SQLite store {}: {e}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("SQLite store {}: {e}", path.display()))?;
    }
    let conn = rusqlite::Connection::open(path).map_err(fail)?;
    // Several nodes on one host may share the file: readers never wait for the writer,
    // and a writer waits its turn.
    conn.busy_timeout(CALL_TIMEOUT).map_err(fail)?;
    // Switching to WAL and making the table take locks that SQLite does not wait for
    // (it answers "database is locked" at once): nodes starting together take turns.
    let mut tries = 0;
    loop {
        let set_up = conn
            .pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| conn.pragma_update(None, "synchronous", "NORMAL"))
            .and_then(|()| conn.execute_batch(SQLITE_SCHEMA));
        match set_up {
            Ok(()) => return Ok(conn),
            Err(e) if tries < 100 && is_busy(&e) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20 + 10 * tries));
            }
            Err(e) => return Err(fail(e)),
        }
    }
}

/// Whether SQLite refused for another connection's lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn sqlite_load(conn: &rusqlite::Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT state FROM ringfeed_documents WHERE key = ?1",
        [key],
        |row| row.get(0),
    )
    .optional()
}

fn sqlite_save(
    conn: &mut rusqlite::Connection,
    key: &str,
    state: &[u8],
    node: &str,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let held = sqlite_load(&tx, key)?;
    let merged = merge(held.as_deref(), state);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    tx.execute(
        "INSERT INTO ringfeed_documents (key, state, updated_ms, node) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (key) DO UPDATE SET state = ?2, updated_ms = ?3, node = ?4",
        rusqlite::params![key, merged, now, node],
    )?;
    tx.commit()
}

/// The union of two states of one document (`held` may be missing, or unreadable:
/// then `state` alone).
pub fn merge(held: Option<&[u8]>, state: &[u8]) -> Vec<u8> {
    let Some(held) = held else {
        return state.to_vec();
    };
    let doc = Doc::new();
    {
        let mut txn = doc.transact_mut();
        for update in [held, state] {
            if let Ok(update) = crate::protocol::frames::decode_yjs(update) {
                if let Err(e) = txn.apply_update(update) {
                    tracing::warn!(error = %e, "a stored document did not apply");
                }
            }
        }
    }
    let merged = crate::protocol::ysync::encode_state(&doc.transact(), &StateVector::default());
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, ReadTxn, Text, Update, WriteTxn};

    fn text_of(state: &[u8]) -> String {
        let doc = Doc::new();
        doc.transact_mut()
            .apply_update(Update::decode_v1(state).unwrap())
            .unwrap();
        let txn = doc.transact();
        txn.get_text("t").unwrap().get_string(&txn)
    }

    #[tokio::test]
    async fn nodes_opening_one_sqlite_file_together_all_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let url = StoreUrl::Sqlite(dir.path().join("shared.sqlite"));
        let opens = (0..8).map(|_| Store::open(&url));
        for opened in futures_util::future::join_all(opens).await {
            assert!(opened.is_ok(), "{:?}", opened.err());
        }
    }

    #[tokio::test]
    async fn sqlite_snapshots_merge_what_two_writers_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreUrl::Sqlite(dir.path().join("a/docs.sqlite")))
            .await
            .unwrap();
        assert_eq!(store.load("doc:x").await.unwrap(), None);
        let doc = Doc::new();
        let text = doc.transact_mut().get_or_insert_text("t");
        text.insert(&mut doc.transact_mut(), 0, "abc");
        let first = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        text.insert(&mut doc.transact_mut(), 3, "def");
        let second = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        // The newer state lands first; the older one, written late, takes nothing away.
        store.save("doc:x", &second, "n1").await.unwrap();
        store.save("doc:x", &first, "n2").await.unwrap();
        let held = store.load("doc:x").await.unwrap().unwrap();
        assert_eq!(text_of(&held), "abcdef");
    }
}
