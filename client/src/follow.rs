//! A subscriber that stays subscribed: [`Follower`] connects over WebSocket or QUIC,
//! follows redirects, and after any disconnect reconnects with full-jitter exponential
//! back-off, resuming with `since`/`epoch` so that nothing is missed or seen twice.
//! Close codes are honoured as docs/protocol.md's table says: 4300 follows the
//! redirect at once; 4429 waits the advised delay; 4408 and 1008 pause, then resume;
//! 4503, 1001 and a dropped connection ask another node; 4400, 4401 and 4413 are
//! final (the same request would fail again).
//!
//! With `direct`, the follower computes the key's owner from the ring (fetched from
//! any node, refreshed when a redirect or a 4503 says it moved) and connects straight
//! to it, saving the redirect hop.

use std::time::Duration;

use ringfeed_router::backoff::Backoff;

use crate::quic::{Hello, QuicSubscription, Trust};
use crate::routing::RingView;
use crate::{connect_url, ClientError, Event, Frame, Subscription, Tls};

/// The transport a [`Follower`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Quic,
}

/// What a [`Follower`] is told to do.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// Nodes to start from (`http://…` / `https://…` base URLs); any will do.
    pub nodes: Vec<String>,
    pub key: String,
    /// Resume after this seq (of `epoch`, if known) rather than from the live end.
    pub since: Option<u64>,
    pub epoch: Option<String>,
    pub transport: Transport,
    /// Connect straight to the owner the ring names.
    pub direct: bool,
    /// The cluster's CA, for `https://`/`wss://` and QUIC (without it, QUIC pins the
    /// certificate digests the ring publishes).
    pub tls: Option<Tls>,
    /// A ticket, when the cluster checks them (the `resume` token replaces it once
    /// welcomed).
    pub ticket: Option<String>,
    /// The back-off's first ceiling and its cap.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl FollowConfig {
    /// Following `key` over WebSocket from `nodes`, with the default back-off
    /// (100 ms doubling to 5 s).
    pub fn new(nodes: Vec<String>, key: &str) -> FollowConfig {
        FollowConfig {
            nodes,
            key: key.to_owned(),
            since: None,
            epoch: None,
            transport: Transport::WebSocket,
            direct: false,
            tls: None,
            ticket: None,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
        }
    }
}

/// What a [`Follower`] reports.
#[derive(Clone, Debug, PartialEq)]
pub enum FollowEvent {
    /// Welcomed by `node` (after `redirects` redirects).
    Connected { node: String, redirects: usize },
    /// An update, in seq order, never twice.
    Update(Frame),
    /// The key's history was lost (its owner and successor both died): what follows
    /// starts from `seq` of a new epoch.
    Reset(Frame),
    /// A presence frame.
    Presence(Frame),
    /// The connection ended; the follower reconnects after `retry_in`.
    Disconnected {
        code: u16,
        reason: String,
        retry_in: Duration,
    },
}

enum Conn {
    Ws(Box<Subscription>),
    Quic(Box<QuicSubscription>),
}

impl Conn {
    async fn next(&mut self) -> Result<Event, ClientError> {
        match self {
            Conn::Ws(sub) => sub.next().await,
            Conn::Quic(sub) => sub.next().await,
        }
    }
}

/// A subscription that survives node restarts, drains and deaths (see the module).
pub struct Follower {
    config: FollowConfig,
    conn: Option<Conn>,
    /// The last seq seen, and its epoch.
    seq: Option<u64>,
    epoch: Option<String>,
    resume: Option<String>,
    ring: Option<RingView>,
    /// Where the last redirect pointed (a WebSocket URL, or a QUIC address).
    redirect: Option<String>,
    /// The pause before the next attempt, reset once welcomed.
    backoff: Backoff,
    /// The next node of `nodes` to try.
    next_node: usize,
    /// What to wait before the next attempt.
    wait: Duration,
}

impl Follower {
    pub fn new(config: FollowConfig) -> Follower {
        Follower {
            backoff: Backoff::full_jitter(config.backoff_base, config.backoff_cap),
            seq: config.since,
            epoch: config.epoch.clone(),
            config,
            conn: None,
            resume: None,
            ring: None,
            redirect: None,
            next_node: 0,
            wait: Duration::ZERO,
        }
    }

