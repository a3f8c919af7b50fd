//! Collaborative documents (issue 25, started): stock y-websocket clients edit a
//! `doc:` key's Yjs document on its owner, one of them through another node that
//! relays it.

use anyhow::{anyhow, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use ringfeed_cluster_tests::Cluster;
use tokio_tungstenite::tungstenite::Message;

use super::{bounded, owner_of, FRAME_TIMEOUT};

#[tokio::test]
async fn two_stock_y_websocket_clients_through_two_nodes_converge_on_one_document_and_a_malformed_message_closes_only_its_connection(
) {
    bounded(async {
        let cluster = Cluster::builder().nodes(2).start().await?;
        let name = "roadmap";
        let owner = owner_of(&cluster, &format!("doc:{name}")).await?;
        let ws = cluster.node(&owner).http.replacen("http://", "ws://", 1);
        let server = format!("{ws}/v1/doc");
        // The second client goes through the other node, which relays it to the owner.
        let other = cluster
            .nodes
            .iter()
            .find(|n| n.id != owner)
            .context("another node")?;
        let through = format!("{}/v1/doc", other.http.replacen("http://", "ws://", 1));

        // A client that sends garbage is closed with 4400; the document is unaffected.
        let (mut bad, _) = tokio_tungstenite::connect_async(format!("{server}/{name}")).await?;
        bad.send(Message::Binary(
            vec![0x00, 0x02, 0x03, 0xff, 0xff, 0xff].into(),
        ))
        .await?;
        let closed = tokio::time::timeout(FRAME_TIMEOUT, async {
            while let Some(message) = bad.next().await {
                if let Message::Close(frame) = message? {
                    return Ok::<_, anyhow::Error>(frame);
                }
            }
            Err(anyhow!("no close frame"))
        })
        .await??;
        let frame = closed.context("a close frame with a code")?;
        ensure!(u16::from(frame.code) == 4400, "closed with {frame:?}");

        let output = tokio::process::Command::new("node")
            .arg("yjs_two.mjs")
            .args([server.as_str(), through.as_str(), name, "50", "30000"])
            .current_dir(ringfeed_cluster_tests::browser_dir())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                anyhow!("cannot run node (scripts/test installs Node.js packages): {e}")
            })?;
        let said = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "the clients did not converge: {said}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: serde_json::Value = serde_json::from_str(said.trim())?;
        ensure!(
            result["converged"] == true && result["a"] == result["b"],
            "{result}"
        );
        ensure!(result["mapA"] == 100, "{result}");
        Ok(())
    })
    .await
}
