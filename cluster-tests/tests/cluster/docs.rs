//! Collaborative documents (issue 25, started): stock y-websocket clients edit a
//! `doc:` key's Yjs document on its owner, one of them through another node that
//! relays it.

use anyhow::{anyhow, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use ringfeed_cluster_tests::Cluster;
use tokio_tungstenite::tungstenite::Message;
use yrs::sync::{Awareness, Message as YMessage, SyncMessage};
use yrs::updates::encoder::{Encode, Encoder, EncoderV1};

use super::{bounded, owner_of, FRAME_TIMEOUT};

#[tokio::test]
async fn two_stock_y_websocket_clients_through_two_nodes_converge_on_one_document_and_a_malformed_message_an_oversized_update_and_an_awareness_flood_each_close_only_their_connection(
) {
    bounded(async {
        let cluster = Cluster::builder()
            .nodes(2)
            .node_args(&["--doc-max-update", "65536", "--doc-awareness-rate", "5"])
            .start()
            .await?;
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

        // A client that sends garbage is closed with 4400, one that sends an update
        // over --doc-max-update with 4413, one that floods awareness with 4429 (and
        // the owner says so, by reason, in the counter). The document and its editors
        // are unaffected: the two stock clients then edit it as if nothing happened.
        let url = format!("{server}/{name}");
        let garbage = vec![vec![0x00, 0x02, 0x03, 0xff, 0xff, 0xff]];
        ensure_closed(&url, garbage, 4400).await?;
        // Ten bytes of awareness claiming 2^34 clients: refused before yrs reserves
        // room for them (fuzz/corpus/doc_update/crash-awareness-claim).
        let claim = vec![vec![
            0x01, 0x08, 0xff, 0xff, 0xff, 0xcd, 0xff, 0x04, 0x00, 0x00,
        ]];
        ensure_closed(&url, claim, 4400).await?;
        let oversized = encode(&YMessage::Sync(SyncMessage::Update(vec![0; 70_000])));
        ensure_closed(&url, vec![oversized], 4413).await?;
        // Each message changes the sender's state (an echo of a state already held
        // would not count).
        let mut awareness = Awareness::new(yrs::Doc::new());
        let mut flood = Vec::new();
        for n in 0..40 {
            awareness.set_local_state(serde_json::json!({"user": "flood", "n": n}))?;
            flood.push(encode(&YMessage::Awareness(awareness.update()?)));
        }
        ensure_closed(&url, flood, 4429).await?;
        let refused =
            super::metric(&cluster.node(&owner).http, "ringfeed_doc_refused_total").await?;
        ensure!(refused == 4, "ringfeed_doc_refused_total {refused}");

        // An ordinary subscriber of the document's key follows its raw updates.
        let connect = ringfeed_client::connect_url(&other.http, &format!("doc:{name}"), None);
        let mut raw = ringfeed_client::Subscription::connect(&connect).await?;

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

        // The editors' updates, as the key's log has them: Yjs updates in data_b64,
        // in seq order; applied to an empty document they give the editors' text.
        let doc = yrs::Doc::new();
        let mut last = 0;
        let text = loop {
            match raw.next_within(FRAME_TIMEOUT).await? {
                ringfeed_client::Event::Frame(ringfeed_client::Frame::Update {
                    seq,
                    data_b64: Some(data),
                    content_type: Some(content_type),
                    ..
                }) => {
                    ensure!(seq == last + 1, "seq {seq} after {last}");
                    last = seq;
                    ensure!(
                        content_type == "application/vnd.yjs.update",
                        "{content_type}"
                    );
                    use base64::Engine;
                    use yrs::updates::decoder::Decode;
                    use yrs::{GetString, ReadTxn, Transact};
                    let update = base64::engine::general_purpose::STANDARD.decode(data)?;
                    doc.transact_mut()
                        .apply_update(yrs::Update::decode_v1(&update)?)
                        .map_err(|e| anyhow!("{e}"))?;
                    let txn = doc.transact();
                    let text = txn
                        .get_text("t")
                        .map(|t| t.get_string(&txn))
                        .unwrap_or_default();
                    if text == result["a"].as_str().unwrap_or_default() {
                        break text;
                    }
                }
                ringfeed_client::Event::Frame(_) => {}
                other => return Err(anyhow!("the raw subscriber got {other:?}")),
            }
        };
        ensure!(!text.is_empty() && last > 0, "no raw updates");
        Ok(())
    })
    .await
}

/// A y-protocol message's bytes.
fn encode(message: &YMessage) -> Vec<u8> {
    let mut encoder = EncoderV1::new();
    message.encode(&mut encoder);
    encoder.to_vec()
}

/// Connects to `url`, sends `messages` and expects to be closed with `code`.
async fn ensure_closed(url: &str, messages: Vec<Vec<u8>>, code: u16) -> anyhow::Result<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    for message in messages {
        // The server may close before the last is sent.
        if ws.send(Message::Binary(message.into())).await.is_err() {
            break;
        }
    }
    let closed = tokio::time::timeout(FRAME_TIMEOUT, async {
        while let Some(message) = ws.next().await {
            if let Message::Close(frame) = message? {
                return Ok::<_, anyhow::Error>(frame);
            }
        }
        Err(anyhow!("no close frame"))
    })
    .await??;
    let frame = closed.context("a close frame with a code")?;
    ensure!(
        u16::from(frame.code) == code,
        "expected {code}, closed with {frame:?}"
    );
    Ok(())
}
