//! The self-fencing decision, pure: what a node whose lease is in doubt does, given
//! what its peers answered (the asking is [`crate::cluster::fence`]'s).

/// Where self-fencing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Serving (the lease is sound, or etcd is down for everyone).
    Serving,
    /// Not accepting deliveries, replicated entries or clients.
    Paused,
    /// Off the ring as the peers see it: clients moved, state dropped.
    Out,
}

/// What the peers said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answers {
    /// Members of this node's last ring, itself included.
    pub members: usize,
    /// Members that answered, this node included.
    pub answered: usize,
    /// Members that have lost etcd, this node included.
    pub lost: usize,
    /// Whether a peer that reaches etcd holds a ring without this node.
    pub dropped_me: bool,
}

/// The decision on a lease in doubt.
pub fn decide(a: &Answers) -> Fence {
    if a.dropped_me {
        Fence::Out
    } else if a.lost * 2 > a.members {
        Fence::Serving
    } else {
        Fence::Paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(members: usize, answered: usize, lost: usize, dropped_me: bool) -> Answers {
        Answers {
            members,
            answered,
            lost,
            dropped_me,
        }
    }

    #[test]
    fn decisions_follow_what_the_peers_say() {
        // etcd down for everyone: 3 of 3 lost it.
        assert_eq!(decide(&answers(3, 3, 3, false)), Fence::Serving);
        // Only this node lost etcd; the others still list it.
        assert_eq!(decide(&answers(3, 3, 1, false)), Fence::Paused);
        // Cut off from everyone.
        assert_eq!(decide(&answers(3, 1, 1, false)), Fence::Paused);
        // 2 of 4 is not a strict majority.
        assert_eq!(decide(&answers(4, 4, 2, false)), Fence::Paused);
        // A peer holds a ring without this node: out, whatever the rest say.
        assert_eq!(decide(&answers(3, 2, 1, true)), Fence::Out);
    }
}