    /// The last seq seen (or resumed from) and its epoch.
    pub fn position(&self) -> (Option<u64>, Option<&str>) {
        (self.seq, self.epoch.as_deref())
    }

    /// The next event; an `Err` only for what retrying cannot fix.
    pub async fn next(&mut self) -> Result<FollowEvent, ClientError> {
        loop {
            let Some(conn) = &mut self.conn else {
                if !self.wait.is_zero() {
                    tokio::time::sleep(std::mem::take(&mut self.wait)).await;
                }
                match self.connect().await {
                    Ok(event) => return Ok(event),
                    Err(e @ ClientError::Closed { code, .. }) if final_code(code) => return Err(e),
                    Err(e) => return Ok(self.lost(1006, &e.to_string())),
                }
            };
            let event = match conn.next().await {
                Ok(event) => event,
                Err(e) => return Ok(self.lost(1006, &e.to_string())),
            };
            match event {
                Event::Frame(update @ Frame::Update { .. }) => {
                    let Frame::Update { seq, .. } = &update else {
                        unreachable!()
                    };
                    // Nothing twice: a frame at or before our position is dropped.
                    if self.seq.is_some_and(|at| *seq <= at) {
                        continue;
                    }
                    self.seq = Some(*seq);
                    return Ok(FollowEvent::Update(update));
                }
                Event::Frame(reset @ Frame::Reset { .. }) => {
                    if let Frame::Reset { epoch, seq, .. } = &reset {
                        self.epoch = Some(epoch.clone());
                        self.seq = Some(*seq);
                    }
                    return Ok(FollowEvent::Reset(reset));
                }
                Event::Frame(presence @ Frame::Presence { .. }) => {
                    return Ok(FollowEvent::Presence(presence))
                }
                Event::Frame(Frame::Redirect { url, quic, .. }) => {
                    self.redirect = match self.config.transport {
                        Transport::WebSocket => Some(url),
                        Transport::Quic => quic,
                    };
                    self.ring = None;
                }
                Event::Frame(_) | Event::Unreadable { .. } => {}
                Event::Closed { code, reason } => {
                    if final_code(code) {
                        self.conn = None;
                        return Err(ClientError::Closed { code, reason });
                    }
                    return Ok(self.lost(code, &reason));
                }
            }
        }
    }

