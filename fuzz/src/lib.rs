//! What the fuzz targets share: the fixed ticket secret, the small limits the key state
//! is fuzzed under (so trimming and eviction happen within a few inputs), a model of a
//! key's log that reads are checked against, and JSON comparison.
//!
//! The model says what docs/protocol.md and the key state's doc comments promise, in
//! `u128` arithmetic so the harness itself cannot overflow where the node might.

use std::collections::VecDeque;

use ringfeed_node::protocol::params::Resume;
use ringfeed_node::protocol::ticket::Signer;
use ringfeed_node::state::{KeySnapshot, KeyTable, Limits, ResetReason};
use serde_json::Value;

/// The ticket secret of every ticket target (and of the seed corpus): 32 bytes.
pub const SECRET: &[u8; 32] = b"ringfeed-fuzz-secret-0123456789!";
/// Another cluster's secret (no seed is signed with it).
pub const OTHER_SECRET: &[u8; 32] = b"another-cluster-secret-987654321";
/// "Now" for ticket checks, in seconds since the Unix epoch (2027-01-15).
pub const NOW: u64 = 1_800_000_000;
/// The key the seed tickets are for.
pub const TICKET_KEY: &str = "user:42";

pub fn signer() -> Signer {
    Signer::new(&[SECRET]).expect("a 32-byte secret")
}

/// Limits small enough that a fuzz input reaches every trimming path.
pub fn limits() -> Limits {
    Limits {
        max_payload: 1024,
        max_json_depth: 16,
        max_subscribers: 16,
        history_len: 6,
        history_bytes: 1024,
        // Past `Idempotency::FEW` (8), so both the scan and the index are used.
        idempotency_window: 10,
        max_doc_update: 2048,
    }
}

/// Whether two JSON values are equal, numbers compared as f64 within a few ulps
/// (serde_json's default float parsing is not always correctly rounded, so a float
/// written and read back may move by one ulp).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// A key's shown state as the docs describe it: its epoch, the seq subscribers have
/// seen, the buffered history (consecutive seqs, oldest first, trimmed to the limits)
/// and the idempotency window (oldest first).
#[derive(Debug, Clone)]
pub struct KeyModel {
    pub epoch: String,
    pub seq: u128,
    pub log: VecDeque<(u128, String)>,
    log_bytes: u128,
    pub window: VecDeque<(String, u64, u64)>,
}

impl KeyModel {
    /// A key that was never published to, in `epoch`.
    pub fn fresh(epoch: String) -> KeyModel {
        KeyModel {
            epoch,
            seq: 0,
            log: VecDeque::new(),
            log_bytes: 0,
            window: VecDeque::new(),
        }
    }

    /// A key rebuilt by its new owner from `snapshot` (a hand-off or a promoted
    /// replica): same epoch; the entries up to the first gap in their seqs; with no
    /// entry, the snapshot's seq; then the idempotency records at or below that seq.
    pub fn restored(snapshot: &KeySnapshot, limits: &Limits) -> KeyModel {
        let mut model = KeyModel::fresh(snapshot.epoch.clone());
        let mut expected: Option<u128> = None;
        for e in &snapshot.entries {
            let seq = u128::from(e.seq);
            if expected.is_some_and(|x| x != seq) {
                break;
            }
            model.append(seq, e.frame.as_str().to_owned(), limits);
            model.seq = seq;
            expected = Some(seq + 1);
        }
        if expected.is_none() {
            model.seq = u128::from(snapshot.seq);
        }
        for (id, seq, digest) in &snapshot.idempotency {
            if u128::from(*seq) <= model.seq && model.remembered(id).is_none() {
                model.remember(id.clone(), *seq, *digest, limits.idempotency_window);
            }
        }
        model
    }

    /// A new update shown at `seq` (`frame` as the node wrote it).
    pub fn append(&mut self, seq: u128, frame: String, limits: &Limits) {
        self.log_bytes += frame.len() as u128;
        self.log.push_back((seq, frame));
        while self.log.len() > limits.history_len
            || (self.log_bytes > limits.history_bytes as u128 && self.log.len() > 1)
        {
            let (_, old) = self.log.pop_front().expect("not empty");
            self.log_bytes -= old.len() as u128;
        }
    }

    /// The seq and digest the window remembers for `id` (its newest record).
    pub fn remembered(&self, id: &str) -> Option<(u64, u64)> {
        self.window
            .iter()
            .rev()
            .find(|(k, ..)| k == id)
            .map(|&(_, seq, digest)| (seq, digest))
    }

    pub fn remember(&mut self, id: String, seq: u64, digest: u64, window: usize) {
        self.window.push_back((id, seq, digest));
        while self.window.len() > window {
            self.window.pop_front();
        }
    }

