//! A browser against a secure cluster (`ClusterBuilder::secure`): a page on another
//! origin gets a ticket from its own small backend (which holds the API token, so the
//! browser never sees it), connects over `wss://` with it and receives updates; the same
//! page served from an origin not on `--allowed-origins` is refused at the upgrade.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use ringfeed_cluster_tests::{eventually, http_post, Cluster, SECURE_TOKEN};
use ringfeed_proto::v1::{PresenceRequest, PublishRequest};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{bounded, numbers, owner_of, with_token};

const PAGE: &str = include_str!("../../browser/wss.html");

/// A web application's backend on a loopback port of its own (so an origin of its own):
/// `GET /` is the page, `GET /ticket?key=K` is `{"ticket":…}`, a ticket for `K` it asks a
/// node for with the API token — server side: the token never reaches the browser.
struct Backend {
    /// `http://127.0.0.1:port`, what a browser sends as `Origin` for its page.
    origin: String,
    listener: Option<TcpListener>,
    /// Tickets handed out.
    tickets: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    /// Binds the port (so the origin is known before the cluster starts); serves nothing
    /// until [`Backend::serve`].
    async fn bind() -> Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Backend {
            origin: format!("http://{}", listener.local_addr()?),
            listener: Some(listener),
            tickets: Arc::default(),
            task: None,
        })
    }

    /// Starts answering: tickets come from `node` (`https://…`) with subject `sub`.
    fn serve(&mut self, node: &str, sub: &str) -> Result<()> {
        let listener = self.listener.take().context("already serving")?;
        let (node, sub, tickets) = (node.to_owned(), sub.to_owned(), self.tickets.clone());
        self.task = Some(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (node, sub, tickets) = (node.clone(), sub.clone(), tickets.clone());
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &node, &sub, &tickets).await {
                        eprintln!("backend: {e:#}");
                    }
                });
            }
        }));
        Ok(())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// One request on a connection of the backend (HTTP/1.1, `Connection: close`).
async fn answer(stream: TcpStream, node: &str, sub: &str, tickets: &AtomicUsize) -> Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    let mut line = String::new();
    while reader.read_line(&mut line).await? > 2 {
        line.clear();
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, content_type, body) = match path {
        "/" => ("200 OK", "text/html; charset=utf-8", PAGE.to_owned()),
        "/ticket" => match ticket(node, sub, query).await {
            Ok(ticket) => {
                tickets.fetch_add(1, Ordering::SeqCst);
                (
                    "200 OK",
                    "application/json",
                    json!({ "ticket": ticket }).to_string(),
                )
            }
            Err(e) => (
                "502 Bad Gateway",
                "application/json",
                json!({ "error": format!("{e:#}") }).to_string(),
            ),
        },
        _ => ("404 Not Found", "text/plain", "not found".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    reader.get_mut().write_all(response.as_bytes()).await?;
    reader.get_mut().shutdown().await?;
    Ok(())
}

/// A subscribe-only ticket for the `key` of `query`, from `node`'s
/// `POST /v1/tickets` with the API token.
async fn ticket(node: &str, sub: &str, query: &str) -> Result<String> {
    let key = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "key")
        .map(|(_, v)| v.into_owned())
        .context("no key")?;
    let body = json!({ "sub": sub, "key": key, "ttl_s": 60 }).to_string();
    let bearer = format!("Bearer {SECURE_TOKEN}");
    let (status, answer) = http_post(
        &format!("{node}/v1/tickets"),
        &[("authorization", &bearer)],
        &body,
    )
    .await?;
    ensure!(status == 200, "POST /v1/tickets: {status} {answer}");
    let answer: Value = serde_json::from_str(&answer)?;
    Ok(answer["ticket"].as_str().context("a ticket")?.to_owned())
}

