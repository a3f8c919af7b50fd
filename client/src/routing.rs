//! The ring as any node publishes it (`GET /v1/ring`), held by a client: who owns a
//! key, computed here with the same function the cluster uses (so a client can connect
//! straight to the owner, saving the redirect), each member's share of the keys, and
//! what a change of members would move.

use ringfeed_router::ring::{Member, NodeId, Ring};

use crate::{http_json, Call, ClientError, Tls};

/// A ring and the version it was published at.
#[derive(Debug, Clone)]
pub struct RingView {
    pub cluster: String,
    pub version: u64,
    pub ring: Ring,
}

impl RingView {
    /// The ring as the node at `base` (`http://…` or `https://…`) sees it.
    pub async fn fetch(base: &str, tls: Option<&Tls>) -> Result<RingView, ClientError> {
        let answer = http_json(base, Call::get("/v1/ring"), tls).await?;
        let bad = |e: String| ClientError::Unexpected(format!("GET /v1/ring: {e}"));
        let members: Vec<Member> =
            serde_json::from_value(answer["members"].clone()).map_err(|e| bad(e.to_string()))?;
        Ok(RingView {
            cluster: answer["cluster"].as_str().unwrap_or_default().to_owned(),
            version: answer["ring_version"]
                .as_u64()
                .ok_or_else(|| bad("no ring_version".into()))?,
            ring: Ring::new(members),
        })
    }

    /// Each active member's share of the keys, by id.
    pub fn shares(&self) -> std::collections::BTreeMap<String, f64> {
        self.ring
            .shares()
            .into_iter()
            .map(|(id, share)| (id.0, share))
            .collect()
    }

    /// The owner of `key` on this ring.
    pub fn owner(&self, key: &str) -> Option<&Member> {
        self.ring.owner(key)
    }

    /// This ring without member `id`, as after its drain.
    pub fn without(&self, id: &str) -> Ring {
        Ring::new(self.ring.members().iter().filter(|m| m.id.0 != id).cloned())
    }

    /// This ring with a member `id` of `points` points added (as if it joined).
    pub fn with(&self, id: &str, points: u32) -> Ring {
        let joining = Member {
            id: NodeId(id.to_owned()),
            incarnation: "simulated".to_owned(),
            grpc: String::new(),
            http: String::new(),
            quic: None,
            quic_sha256: None,
            points,
            state: ringfeed_router::ring::MemberState::Active,
            version: String::new(),
        };
        let members = self.ring.members().iter().filter(|m| m.id.0 != id).cloned();
        Ring::new(members.chain([joining]))
    }
}

/// A gauge of a node's `/metrics` (`ringfeed_keys`, `ringfeed_connections`).
pub async fn gauge(base: &str, name: &str, tls: Option<&Tls>) -> Result<u64, ClientError> {
    let text = crate::http_text(base, Call::get("/metrics"), tls).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| ClientError::Unexpected(format!("no {name} in {base}/metrics")))
}
