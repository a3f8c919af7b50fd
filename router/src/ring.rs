//! The consistent-hash ring: members → points → owner and successor of a key.
//!
//! Pure: no IO, no clock. The same member records give the same ring in every node,
//! router and client, whatever order they arrive in (docs/protocol.md *Ring function*):
//!
//! * a key hashes to `xxh3_64(key)` (seed 0);
//! * each *active* member contributes `points` virtual nodes at `xxh3_64("{id}#{i}")`;
//! * the owner is the member of the first point at or after the key's hash, wrapping,
//!   equal points ordered by node id;
//! * the successor is the next *distinct* member clockwise from that point.

use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// Points per node when a record does not say otherwise: about a thousand per unit of
/// weight keeps max/mean load ≤ 1.10 at 5 nodes (docs/benchmarks.md P6, `examples/ring_bench.rs`).
pub const DEFAULT_POINTS: u32 = 1024;

/// The largest `points` a record may carry; larger records are ignored as corrupt.
pub const MAX_POINTS: u32 = 65_536;

/// A node's identity on the ring, e.g. `n1`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a member takes keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Active,
    Draining,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Draining => "draining",
        }
    }
}

/// A member record, as stored at `/ringfeed/{cluster}/nodes/{id}` (docs/protocol.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub incarnation: String,
    pub grpc: String,
    pub http: String,
    /// The host:port of its QUIC listener, if it has one.
    pub quic: Option<String>,
    /// The SHA-256 of its QUIC certificate (lowercase hex), for clients to pin when the
    /// certificate is self-signed. Absent from records written before QUIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_sha256: Option<String>,
    pub points: u32,
    pub state: MemberState,
    pub version: String,
}

impl Member {
    /// The WebSocket base URL of this member (`ws://host:port`), from its `http` URL.
    pub fn ws_base(&self) -> String {
        if let Some(rest) = self.http.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = self.http.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            self.http.clone()
        }
    }
}

/// A digest of the member records: two views with the same id are the same ring.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct RingId(pub String);

impl fmt::Display for RingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The ring derived from a set of member records.
#[derive(Clone, Debug)]
pub struct Ring {
    /// Every record, draining ones included, sorted by id.
    members: Vec<Member>,
    /// Point hashes, ascending; ties ordered by member id.
    hashes: Vec<u64>,
    /// `owners[i]` is the index in `members` of the point at `hashes[i]`.
    owners: Vec<u32>,
    /// `starts[b]` is the first point whose hash has top bits `b` or more (of
    /// `start_bits`; about one point per bucket), so a lookup searches one bucket of
    /// `hashes`, not all of it: a few cache lines instead of a dozen halvings over
    /// tens of KiB (1,024 points per member).
    starts: Vec<u32>,
    start_bits: u32,
    id: RingId,
}

impl Ring {
    /// Builds the ring of `members`; the order they come in does not matter. Of two
    /// records with the same id (which etcd cannot hold) the first is kept.
    pub fn new(members: impl IntoIterator<Item = Member>) -> Ring {
        let mut members: Vec<Member> = members.into_iter().collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|a, b| a.id == b.id);

