//! `ringfeed`: subscribe to a key (`sub`), publish (`pub`, through a router or straight
//! to the owner), and the operator's commands: `ring`, `route`, `simulate`, `drain`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringfeed_client::direct::Publisher;
use ringfeed_client::follow::{FollowConfig, FollowEvent, Follower, Transport};
use ringfeed_client::{publisher, Frame};
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
    /// Subscribe to KEY and print every update as a JSON line on stdout (connections,
    /// disconnections and resets go to stderr). Survives node restarts, drains and
    /// deaths: it reconnects with full-jitter back-off and resumes where it was, so
    /// nothing is missed or printed twice.
    #[command(alias = "subscribe")]
    Sub {
        /// A node's HTTP URL, e.g. http://127.0.0.1:8001; repeat it to give others to
        /// fall back on.
        #[arg(long, env = "RINGFEED_NODE", value_delimiter = ',', required = true)]
        node: Vec<String>,
        /// The key, e.g. user:42.
        key: String,
        /// Start after this seq (its history replayed) rather than at the live end.
        #[arg(long)]
        since: Option<u64>,
        /// The epoch --since belongs to (a different one starts with a `reset`).
        #[arg(long, requires = "since")]
        epoch: Option<String>,
        /// Over QUIC (the node's certificate is checked against the digest the ring
        /// publishes, or against --ca).
        #[arg(long)]
        quic: bool,
        /// Connect straight to the owner the ring names (no redirect hop).
        #[arg(long)]
        direct: bool,
        /// Stop after this many updates.
        #[arg(long)]
        count: Option<u64>,
        /// A ticket for KEY (else one is asked for with --token, when given).
        #[arg(long, env = "RINGFEED_TICKET", hide_env_values = true)]
        ticket: Option<String>,
    },
    /// Publish to KEY: DATA (a JSON value), --file F, or `-` for standard input.
    /// Through a router (--router), or straight to the owner (--direct, with --node).
    #[command(alias = "publish")]
    Pub {
        /// The router's gRPC address, e.g. 127.0.0.1:7000.
        #[arg(long, env = "RINGFEED_ROUTER", required_unless_present = "direct")]
        router: Option<String>,
        /// Straight to the key's owner, computed from the ring of --node.
        #[arg(long, requires = "node")]
        direct: bool,
        /// A node's HTTP URL (for --direct); repeat it to give others.
        #[arg(long, env = "RINGFEED_NODE", value_delimiter = ',')]
        node: Vec<String>,
        /// The key, e.g. user:42.
        key: String,
        /// A JSON value, or `-` to read it from standard input.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        data: Option<String>,
        /// Read the JSON value from this file.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Applied at most once per key within the idempotency window: a retry with
        /// the same key gets the first answer.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Compare-and-set: publish only if the key's current seq is this.
        #[arg(long)]
        expect_seq: Option<u64>,
        /// With --expect-seq: the epoch that seq belongs to.
        #[arg(long, requires = "expect_seq")]
        expect_epoch: Option<String>,
        /// Give up after this many seconds (retries included).
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
        /// One JSON object (the default prints a line for people).
        #[arg(long)]
        json: bool,
    },
    /// Print the ring: as the router sees it (--router), or as a node publishes it
    /// (--node), with each member's share of the keys.
    Ring {
        #[arg(long, env = "RINGFEED_ROUTER", conflicts_with = "node")]
        /// The router's gRPC address (what the router sees).
        router: Option<String>,
        #[arg(long, env = "RINGFEED_NODE")]
        /// Any node's HTTP URL (what that node publishes).
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
        /// Any node's HTTP URL.
        node: String,
        /// The key, e.g. user:42.
        key: String,
        /// One JSON object instead of text.
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
        /// The id of the node to drain.
        id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The hottest keys cluster-wide, by update rate and by subscribers, refreshed
    /// live in the terminal (each node reports its own; Ctrl-C to stop).
    Top {
        /// Any node's HTTP URL.
        #[arg(long, env = "RINGFEED_NODE")]
        node: String,
        /// How many keys in each list.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Seconds between refreshes (at least 1.1).
        #[arg(long, default_value_t = 2.0)]
        interval_secs: f64,
        /// Print once (after two samples, so that rates exist) and exit.
        #[arg(long)]
        once: bool,
        /// One JSON object a refresh instead of the live table.
        #[arg(long)]
        json: bool,
    },
    /// A dry run against the live ring: what would move if a member left (--remove)
    /// or joined (--add ID[:POINTS]): the share of keys, from where to where, and
    /// about how many keys and connections (from each node's own counts).
    Simulate {
        #[arg(long, env = "RINGFEED_NODE")]
        /// Any node's HTTP URL.
        node: String,
        /// The id of a member that would leave.
        #[arg(long, conflicts_with = "add", required_unless_present = "add")]
        remove: Option<String>,
        /// A member that would join: ID, or ID:POINTS (its virtual nodes).
        #[arg(long)]
        add: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A gRPC status reads as its code and message, not tonic's description.
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("ringfeed: {:?}: {}", status.code(), status.message()),
                None => eprintln!("ringfeed: {e:#}"),
            }
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
        Command::Sub {
            node,
            key,
            since,
            epoch,
            quic,
            direct,
            count,
            ticket,
        } => {
            let ticket = match (ticket, token) {
                (Some(ticket), _) => Some(ticket),
                (None, Some(token)) => Some(
                    ringfeed_client::request_ticket(
                        &node[0],
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
            let mut config = FollowConfig::new(node, &key);
            config.since = since;
            config.epoch = epoch;
            config.transport = if quic {
                Transport::Quic
            } else {
                Transport::WebSocket
            };
            config.direct = direct;
            config.tls = tls;
            config.ticket = ticket;
            subscribe(config, count).await
        }
        Command::Pub {
            router,
            direct,
            node,
            key,
            data,
            file,
            idempotency_key,
            expect_seq,
            expect_epoch,
            timeout_secs,
            json,
        } => {
            let text = match (data.as_deref(), file) {
                (_, Some(file)) => std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("--file {}: {e}", file.display()))?,
                (Some("-"), None) => std::io::read_to_string(std::io::stdin())
                    .map_err(|e| anyhow::anyhow!("standard input: {e}"))?,
                (Some(data), None) => data.to_owned(),
                (None, None) => anyhow::bail!("DATA, --file F or - is needed"),
            };
            let value: serde_json::Value = serde_json::from_str(text.trim())
                .map_err(|e| anyhow::anyhow!("the data is not JSON: {e}"))?;
            let item = ringfeed_proto::v1::PublishRequest {
                idempotency_key: idempotency_key.unwrap_or_default(),
                expected_seq: expect_seq,
                expected_epoch: expect_epoch.unwrap_or_default(),
                ..publisher::json(&key, &value)
            };
            let timeout = std::time::Duration::from_secs(timeout_secs);
            let reply = if direct {
                let mut publisher = Publisher::connect(node, tls).await?;
                publisher.deadline = timeout;
                publisher.publish(item).await?
            } else {
                let router = router.ok_or_else(|| anyhow::anyhow!("--router or --direct"))?;
                let mut client = publisher::connect_with(&router, tls.as_ref()).await?;
                let mut request = with_token(tonic::Request::new(item), token)?;
                request.set_timeout(timeout);
                client.publish(request).await?.into_inner()
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"seq": reply.seq, "epoch": reply.epoch, "node": reply.node,
                        "delivered": reply.delivered, "replicated": reply.replicated})
                );
            } else {
                println!(
                    "published {key} seq {} (epoch {}) on {}; {} subscriber(s) there{}",
                    reply.seq,
                    reply.epoch,
                    reply.node,
                    reply.delivered,
                    if reply.replicated { "; replicated" } else { "" }
                );
            }
            Ok(())
        }
        Command::Top {
            node,
            count,
            interval_secs,
            once,
            json,
        } => {
            let interval = std::time::Duration::try_from_secs_f64(interval_secs)
                .map_err(|_| anyhow::anyhow!("--interval-secs: a number of seconds"))?;
            ops::top(&node, count, interval, once, json, tls.as_ref()).await
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

/// Follows a key, printing each update as a JSON line, until `count` updates.
async fn subscribe(config: FollowConfig, count: Option<u64>) -> anyhow::Result<()> {
    let mut follower = Follower::new(config);
    let mut seen = 0u64;
    loop {
        match follower.next().await? {
            FollowEvent::Update(frame) | FollowEvent::Presence(frame) => {
                println!("{}", serde_json::to_string(&frame)?);
                if matches!(frame, Frame::Update { .. }) {
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        return Ok(());
                    }
                }
            }
            FollowEvent::Reset(frame) => {
                eprintln!("reset: the key's history was lost");
                println!("{}", serde_json::to_string(&frame)?);
            }
            FollowEvent::Connected { node, redirects } => {
                eprintln!("connected to {node} ({redirects} redirect(s))");
            }
            FollowEvent::Disconnected {
                code,
                reason,
                retry_in,
            } => {
                eprintln!("disconnected ({code}: {reason}); again in {retry_in:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand, argument and option says what it is for in `--help`.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for sub in cli.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "ringfeed {} {id} has no help",
                    sub.get_name()
                );
            }
        }
    }
}
