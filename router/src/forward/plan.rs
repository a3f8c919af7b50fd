//! The forwarder's decisions, without IO: checking an item, grouping items per owner,
//! and reading what each owner answered into results, retries and the error that the
//! items still unanswered at the deadline get.

use std::collections::HashMap;
use std::time::Duration;

use rand::RngExt;
use ringfeed_proto::v1::{self as pb, deliver_result, publish_result};
use tonic::{Code, Status};

use super::ForwardConfig;
use crate::key;
use crate::ring::{Ring, RingId};

/// What each item of a group came to, in order, or why the call carrying it failed.
pub(super) type GroupResult = Result<Vec<pb::DeliverResult>, Status>;

/// Checks one item against the per-request limits and fills in its idempotency key.
pub(super) fn prepare(config: &ForwardConfig, item: &mut pb::PublishRequest) -> Result<(), Status> {
    key::validate(&item.key).map_err(|e| Status::invalid_argument(format!("invalid key: {e}")))?;
    if item.data.len() > config.max_payload {
        return Err(Status::invalid_argument(format!(
            "payload is {} bytes; the limit is {}",
            item.data.len(),
            config.max_payload
        )));
    }
    let bounded = [
        (
            "content_type",
            item.content_type.len(),
            key::MAX_CONTENT_TYPE,
        ),
        (
            "idempotency_key",
            item.idempotency_key.len(),
            key::MAX_IDEMPOTENCY_KEY,
        ),
        ("expected_epoch", item.expected_epoch.len(), key::MAX_EPOCH),
    ];
    for (field, len, max) in bounded {
        if len > max {
            return Err(Status::invalid_argument(format!(
                "{field} is {len} bytes; the limit is {max}"
            )));
        }
    }
    if item.idempotency_key.is_empty() {
        item.idempotency_key = new_idempotency_key();
    }
    Ok(())
}

/// The `pending` items grouped by their owner's gRPC address on `ring`, and those whose
/// key has no owner there.
pub(super) fn plan<'r>(
    ring: &'r Ring,
    items: &[pb::PublishRequest],
    pending: &[usize],
) -> (HashMap<&'r str, Vec<usize>>, Vec<usize>) {
    let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut unowned = Vec::new();
    for &i in pending {
        match ring.owner(&items[i].key) {
            Some(owner) => groups.entry(owner.grpc.as_str()).or_default().push(i),
            None => unowned.push(i),
        }
    }
    (groups, unowned)
}

/// Where one publish call stands between rounds: each item's result once it has one,
/// the items still to send, and what to tell their callers if the deadline ends first.
#[derive(Debug)]
pub(super) struct Outcome {
    results: Vec<Option<Result<pb::PublishReply, Status>>>,
    /// Items to send in the next round, in order.
    pub(super) pending: Vec<usize>,
    retry: Vec<usize>,
    last_error: String,
    /// Whether the last failure was an owner that took the call but did not answer in
    /// time (`DEADLINE_EXCEEDED` at the end) rather than no owner reachable
    /// (`UNAVAILABLE`), as docs/protocol.md tells the two apart.
    timed_out: bool,
    /// The newest ring an owner said it decided on: catch up with it first.
    pub(super) behind: Option<(u64, RingId)>,
    /// Whether this round failed in a way only time can fix: back off before the next.
    pub(super) transport_failure: bool,
}

impl Outcome {
    /// Checks every item ([`prepare`]); those that pass are pending.
    pub(super) fn new(items: &mut [pb::PublishRequest], config: &ForwardConfig) -> Outcome {
        let mut results = Vec::with_capacity(items.len());
        let mut pending = Vec::new();
        for (i, item) in items.iter_mut().enumerate() {
            match prepare(config, item) {
                Ok(()) => {
                    results.push(None);
                    pending.push(i);
                }
                Err(status) => results.push(Some(Err(status))),
            }
        }
        Outcome {
            results,
            pending,
            retry: Vec::new(),
            last_error: String::from("no owner reachable"),
            timed_out: false,
            behind: None,
            transport_failure: false,
        }
    }

    /// Starts a round in which `unowned` items found no owner on the ring.
    pub(super) fn begin_round(&mut self, unowned: Vec<usize>) {
        self.transport_failure = !unowned.is_empty();
        if !unowned.is_empty() {
            self.last_error = "the ring has no active members".into();
            self.timed_out = false;
        }
        self.retry = unowned;
    }

