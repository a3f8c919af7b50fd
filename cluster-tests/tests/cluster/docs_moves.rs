//! Documents across ownership changes: stock y-websocket editors (driven through
//! `browser/yjs_editors.mjs`) edit one document through two nodes that relay them to
//! its owner while the owner drains or is killed; a gRPC caller's update reaches them;
//! every node stopped and started again finds the document as at its last snapshot,
//! in the embedded store and in PostgreSQL.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use ringfeed_cluster_tests::{eventually, Cluster};
use ringfeed_proto::v1::{GetDocumentRequest, PublishRequest};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::time::Instant;
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, StateVector, Text, Transact, Update, WriteTxn};

use super::{bounded, owner_of};

/// The Node.js process holding the editors.
pub(crate) struct Editors {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Editors {
    pub(crate) async fn start() -> Result<Editors> {
        let mut child = tokio::process::Command::new("node")
            .arg("yjs_editors.mjs")
            .current_dir(ringfeed_cluster_tests::browser_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                anyhow!("cannot run node (scripts/test installs Node.js packages): {e}")
            })?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Editors {
            _child: child,
            stdin,
            stdout,
        })
    }

    /// Sends one command and reads its answer.
    pub(crate) async fn ask(&mut self, command: Value) -> Result<Value> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        let line = tokio::time::timeout(Duration::from_secs(90), self.stdout.next_line())
            .await
            .map_err(|_| anyhow!("no answer to {command}"))??
            .ok_or_else(|| anyhow!("the editors' process ended"))?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Sends a command that must answer `ok`.
    pub(crate) async fn must(&mut self, command: Value) -> Result<Value> {
        let answer = self.ask(command.clone()).await?;
        ensure!(answer["ok"] == true, "{command} answered {answer}");
        Ok(answer)
    }

    pub(crate) async fn open(&mut self, name: &str, node_http: &str, room: &str) -> Result<()> {
        let url = format!("{}/v1/doc", node_http.replacen("http://", "ws://", 1));
        self.must(json!({"cmd": "open", "name": name, "url": url, "room": room}))
            .await
            .map(|_| ())
    }

    /// The tokens of `name` that `by` has seen: they went through the owner.
    pub(crate) async fn acked(&mut self, name: &str, by: &str) -> Result<Vec<String>> {
        let answer = self
            .ask(json!({"cmd": "acked", "name": name, "by": by}))
            .await?;
        serde_json::from_value(answer["acked"].clone()).context("acked")
    }
}

/// A Yjs update inserting `text` at the start of the Y.Text `t`, from a fresh client.
fn insert_update(text: &str) -> Vec<u8> {
    let doc = yrs::Doc::new();
    {
        let mut txn = doc.transact_mut();
        let t = txn.get_or_insert_text("t");
        t.insert(&mut txn, 0, text);
    }
    let update = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    update
}

/// The text of Y.Text `t` in a document's state.
fn text_of(state: &[u8]) -> Result<String> {
    let doc = yrs::Doc::new();
    doc.transact_mut()
        .apply_update(Update::decode_v1(state)?)
        .map_err(|e| anyhow!("{e}"))?;
    let txn = doc.transact();
    Ok(txn
        .get_text("t")
        .map(|t| t.get_string(&txn))
        .unwrap_or_default())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    Drain,
    Kill,
}