        let mut points: Vec<(u64, u32)> = Vec::new();
        for (index, member) in members.iter().enumerate() {
            if member.state != MemberState::Active {
                continue;
            }
            let index = u32::try_from(index).expect("fewer than 2^32 members");
            points.extend((0..member.points).map(|i| (point_hash(&member.id, i), index)));
        }
        // Members are sorted by id, so ordering ties by index orders them by id.
        points.sort_unstable();
        let (hashes, owners): (Vec<u64>, Vec<u32>) = points.into_iter().unzip();
        let (starts, start_bits) = bucket_starts(&hashes);
        let id = ring_id(&members);
        Ring {
            members,
            hashes,
            owners,
            starts,
            start_bits,
            id,
        }
    }

    /// The ring with no members.
    pub fn empty() -> Ring {
        Ring::new(Vec::new())
    }

    pub fn id(&self) -> &RingId {
        &self.id
    }

    /// Every member record, draining ones included, sorted by id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The record of `id`, whatever its state.
    pub fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members
            .binary_search_by(|m| m.id.cmp(id))
            .ok()
            .map(|i| &self.members[i])
    }

    /// Whether `id` owns any keys (has a record and is active).
    pub fn is_active(&self, id: &NodeId) -> bool {
        self.member(id)
            .is_some_and(|m| m.state == MemberState::Active)
    }

    /// The owner of `key`, or `None` on a ring without active members.
    pub fn owner(&self, key: &str) -> Option<&Member> {
        self.owner_of_hash(key_hash(key))
    }

    /// The owner of the point at or after `hash`.
    pub fn owner_of_hash(&self, hash: u64) -> Option<&Member> {
        let at = self.point_at(hash)?;
        Some(&self.members[self.owners[at] as usize])
    }

    /// The next distinct member clockwise from `key`'s owner: where its replica lives.
    pub fn successor(&self, key: &str) -> Option<&Member> {
        let at = self.point_at(key_hash(key))?;
        let owner = self.owners[at];
        let n = self.owners.len();
        (1..n)
            .map(|step| self.owners[(at + step) % n])
            .find(|&m| m != owner)
            .map(|m| &self.members[m as usize])
    }

    /// The number of points on the ring.
    pub fn point_count(&self) -> usize {
        self.hashes.len()
    }

    /// Each active member's share of the hash space (the keys it owns), largest first
    /// (`ringfeed ring`).
    pub fn shares(&self) -> Vec<(NodeId, f64)> {
        let mut shares: Vec<(NodeId, f64)> = Vec::new();
        for (from, to, share) in self.moves_to(self) {
            debug_assert_eq!(from, to);
            shares.push((from, share));
        }
        shares.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        shares
    }

    /// How the hash space goes from this ring's owners to `next`'s: each (owner here,
    /// owner there) pair with the share of keys it covers, the unmoved (`from == to`)
    /// included. Exact: the hash space is cut at every point of either ring, and each
    /// piece has one owner on each.
    pub fn moves_to(&self, next: &Ring) -> Vec<(NodeId, NodeId, f64)> {
        let mut cuts: Vec<u64> = self.hashes.iter().chain(&next.hashes).copied().collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut moved: std::collections::BTreeMap<(NodeId, NodeId), f64> = Default::default();
        let Some(&last) = cuts.last() else {
            return Vec::new();
        };
        let mut prev = last;
        for &cut in &cuts {
            // The keys in (prev, cut], wrapping past the top for the first piece.
            let len = cut.wrapping_sub(prev);
            let len = if cuts.len() == 1 { u64::MAX } else { len };
            prev = cut;
            let (Some(a), Some(b)) = (self.owner_of_hash(cut), next.owner_of_hash(cut)) else {
                continue;
            };
            *moved.entry((a.id.clone(), b.id.clone())).or_default() += len as f64 / 2f64.powi(64);
        }
        moved
            .into_iter()
            .map(|((from, to), share)| (from, to, share))
            .collect()
    }

    fn point_at(&self, hash: u64) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        // Every point of bucket `b` lies in `starts[b]..starts[b + 1]`; the first one
        // at or after `hash` is in there, or is the next bucket's first.
        let bucket = (hash >> (64 - self.start_bits)) as usize;
        let lo = self.starts[bucket] as usize;
        let hi = self.starts[bucket + 1] as usize;
        let at = lo + self.hashes[lo..hi].partition_point(|&p| p < hash);
        Some(if at == self.hashes.len() { 0 } else { at })
    }
}

/// The bucket index of `hashes` (ascending): `2^bits + 1` starts, `bits` the smallest
/// with at least as many buckets as points (1 to 16), and the last start `hashes.len()`.
fn bucket_starts(hashes: &[u64]) -> (Vec<u32>, u32) {
    let bits = hashes
        .len()
        .next_power_of_two()
        .trailing_zeros()
        .clamp(1, 16);
    let buckets = 1usize << bits;
    let mut starts = Vec::with_capacity(buckets + 1);
    let mut at = 0;
    for b in 0..buckets as u64 {
        let floor = b << (64 - bits);
        while at < hashes.len() && hashes[at] < floor {
            at += 1;
        }
        starts.push(u32::try_from(at).expect("fewer than 2^32 points"));
    }
    starts.push(u32::try_from(hashes.len()).expect("fewer than 2^32 points"));
    (starts, bits)
}

/// The hash of a key: `xxh3_64` of its bytes, seed 0.
pub fn key_hash(key: &str) -> u64 {
    xxh3_64(key.as_bytes())
}