    /// Reads the answer of the owner at `grpc` for the items at `indices`, sent on
    /// the ring `ring_id`.
    pub(super) fn absorb(
        &mut self,
        ring_id: &str,
        grpc: &str,
        indices: Vec<usize>,
        reply: GroupResult,
    ) {
        match reply {
            Ok(answered) if answered.len() == indices.len() => {
                for (i, result) in indices.into_iter().zip(answered) {
                    self.absorb_item(ring_id, i, result);
                }
            }
            Ok(_) => {
                for i in indices {
                    self.results[i] = Some(Err(Status::internal(
                        "node answered a different number of items",
                    )));
                }
            }
            Err(status) if retryable(&status) => {
                tracing::debug!(node = %grpc, %status, "deliver failed; will retry");
                self.timed_out = status.code() == Code::DeadlineExceeded;
                self.last_error = if self.timed_out {
                    format!("owner {grpc} did not answer in time: {}", status.message())
                } else {
                    format!("owner {grpc} unreachable: {}", status.message())
                };
                self.transport_failure = true;
                self.retry.extend(indices);
            }
            Err(status) => {
                for i in indices {
                    self.results[i] = Some(Err(status.clone()));
                }
            }
        }
    }

    fn absorb_item(&mut self, ring_id: &str, i: usize, result: pb::DeliverResult) {
        match result.result {
            Some(deliver_result::Result::Ok(ok)) => self.results[i] = Some(Ok(ok)),
            // The node asks for a retry (the key is moving, or the same update is still
            // in flight): same item, same idempotency key, until the deadline.
            Some(deliver_result::Result::Error(e)) if e.code == Code::Unavailable as u32 => {
                self.last_error = e.message;
                self.timed_out = false;
                self.transport_failure = true;
                self.retry.push(i);
            }
            Some(deliver_result::Result::Error(e)) => self.results[i] = Some(Err(error_status(e))),
            Some(deliver_result::Result::NotOwner(r)) => {
                // Decided on our own ring: nothing to catch up with, so back off
                // before the next try.
                if r.ring_id == ring_id {
                    self.transport_failure = true;
                }
                note_behind(&mut self.behind, r);
                self.retry.push(i);
            }
            None => self.results[i] = Some(Err(Status::internal("node sent an empty result"))),
        }
    }

    /// Ends a round: what is to be retried is pending, in order.
    pub(super) fn end_round(&mut self) {
        self.retry.sort_unstable();
        self.pending = std::mem::take(&mut self.retry);
    }

    /// Every item's result, in order; those still pending fail with the last error.
    pub(super) fn finish(mut self) -> Vec<Result<pb::PublishReply, Status>> {
        let code = if self.timed_out {
            Code::DeadlineExceeded
        } else {
            Code::Unavailable
        };
        for &i in &self.pending {
            self.results[i] = Some(Err(Status::new(
                code,
                format!("{} before the deadline", self.last_error),
            )));
        }
        self.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Status::internal("item left unanswered"))))
            .collect()
    }
}

/// Keeps in `behind` the newest of the rings owners said they decided on.
pub(super) fn note_behind(behind: &mut Option<(u64, RingId)>, ring: pb::RingRef) {
    if behind.as_ref().is_none_or(|(v, _)| ring.ring_version > *v) {
        *behind = Some((ring.ring_version, RingId(ring.ring_id)));
    }
}

/// Whether a failed call may succeed on another try (or another owner).
pub(super) fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// The `Status` of a per-item error a node sent.
pub fn error_status(e: pb::Error) -> Status {
    Status::new(Code::from(i32::try_from(e.code).unwrap_or(2)), e.message)
}

/// The per-item error of a `Status`, for `PublishBatch`.
pub fn status_error(status: &Status) -> pb::Error {
    pb::Error {
        code: status.code() as u32,
        message: status.message().to_owned(),
    }
}

/// A `PublishResult` from an item's outcome.
pub fn publish_result(result: Result<pb::PublishReply, Status>) -> pb::PublishResult {
    pb::PublishResult {
        result: Some(match result {
            Ok(reply) => publish_result::Result::Ok(reply),
            Err(status) => publish_result::Result::Error(status_error(&status)),
        }),
    }
}

/// A random idempotency key for callers that gave none: `r-` and 32 hex digits.
fn new_idempotency_key() -> String {
    format!("r-{:032x}", rand::rng().random::<u128>())
}

