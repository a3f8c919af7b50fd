//! Who is who among the members: an id with the incarnation it registered under. A
//! node restarted under the same id is another incarnation — another owner, another
//! successor — so state that names a peer names a [`MemberRef`], never a bare id.

use std::fmt;

use ringfeed_router::membership::View;
use ringfeed_router::ring::{Member, NodeId};

/// One incarnation of a member.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberRef {
    pub id: NodeId,
    pub incarnation: String,
}

impl MemberRef {
    /// The incarnation `member`'s record names.
    pub fn of(member: &Member) -> MemberRef {
        MemberRef {
            id: member.id.clone(),
            incarnation: member.incarnation.clone(),
        }
    }

    /// Whether `view`'s record under this id is this incarnation.
    pub fn is_on(&self, view: &View) -> bool {
        view.ring
            .member(&self.id)
            .is_some_and(|m| m.incarnation == self.incarnation)
    }

    /// Whether this incarnation is an active member of `view`'s ring.
    pub fn is_active_on(&self, view: &View) -> bool {
        self.is_on(view) && view.ring.is_active(&self.id)
    }
}

impl fmt::Display for MemberRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.incarnation)
    }
}
