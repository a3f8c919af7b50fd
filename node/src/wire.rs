//! One mapping from each refusal to its form on every transport, so WebSocket, SSE,
//! long polling and gRPC tell a client the same thing (docs/protocol.md lists them):
//! the HTTP status (SSE, long poll, a refused upgrade), the WebSocket close code (a
//! refused subscription) or `nack` code (a refused `publish` frame), and the gRPC code
//! (`Deliver`, for the router to pass on).

use http::StatusCode;
use tonic::Code;

use crate::cluster::replication::PublishError;
use crate::node::AdmitError;
use crate::protocol::close::CloseCode;
use crate::protocol::ticket::AuthError;
use crate::protocol::ticket::TicketError;
use crate::state::{ApplyError, SubscribeError};
use ringfeed_router::api_token::TokenError;

/// A refusal on each transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub http: StatusCode,
    pub close: CloseCode,
    pub nack: &'static str,
    pub grpc: Code,
}

impl Wire {
    /// Whether a client should try again later (503 and 4429 carry the delay).
    pub fn retry_later(&self) -> bool {
        self.http == StatusCode::SERVICE_UNAVAILABLE
            || self.close == CloseCode::TooMany
            || self.grpc == Code::Unavailable
    }
}

/// How an error is told to a client.
pub trait ToWire: std::fmt::Display {
    fn wire(&self) -> Wire;

    /// The delay advised when the refusal is for now only.
    fn retry_after(&self) -> std::time::Duration {
        RETRY_AFTER
    }

    /// The reason a WebSocket close carries: the advised delay for 4429, else the
    /// error itself.
    fn close_reason(&self) -> String {
        match self.wire().close {
            CloseCode::TooMany => format!("retry_after_ms={}", self.retry_after().as_millis()),
            _ => self.to_string(),
        }
    }
}

/// Too many failed authentications from the client's address: 429 / 4429 /
/// `RESOURCE_EXHAUSTED`, with the delay until it may try again.
const THROTTLED: Wire = wire(
    StatusCode::TOO_MANY_REQUESTS,
    CloseCode::TooMany,
    "resource_exhausted",
    Code::ResourceExhausted,
);

/// The delay advised with a refusal to retry later.
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

const fn wire(http: StatusCode, close: CloseCode, nack: &'static str, grpc: Code) -> Wire {
    Wire {
        http,
        close,
        nack,
        grpc,
    }
}

/// The node is busy: retry later (on this node, or after asking `/v1/route`).
const BUSY: Wire = wire(
    StatusCode::SERVICE_UNAVAILABLE,
    CloseCode::TooMany,
    "resource_exhausted",
    Code::ResourceExhausted,
);

/// The key is in flight between owners, or this node cannot take it now: retry.
const MOVING: Wire = wire(
    StatusCode::SERVICE_UNAVAILABLE,
    CloseCode::Unavailable,
    "retry",
    Code::Unavailable,
);

/// No valid ticket, or no valid API token: 401 / 4401 / `UNAUTHENTICATED`.
const UNAUTHORIZED: Wire = wire(
    StatusCode::UNAUTHORIZED,
    CloseCode::Unauthorized,
    "unauthorized",
    Code::Unauthenticated,
);

impl ToWire for TicketError {
    fn wire(&self) -> Wire {
        UNAUTHORIZED
    }
}

impl ToWire for TokenError {
    fn wire(&self) -> Wire {
        match self {
            TokenError::Throttled { .. } => THROTTLED,
            TokenError::Missing | TokenError::Wrong => UNAUTHORIZED,
        }
    }

    fn retry_after(&self) -> std::time::Duration {
        match self {
            TokenError::Throttled { retry_after_ms } => {
                std::time::Duration::from_millis(*retry_after_ms)
            }
            _ => RETRY_AFTER,
        }
    }
}

impl ToWire for AuthError {
    fn wire(&self) -> Wire {
        match self {
            AuthError::Ticket(e) => e.wire(),
            AuthError::Throttled { .. } => THROTTLED,
            AuthError::Busy => BUSY,
        }
    }

    fn retry_after(&self) -> std::time::Duration {
        match self {
            AuthError::Throttled { retry_after_ms } => {
                std::time::Duration::from_millis(*retry_after_ms)
            }
            _ => RETRY_AFTER,
        }
    }
}

impl ToWire for AdmitError {
    fn wire(&self) -> Wire {
        match self {
            AdmitError::ConnectionLimit | AdmitError::MemoryBudget => BUSY,
        }
    }
}

impl ToWire for SubscribeError {
    fn wire(&self) -> Wire {
        match self {
            SubscribeError::TooManySubscribers(_) | SubscribeError::MemoryBudget => BUSY,
            SubscribeError::Moved => MOVING,
        }
    }
}

