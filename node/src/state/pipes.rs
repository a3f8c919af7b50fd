//! The pipes to every successor this node replicates to: what goes down them, and
//! the queue of each (the task that drains it is [`crate::cluster::replication`]'s).

use std::collections::HashMap;
use std::sync::Mutex;

use ringfeed_router::membership::View;
use tokio::sync::mpsc;

use super::log::{KeySnapshot, LogEntry};
use super::member_ref::MemberRef;

/// A successor: node id and incarnation.
pub type Successor = MemberRef;

/// What goes down a pipe.
#[derive(Debug)]
pub enum Job {
    Entry {
        key: String,
        epoch: String,
        entry: LogEntry,
    },
    Snapshot {
        key: String,
        snapshot: KeySnapshot,
    },
    /// The owner dropped the key as idle.
    Drop {
        key: String,
    },
}

impl Job {
    /// About what the job takes in a request.
    pub(crate) fn wire_bytes(&self) -> usize {
        match self {
            Job::Entry { key, epoch, entry } => entry.wire_bytes(key, epoch),
            Job::Snapshot { key, snapshot } => snapshot.wire_bytes(key),
            Job::Drop { key } => key.len() + 8,
        }
    }
}

/// The queue of the pipe to every successor this node replicates to.
#[derive(Default)]
pub struct Replication {
    pipes: Mutex<HashMap<Successor, mpsc::Sender<Job>>>,
}

impl Replication {
    /// The queue to `to`, opening one with `open` when there is none or it closed
    /// (`None` from `open`: nothing to send to).
    pub fn queue(
        &self,
        to: &Successor,
        open: impl FnOnce() -> Option<mpsc::Sender<Job>>,
    ) -> Option<mpsc::Sender<Job>> {
        let mut pipes = self.pipes.lock().expect("pipes lock poisoned");
        match pipes.get(to) {
            Some(tx) if !tx.is_closed() => Some(tx.clone()),
            _ => {
                let tx = open()?;
                pipes.insert(to.clone(), tx.clone());
                Some(tx)
            }
        }
    }

    /// Forgets the queue to `to` (its successor left the ring).
    pub fn close(&self, to: &Successor) {
        self.pipes.lock().expect("pipes lock poisoned").remove(to);
    }
}

/// The key a job is about.
pub fn job_key(job: &Job) -> &str {
    match job {
        Job::Entry { key, .. } | Job::Snapshot { key, .. } | Job::Drop { key } => key,
    }
}

/// The successor of `key` on `view` as (id, incarnation), if any.
pub fn successor_of(view: &View, key: &str) -> Option<Successor> {
    view.ring.successor(key).map(MemberRef::of)
}
