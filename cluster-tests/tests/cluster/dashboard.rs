//! The dashboard (`GET /` on every node): in headless Chromium it draws the ring, shows
//! a node joining within 2 s and a drain in progress without a reload, and is readable
//! at a phone's width; the snapshot it is drawn from (`/v1/cluster`, `/v1/dashboard`)
//! counts every node's keys and connections by transport, is gathered once for every
//! viewer, and is bounded; a member cut off from etcd is shown fenced while its record
//! lasts.
//!
//! Screenshots are saved in `target/test-artifacts/dashboard/`. With
//! `RINGFEED_UPDATE_DOCS=1` the one after the join becomes `docs/dashboard.png`
//! (`scripts/dashboard-screenshot`).

use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::StreamExt;
use ringfeed_client::publisher;
use ringfeed_client::routing::RingView;
use ringfeed_cluster_tests::{http_json, http_request_full, Cluster, SseStream};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};

use super::{bounded, owned_by};

/// Where the screenshots go.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("test-artifacts/dashboard")
}

/// The page in Chromium, driven by `cluster-tests/browser/dashboard.mjs`.
struct Page {
    _child: tokio::process::Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    opened: Instant,
}

impl Page {
    async fn open(url: &str) -> Result<Page> {
        let mut child = tokio::process::Command::new("node")
            .arg("dashboard.mjs")
            .arg(url)
            .arg(artifacts())
            .current_dir(ringfeed_cluster_tests::browser_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                anyhow!(
                    "cannot run node (scripts/test installs Node.js packages and Chromium): {e}"
                )
            })?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut page = Page {
            _child: child,
            stdin,
            stdout,
            opened: Instant::now(),
        };
        let first = page.line(Duration::from_secs(60)).await?;
        ensure!(first == "loaded", "the driver said {first:?}");
        Ok(page)
    }

    async fn line(&mut self, within: Duration) -> Result<String> {
        tokio::time::timeout(within, self.stdout.next_line())
            .await
            .context("the driver did not answer")??
            .context("the driver ended")
    }

    async fn send(&mut self, command: &str) -> Result<String> {
        self.stdin.write_all(command.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.line(Duration::from_secs(60)).await
    }

    /// Waits (at most `within`) until `expression` holds in the page, then saves
    /// `name.png`; how long it waited.
    async fn wait(&mut self, name: &str, within: Duration, expression: &str) -> Result<Duration> {
        let answer = self
            .send(&format!("wait {name} {} {expression}", within.as_millis()))
            .await?;
        println!(
            "{:?} after the page opened: {answer}",
            self.opened.elapsed()
        );
        match answer.split_whitespace().collect::<Vec<_>>()[..] {
            ["ok", n, ms] if n == name => Ok(Duration::from_millis(ms.parse()?)),
            _ => bail!("{name}: the page did not show it within {within:?} ({answer})"),
        }
    }

    async fn eval(&mut self, expression: &str) -> Result<Value> {
        let answer = self.send(&format!("eval {expression}")).await?;
        let value = answer
            .strip_prefix("value ")
            .with_context(|| format!("eval said {answer}"))?;
        Ok(serde_json::from_str(value)?)
    }
}

/// The page shows `id` drawn on the ring and listed active.
fn shown_active(id: &str) -> String {
    format!(
        "document.querySelector('#ring path[data-member=\"{id}\"]') !== null && \
         document.querySelector('#members tr[data-member=\"{id}\"][data-state=\"active\"]') !== null"
    )
}