impl ToWire for ApplyError {
    fn wire(&self) -> Wire {
        let bad = |nack| {
            wire(
                StatusCode::BAD_REQUEST,
                CloseCode::BadRequest,
                nack,
                Code::InvalidArgument,
            )
        };
        match self {
            ApplyError::Payload(_) => bad("bad_payload"),
            ApplyError::IdempotencyKeyTooLong(_) => bad("bad_id"),
            ApplyError::IdempotencyConflict { .. } => wire(
                StatusCode::CONFLICT,
                CloseCode::BadRequest,
                "already_exists",
                Code::AlreadyExists,
            ),
            ApplyError::SeqMismatch { .. } => wire(
                StatusCode::PRECONDITION_FAILED,
                CloseCode::BadRequest,
                "seq_mismatch",
                Code::FailedPrecondition,
            ),
            ApplyError::MemoryBudget => BUSY,
            ApplyError::InFlight | ApplyError::Moved => MOVING,
        }
    }
}

impl ToWire for PublishError {
    fn wire(&self) -> Wire {
        match self {
            PublishError::Apply(e) => e.wire(),
            PublishError::Moved | PublishError::Fenced => MOVING,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frames::PayloadError;

    /// Every refusal on every transport, as docs/protocol.md states it.
    #[test]
    fn every_refusal_has_one_form_per_transport() {
        use CloseCode as C;
        use StatusCode as S;
        let conflict = ApplyError::IdempotencyConflict { seq: 3 };
        let mismatch = ApplyError::SeqMismatch {
            expected: 1,
            expected_epoch: String::new(),
            seq: 2,
            epoch: "e".into(),
        };
        let cases: Vec<(&dyn ToWire, S, C, &str, Code)> = vec![
            (
                &AdmitError::ConnectionLimit,
                S::SERVICE_UNAVAILABLE,
                C::TooMany,
                "resource_exhausted",
                Code::ResourceExhausted,
            ),
            (
                &AdmitError::MemoryBudget,
                S::SERVICE_UNAVAILABLE,
                C::TooMany,
                "resource_exhausted",
                Code::ResourceExhausted,
            ),
            (
                &SubscribeError::TooManySubscribers(5),
                S::SERVICE_UNAVAILABLE,
                C::TooMany,
                "resource_exhausted",
                Code::ResourceExhausted,
            ),
            (
                &SubscribeError::MemoryBudget,
                S::SERVICE_UNAVAILABLE,
                C::TooMany,
                "resource_exhausted",
                Code::ResourceExhausted,
            ),
            (
                &SubscribeError::Moved,
                S::SERVICE_UNAVAILABLE,
                C::Unavailable,
                "retry",
                Code::Unavailable,
            ),
            (
                &ApplyError::Payload(PayloadError::TooLarge(9, 8)),
                S::BAD_REQUEST,
                C::BadRequest,
                "bad_payload",
                Code::InvalidArgument,
            ),
            (
                &ApplyError::IdempotencyKeyTooLong(300),
                S::BAD_REQUEST,
                C::BadRequest,
                "bad_id",
                Code::InvalidArgument,
            ),
            (
                &conflict,
                S::CONFLICT,
                C::BadRequest,
                "already_exists",
                Code::AlreadyExists,
            ),
            (
                &mismatch,
                S::PRECONDITION_FAILED,
                C::BadRequest,
                "seq_mismatch",
                Code::FailedPrecondition,
            ),
            (
                &ApplyError::MemoryBudget,
                S::SERVICE_UNAVAILABLE,
                C::TooMany,
                "resource_exhausted",
                Code::ResourceExhausted,
            ),
            (
                &ApplyError::InFlight,
                S::SERVICE_UNAVAILABLE,
                C::Unavailable,
                "retry",
                Code::Unavailable,
            ),
            (
                &ApplyError::Moved,
                S::SERVICE_UNAVAILABLE,
                C::Unavailable,
                "retry",
                Code::Unavailable,
            ),
            (
                &PublishError::Moved,
                S::SERVICE_UNAVAILABLE,
                C::Unavailable,
                "retry",
                Code::Unavailable,
            ),
            (
                &PublishError::Fenced,
                S::SERVICE_UNAVAILABLE,
                C::Unavailable,
                "retry",
                Code::Unavailable,
            ),
            (
                &PublishError::Apply(ApplyError::MemoryBudget),
                S::SERVICE_UNAVAILABLE,
                C::TooMany,
                "resource_exhausted",
                Code::ResourceExhausted,
            ),
        ];
        for (error, http, close, nack, grpc) in cases {
            let w = error.wire();
            assert_eq!(
                (w.http, w.close, w.nack, w.grpc),
                (http, close, nack, grpc),
                "{error}"
            );
            // Whatever is refused for now says so, with a delay to wait.
            let later = http == S::SERVICE_UNAVAILABLE;
            assert_eq!(w.retry_later(), later, "{error}");
        }
        assert_eq!(
            AdmitError::ConnectionLimit.close_reason(),
            "retry_after_ms=1000"
        );
        assert_eq!(
            SubscribeError::Moved.close_reason(),
            SubscribeError::Moved.to_string()
        );
    }
}
