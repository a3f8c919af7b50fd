//! The harness's private PostgreSQL servers ([`ringfeed_cluster_tests::postgres`]):
//! one starts and answers queries over its URL, a second runs beside it, and one keeps
//! its data across a restart.

use std::time::Duration;

use anyhow::{Context, Result};
use ringfeed_cluster_tests::postgres::Postgres;
use tokio::time::Instant;
use tokio_postgres::NoTls;

/// Connects to `url`; the connection is driven by a spawned task.
async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection: {e}");
        }
    });
    Ok(client)
}

async fn select_one(url: &str) -> Result<i32> {
    let client = connect(url).await?;
    let row = client.query_one("SELECT 1", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn two_servers_at_once() -> Result<()> {
    let started = Instant::now();
    let first = Postgres::start().await?;
    eprintln!("started {} in {:?}", first.url, started.elapsed());
    assert!(
        first.url.starts_with("postgres://postgres@127.0.0.1:") && first.url.ends_with("/ringfeed"),
        "{}",
        first.url
    );
    assert_eq!(select_one(&first.url).await?, 1);

    let started = Instant::now();
    let second = Postgres::start().await?;
    eprintln!("started {} in {:?}", second.url, started.elapsed());
    assert_ne!(first.port, second.port);
    assert_eq!(select_one(&second.url).await?, 1);
    assert_eq!(select_one(&first.url).await?, 1, "the first still runs");

    // Each has its own data.
    connect(&first.url)
        .await?
        .batch_execute("CREATE TABLE only_here (n int)")
        .await?;
    let tables = "SELECT count(*) FROM pg_tables WHERE tablename = 'only_here'";
    let count = |url: String| async move {
        let row = connect(&url).await?.query_one(tables, &[]).await?;
        Ok::<i64, anyhow::Error>(row.get(0))
    };
    assert_eq!(count(first.url.clone()).await?, 1);
    assert_eq!(count(second.url.clone()).await?, 0);

    let data = first.data_dir();
    drop(first);
    assert!(!data.exists(), "dropping removes {}", data.display());
    assert_eq!(select_one(&second.url).await?, 1);
    Ok(())
}

#[tokio::test]
async fn restart_keeps_the_data() -> Result<()> {
    let mut pg = Postgres::start().await?;
    connect(&pg.url)
        .await?
        .batch_execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
        .await?;
    pg.stop();
    assert!(connect(&pg.url).await.is_err(), "stopped");
    let started = Instant::now();
    pg.restart().await?;
    eprintln!("restarted in {:?}", started.elapsed());
    let row = tokio::time::timeout(
        Duration::from_secs(10),
        connect(&pg.url).await?.query_one("SELECT n FROM kept", &[]),
    )
    .await??;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok(())
}