/// The hash of member `id`'s point `i`: `xxh3_64("{id}#{i}")`.
pub fn point_hash(id: &NodeId, i: u32) -> u64 {
    let mut buf = String::with_capacity(id.0.len() + 11);
    buf.push_str(&id.0);
    buf.push('#');
    buf.push_str(&i.to_string());
    xxh3_64(buf.as_bytes())
}

/// The ring id of `members` (sorted by id): a digest of id, incarnation, points, state.
fn ring_id(members: &[Member]) -> RingId {
    let mut canon = String::new();
    for m in members {
        canon.push_str(&m.id.0);
        canon.push('\0');
        canon.push_str(&m.incarnation);
        canon.push('\0');
        canon.push_str(&m.points.to_string());
        canon.push('\0');
        canon.push_str(m.state.as_str());
        canon.push('\n');
    }
    RingId(format!("{:032x}", xxh3_128(canon.as_bytes())))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn member(id: &str, points: u32) -> Member {
        Member {
            id: NodeId(id.to_owned()),
            incarnation: format!("inc-{id}"),
            grpc: format!("{id}:1"),
            http: format!("http://{id}:2"),
            quic: None,
            quic_sha256: None,
            points,
            state: MemberState::Active,
            version: "0.1.0".to_owned(),
        }
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user:{i}")).collect()
    }

    #[test]
    fn shares_and_moves_measure_what_many_keys_show() {
        let three = Ring::new((1..=3).map(|i| member(&format!("n{i}"), 256)));
        let two = Ring::new((1..=2).map(|i| member(&format!("n{i}"), 256)));
        let shares = three.shares();
        assert_eq!(shares.len(), 3);
        let total: f64 = shares.iter().map(|(_, s)| s).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        // Without n3, exactly n3's share moves, and only from n3.
        let moves = three.moves_to(&two);
        let moved: f64 = moves.iter().filter(|(f, t, _)| f != t).map(|m| m.2).sum();
        let n3 = shares
            .iter()
            .find(|(id, _)| id.0 == "n3")
            .map(|s| s.1)
            .unwrap();
        assert!((moved - n3).abs() < 1e-9, "{moved} vs {n3}");
        assert!(moves.iter().all(|(f, t, _)| f == t || f.0 == "n3"));
        // Keys agree with the shares, within sampling error.
        let keys = keys(100_000);
        let on_n3 = keys
            .iter()
            .filter(|k| three.owner(k).unwrap().id.0 == "n3")
            .count() as f64
            / keys.len() as f64;
        assert!((on_n3 - n3).abs() < 0.01, "{on_n3} vs {n3}");
        assert!(Ring::empty().shares().is_empty());
    }

    #[test]
    fn the_bucket_index_finds_what_a_search_of_every_point_finds() {
        for ring in [
            Ring::new([member("n1", 1)]),
            Ring::new([member("n1", 3), member("n2", 5)]),
            Ring::new((1..=7).map(|i| member(&format!("n{i}"), 1024))),
        ] {
            let whole = |hash: u64| {
                let at = ring.hashes.partition_point(|&p| p < hash);
                if at == ring.hashes.len() {
                    0
                } else {
                    at
                }
            };
            // Every point, either side of it, the ends of the hash space, and many keys.
            let edges = ring
                .hashes
                .iter()
                .flat_map(|&h| [h.wrapping_sub(1), h, h.wrapping_add(1)]);
            let keys = keys(20_000);
            let hashes = edges
                .chain([0, 1, u64::MAX - 1, u64::MAX])
                .chain(keys.iter().map(|k| key_hash(k)));
            for hash in hashes {
                assert_eq!(ring.point_at(hash), Some(whole(hash)), "hash {hash:#x}");
            }
        }
    }

    #[test]
    fn empty_ring_has_no_owner() {
        let ring = Ring::empty();
        assert!(ring.owner("user:1").is_none());
        assert!(ring.successor("user:1").is_none());
    }

    #[test]
    fn one_member_owns_everything_and_has_no_successor() {
        let ring = Ring::new([member("n1", 8)]);
        assert_eq!(ring.owner("a").unwrap().id.0, "n1");
        assert!(ring.successor("a").is_none());
    }

    #[test]
    fn owner_is_first_point_at_or_after_the_hash_wrapping() {
        let ring = Ring::new([member("n1", 4), member("n2", 4)]);
        // A key hashing exactly onto a point belongs to that point's member.
        let h = point_hash(&NodeId("n2".into()), 3);
        assert_eq!(ring.owner_of_hash(h).unwrap().id.0, "n2");
        // Past the last point wraps to the first.
        let first = *ring.hashes.first().unwrap();
        let wrapped = ring.owner_of_hash(u64::MAX).unwrap();
        assert_eq!(Some(wrapped), ring.owner_of_hash(first));
    }

    #[test]
    fn draining_members_take_no_keys_but_change_the_id() {
        let mut n2 = member("n2", 16);
        let active = Ring::new([member("n1", 16), n2.clone()]);
        n2.state = MemberState::Draining;
        let draining = Ring::new([member("n1", 16), n2]);
        assert_ne!(active.id(), draining.id());
        for k in keys(200) {
            assert_eq!(draining.owner(&k).unwrap().id.0, "n1");
        }
        assert!(draining.member(&NodeId("n2".into())).is_some());
        assert!(!draining.is_active(&NodeId("n2".into())));
    }

    #[test]
    fn successor_is_a_distinct_member() {
        let ring = Ring::new([member("n1", 32), member("n2", 32), member("n3", 32)]);
        for k in keys(500) {
            assert_ne!(ring.owner(&k).unwrap().id, ring.successor(&k).unwrap().id);
        }
    }

    #[test]
    fn ring_id_depends_on_incarnation() {
        let a = Ring::new([member("n1", 8)]);
        let mut m = member("n1", 8);
        m.incarnation = "other".into();
        assert_ne!(a.id(), Ring::new([m]).id());
    }

    #[test]
    fn ws_base_follows_the_http_scheme() {
        let mut m = member("n1", 1);
        m.http = "http://127.0.0.1:8001".into();
        assert_eq!(m.ws_base(), "ws://127.0.0.1:8001");
        m.http = "https://a.example".into();
        assert_eq!(m.ws_base(), "wss://a.example");
    }

    fn ids() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-z][a-z0-9]{0,5}", 1..7)
            .prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn same_members_same_ring_in_any_order(ids in ids(), seed in any::<u64>()) {
            let members: Vec<Member> = ids.iter().map(|id| member(id, 32)).collect();
            let mut shuffled = members.clone();
            // A deterministic shuffle from the seed.
            let n = shuffled.len();
            for i in 0..n {
                let j = (seed.rotate_left(i as u32) as usize) % n;
                shuffled.swap(i, j);
            }
            let a = Ring::new(members);
            let b = Ring::new(shuffled);
            prop_assert_eq!(a.id(), b.id());
            for k in keys(300) {
                prop_assert_eq!(a.owner(&k).map(|m| &m.id), b.owner(&k).map(|m| &m.id));
                prop_assert_eq!(a.successor(&k).map(|m| &m.id), b.successor(&k).map(|m| &m.id));
            }
        }

        #[test]
        fn adding_a_member_moves_keys_only_onto_it(ids in ids(), new in "[A-Z]{1,4}") {
            let before = Ring::new(ids.iter().map(|id| member(id, 32)));
            let after = Ring::new(ids.iter().map(|id| member(id, 32)).chain([member(&new, 32)]));
            for k in keys(500) {
                let (was, is) = (&before.owner(&k).unwrap().id, &after.owner(&k).unwrap().id);
                if was != is {
                    prop_assert_eq!(&is.0, &new);
                }
            }
        }

        #[test]
        fn removing_a_member_moves_only_its_keys_onto_successors(ids in ids(), pick in any::<usize>()) {
            prop_assume!(ids.len() >= 2);
            let gone = &ids[pick % ids.len()];
            let before = Ring::new(ids.iter().map(|id| member(id, 32)));
            let after = Ring::new(ids.iter().filter(|id| *id != gone).map(|id| member(id, 32)));
            for k in keys(500) {
                let was = &before.owner(&k).unwrap().id;
                let is = &after.owner(&k).unwrap().id;
                if &was.0 == gone {
                    prop_assert_eq!(is, &before.successor(&k).unwrap().id);
                } else {
                    prop_assert_eq!(was, is);
                }
            }
        }
    }
}