/// Parses a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    #[test]
    fn generated_idempotency_keys_differ() {
        assert_ne!(new_idempotency_key(), new_idempotency_key());
    }

    fn member(id: &str) -> crate::ring::Member {
        super::super::testing::member(id, &format!("{id}:1"))
    }

    fn item(key: &str) -> pb::PublishRequest {
        pb::PublishRequest {
            key: key.into(),
            ..Default::default()
        }
    }

    fn ok(seq: u64) -> pb::DeliverResult {
        pb::DeliverResult {
            result: Some(deliver_result::Result::Ok(pb::PublishReply {
                seq,
                ..Default::default()
            })),
        }
    }

    fn error(code: Code) -> pb::DeliverResult {
        pb::DeliverResult {
            result: Some(deliver_result::Result::Error(pb::Error {
                code: code as u32,
                message: format!("{code:?}"),
            })),
        }
    }

    fn not_owner(version: u64, id: &str) -> pb::DeliverResult {
        pb::DeliverResult {
            result: Some(deliver_result::Result::NotOwner(pb::RingRef {
                ring_version: version,
                ring_id: id.into(),
            })),
        }
    }

    #[test]
    fn bad_items_are_answered_at_once_and_the_rest_get_idempotency_keys() {
        let config = ForwardConfig::default();
        let mut items = vec![item("user:1"), item("bad key"), item("user:2")];
        items[2].content_type = "x".repeat(key::MAX_CONTENT_TYPE + 1);
        let outcome = Outcome::new(&mut items, &config);
        assert_eq!(outcome.pending, [0]);
        assert!(items[0].idempotency_key.starts_with("r-"));
        let results = outcome.finish();
        assert_eq!(
            results[1].as_ref().unwrap_err().code(),
            Code::InvalidArgument
        );
        assert!(results[2]
            .as_ref()
            .unwrap_err()
            .message()
            .contains("content_type"));
        // Still pending at the end: no owner was reachable.
        assert_eq!(results[0].as_ref().unwrap_err().code(), Code::Unavailable);
    }

    #[test]
    fn items_are_grouped_by_owner_and_an_empty_ring_owns_nothing() {
        let ring = Ring::new(["n1", "n2", "n3"].map(member));
        let items: Vec<_> = (0..50).map(|i| item(&format!("k{i}"))).collect();
        let pending: Vec<usize> = (0..50).collect();
        let (groups, unowned) = plan(&ring, &items, &pending);
        assert!(unowned.is_empty());
        assert_eq!(groups.values().map(Vec::len).sum::<usize>(), 50);
        for (grpc, indices) in &groups {
            for &i in indices {
                assert_eq!(ring.owner(&items[i].key).unwrap().grpc, *grpc);
            }
        }
        let empty = Ring::empty();
        let (groups, unowned) = plan(&empty, &items, &pending);
        assert!(groups.is_empty());
        assert_eq!(unowned.len(), 50);
    }

    #[test]
    fn each_answer_is_classified_into_a_result_or_a_retry() {
        let config = ForwardConfig::default();
        let mut items: Vec<_> = (0..6).map(|i| item(&format!("k{i}"))).collect();
        let mut outcome = Outcome::new(&mut items, &config);
        outcome.begin_round(Vec::new());
        let answers = vec![
            ok(7),
            error(Code::Unavailable),
            error(Code::FailedPrecondition),
            not_owner(9, "other"),
            not_owner(4, "mine"),
        ];
        outcome.absorb("mine", "n1:1", vec![0, 1, 2, 3, 4], Ok(answers));
        outcome.absorb("mine", "n2:1", vec![5], Err(Status::unavailable("refused")));
        outcome.end_round();
        assert_eq!(outcome.pending, [1, 3, 4, 5]);
        assert!(outcome.transport_failure);
        // The newest ring an owner named is the one to catch up with.
        assert_eq!(outcome.behind, Some((9, RingId("other".into()))));
        let results = outcome.finish();
        assert_eq!(results[0].as_ref().unwrap().seq, 7);
        assert_eq!(
            results[2].as_ref().unwrap_err().code(),
            Code::FailedPrecondition
        );
        assert!(results[5]
            .as_ref()
            .unwrap_err()
            .message()
            .contains("unreachable"));
    }

    #[test]
    fn an_owner_that_did_not_answer_in_time_reads_as_a_deadline_not_unavailable() {
        let config = ForwardConfig::default();
        let mut items = vec![item("k")];
        let mut outcome = Outcome::new(&mut items, &config);
        outcome.begin_round(Vec::new());
        outcome.absorb("r", "n1:1", vec![0], Err(Status::deadline_exceeded("slow")));
        outcome.end_round();
        let results = outcome.finish();
        assert_eq!(
            results[0].as_ref().unwrap_err().code(),
            Code::DeadlineExceeded
        );
    }

    #[test]
    fn a_miscounted_answer_or_a_final_error_is_not_retried() {
        let config = ForwardConfig::default();
        let mut items = vec![item("a"), item("b"), item("c")];
        let mut outcome = Outcome::new(&mut items, &config);
        outcome.begin_round(Vec::new());
        outcome.absorb("r", "n1:1", vec![0, 1], Ok(vec![ok(1)]));
        outcome.absorb("r", "n2:1", vec![2], Err(Status::permission_denied("no")));
        outcome.end_round();
        assert!(outcome.pending.is_empty());
        assert!(!outcome.transport_failure);
        let results = outcome.finish();
        assert_eq!(results[0].as_ref().unwrap_err().code(), Code::Internal);
        assert_eq!(
            results[2].as_ref().unwrap_err().code(),
            Code::PermissionDenied
        );
    }
}
