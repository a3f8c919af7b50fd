//! Reading and watching the members' records in etcd
//! (`/ringfeed/{cluster}/nodes/{id}`, docs/protocol.md *etcd layout*).

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Membership, MembershipConfig, MembershipError};
use crate::backoff::Backoff;
use crate::ring::Member;

/// How long one etcd request may take before we treat etcd as unreachable.
const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Membership {
    /// Connects to etcd, reads the current ring and starts watching it. The watch runs
    /// on `tasks` until `shutdown` is cancelled.
    pub async fn start(
        config: &MembershipConfig,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Membership, MembershipError> {
        // etcd refuses HTTP/2 pings more often than every 5 s on a connection without
        // traffic (GOAWAY "too many pings"), so keep-alive pings stay above that; a
        // dead etcd shows up through the requests' own timeouts.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(ETCD_REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(false);
        let security = &config.security;
        if let Some(ca) = &security.ca {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca.clone()));
            if let Some((cert, key)) = &security.identity {
                tls = tls.identity(etcd_client::Identity::from_pem(cert.clone(), key.clone()));
            }
            options = options.with_tls(tls);
        }
        if let Some((user, password)) = &security.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let client = timed(Client::connect(&config.endpoints, Some(options))).await?;
        let membership = Membership::new(Some(client), &config.cluster, config.lease_ttl);
        membership.read_fresh().await?;
        let watcher = membership.clone();
        tasks.spawn(async move { watcher.watch_loop(shutdown).await });
        Ok(membership)
    }

    pub(super) fn nodes_prefix(&self) -> String {
        format!("/ringfeed/{}/nodes/", self.inner.cluster)
    }

    /// The open transition record (docs/protocol.md *etcd layout*) as etcd holds it,
    /// if a planned change is under way; `None` too on a fixed ring.
    pub async fn transition(&self) -> Result<Option<String>, MembershipError> {
        let Some(mut client) = self.client() else {
            return Ok(None);
        };
        let key = format!("/ringfeed/{}/transition", self.inner.cluster);
        let resp = timed(client.get(key.as_str(), None)).await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// The etcd client, unless the ring is fixed.
    pub(super) fn client(&self) -> Option<Client> {
        self.inner.client.clone()
    }

    /// Reads every record and publishes the ring if it is newer than the current view.
    /// Returns the revision etcd answered at.
    /// A fixed ring has nothing to read: its view is as fresh as it gets.
    pub(super) async fn read_fresh(&self) -> Result<u64, MembershipError> {
        let prefix = self.nodes_prefix();
        let Some(mut client) = self.client() else {
            return Ok(self.view().version);
        };
        let resp =
            timed(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut members = BTreeMap::new();
        for kv in resp.kvs() {
            if let Some(member) = parse_record(&prefix, kv.key(), kv.value()) {
                members.insert(member.id.0.clone(), member);
            }
        }
        let mut map = self.inner.members.lock().expect("members lock poisoned");
        if to_version(revision) > self.view().version {
            *map = members;
            self.publish(&map, to_version(revision));
        }
        Ok(to_version(revision))
    }

    async fn watch_loop(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.watch_once() => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "ring watch interrupted; serving on the last ring");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_pause()) => {}
            }
            if self.read_fresh().await.is_ok() {
                backoff.reset();
            }
        }
    }

    /// Watches the prefix from just after the current view until the stream ends.
    async fn watch_once(&self) -> Result<(), MembershipError> {
        let prefix = self.nodes_prefix();
        let start = i64::try_from(self.view().version).unwrap_or(i64::MAX - 1) + 1;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_progress_notify();
        let Some(mut client) = self.client() else {
            return Ok(());
        };
        let mut stream = timed(client.watch(prefix.as_str(), Some(options))).await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                tracing::warn!(
                    reason = resp.cancel_reason(),
                    "ring watch cancelled by etcd"
                );
                return Ok(());
            }
            let revision = to_version(resp.header().map_or(0, |h| h.revision()));
            let mut map = self.inner.members.lock().expect("members lock poisoned");
            let events = resp.events();
            for (i, event) in events.iter().enumerate() {
                let Some(kv) = event.kv() else { continue };
                let at = to_version(kv.mod_revision());
                let Some(id) = kv.key().strip_prefix(prefix.as_bytes()) else {
                    continue;
                };
                let id = String::from_utf8_lossy(id).into_owned();
                match event.event_type() {
                    EventType::Put => match parse_record(&prefix, kv.key(), kv.value()) {
                        Some(member) => {
                            map.insert(id, member);
                        }
                        None => {
                            map.remove(&id);
                        }
                    },
                    EventType::Delete => {
                        map.remove(&id);
                    }
                }
                // One ring per revision: a response can carry several, and a node
                // restarted under the same id must be seen leaving before it rejoins.
                let last_of_revision = events
                    .get(i + 1)
                    .and_then(|e| e.kv())
                    .is_none_or(|next| to_version(next.mod_revision()) != at);
                if last_of_revision {
                    self.publish(&map, at);
                }
            }
            // A response's header revision is etcd's when it was sent: events up to it
            // may still be on their way (the response that creates the watch, catch-up
            // chunks), and a view claiming that revision would make them look old and
            // be dropped — a first node never saw its own ring. Only a progress
            // notification (no events, watch already created) says nothing older is
            // left to come.
            if events.is_empty() && !resp.created() {
                self.publish(&map, revision);
            }
        }
        Ok(())
    }
}

pub(super) fn parse_record(prefix: &str, key: &[u8], value: &[u8]) -> Option<Member> {
    let id = key.strip_prefix(prefix.as_bytes())?;
    match serde_json::from_slice::<Member>(value) {
        Ok(member) if member.id.0.as_bytes() == id && member.points <= crate::ring::MAX_POINTS => {
            Some(member)
        }
        Ok(_) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "member record does not match its key; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "unreadable member record; ignored");
            None
        }
    }
}

pub(super) fn to_version(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

pub(super) async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, MembershipError> {
    match tokio::time::timeout(ETCD_REQUEST_TIMEOUT, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(MembershipError::Timeout(ETCD_REQUEST_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_must_match_their_key() {
        let prefix = "/ringfeed/c/nodes/";
        let good = br#"{"id":"n1","incarnation":"x","grpc":"g","http":"h","quic":null,"points":4,"state":"active","version":"0.1.0"}"#;
        assert!(parse_record(prefix, b"/ringfeed/c/nodes/n1", good).is_some());
        assert!(parse_record(prefix, b"/ringfeed/c/nodes/n2", good).is_none());
        assert!(parse_record(prefix, b"/ringfeed/c/nodes/n1", b"{nope").is_none());
    }
}
