//! The node among its peers: replication to the successor, hand-off of moved keys,
//! following the ring (promotion included), self-fencing, and the conversions between
//! the internal protocol's messages and the key state's types.

pub mod documents;
pub mod fence;
pub mod figures;
pub mod follower;
pub mod handoff;
pub mod replication;