fn escape(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_gets_a_ticket_from_its_backend_and_receives_updates_over_wss_and_a_page_on_an_origin_not_allowed_is_refused(
) {
    bounded(async {
        const N: u64 = 20;
        // Two web applications on two origins; only A's is allowed.
        let mut a = Backend::bind().await?;
        let mut b = Backend::bind().await?;
        let cluster = Cluster::builder()
            .nodes(2)
            .secure()
            .node_args(&["--allowed-origins", &a.origin])
            .start()
            .await?;
        let tls_dir = cluster.tls_dir().context("a secure cluster")?.to_path_buf();
        // A key n2 owns: page A connects to n1 and follows the redirect to n2 over wss;
        // page B goes straight to the owner, so nothing but its origin can refuse it.
        let mut key = String::new();
        for i in 0.. {
            key = format!("browser:wss:{i}");
            if owner_of(&cluster, &key).await? == "n2" {
                break;
            }
        }
        let (n1, n2) = (
            cluster.node("n1").http.clone(),
            cluster.node("n2").http.clone(),
        );
        ensure!(
            n1.starts_with("https://") && n2.starts_with("https://"),
            "{n1} {n2}"
        );
        a.serve(&n1, "page-a")?;
        b.serve(&n1, "page-b")?;
        let wss = |http: &str| http.replacen("https://", "wss://", 1);
        let page = |origin: &str, node: &str| {
            format!("{origin}/?node={}&key={}", escape(&wss(node)), escape(&key))
        };

        let mut driver = tokio::process::Command::new("node")
            .arg("wss.mjs")
            .arg(&tls_dir)
            .args([
                &N.to_string(),
                "30000",
                &page(&a.origin, &n1),
                &page(&b.origin, &n2),
            ])
            .current_dir(ringfeed_cluster_tests::browser_dir())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                anyhow!(
                    "cannot run node (scripts/test installs Node.js packages and Chromium): {e}"
                )
            })?;

        let mut stdout = driver.stdout.take().context("the driver's stdout")?;
        let stdout = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text).await;
            text
        });

        // Page A is subscribed once its ticket's subject is present on the owner. The
        // driver ending first (page A's socket refused or failed) is said at once.
        let router = cluster.router().await?;
        let subscribed = eventually("page A to subscribe", Duration::from_secs(30), || {
            let (mut router, key) = (router.clone(), key.clone());
            async move {
                let presence = router
                    .presence(with_token(PresenceRequest { key })?)
                    .await?
                    .into_inner();
                Ok(presence.members.iter().any(|m| m == "page-a").then_some(()))
            }
        });
        tokio::select! {
            () = subscribed => {}
            status = driver.wait() => {
                return Err(anyhow!(
                    "the browser driver ended ({}) before page A subscribed: {}",
                    status?,
                    stdout.await?
                ));
            }
        }
        for i in 1..=N {
            let reply = router
                .clone()
                .publish(with_token(PublishRequest {
                    key: key.clone(),
                    data: json!({ "n": i }).to_string().into_bytes(),
                    ..Default::default()
                })?)
                .await?
                .into_inner();
            ensure!(reply.node == "n2" && reply.seq == i, "{reply:?}");
        }

        let status = tokio::time::timeout(Duration::from_secs(60), driver.wait()).await??;
        let stdout = stdout.await?;
        let state: Value = serde_json::from_str(stdout.trim())
            .with_context(|| format!("browser driver failed ({status}): {stdout}"))?;
        eprintln!("chromium: {state}");
        let (allowed, refused) = (&state["allowed"], &state["refused"]);

        // A: a ticket from its backend, a redirect followed, every update in order.
        ensure!(allowed["ticket"] == "ok", "page A's ticket: {allowed}");
        ensure!(a.tickets.load(Ordering::SeqCst) == 1, "backend A's tickets");
        let want: Vec<u64> = (1..=N).collect();
        ensure!(
            numbers(allowed, "handshakes") == [101, 101],
            "page A's upgrades (n1, then n2): {allowed}"
        );
        let redirect = allowed["redirects"][0].as_str().unwrap_or_default();
        ensure!(
            allowed["redirects"].as_array().map(Vec::len) == Some(1)
                && redirect.starts_with(&format!("{}/v1/connect?", wss(&n2))),
            "page A's redirect to n2 over wss: {allowed}"
        );
        ensure!(
            allowed["welcomes"] == json!(["n2"]),
            "page A's welcome: {allowed}"
        );
        ensure!(numbers(allowed, "seqs") == want, "page A's seqs: {allowed}");
        ensure!(numbers(allowed, "ns") == want, "page A's data: {allowed}");
        ensure!(
            allowed["failures"] == json!([])
                && allowed["errors"] == 0
                && allowed["done"] == false
                && allowed["closes"].as_array().map(|c| c.len()) == Some(1)
                && allowed["closes"][0]["code"] == 4300,
            "page A: only the redirected socket closed, with 4300: {allowed}"
        );

        // B: its backend gave it a good ticket, and the upgrade was refused with 403.
        ensure!(refused["ticket"] == "ok", "page B's ticket: {refused}");
        ensure!(b.tickets.load(Ordering::SeqCst) == 1, "backend B's tickets");
        ensure!(
            refused["welcomes"] == json!([])
                && refused["redirects"] == json!([])
                && numbers(refused, "seqs").is_empty(),
            "page B, on an origin not allowed, was let in: {refused}"
        );
        // A refused upgrade is no handshake DevTools reports; its status is in the
        // failure's message.
        let failures = refused["failures"].as_array().cloned().unwrap_or_default();
        ensure!(
            numbers(refused, "handshakes").is_empty()
                && failures.len() == 1
                && failures[0]
                    .as_str()
                    .is_some_and(|f| f.ends_with("Unexpected response code: 403")),
            "page B's upgrade, refused with 403: {refused}"
        );
        ensure!(
            refused["errors"].as_u64() >= Some(1)
                && refused["done"] == true
                && refused["closes"].as_array().map(|c| c.len()) == Some(1)
                && refused["closes"][0]["code"] == 1006,
            "page B's socket: an error, then close 1006: {refused}"
        );
        // Both pages got there (the assertions above say what is wrong otherwise).
        ensure!(
            status.success(),
            "browser driver failed ({status}): {state}"
        );
        Ok(())
    })
    .await;
}
