//! QUIC framing proved by an independent client: `cluster-tests/quic/aioquic_client.py`,
//! written in Python on aioquic from docs/protocol.md *QUIC* alone (no ringfeed code),
//! subscribes at the node that does not own its key, pins the certificates published
//! in the ring, follows the redirect to the owner, pings, and receives the updates the
//! router publishes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use ringfeed_client::publisher;
use ringfeed_client::routing::RingView;
use ringfeed_cluster_tests::Cluster;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::bounded;

/// How long the script may take to be welcomed, and then to receive the updates.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(25);

/// The repository's root (the parent of `cluster-tests/`).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cluster-tests/ has a parent")
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_aioquic_client_is_redirected_pings_and_receives_updates_in_order() {
    bounded(async {
        let root = repo_root();
        let python = root.join("cluster-tests/quic/.venv/bin/python");
        ensure!(
            python.exists(),
            "{} is missing: run scripts/test, or `. scripts/lib.sh; ensure_python_quic` at the repository's root",
            python.display()
        );

        let cluster = Cluster::builder().nodes(2).start().await?;
        let ring = RingView::fetch(&cluster.nodes[0].http, None).await?;
        let key = (0..)
            .map(|i| format!("aioquic:{i}"))
            .find(|k| ring.owner(k).is_some_and(|m| m.id.0 == "n2"))
            .context("a key owned by n2")?;
        // Every member's fingerprint: the script is redirected from n1 to n2.
        let pins = ring
            .ring
            .members()
            .iter()
            .map(|m| m.quic_sha256.clone().context("a member without quic_sha256"))
            .collect::<Result<Vec<_>>>()?
            .join(",");
        let n1 = cluster.node("n1").quic.clone().context("n1 serves QUIC")?;
        let n2 = cluster.node("n2").quic.clone().context("n2 serves QUIC")?;

        let mut child = tokio::process::Command::new(&python)
            .arg(root.join("cluster-tests/quic/aioquic_client.py"))
            .args(["--addr", &n1, "--key", &key, "--sha256", &pins, "--count", "3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", python.display()))?;
        let mut stderr = child.stderr.take().context("stderr")?;
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut printed = Vec::new();

        // Welcomed (after the redirect): then publish.
        let ready = tokio::time::timeout(SCRIPT_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line == "READY" {
                    return Ok(true);
                }
                printed.push(line);
            }
            anyhow::Ok(false)
        })
        .await;
        if !matches!(ready, Ok(Ok(true))) {
            let _ = child.start_kill();
            let stderr = stderr.await.unwrap_or_default();
            return Err(anyhow!(
                "the script was not welcomed ({ready:?}); it printed {printed:?}; stderr: {stderr}"
            ));
        }

        let mut router = cluster.router().await?;
        for i in 1..=3 {
            router
                .publish(publisher::json(&key, &json!({ "n": i })))
                .await?;
        }

        // Then it prints the updates and ends.
        let status = tokio::time::timeout(SCRIPT_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                printed.push(line);
            }
            anyhow::Ok(child.wait().await?)
        })
        .await;
        let stderr = stderr.await.unwrap_or_default();
        let status = match status {
            Ok(status) => status?,
            Err(_) => {
                let _ = child.start_kill();
                return Err(anyhow!(
                    "the script did not end within {SCRIPT_TIMEOUT:?}; it printed {printed:?}; stderr: {stderr}"
                ));
            }
        };
        eprintln!("aioquic client printed:\n{}", printed.join("\n"));
        ensure!(
            status.success(),
            "the script failed ({status}): {stderr}; it printed {printed:?}"
        );

        let frames = printed
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).with_context(|| format!("not JSON: {l}")))
            .collect::<Result<Vec<_>>>()?;
        let of_type = |t: &'static str| frames.iter().filter(move |f| f["type"] == t);

        // n1 redirected it to n2, over QUIC, and n2 welcomed it.
        let redirects: Vec<_> = of_type("redirect").collect();
        ensure!(
            redirects.len() == 1 && redirects[0]["node"] == "n2" && redirects[0]["quic"] == n2.as_str(),
            "expected one redirect to n2 at {n2}: {redirects:?}"
        );
        let welcome = of_type("welcome").next().context("no welcome")?;
        ensure!(
            welcome["node"] == "n2" && welcome["key"] == key.as_str(),
            "welcomed by {} for {}, not by n2 for {key}",
            welcome["node"],
            welcome["key"]
        );
        ensure!(of_type("pong").count() == 1, "no pong for the ping");

        // The three updates, in order, with consecutive seqs following the welcome's.
        let updates: Vec<_> = of_type("update").collect();
        let data: Vec<_> = updates.iter().map(|u| u["data"].clone()).collect();
        ensure!(
            data == [json!({"n": 1}), json!({"n": 2}), json!({"n": 3})],
            "updates: {updates:?}"
        );
        let seqs: Vec<u64> = updates.iter().filter_map(|u| u["seq"].as_u64()).collect();
        let first = welcome["seq"].as_u64().context("welcome seq")? + 1;
        ensure!(
            seqs == [first, first + 1, first + 2] && updates.iter().all(|u| u["key"] == key.as_str()),
            "update seqs {seqs:?} after the welcome's {}",
            welcome["seq"]
        );
        Ok(())
    })
    .await
}
