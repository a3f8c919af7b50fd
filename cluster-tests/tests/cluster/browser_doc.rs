//! A browser edits a collaborative document: a page in headless Chromium opens a `doc:`
//! key's Yjs document with the stock npm `y-websocket` client (its ES modules served
//! from `browser/node_modules` with an import map: no build step, no network) through
//! the node that does not own it, which relays it to the owner; a Node.js client (stock
//! `yjs` + `y-websocket` + `ws`) opens it on the owner. Each inserts into the Y.Text and
//! sets a key of the Y.Map; each must see the other's edit.

use std::path::{Component, Path};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use ringfeed_cluster_tests::Cluster;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{bounded, owner_of};

const PAGE: &str = include_str!("../../browser/doc.html");

/// The whole test's bound (the cluster's start included).
const WITHIN: Duration = Duration::from_secs(60);
/// How long the driver waits for both sides to see both edits.
const CONVERGE_MS: u64 = 30_000;

/// The page's own server, on a loopback port of its own (an origin of its own): `GET /`
/// is doc.html (whatever the query), `GET /node_modules/P` the JavaScript file P of
/// `browser/node_modules`; anything else is 404, and noted.
struct Pages {
    /// `http://127.0.0.1:port`.
    base: String,
    /// Paths answered 404 (a module the import map names that is not there, say).
    missing: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Pages {
    async fn serve() -> Result<Pages> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let missing = Arc::<Mutex<Vec<String>>>::default();
        let noted = missing.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let noted = noted.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &noted).await {
                        eprintln!("page server: {e:#}");
                    }
                });
            }
        });
        Ok(Pages {
            base,
            missing,
            task,
        })
    }

    fn missing(&self) -> Vec<String> {
        self.missing.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request on a connection of the page server (HTTP/1.1, `Connection: close`).
async fn answer(stream: TcpStream, missing: &Mutex<Vec<String>>) -> Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    let mut line = String::new();
    while reader.read_line(&mut line).await? > 2 {
        line.clear();
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let (status, content_type, body) = if path == "/" {
        (
            "200 OK",
            "text/html; charset=utf-8",
            PAGE.as_bytes().to_vec(),
        )
    } else if let Some(module) = module(path).await {
        ("200 OK", "text/javascript; charset=utf-8", module)
    } else {
        if let Ok(mut missing) = missing.lock() {
            missing.push(path.to_owned());
        }
        ("404 Not Found", "text/plain", b"not found".to_vec())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let stream = reader.get_mut();
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await?;
    Ok(())
}

/// The file of `/node_modules/P`: a `.js` or `.mjs` file under `browser/node_modules`,
/// by a path of plain names only (no `..`).
async fn module(path: &str) -> Option<Vec<u8>> {
    let relative = Path::new(path.strip_prefix("/node_modules/")?);
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    let script = matches!(
        relative.extension().and_then(|e| e.to_str()),
        Some("js" | "mjs")
    );
    if !plain || !script {
        return None;
    }
    let file = ringfeed_cluster_tests::browser_dir()
        .join("node_modules")
        .join(relative);
    tokio::fs::read(file).await.ok()
}

fn escape(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// What one side saw, for messages: its text, its map, and its connection's story.
fn saw(side: &Value) -> String {
    format!(
        "text {}, map {}, synced {}, statuses {}, closes {}",
        side["text"], side["map"], side["synced"], side["statuses"], side["closes"]
    )
}

/// `side` saw both edits, each once: "browser;" and "node;" in the text, in either
/// order, and the map's two keys.
fn saw_both(side: &Value) -> bool {
    let text = side["text"].as_str().unwrap_or_default();
    (text == "browser;node;" || text == "node;browser;")
        && side["map"] == json!({ "browser": "edited in Chromium", "node": "edited in Node.js" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_in_chromium_through_the_relaying_node_and_a_node_js_client_on_the_owner_edit_one_document_and_each_sees_the_others_edit(
) {
    bounded(async {
        tokio::time::timeout(WITHIN, page_and_node_js_client_edit_one_document())
            .await
            .map_err(|_| anyhow!("the test did not finish within {WITHIN:?}"))?
    })
    .await;
}

async fn page_and_node_js_client_edit_one_document() -> Result<()> {
    let cluster = Cluster::builder().nodes(2).start().await?;
    let name = "browser-notes";
    let owner = owner_of(&cluster, &format!("doc:{name}")).await?;
    let relay = cluster
        .nodes
        .iter()
        .find(|n| n.id != owner)
        .context("another node")?;
    let ws = |http: &str| http.replacen("http://", "ws://", 1);
    // The page through the node that relays, the Node.js client on the owner.
    let page_server = format!("{}/v1/doc", ws(&relay.http));
    let node_server = format!("{}/v1/doc", ws(&cluster.node(&owner).http));
    let pages = Pages::serve().await?;
    let page_url = format!(
        "{}/?server={}&room={}",
        pages.base,
        escape(&page_server),
        escape(name)
    );

    let driver = tokio::process::Command::new("node")
        .arg("doc.mjs")
        .args([&page_url, &node_server, name, &CONVERGE_MS.to_string()])
        .current_dir(ringfeed_cluster_tests::browser_dir())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow!("cannot run node (scripts/test installs Node.js packages and Chromium): {e}")
        })?;
    let output = tokio::time::timeout(
        Duration::from_millis(CONVERGE_MS) + Duration::from_secs(15),
        driver.wait_with_output(),
    )
    .await
    .context("the browser driver did not end")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let state: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "browser driver failed ({}): {stdout}; the page server answered 404 for {:?}",
            output.status,
            pages.missing()
        )
    })?;
    eprintln!("chromium and node.js: {state}");
    let (page, node) = (&state["page"], &state["node"]);

    // The page loaded: every module there, nothing thrown.
    ensure!(
        pages.missing().is_empty()
            && page["errors"] == json!([])
            && page["pageErrors"] == json!([])
            && page["loaded"] != false,
        "the page failed: the page server answered 404 for {:?}; {} {}",
        pages.missing(),
        page["errors"],
        page["pageErrors"]
    );
    // One WebSocket, to the relaying node, upgraded.
    let sockets = page["sockets"].as_array().cloned().unwrap_or_default();
    let want = format!("{page_server}/{name}");
    ensure!(
        sockets.len() == 1 && sockets[0]["url"] == want.as_str() && sockets[0]["status"] == 101,
        "the page's WebSocket: one to {want}, answered 101; DevTools saw {}",
        page["sockets"]
    );
    ensure!(
        saw_both(page),
        "the page (through {}) did not see both edits: it saw {}; the Node.js client (on {owner}) saw {}",
        relay.id,
        saw(page),
        saw(node)
    );
    ensure!(
        saw_both(node),
        "the Node.js client (on {owner}) did not see both edits: it saw {}; the page (through {}) saw {}",
        saw(node),
        relay.id,
        saw(page)
    );
    ensure!(
        page["text"] == node["text"],
        "the two sides' texts differ: the page saw {}; the Node.js client saw {}",
        saw(page),
        saw(node)
    );
    // Neither connection dropped on the way (y-websocket would have reconnected quietly);
    // the status events start after the constructor's "connecting".
    for (who, side) in [("the page", page), ("the Node.js client", node)] {
        ensure!(
            side["statuses"] == json!(["connected"])
                && side["closes"] == json!([])
                && side["connectionErrors"] == 0,
            "{who}'s connection did not stay up: {}",
            saw(side)
        );
    }
    ensure!(
        output.status.success() && state["converged"] == true,
        "browser driver failed ({}): {state}",
        output.status
    );
    Ok(())
}
