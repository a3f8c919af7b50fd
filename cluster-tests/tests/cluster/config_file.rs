//! The config file (`--config`, TOML): a flag beats its environment variable, which
//! beats the file, which beats the default; a bad file exits 64 naming the setting; a
//! `SIGHUP` changes a limit and the log filter on a live node, and the router's log
//! filter.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ringfeed_client::{Event, Frame, Subscription};
use ringfeed_cluster_tests::{bin_dir, eventually, Cluster};

use super::{bounded, FRAME_TIMEOUT};

/// The `heartbeat_ms` a node's `welcome` says.
async fn heartbeat_of(cluster: &Cluster) -> Result<u64> {
    let sub = Subscription::connect(&cluster.nodes[0].connect_url("conf:1")).await?;
    match &sub.welcome {
        Frame::Welcome { heartbeat_ms, .. } => Ok(*heartbeat_ms),
        other => bail!("{other:?}"),
    }
}

/// Sends `n` pings at once: `Ok(true)` if every one was answered, `Ok(false)` if the
/// node closed the connection with 1008 instead.
async fn ping_burst(cluster: &Cluster, n: usize) -> Result<bool> {
    let mut sub = Subscription::connect(&cluster.nodes[0].connect_url("conf:2")).await?;
    for _ in 0..n {
        sub.send_text(r#"{"type":"ping"}"#).await?;
    }
    let mut pongs = 0;
    while pongs < n {
        match sub.next_within(FRAME_TIMEOUT).await? {
            Event::Frame(Frame::Pong) => pongs += 1,
            Event::Frame(_) => {}
            Event::Closed { code: 1008, .. } => return Ok(false),
            other => bail!("{other:?}"),
        }
    }
    Ok(true)
}

/// Sends `SIGHUP` to `pid`.
fn hang_up(pid: u32) -> Result<()> {
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(hup.success(), "kill -HUP {pid}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flag_env_file_and_default_in_that_order_and_sighup_changes_a_limit() {
    bounded(async {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "heartbeat-ms = 1111\nclient_message_rate = 1000\nlog = \"info\"\n",
        )?;
        let path = file.to_string_lossy().into_owned();
        let router_file = dir.path().join("router.toml");
        std::fs::write(&router_file, "log = \"info\"\n")?;
        let router_path = router_file.to_string_lossy().into_owned();

        // The file beats the default (30,000). No RINGFEED_LOG: the files set `log`.
        let cluster = Cluster::builder()
            .nodes(1)
            .log("")
            .node_args(&["--config", &path])
            .router_args(&["--config", &router_path])
            .start()
            .await?;
        ensure!(heartbeat_of(&cluster).await? == 1111, "file over default");
        // A flag beats the file.
        let flagged = Cluster::builder()
            .nodes(1)
            .node_args(&["--config", &path, "--heartbeat-ms", "3333"])
            .start()
            .await?;
        ensure!(heartbeat_of(&flagged).await? == 3333, "flag over file");
        drop(flagged);

        // SIGHUP: the file now allows 5 client messages a second.
        ensure!(
            ping_burst(&cluster, 20).await?,
            "20 pings refused at 1,000/s"
        );
        // …and logs the node's debug lines from now on.
        ensure!(
            !cluster.nodes[0].log().contains("subscribed"),
            "debug lines logged at info"
        );
        std::fs::write(
            &file,
            "heartbeat-ms = 1111\nclient-message-rate = 5\nlog = \"ringfeed_node=debug,info\"\n",
        )?;
        hang_up(cluster.nodes[0].pid().context("running")?)?;
        eventually("the reload logged", Duration::from_secs(10), || {
            let log = cluster.nodes[0].log();
            async move {
                Ok((log.contains("SIGHUP: changed")
                    && log.contains("client-message-rate")
                    && log.contains("ringfeed_node=debug,info"))
                .then_some(()))
            }
        })
        .await;
        ensure!(
            !ping_burst(&cluster, 20).await?,
            "20 pings allowed at 5/s after SIGHUP"
        );
        heartbeat_of(&cluster).await?;
        eventually("a debug line", Duration::from_secs(10), || {
            let log = cluster.nodes[0].log();
            async move { Ok(log.contains("subscribed").then_some(())) }
        })
        .await;
        // The router's filter changes the same way.
        std::fs::write(&router_file, "log = \"ringfeed_router=debug,info\"\n")?;
        hang_up(cluster.router_pid().context("router running")?)?;
        eventually(
            "the router's reload logged",
            Duration::from_secs(10),
            || {
                let log = cluster.router_log();
                async move {
                    Ok((log.contains("SIGHUP: changed")
                        && log.contains("ringfeed_router=debug,info"))
                    .then_some(()))
                }
            },
        )
        .await;
        drop(cluster);

        // The environment beats the file (this test's process is its own: nextest).
        std::env::set_var("RINGFEED_HEARTBEAT_MS", "2222");
        let from_env = Cluster::builder()
            .nodes(1)
            .node_args(&["--config", &path])
            .start()
            .await;
        std::env::remove_var("RINGFEED_HEARTBEAT_MS");
        ensure!(heartbeat_of(&from_env?).await? == 2222, "env over file");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_bad_config_file_exits_64_naming_the_setting() {
    bounded(async {
        let dir = tempfile::tempdir()?;
        for (text, named) in [
            ("max-conections = 5\n", "max-conections"),
            ("max-payload = \"lots\"\n", "--max-payload"),
            ("max-payload = { a = 1 }\n", "max-payload"),
            ("not toml at all [\n", "not TOML"),
            ("log = \"ringfeed_node=loud\"\n", "--log"),
        ] {
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, text)?;
            for binary in ["ringfeed-node", "ringfeed-router"] {
                let out = tokio::process::Command::new(bin_dir().join(binary))
                    .args(["--id", "n1"].iter().filter(|_| binary == "ringfeed-node"))
                    .arg("--config")
                    .arg(&file)
                    .env_remove("RINGFEED_LOG")
                    .output()
                    .await?;
                let stderr = String::from_utf8_lossy(&out.stderr);
                ensure!(
                    out.status.code() == Some(64) && stderr.contains(named),
                    "{binary} with {text:?}: exit {:?}, {stderr}",
                    out.status.code()
                );
            }
        }
        Ok(())
    })
    .await
}
