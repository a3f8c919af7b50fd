//! `ringfeed`: subscribe to a key, publish through a router, show the ring.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringfeed_client::{connect_url, publisher, Event, Frame, Subscription};
use ringfeed_proto::v1::GetRingRequest;

mod ops;

#[derive(Parser)]
#[command(
    name = "ringfeed",
    version,
    about = "A command-line client for a ringfeed cluster"
)]
struct Cli {
    /// The CA (PEM) that signed the cluster's certificates, for https://, wss:// and
    /// gRPC over TLS (`.cluster/tls/ca.pem` for `scripts/cluster --secure`).
    #[arg(long, global = true, env = "RINGFEED_CA")]
    ca: Option<std::path::PathBuf>,
    /// An API token: sent to the router (publish, ring) and, to subscribe, used to ask
    /// the node for a ticket.
    #[arg(
        long,
        global = true,
        env = "RINGFEED_API_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Subscribe to KEY through any node and print every frame as a JSON line;
    /// follows redirects and reconnects with `since` when moved.
    Subscribe {
        /// Any node's HTTP URL, e.g. http://127.0.0.1:8001
        #[arg(long, env = "RINGFEED_NODE")]
        node: String,
        key: String,
        /// Stop after this many updates.
        #[arg(long)]
        count: Option<u64>,
        /// A ticket for KEY (else one is asked for with --token, when given).
        #[arg(long, env = "RINGFEED_TICKET", hide_env_values = true)]
        ticket: Option<String>,
    },
    /// Publish one JSON value to KEY through a router.
    Publish {
        /// The router's gRPC address, e.g. 127.0.0.1:7000
        #[arg(long, env = "RINGFEED_ROUTER")]
        router: String,
        key: String,
        /// A JSON value.
        data: String,
    },
    /// Print the ring: as the router sees it (--router), or as a node publishes it
    /// (--node), with each member's share of the keys.
    Ring {
        #[arg(long, env = "RINGFEED_ROUTER", conflicts_with = "node")]
        router: Option<String>,
        #[arg(long, env = "RINGFEED_NODE")]
        node: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Which node owns KEY: computed here from the ring a node publishes, and what the
    /// node itself says.
    Route {
        /// Any node's HTTP URL.
        #[arg(long, env = "RINGFEED_NODE")]
        node: String,
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Drain node ID: it hands its keys and clients to the others and exits; shows the
    /// progress until it has left the ring. Plain clusters (a secure cluster's nodes
    /// take this only from a node certificate: use `ringfeed-node drain`).
    Drain {
        /// Another node's HTTP URL (asked who is on the ring).
        #[arg(long, env = "RINGFEED_NODE")]
        node: String,
        id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// A dry run against the live ring: what would move if a member left (--remove)
    /// or joined (--add ID[:POINTS]): the share of keys, from where to where, and
    /// about how many keys and connections (from each node's own counts).
    Simulate {
        #[arg(long, env = "RINGFEED_NODE")]
        node: String,
        #[arg(long, conflicts_with = "add", required_unless_present = "add")]
        remove: Option<String>,
        #[arg(long)]
        add: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfeed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `request` with the API token, if there is one.
fn with_token<T>(
    mut request: tonic::Request<T>,
    token: Option<&str>,
) -> anyhow::Result<tonic::Request<T>> {
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("--token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = match &cli.ca {
        Some(path) => Some(ringfeed_client::Tls::from_ca_file(path)?),
        None => None,
    };
    let token = cli.token.as_deref();
    match cli.command {
        Command::Subscribe {
            node,
            key,
            count,
            ticket,
        } => {
            let ticket = match (ticket, token) {
                (Some(ticket), _) => Some(ticket),
                (None, Some(token)) => Some(
                    ringfeed_client::request_ticket(
                        &node,
                        token,
                        &key,
                        "ringfeed-cli",
                        3600,
                        tls.as_ref(),
                    )
                    .await?,
                ),
                (None, None) => None,
            };
            subscribe(&node, &key, count, ticket, tls.as_ref()).await
        }
        Command::Publish { router, key, data } => {
            let value: serde_json::Value = serde_json::from_str(&data)
                .map_err(|e| anyhow::anyhow!("DATA is not JSON: {e}"))?;
            let mut client = publisher::connect_with(&router, tls.as_ref()).await?;
            let reply = client
                .publish(with_token(
                    tonic::Request::new(publisher::json(&key, &value)),
                    token,
                )?)
                .await?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({"seq": reply.seq, "epoch": reply.epoch, "node": reply.node,
                    "delivered": reply.delivered, "replicated": reply.replicated})
            );
            Ok(())
        }
        Command::Route { node, key, json } => ops::route(&node, &key, json, tls.as_ref()).await,
        Command::Drain {
            node,
            id,
            wait_secs,
            json,
        } => ops::drain(&node, &id, token, wait_secs, json).await,
        Command::Simulate {
            node,
            remove,
            add,
            json,
        } => {
            let change = match (remove, add) {
                (Some(id), _) => ops::Change::Remove(id),
                (None, Some(add)) => {
                    let (id, points) = match add.split_once(':') {
                        Some((id, points)) => (
                            id.to_owned(),
                            points.parse().map_err(|_| {
                                anyhow::anyhow!("--add ID[:POINTS]: bad points {points:?}")
                            })?,
                        ),
                        None => (add, ringfeed_router::ring::DEFAULT_POINTS),
                    };
                    ops::Change::Add(id, points)
                }
                (None, None) => anyhow::bail!("--remove ID or --add ID[:POINTS]"),
            };
            ops::simulate(&node, change, json, tls.as_ref()).await
        }
        Command::Ring {
            node: Some(node),
            json,
            ..
        } => ops::ring(&node, json, tls.as_ref()).await,
        Command::Ring { router: None, .. } => {
            anyhow::bail!("ring needs --node URL or --router ADDR")
        }
        Command::Ring {
            router: Some(router),
            ..
        } => {
            let mut client = publisher::connect_with(&router, tls.as_ref()).await?;
            let ring = client
                .get_ring(with_token(tonic::Request::new(GetRingRequest {}), token)?)
                .await?
                .into_inner();
            println!(
                "cluster {} ring_version {} ring_id {}",
                ring.cluster, ring.ring_version, ring.ring_id
            );
            for m in ring.members {
                println!("  {} {} http={} grpc={}", m.id, m.state, m.http, m.grpc);
            }
            Ok(())
        }
    }
}

async fn subscribe(
    node: &str,
    key: &str,
    count: Option<u64>,
    ticket: Option<String>,
    tls: Option<&ringfeed_client::Tls>,
) -> anyhow::Result<()> {
    let mut last: Option<(u64, String)> = None;
    let mut seen = 0u64;
    // The ticket first; then the resume token each welcome hands back.
    let mut credential = ticket.map(|t| ("ticket", t));
    loop {
        let mut url = connect_url(
            node,
            key,
            last.as_ref().map(|(s, e)| (*s, Some(e.as_str()))),
        );
        if let Some((name, value)) = &credential {
            url = url::Url::parse_with_params(&url, [(name, value)])?.to_string();
        }
        let mut sub = Subscription::connect_with(&url, tls).await?;
        // The URL carries the ticket: show where, not with what.
        eprintln!("connected to {}", sub.node());
        if let Frame::Welcome {
            epoch, seq, resume, ..
        } = &sub.welcome
        {
            if last.is_none() {
                last = Some((*seq, epoch.clone()));
            }
            if let Some(resume) = resume {
                credential = Some(("resume", resume.clone()));
            }
        }
        loop {
            match sub.next().await? {
                Event::Frame(frame) => {
                    println!("{}", serde_json::to_string(&frame)?);
                    if let Frame::Update { seq, .. } = frame {
                        if let Some((s, _)) = last.as_mut() {
                            *s = seq;
                        }
                        seen += 1;
                        if count.is_some_and(|c| seen >= c) {
                            sub.close().await;
                            return Ok(());
                        }
                    }
                }
                Event::Unreadable { error, seq } => {
                    eprintln!("a frame could not be read ({error}); going on");
                    if let (Some(seq), Some((s, _))) = (seq, last.as_mut()) {
                        *s = seq;
                    }
                }
                Event::Closed { code, reason } => {
                    eprintln!("closed {code}: {reason}");
                    if matches!(code, 4300 | 4408 | 4503 | 1001) {
                        break;
                    }
                    anyhow::bail!("closed with {code}: {reason}");
                }
            }
        }
    }
}
