//! `ringfeed`: subscribe to a key, publish through a router, show the ring.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringfeed_client::{connect_url, publisher, Event, Frame, Subscription};
use ringfeed_proto::v1::GetRingRequest;

#[derive(Parser)]
#[command(
    name = "ringfeed",
    version,
    about = "A command-line client for a ringfeed cluster"
)]
struct Cli {
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
    /// Print the ring as the router sees it.
    Ring {
        #[arg(long, env = "RINGFEED_ROUTER")]
        router: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfeed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Subscribe { node, key, count } => subscribe(&node, &key, count).await,
        Command::Publish { router, key, data } => {
            let value: serde_json::Value = serde_json::from_str(&data)
                .map_err(|e| anyhow::anyhow!("DATA is not JSON: {e}"))?;
            let mut client = publisher::connect(&router).await?;
            let reply = client
                .publish(publisher::json(&key, &value))
                .await?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({"seq": reply.seq, "epoch": reply.epoch, "node": reply.node,
                    "delivered": reply.delivered, "replicated": reply.replicated})
            );
            Ok(())
        }
        Command::Ring { router } => {
            let mut client = publisher::connect(&router).await?;
            let ring = client.get_ring(GetRingRequest {}).await?.into_inner();
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

async fn subscribe(node: &str, key: &str, count: Option<u64>) -> anyhow::Result<()> {
    let mut last: Option<(u64, String)> = None;
    let mut seen = 0u64;
    loop {
        let url = connect_url(
            node,
            key,
            last.as_ref().map(|(s, e)| (*s, Some(e.as_str()))),
        );
        let mut sub = Subscription::connect(&url).await?;
        eprintln!("connected to {} ({})", sub.node(), sub.url);
        if let Frame::Welcome { epoch, seq, .. } = &sub.welcome {
            if last.is_none() {
                last = Some((*seq, epoch.clone()));
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
