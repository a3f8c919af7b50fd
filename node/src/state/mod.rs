//! The per-key state a node holds, without IO: the log and its high watermark, the
//! idempotency window, presence, the connection mailboxes, the sharded table of keys,
//! the replicas held for other owners, the hand-off bookkeeping and the queues of the
//! replication pipes. Time comes from [`clock`] (tokio's, so paused-time tests drive
//! it); the tasks that do IO for this state live in [`crate::cluster`].
//!
//! Each key's state sits behind its own short `std::sync::Mutex`, and nothing awaits
//! while holding it. A publish assigns the next seq, encodes the frame once, appends it
//! to the buffer and offers it to every subscriber's bounded queue with `try_send` —
//! all under the lock. That is what gives the guarantees: every subscriber sees seqs in
//! order, and a new subscriber's welcome, replay and first live update line up exactly
//! (the replay snapshot and the registration happen under the same lock). A full queue
//! never blocks the key: that subscriber is kicked with 4408 and resumes with `since`.
//!
//! (A task per key as the single writer would give the same order, at the price of a
//! channel hop per publish and a task per key; a short mutex held only for synchronous
//! work costs neither. The wait for the successor happens outside the lock: staged
//! updates are shown in seq order as their acknowledgements come, see [`log`].)

mod clock;
pub mod docs;
mod fencing;
mod handoffs;
pub mod hot;
mod idempotency;
mod log;
mod mailbox;
mod member_ref;
mod pipes;
mod presence;
mod replicas;
mod table;
#[cfg(test)]
mod tests;

pub use crate::config::Limits;
pub use fencing::*;
pub use handoffs::*;
pub use log::*;
pub use mailbox::*;
pub use member_ref::MemberRef;
pub use pipes::*;
pub use replicas::*;
pub use ringfeed_router::key::MAX_IDEMPOTENCY_KEY;
pub use table::*;