/// Two editors through the two nodes that do not own the document edit it while its
/// owner drains or is killed; a third made edits that the others saw and left before.
/// After reconnection both converge, holding every edit the owner had acknowledged —
/// the third's too, which no client could bring back — and a newcomer finds it all.
async fn editors_survive(failure: Failure, room: &str) -> Result<()> {
    let mut cluster = Cluster::builder().nodes(3).start().await?;
    let key = format!("doc:{room}");
    let owner = owner_of(&cluster, &key).await?;
    let others: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.id != owner)
        .map(|n| n.http.clone())
        .collect();
    let (p, q) = (others[0].clone(), others[1].clone());
    let mut editors = Editors::start().await?;
    editors.open("a", &p, room).await?;
    editors.open("b", &q, room).await?;
    editors.open("c", &p, room).await?;
    // c edits, is seen by b (through the owner), and leaves.
    editors
        .must(json!({"cmd": "steps", "name": "c", "n": 20}))
        .await?;
    let kept = editors.ask(json!({"cmd": "state", "name": "c"})).await?["kept"]
        .as_u64()
        .unwrap_or(0) as usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    let c_kept = loop {
        let seen = editors.acked("c", "b").await?;
        if seen.len() == kept {
            break seen;
        }
        ensure!(
            Instant::now() < deadline,
            "b saw {seen:?} of c's {kept} tokens"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    editors.must(json!({"cmd": "close", "name": "c"})).await?;

    editors
        .must(json!({"cmd": "edit", "name": "a", "every_ms": 15}))
        .await?;
    editors
        .must(json!({"cmd": "edit", "name": "b", "every_ms": 15}))
        .await?;
    // Both editing, each seen by the other, before the failure.
    let deadline = Instant::now() + Duration::from_secs(20);
    let acked = loop {
        let a = editors.acked("a", "b").await?;
        let b = editors.acked("b", "a").await?;
        if a.len() >= 10 && b.len() >= 10 {
            break [a, b].concat();
        }
        ensure!(
            Instant::now() < deadline,
            "edits not acknowledged: {a:?} {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match failure {
        Failure::Drain => {
            let out = cluster.drain_command(&owner).await?;
            ensure!(
                out.status.success(),
                "drain failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Failure::Kill => cluster.node_mut(&owner).kill().await,
    }
    // They go on editing through the move, then stop and converge.
    let new_owner = eventually("a new owner", Duration::from_secs(30), || async {
        Ok(owner_of(&cluster, &key).await.ok().filter(|o| *o != owner))
    })
    .await;
    let steps = |state: Value| state["steps"].as_u64().unwrap_or(0);
    let before = steps(editors.ask(json!({"cmd": "state", "name": "a"})).await?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while steps(editors.ask(json!({"cmd": "state", "name": "a"})).await?) < before + 20 {
        ensure!(Instant::now() < deadline, "a stopped editing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    editors.must(json!({"cmd": "stop", "name": "a"})).await?;
    editors.must(json!({"cmd": "stop", "name": "b"})).await?;
    let must: Vec<String> = acked.iter().chain(&c_kept).cloned().collect();
    let converged = editors
        .ask(json!({"cmd": "converge", "names": ["a", "b"], "must": must, "timeout_ms": 40000}))
        .await?;
    ensure!(
        converged["ok"] == true,
        "the editors did not converge after the owner {} ({owner} → {new_owner}): {converged}",
        if failure == Failure::Drain {
            "drained"
        } else {
            "was killed"
        }
    );
    // A newcomer through either node finds the same document, c's edits included.
    editors.open("d", &q, room).await?;
    let text = converged["text"].as_str().unwrap_or_default().to_owned();
    let fresh = editors
        .ask(
            json!({"cmd": "converge", "names": ["a", "b", "d"], "must": must, "timeout_ms": 20000}),
        )
        .await?;
    ensure!(
        fresh["ok"] == true,
        "a newcomer did not find the document: {fresh}"
    );

    if failure == Failure::Drain {
        return grpc_update_and_read(&cluster, &key, &mut editors, &text).await;
    }
    // No client holds the document any more; its owner is killed too. The last node
    // promotes its replica, and a newcomer finds the document in it.
    let text = fresh["text"].as_str().unwrap_or_default().to_owned();
    for name in ["a", "b", "d"] {
        editors.must(json!({"cmd": "close", "name": name})).await?;
    }
    cluster.node_mut(&new_owner).kill().await;
    let last = cluster
        .nodes
        .iter()
        .find(|n| n.id != owner && n.id != new_owner)
        .context("a third node")?
        .http
        .clone();
    editors.open("e", &last, room).await?;
    let found = editors.ask(json!({"cmd": "state", "name": "e"})).await?;
    ensure!(
        found["text"] == text.as_str(),
        "after both owners were killed the replica served {found}, the editors had {text:?}"
    );
    Ok(())
}

/// A gRPC caller's update appears in both editors; the read RPC returns the text they
/// converged on; an update that is not one is refused.
async fn grpc_update_and_read(
    cluster: &Cluster,
    key: &str,
    editors: &mut Editors,
    text: &str,
) -> Result<()> {
    let mut router = cluster.router().await?;
    let reply = router
        .publish(PublishRequest {
            key: key.to_owned(),
            data: insert_update("grpc;"),
            content_type: "application/vnd.yjs.update".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(reply.seq > 0, "{reply:?}");
    for name in ["a", "b"] {
        let seen = editors
            .ask(json!({"cmd": "wait", "name": name, "contains": ["grpc;"], "timeout_ms": 20000}))
            .await?;
        ensure!(
            seen["ok"] == true,
            "{name} never saw the gRPC update: {seen}"
        );
    }
    let converged = editors
        .must(json!({"cmd": "converge", "names": ["a", "b"], "timeout_ms": 20000}))
        .await?;
    let now = converged["text"].as_str().unwrap_or_default();
    ensure!(
        now.len() == text.len() + "grpc;".len(),
        "{now:?} after {text:?}"
    );
    let read = router
        .get_document(GetDocumentRequest {
            key: key.to_owned(),
            text: "t".into(),
        })
        .await?
        .into_inner();
    ensure!(
        read.text == now,
        "GetDocument said {:?}, the editors {now:?}",
        read.text
    );
    ensure!(
        text_of(&read.update)? == now,
        "the update does not hold the text"
    );
    let refused = router
        .publish(PublishRequest {
            key: key.to_owned(),
            data: b"\xff\xfe not yjs".to_vec(),
            content_type: "application/vnd.yjs.update".into(),
            ..Default::default()
        })
        .await
        .expect_err("garbage is not a Yjs update");
    ensure!(
        refused.code() == tonic::Code::InvalidArgument,
        "{refused:?}"
    );
    Ok(())
}

#[tokio::test]
async fn editors_through_two_nodes_lose_no_acknowledged_edit_when_the_owner_drains_and_a_grpc_update_reaches_them(
) {
    bounded(editors_survive(Failure::Drain, "drained")).await
}

#[tokio::test]
async fn editors_through_two_nodes_lose_no_acknowledged_edit_when_the_owner_is_killed() {
    bounded(editors_survive(Failure::Kill, "killed")).await
}

/// Edits, waits until the store holds them, stops every node (SIGKILL), starts them
/// again, and a newcomer finds the document as it was at the last snapshot.
async fn restart_finds_the_snapshot(store: Option<&str>) -> Result<()> {
    let mut builder = Cluster::builder().nodes(3);
    let arg;
    if let Some(url) = store {
        arg = format!("--store={url}");
        builder = builder.node_args(&[arg.as_str()]);
    }
    builder = builder.node_args(&["--snapshot-interval-ms", "200"]);
    let mut cluster = builder.start().await?;
    let room = "restarted";
    let key = format!("doc:{room}");
    let mut editors = Editors::start().await?;
    let first = cluster.nodes[0].http.clone();
    let second = cluster.nodes[1].http.clone();
    editors.open("a", &first, room).await?;
    editors.open("b", &second, room).await?;
    editors
        .must(json!({"cmd": "steps", "name": "a", "n": 30}))
        .await?;
    editors
        .must(json!({"cmd": "steps", "name": "b", "n": 30}))
        .await?;
    // One update larger than an ordinary key's payload limit (64 KiB), replicated.
    editors
        .must(json!({"cmd": "big", "name": "b", "chars": 300_000}))
        .await?;
    let converged = editors
        .must(json!({"cmd": "converge", "names": ["a", "b"], "timeout_ms": 20000}))
        .await?;
    let text = converged["text"].as_str().unwrap_or_default().to_owned();
    // The snapshot holds it all: read it back through the read RPC's twin, the store.
    eventually(
        "the snapshot to hold the text",
        Duration::from_secs(20),
        || async {
            let Some(state) = stored(&cluster, store, &key).await? else {
                return Ok(None);
            };
            Ok((text_of(&state)? == text).then_some(()))
        },
    )
    .await;
    editors.must(json!({"cmd": "close", "name": "a"})).await?;
    editors.must(json!({"cmd": "close", "name": "b"})).await?;
    let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    for id in &ids {
        cluster.node_mut(id).kill().await;
    }
    for id in &ids {
        cluster.restart_node(id).await?;
    }
    cluster.converged().await;
    let third = cluster.nodes[2].http.clone();
    editors.open("fresh", &third, room).await?;
    let state = editors
        .ask(json!({"cmd": "state", "name": "fresh"}))
        .await?;
    ensure!(
        state["text"] == text.as_str(),
        "after the restart: {state}, before: {text:?}"
    );
    let read = cluster
        .router()
        .await?
        .get_document(GetDocumentRequest {
            key,
            text: "t".into(),
        })
        .await?
        .into_inner();
    ensure!(
        read.text == text,
        "GetDocument after the restart: {:?}",
        read.text
    );
    Ok(())
}

/// The snapshot of `key` in the cluster's store.
async fn stored(cluster: &Cluster, postgres: Option<&str>, key: &str) -> Result<Option<Vec<u8>>> {
    match postgres {
        None => {
            let path = cluster.store_path();
            let key = key.to_owned();
            tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>> {
                use rusqlite::OptionalExtension;
                if !path.exists() {
                    return Ok(None);
                }
                let conn = rusqlite::Connection::open(&path)?;
                conn.busy_timeout(Duration::from_secs(5))?;
                Ok(conn
                    .query_row(
                        "SELECT state FROM ringfeed_documents WHERE key = ?1",
                        [key],
                        |row| row.get(0),
                    )
                    .optional()?)
            })
            .await?
        }
        Some(url) => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let row = client
                .query_opt(
                    "SELECT state FROM ringfeed_documents WHERE key = $1",
                    &[&key],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        }
    }
}

#[tokio::test]
async fn every_node_restarted_finds_the_document_as_at_its_last_snapshot_in_the_embedded_store() {
    bounded(restart_finds_the_snapshot(None)).await
}

#[tokio::test]
async fn every_node_restarted_finds_the_document_as_at_its_last_snapshot_in_postgresql() {
    bounded(async {
        let postgres = ringfeed_cluster_tests::postgres::Postgres::start().await?;
        restart_finds_the_snapshot(Some(&postgres.url)).await
    })
    .await
}
