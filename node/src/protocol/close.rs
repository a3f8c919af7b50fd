//! WebSocket close codes (docs/protocol.md *Close codes*): one enum, so a code is
//! named where it is chosen and the table of what a client should do lives here.

/// Why the node closes a WebSocket, as the close frame's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// Shutting down, or the client stopped answering (1001): as [`Self::Unavailable`].
    GoingAway = 1001,
    /// A per-connection bound was broken (1008): fix the client, resume after a pause.
    Policy = 1008,
    /// The key moved (4300): follow the `redirect` frame sent just before.
    Moved = 4300,
    /// A bad request or protocol error (4400): do not retry the same request.
    BadRequest = 4400,
    /// No valid ticket for the key (4401): get a new ticket and reconnect.
    Unauthorized = 4401,
    /// The client fell behind its queue (4408): resume with `since` after a pause.
    SlowConsumer = 4408,
    /// A frame over `--max-frame` (4413): do not retry the same frame.
    TooLarge = 4413,
    /// Too many connections or subscribers (4429): retry after the advised delay.
    TooMany = 4429,
    /// Draining or fenced, owner not known yet (4503): ask `/v1/route` elsewhere.
    Unavailable = 4503,
}

impl CloseCode {
    /// The code on the wire.
    pub fn code(self) -> u16 {
        self as u16
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.code()
    }
}