/// Publishes to three hot keys ten times a second and to cold ones once, until dropped.
fn load(cluster: &Cluster) -> tokio::task::JoinHandle<Result<()>> {
    let router = cluster.router_grpc();
    tokio::spawn(async move {
        let mut client = ringfeed_cluster_tests::connect_router(&router).await?;
        for round in 0u64.. {
            let mut items: Vec<_> = (0..3)
                .map(|i| publisher::json(&format!("celebrity:{i}"), &json!(round)))
                .collect();
            items.push(publisher::json(
                &format!("fan:{}", round % 40),
                &json!(round),
            ));
            // Refusals during a change are retried by the next round; what counts here
            // is that the keys are busy.
            let _ = client
                .publish_batch(ringfeed_proto::v1::PublishBatchRequest { items })
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_the_ring_and_shows_a_join_and_a_drain_live() {
    bounded(async {
        let mut cluster = Cluster::builder().nodes(2).lease_ttl(2).start().await?;
        let n1 = cluster.node("n1").http.clone();
        let load = load(&cluster);
        // A few subscribers, over two transports.
        let mut subscribers = Vec::new();
        for i in 0..3 {
            subscribers.push(
                ringfeed_client::Subscription::connect(
                    &cluster.node("n1").connect_url("celebrity:0"),
                )
                .await?,
            );
            subscribers.push(
                ringfeed_client::Subscription::connect(
                    &cluster.node("n2").connect_url(&format!("fan:{i}")),
                )
                .await?,
            );
        }
        let _sse = SseStream::open(&format!("{n1}/v1/sse?key=celebrity%3A1"), None).await?;

        let _ = std::fs::remove_dir_all(artifacts());
        let mut page = Page::open(&format!("{n1}/")).await?;
        page.wait(
            "ring",
            Duration::from_secs(20),
            &format!("{} && {}", shown_active("n1"), shown_active("n2")),
        )
        .await?;
        // The hottest keys come from the owners, through n1.
        page.wait(
            "hot",
            Duration::from_secs(20),
            "[...document.querySelectorAll('#hot-rate code')].some(c => c.textContent.startsWith('celebrity:'))",
        )
        .await?;

        // A node joins: drawn on the ring and listed within 2 s of it being ready,
        // without a reload (its figures may take one more snapshot: next step).
        cluster.add_node("n3").await?;
        let joined = page
            .wait(
                "join",
                Duration::from_secs(2),
                "document.querySelector('#ring path[data-member=\"n3\"]') !== null && \
                 document.querySelector('#members tr[data-member=\"n3\"]') !== null",
            )
            .await?;
        // Let the figures fill in (a rate needs two snapshots) for the picture.
        page.wait(
            "joined",
            Duration::from_secs(10),
            "document.querySelectorAll('#members tr[data-state=\"active\"]').length === 3 && \
             document.getElementById('transition').hidden && \
             document.querySelector('#ring path[data-share=\"n3\"]') !== null && \
             !document.querySelector('#members tr[data-member=\"n3\"] td:nth-child(8)').textContent.includes('–')",
        )
        .await?;
        if std::env::var_os("RINGFEED_UPDATE_DOCS").is_some() {
            let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png");
            std::fs::copy(artifacts().join("joined.png"), docs)?;
        }

        // A drain in progress: a client that ignores its redirect keeps n2's drain open
        // (a drain waits up to 3 s for its clients to leave), and the page shows it
        // without a reload.
        let ring = RingView::fetch(&n1, None).await?;
        let key = owned_by(&ring, "n2", "stubborn");
        let (stubborn, _) =
            tokio_tungstenite::connect_async(cluster.node("n2").connect_url(&key)).await?;
        let (_write, mut read) = stubborn.split();
        read.next().await.context("no welcome")??;
        // What n1's dashboard stream says meanwhile, to explain a failure.
        let mut witness = SseStream::open(&format!("{n1}/v1/dashboard"), None).await?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let watching = {
            let seen = seen.clone();
            let started = Instant::now();
            tokio::spawn(async move {
                while let Ok(s) = next_snapshot(&mut witness).await {
                    let n2 = member(&s, "n2").map_or("gone".into(), |m| {
                        format!("{}/{}", m["state"], m["node_state"])
                    });
                    seen.lock().expect("seen").push(format!(
                        "{:?}: v{} n2 {n2} transition {}",
                        started.elapsed(),
                        s["ring_version"],
                        s["transition"]
                    ));
                }
            })
        };
        let drained = {
            let n2 = cluster.node_mut("n2");
            let (exit, shown) = tokio::join!(n2.terminate(Duration::from_secs(30)), async {
                page.wait(
                    "drain",
                    Duration::from_secs(10),
                    "document.querySelector('#members tr[data-member=\"n2\"][data-state=\"draining\"]') !== null && \
                     document.querySelector('#ring path[data-member=\"n2\"]') === null && \
                     document.getElementById('transition').dataset.kind === 'drain' && \
                     document.getElementById('transition').dataset.node === 'n2'",
                )
                .await
            });
            let exit = exit?;
            ensure!(exit.success(), "n2 exited with {exit}");
            shown.with_context(|| {
                let log = cluster.node("n2").log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let n1: Vec<String> = cluster
                    .node("n1")
                    .log()
                    .lines()
                    .filter(|l| l.contains("new ring"))
                    .map(str::to_owned)
                    .collect();
                format!(
                    "n2's last lines (newest first):\n{}\nn1's rings:\n{}\nn1's snapshots:\n{}",
                    tail.join("\n"),
                    n1.join("\n"),
                    seen.lock().expect("seen").join("\n")
                )
            })?
        };
        watching.abort();
        // …and its end: n2 gone, the transition closed.
        page.wait(
            "drained",
            Duration::from_secs(15),
            "document.querySelector('#members tr[data-member=\"n2\"]') === null && \
             document.getElementById('transition').hidden && \
             document.querySelectorAll('#members tr[data-state=\"active\"]').length === 2",
        )
        .await?;
        drop(read);

        // Readable on a phone: nothing wider than the screen but the tables' own
        // scrolling boxes.
        page.send("viewport 390 844").await?;
        page.wait(
            "phone",
            Duration::from_secs(5),
            "document.documentElement.scrollWidth <= window.innerWidth",
        )
        .await?;
        let text = page.eval("document.body.innerText").await?;
        ensure!(
            text.as_str().is_some_and(|t| t.contains("n1") && t.contains("n3")),
            "{text}"
        );
        page.stdin.write_all(b"quit\n").await.ok();
        load.abort();

        for shot in ["ring", "join", "drain", "drained", "phone"] {
            let png = std::fs::read(artifacts().join(format!("{shot}.png")))
                .with_context(|| format!("no {shot}.png"))?;
            ensure!(
                png.starts_with(b"\x89PNG") && png.len() > 10_000,
                "{shot}.png is {} bytes",
                png.len()
            );
        }
        println!(
            "join shown after {joined:?}, drain after {drained:?}; screenshots in {}",
            artifacts().display()
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_snapshot_counts_every_node_by_transport_and_is_bounded() {
    bounded(async {
        let mut cluster = Cluster::builder().nodes(3).lease_ttl(2).start().await?;
        let n1 = cluster.node("n1").http.clone();
        let ring = RingView::fetch(&n1, None).await?;

        // The page and its module, with a policy that lets them load nothing else.
        let (status, headers, body) = http_request_full(&format!("{n1}/"), &[]).await?;
        let csp = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-security-policy"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        ensure!(
            status == 200 && body.contains("/dashboard.js") && csp.contains("default-src 'none'"),
            "GET / {status} csp={csp:?}"
        );
        let (status, _, module) = http_request_full(&format!("{n1}/dashboard.js"), &[]).await?;
        ensure!(
            status == 200 && module.contains("export function render"),
            "GET /dashboard.js {status}"
        );

        // Only the node's own page may read the dashboard: no CORS, whatever the
        // node's --allowed-origins (here the default, any).
        let (_, headers, _) = http_request_full(
            &format!("{n1}/v1/cluster"),
            &[("origin", "http://elsewhere.example")],
        )
        .await?;
        ensure!(
            !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("access-control-allow-origin")),
            "/v1/cluster readable from another origin: {headers:?}"
        );
        let (_, headers, _) = http_request_full(
            &format!("{n1}/v1/ring"),
            &[("origin", "http://elsewhere.example")],
        )
        .await?;
        ensure!(
            headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("access-control-allow-origin")),
            "the other endpoints keep their CORS: {headers:?}"
        );

        // Connections on n3, seen from n1: two WebSockets and an SSE stream.
        let key = owned_by(&ring, "n3", "watched");
        let _ws1 =
            ringfeed_client::Subscription::connect(&cluster.node("n3").connect_url(&key)).await?;
        let _ws2 =
            ringfeed_client::Subscription::connect(&cluster.node("n3").connect_url(&key)).await?;
        let _sse = SseStream::open(
            &format!("{}/v1/sse?key={key}", cluster.node("n3").http),
            None,
        )
        .await?;
        let snapshot = ringfeed_cluster_tests::eventually(
            "n3's connections in n1's snapshot",
            Duration::from_secs(20),
            || {
                let url = format!("{n1}/v1/cluster");
                async move {
                    let s = http_json(&url).await?;
                    let n3 = member(&s, "n3")?;
                    Ok(
                        (n3["connections"]["ws"] == 2 && n3["connections"]["sse"] == 1)
                            .then_some(s),
                    )
                }
            },
        )
        .await;
        ensure!(
            snapshot["members"].as_array().map(Vec::len) == Some(3),
            "{snapshot}"
        );
        for id in ["n1", "n2", "n3"] {
            let m = member(&snapshot, id)?;
            ensure!(m["reachable"] == true && m["state"] == "active", "{m}");
        }
        ensure!(
            member(&snapshot, "n3")?["keys"].as_u64() >= Some(1),
            "{snapshot}"
        );
        ensure!(
            snapshot["ring_version"].as_u64() == Some(ring.version),
            "{snapshot}"
        );

        // Each member's share is the ring's, exactly; the arcs cover the circle once,
        // in order, and come close to it (to the drawing's quarter-degree).
        for (id, share) in ring.ring.shares() {
            let shown = member(&snapshot, &id.0)?["share"]
                .as_f64()
                .context("share")?;
            ensure!(
                (shown - share).abs() < 1e-9,
                "{id:?}: shown {shown}, owns {share}"
            );
        }
        let arcs = snapshot["arcs"].as_array().context("arcs")?;
        let mut at = 0.0;
        let mut drawn = std::collections::BTreeMap::<String, f64>::new();
        for arc in arcs {
            let (i, from, to) = (
                arc[0].as_u64().context("index")? as usize,
                arc[1].as_f64().context("from")?,
                arc[2].as_f64().context("to")?,
            );
            ensure!(
                (from - at).abs() < 1e-9 && to > from,
                "arcs not contiguous: {arcs:?}"
            );
            at = to;
            let id = snapshot["members"][i]["id"].as_str().context("id")?;
            *drawn.entry(id.to_owned()).or_default() += to - from;
        }
        ensure!((at - 1.0).abs() < 1e-9, "the arcs end at {at}");
        for (id, share) in ring.ring.shares() {
            let d = drawn.get(&id.0).copied().unwrap_or(0.0);
            ensure!((d - share).abs() < 0.02, "{id:?}: drawn {d}, owns {share}");
        }

        // Bounded: 32 viewers at once; the 33rd is told to come back.
        let mut streams = Vec::new();
        for _ in 0..32 {
            streams.push(SseStream::open(&format!("{n1}/v1/dashboard"), None).await?);
        }
        let refused = SseStream::open(&format!("{n1}/v1/dashboard"), None).await;
        let refused = refused.err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(refused.contains("503"), "the 33rd dashboard: {refused:?}");
        // A viewer gets the cluster's snapshot.
        let started = Instant::now();
        let mut first = streams[0]
            .next_within(Duration::from_secs(5))
            .await?
            .context("a snapshot")?;
        while first.data.is_empty() {
            first = streams[0]
                .next_within(Duration::from_secs(5))
                .await?
                .context("a snapshot")?;
        }
        let s: Value = serde_json::from_str(&first.data)?;
        ensure!(
            s["node"] == "n1" && s["members"].as_array().map(Vec::len) == Some(3),
            "{s}"
        );
        drop(streams);
        // With everyone gone the place is free again.
        ringfeed_cluster_tests::eventually("a dashboard place", Duration::from_secs(10), || {
            let url = format!("{n1}/v1/dashboard");
            async move { Ok(SseStream::open(&url, None).await.ok().map(|_| ())) }
        })
        .await;
        ensure!(started.elapsed() < Duration::from_secs(30));

        // A member that stops answering is shown unreachable while its record lasts.
        cluster.node_mut("n2").kill().await;
        ringfeed_cluster_tests::eventually(
            "n2 unreachable or gone",
            Duration::from_secs(20),
            || {
                let url = format!("{n1}/v1/cluster");
                async move {
                    let s = http_json(&url).await?;
                    let gone = member(&s, "n2").map_or(true, |m| m["reachable"] == false);
                    Ok(gone.then_some(()))
                }
            },
        )
        .await;
        Ok(())
    })
    .await;
}

/// The record of member `id` in a snapshot.
fn member<'a>(snapshot: &'a Value, id: &str) -> Result<&'a Value> {
    snapshot["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == id))
        .with_context(|| format!("no member {id} in {snapshot}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_etcd_is_shown_fenced_until_its_record_expires() {
    bounded(async {
        // n3 reaches etcd through a proxy the test cuts. With a 12 s lease it fences
        // itself 9 s after its last keep-alive and its record lasts 3 s more: two
        // snapshots at least fall in between.
        let cluster = Cluster::builder()
            .nodes(3)
            .lease_ttl(12)
            .etcd_through_proxy("n3")
            .start()
            .await?;
        let n1 = cluster.node("n1").http.clone();
        let mut stream = SseStream::open(&format!("{n1}/v1/dashboard"), None).await?;
        loop {
            let s = next_snapshot(&mut stream).await?;
            if member(&s, "n3").is_ok_and(|m| m["node_state"] == "serving") {
                break;
            }
        }
        cluster.etcd_proxy("n3").cut();
        let cut = Instant::now();
        let mut fenced_at = None;
        loop {
            ensure!(
                cut.elapsed() < Duration::from_secs(40),
                "n3 never left n1's ring"
            );
            let s = next_snapshot(&mut stream).await?;
            match member(&s, "n3") {
                Err(_) => break,
                Ok(m) if m["node_state"] == "fenced" => {
                    // Fenced, while its record still stands on the others' ring.
                    ensure!(m["state"] == "active" && m["ready"] == false, "{m}");
                    fenced_at.get_or_insert(cut.elapsed());
                }
                Ok(_) => {}
            }
        }
        let fenced_at = fenced_at.context("no snapshot showed n3 fenced")?;
        println!(
            "n3 shown fenced {fenced_at:?} after the cut, gone from the ring {:?} after it",
            cut.elapsed()
        );
        Ok(())
    })
    .await;
}

/// The next snapshot on a dashboard stream.
async fn next_snapshot(stream: &mut SseStream) -> Result<Value> {
    let event = stream
        .next_within(Duration::from_secs(5))
        .await?
        .context("the dashboard stream ended")?;
    Ok(serde_json::from_str(&event.data)?)
}