    /// The follower as a `Stream` of events, ending after the first final error.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<FollowEvent, ClientError>> + Send {
        futures_util::stream::unfold(Some(self), |follower| async move {
            let mut follower = follower?;
            match follower.next().await {
                Ok(event) => Some((Ok(event), Some(follower))),
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    /// Records a lost connection and decides when to try again.
    fn lost(&mut self, code: u16, reason: &str) -> FollowEvent {
        self.conn = None;
        self.wait = match code {
            // Moved: follow the redirect at once.
            4300 if self.redirect.is_some() => Duration::ZERO,
            4429 => advised(reason).unwrap_or_else(|| self.backoff()),
            4408 | 1008 => Duration::from_secs(1).max(self.backoff()),
            _ => {
                // Ask another node, with a fresh ring.
                self.redirect = None;
                self.ring = None;
                self.next_node += 1;
                self.backoff()
            }
        };
        FollowEvent::Disconnected {
            code,
            reason: reason.to_owned(),
            retry_in: self.wait,
        }
    }

    /// Full jitter: a uniform pause below `min(cap, base × 2^attempt)`.
    fn backoff(&mut self) -> Duration {
        self.backoff.next_pause()
    }

    /// One connection attempt: `Connected`, or the error that stopped it.
    async fn connect(&mut self) -> Result<FollowEvent, ClientError> {
        let base = self.config.nodes[self.next_node % self.config.nodes.len().max(1)].clone();
        if self.ring.is_none() && (self.config.direct || self.config.transport == Transport::Quic) {
            self.ring = Some(RingView::fetch(&base, self.config.tls.as_ref()).await?);
        }
        let owner = self
            .config
            .direct
            .then(|| self.ring.as_ref()?.owner(&self.config.key).cloned())
            .flatten();
        let redirect = self.redirect.take();
        let conn = match self.config.transport {
            Transport::WebSocket => {
                let target = redirect.unwrap_or_else(|| {
                    let base = owner.as_ref().map_or(base.as_str(), |m| m.http.as_str());
                    self.ws_url(base)
                });
                let sub = Subscription::connect_with(&target, self.config.tls.as_ref()).await?;
                Conn::Ws(Box::new(sub))
            }
            Transport::Quic => {
                let ring = self.ring.as_ref().expect("fetched above");
                let target = match redirect.or_else(|| owner.as_ref()?.quic.clone()) {
                    Some(target) => target,
                    None => ring
                        .ring
                        .members()
                        .iter()
                        .find(|m| m.http.trim_end_matches('/') == base.trim_end_matches('/'))
                        .and_then(|m| m.quic.clone())
                        .ok_or_else(|| ClientError::Url(format!("{base} serves no QUIC")))?,
                };
                let trust = match &self.config.tls {
                    Some(tls) => Trust::Ca(tls.clone()),
                    None => Trust::pins_of(ring),
                };
                let hello = Hello {
                    key: self.config.key.clone(),
                    since: self.seq,
                    epoch: self.epoch.clone(),
                    ticket: self.config.ticket.clone().filter(|_| self.resume.is_none()),
                    resume: self.resume.clone(),
                    ..Hello::default()
                };
                Conn::Quic(Box::new(
                    QuicSubscription::connect(&target, &hello, &trust).await?,
                ))
            }
        };
        let (welcome, redirects) = match &conn {
            Conn::Ws(sub) => (&sub.welcome, sub.redirects),
            Conn::Quic(sub) => (&sub.welcome, sub.redirects),
        };
        let Frame::Welcome {
            node,
            epoch,
            seq,
            resume,
            ..
        } = welcome
        else {
            return Err(ClientError::Unexpected("no welcome".into()));
        };
        let node = node.clone();
        // A first connection starts at the live end; a resumed one where it was.
        if self.seq.is_none() || self.epoch.as_deref() != Some(epoch.as_str()) {
            if self.seq.is_none() {
                self.seq = Some(*seq);
            }
            self.epoch = Some(epoch.clone());
        }
        if resume.is_some() {
            self.resume = resume.clone();
        }
        self.backoff.reset();
        self.conn = Some(conn);
        Ok(FollowEvent::Connected { node, redirects })
    }

    /// The WebSocket URL of the key on the node at `base`, resuming where we are.
    fn ws_url(&self, base: &str) -> String {
        let since = self.seq.map(|seq| (seq, self.epoch.as_deref()));
        let mut url = connect_url(base, &self.config.key, since);
        let credential = match (&self.resume, &self.config.ticket) {
            (Some(resume), _) => Some(("resume", resume)),
            (None, Some(ticket)) => Some(("ticket", ticket)),
            _ => None,
        };
        if let Some((name, value)) = credential {
            let value: String = form_urlencoded_byte(value);
            url.push_str(&format!("&{name}={value}"));
        }
        url
    }
}

/// Percent-encodes what a query value must not carry as is.
fn form_urlencoded_byte(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Close codes after which the same request would fail again.
fn final_code(code: u16) -> bool {
    matches!(code, 4400 | 4401 | 4413)
}

/// The delay a 4429's reason advises (`retry_after_ms=N`).
fn advised(reason: &str) -> Option<Duration> {
    let at = reason.find("retry_after_ms=")? + "retry_after_ms=".len();
    let digits: String = reason[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_below_a_doubling_capped_ceiling() {
        let mut f = Follower::new(FollowConfig::new(vec!["http://x".into()], "k:1"));
        for attempt in 0..20u32 {
            let pause = f.backoff();
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(5));
            assert!(pause < ceiling.max(Duration::from_millis(1)), "{pause:?}");
        }
        assert_eq!(
            advised("retry_after_ms=250"),
            Some(Duration::from_millis(250))
        );
        assert!(final_code(4401) && !final_code(4503));
    }

    #[test]
    fn a_redirect_is_followed_at_once_and_a_4503_asks_another_node() {
        let mut f = Follower::new(FollowConfig::new(
            vec!["http://a".into(), "http://b".into()],
            "k:1",
        ));
        f.redirect = Some("ws://b/v1/connect?key=k%3A1".into());
        assert!(
            matches!(f.lost(4300, "moved"), FollowEvent::Disconnected { retry_in, .. } if retry_in.is_zero())
        );
        f.lost(4503, "draining");
        assert_eq!(f.next_node, 1);
        assert!(f.redirect.is_none());
    }
}
