//! The query parameters of the client endpoints (`/v1/connect`, `/v1/sse`, `/v1/poll`,
//! `/v1/route`). A malformed value is refused with a message that names it.

use std::sync::Arc;

use super::epoch::valid_epoch;

/// The longest `wait` of a long poll, in seconds.
pub const MAX_WAIT_S: u64 = 60;
/// `wait` when a long poll gives none.
pub const DEFAULT_WAIT_S: u64 = 25;

/// Where a client wants to continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    /// `None`: read `since` in the current epoch.
    pub epoch: Option<String>,
}

/// What a client asked for.
#[derive(Debug, Clone, Default)]
pub struct ClientQuery {
    /// `ticket`: what the client presents for the key when authentication is on.
    pub ticket: Option<String>,
    /// `resume`: the token a `welcome` handed back, presented instead of a ticket.
    pub resume_token: Option<String>,
    /// Not validated yet: transports answer a bad key in their own way.
    pub key: Option<String>,
    pub since: Option<u64>,
    pub epoch: Option<String>,
    /// The ring version of the node that redirected the client here.
    pub rv: Option<u64>,
    pub presence: bool,
    pub wait: Option<u64>,
    /// The raw query, to build redirects from.
    pub raw: Arc<str>,
}

impl ClientQuery {
    /// Parses `query`; the error names the parameter.
    pub fn parse(query: Option<&str>) -> Result<ClientQuery, String> {
        let raw = query.unwrap_or("");
        let mut q = ClientQuery {
            raw: Arc::from(raw),
            ..ClientQuery::default()
        };
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            match &*k {
                "key" => q.key = Some(v.into_owned()),
                "since" => q.since = Some(number("since", &v)?),
                "rv" => q.rv = Some(number("rv", &v)?),
                "wait" => {
                    let wait = number("wait", &v)?;
                    if wait > MAX_WAIT_S {
                        return Err(format!("invalid wait {wait}: at most {MAX_WAIT_S} seconds"));
                    }
                    q.wait = Some(wait);
                }
                "epoch" => {
                    if !valid_epoch(&v) {
                        return Err(format!(
                            "invalid epoch {v:?}: 1–64 characters of A-Z a-z 0-9 - _"
                        ));
                    }
                    q.epoch = Some(v.into_owned());
                }
                "ticket" => q.ticket = Some(v.into_owned()),
                "resume" => q.resume_token = Some(v.into_owned()),
                "presence" => {
                    q.presence = match &*v {
                        "1" | "true" => true,
                        "0" | "false" | "" => false,
                        other => return Err(format!("invalid presence {other:?}: 1 or 0")),
                    }
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// Parses a QUIC client's `hello` frame (docs/protocol.md *QUIC*): the same fields
    /// as the WebSocket query, as JSON — `key`, `since`, `epoch`, `ticket`, `resume`,
    /// `presence`, `rv` — checked as the query is. The raw query redirects are built
    /// from is made from them.
    pub fn from_hello(frame: &[u8]) -> Result<ClientQuery, String> {
        #[derive(serde::Deserialize)]
        struct Hello {
            #[serde(rename = "type")]
            kind: String,
            key: Option<String>,
            since: Option<u64>,
            epoch: Option<String>,
            ticket: Option<String>,
            resume: Option<String>,
            presence: Option<bool>,
            rv: Option<u64>,
        }
        let hello: Hello =
            serde_json::from_slice(frame).map_err(|e| format!("invalid hello frame: {e}"))?;
        if hello.kind != "hello" {
            return Err(format!(
                "the first frame must be a hello, not {:?}",
                hello.kind
            ));
        }
        let mut raw = form_urlencoded::Serializer::new(String::new());
        let mut pair = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                raw.append_pair(name, &value);
            }
        };
        pair("key", hello.key);
        pair("since", hello.since.map(|s| s.to_string()));
        pair("epoch", hello.epoch);
        pair("ticket", hello.ticket);
        pair("resume", hello.resume);
        pair(
            "presence",
            hello.presence.filter(|p| *p).map(|_| "1".into()),
        );
        pair("rv", hello.rv.map(|v| v.to_string()));
        let raw = raw.finish();
        ClientQuery::parse(Some(&raw))
    }

    /// What the client presents for its key: its resume token, else its ticket.
    pub fn credential(&self) -> Option<&str> {
        self.resume_token.as_deref().or(self.ticket.as_deref())
    }

    /// Where the client continues from, if it said.
    pub fn resume(&self) -> Option<Resume> {
        self.since.map(|since| Resume {
            since,
            epoch: self.epoch.clone(),
        })
    }
}

/// Parses a `Last-Event-ID` (`{epoch}:{seq}`).
pub fn last_event_id(value: &str) -> Result<Resume, String> {
    let (epoch, seq) = value
        .split_once(':')
        .ok_or_else(|| format!("invalid Last-Event-ID {value:?}: expected epoch:seq"))?;
    if !valid_epoch(epoch) {
        return Err(format!("invalid Last-Event-ID {value:?}: bad epoch"));
    }
    Ok(Resume {
        since: number("Last-Event-ID seq", seq)?,
        epoch: Some(epoch.to_owned()),
    })
}

fn number(name: &str, value: &str) -> Result<u64, String> {
    // Digits only: `parse` would also take a leading `+`.
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| value.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| format!("invalid {name} {value:?}: expected a non-negative integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_frames_read_as_queries() {
        let q = ClientQuery::from_hello(
            br#"{"type":"hello","key":"user:1","since":4,"epoch":"e1","presence":true,"x":1}"#,
        )
        .unwrap();
        assert_eq!(q.key.as_deref(), Some("user:1"));
        assert_eq!(q.since, Some(4));
        assert!(q.presence);
        assert_eq!(&*q.raw, "key=user%3A1&since=4&epoch=e1&presence=1");
        for bad in [
            &br#"{"type":"ping"}"#[..],
            br#"{"key":"user:1"}"#,
            br#"{"type":"hello","epoch":"no spaces"}"#,
            br#"{"type":"hello","since":-1}"#,
            b"not json",
        ] {
            assert!(ClientQuery::from_hello(bad).is_err());
        }
    }

    #[test]
    fn parses_and_names_bad_values() {
        let q = ClientQuery::parse(Some(
            "key=user%3A1&since=4&epoch=Ab-_9&rv=7&presence=1&wait=0",
        ))
        .unwrap();
        assert_eq!(q.key.as_deref(), Some("user:1"));
        assert_eq!(
            (q.since, q.rv, q.wait, q.presence),
            (Some(4), Some(7), Some(0), true)
        );
        assert_eq!(
            q.resume(),
            Some(Resume {
                since: 4,
                epoch: Some("Ab-_9".into())
            })
        );
        for (bad, name) in [
            ("since=-1", "since"),
            ("since=x", "since"),
            ("epoch=a:b", "epoch"),
            ("epoch=", "epoch"),
            ("wait=61", "wait"),
            ("wait=1.5", "wait"),
            ("rv=z", "rv"),
            ("presence=maybe", "presence"),
        ] {
            let e = ClientQuery::parse(Some(bad)).unwrap_err();
            assert!(e.contains(name), "{bad}: {e}");
        }
        assert!(ClientQuery::parse(None).unwrap().key.is_none());
    }

    #[test]
    fn last_event_ids() {
        assert_eq!(
            last_event_id("E1:42").unwrap(),
            Resume {
                since: 42,
                epoch: Some("E1".into())
            }
        );
        assert!(last_event_id("42").is_err());
        assert!(last_event_id("E1:x").is_err());
        assert!(last_event_id(":4").is_err());
    }
}