    /// Checks that `table` holds `key` as this model says, and that reads from every
    /// interesting point give what the protocol promises: a reset when the epoch is
    /// another or `since` is ahead; a `history_gap` reset to just before the oldest
    /// buffered update when `since` is older; then the updates after it, in order, at
    /// most `max`, and the position they lead to.
    pub fn check_reads(&self, table: &KeyTable, key: &str) {
        let (epoch, seq) = table
            .held_position(key)
            .unwrap_or_else(|| panic!("{key:?} is not held"));
        assert_eq!(epoch, self.epoch, "{key:?}: epoch");
        assert_eq!(u128::from(seq), self.seq, "{key:?}: seq");
        let first = self.log.front().map_or(self.seq + 1, |(s, _)| *s);
        let mut sinces = vec![0u128, 1, self.seq, self.seq + 1, u128::from(u64::MAX)];
        sinces.extend([self.seq.saturating_sub(1), first.saturating_sub(1), first]);
        sinces.extend([first + 1, (first + self.seq) / 2]);
        sinces.retain(|s| *s <= u128::from(u64::MAX));
        sinces.sort_unstable();
        sinces.dedup();
        for since in sinces {
            let since = since as u64;
            for epoch in [
                None,
                Some(self.epoch.clone()),
                Some(format!("{}x", self.epoch)),
            ] {
                for max in [usize::MAX, 2] {
                    let resume = Resume {
                        since,
                        epoch: epoch.clone(),
                    };
                    let (got, _changes) = table
                        .read(key, &resume, max)
                        .unwrap_or_else(|| panic!("{key:?}: read refused"));
                    let want = self.catchup(&resume, max);
                    let ctx = || format!("{key:?} read at {resume:?} max {max}: model {self:?}");
                    assert_eq!(got.epoch, self.epoch, "{}", ctx());
                    assert_eq!(u128::from(got.seq), self.seq, "{}", ctx());
                    assert_eq!(
                        got.reset.map(|r| (r.reason, u128::from(r.seq))),
                        want.reset,
                        "{}",
                        ctx()
                    );
                    let frames: Vec<&str> = got.updates.iter().map(|u| u.as_str()).collect();
                    assert_eq!(frames, want.updates, "{}", ctx());
                    assert_eq!(u128::from(got.position), want.position, "{}", ctx());
                }
            }
        }
    }

    fn catchup(&self, resume: &Resume, max: usize) -> Catchup<'_> {
        let mut out = Catchup {
            reset: None,
            updates: Vec::new(),
            position: self.seq,
        };
        if resume.epoch.as_ref().is_some_and(|e| *e != self.epoch) {
            out.reset = Some((ResetReason::EpochChanged, self.seq));
            return out;
        }
        let since = u128::from(resume.since);
        if since > self.seq {
            out.reset = Some((ResetReason::SeqAhead, self.seq));
            return out;
        }
        let first = self.log.front().map_or(self.seq + 1, |(s, _)| *s);
        let mut from = since;
        if from + 1 < first {
            out.reset = Some((ResetReason::HistoryGap, first - 1));
            from = first - 1;
        }
        out.updates = self
            .log
            .iter()
            .filter(|(s, _)| *s > from)
            .take(max)
            .map(|(_, f)| f.as_str())
            .collect();
        out.position = from + out.updates.len() as u128;
        out
    }
}

struct Catchup<'a> {
    reset: Option<(ResetReason, u128)>,
    updates: Vec<&'a str>,
    position: u128,
}

/// Checks what a replica (as [`Replicas::copy`](ringfeed_node::state::Replicas::copy)
/// gives it) must be whatever its owner sent: entries in strictly increasing seq order,
/// at most `history_len` of them, and within `history_bytes` unless a single one is
/// larger.
pub fn check_replica(key: &str, replica: &KeySnapshot, limits: &Limits) {
    let seqs: Vec<u64> = replica.entries.iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{key:?}: replica entries out of order: {seqs:?}"
    );
    assert!(
        seqs.len() <= limits.history_len,
        "{key:?}: {} entries held, limit {}",
        seqs.len(),
        limits.history_len
    );
    let bytes: usize = replica.entries.iter().map(|e| e.frame.len()).sum();
    assert!(
        bytes <= limits.history_bytes || seqs.len() == 1,
        "{key:?}: {bytes} bytes held in {} entries, limit {}",
        seqs.len(),
        limits.history_bytes
    );
    if let Some(last) = replica.entries.last() {
        assert_eq!(
            replica.seq, last.seq,
            "{key:?}: replica seq is its last entry's"
        );
    }
}

/// Checks that an update frame a peer's checks accepted for `seq` reads back that seq
/// the way the node reads it when it writes SSE event ids (`frames::update_seq`, which
/// expects the exact form `frames::update` writes).
pub fn check_accepted_frame(key: &str, seq: u64, frame: &[u8]) {
    let text = std::str::from_utf8(frame).expect("an accepted frame is UTF-8");
    assert_eq!(
        ringfeed_node::protocol::frames::update_seq(text),
        Some(seq),
        "{key:?}: a peer's frame for seq {seq} was accepted, but its seq does not read back: {text:?}"
    );
}
