//! A document editor's messages (the y-websocket protocol), checked before yrs reads
//! them; and a document's state, encoded without yrs's panic.
//!
//! yrs reserves room for as many awareness clients, or state-vector entries, as a
//! message claims before it reads them. The reservation is fallible, so a claim of
//! billions is an error rather than an abort. But one of a few hundred million is
//! granted, and the hash map's control bytes are written at once: eight bytes on the
//! wire cost the node hundreds of MiB, every time they are sent. An awareness client
//! takes at least three bytes (its id, its clock, its state's length), and a
//! state-vector entry at least two (client, clock), so [`check`] refuses a claim the
//! message's bytes cannot hold. It walks the messages exactly as yrs's
//! `MessageReader` does, with the same integer encoding, so the two agree on where
//! each message starts.

/// Decodes a Yjs update (v1) from untrusted bytes. yrs reserves room for as many
/// clients as the update's first number claims before reading them, and a few bytes
/// can claim billions; each client takes at least three bytes, so a claim the bytes
/// cannot hold is refused first. (Block counts are reserved without being touched, and
/// a reservation that cannot be made is an error, not an abort.)
pub fn decode_yjs(data: &[u8]) -> Result<yrs::Update, String> {
    use yrs::updates::decoder::Decode;
    let (mut clients, mut shift, mut read) = (0u64, 0u32, 0usize);
    for &byte in data.iter().take(5) {
        clients |= u64::from(byte & 0x7f) << shift;
        shift += 7;
        read += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    if clients.saturating_mul(3) > (data.len() - read) as u64 {
        return Err(format!(
            "an update claiming {clients} clients in {} bytes",
            data.len()
        ));
    }
    yrs::Update::decode_v1(data).map_err(|e| e.to_string())
}

/// A document's state since `since` as one Yjs update (v1).
///
/// yrs 0.28's `encode_state_as_update_v1` panics when the document holds updates
/// still waiting for what they depend on and merging them into the answer fails: it
/// unwraps the merge's error (found by `fuzz/doc_update`). A panic would end whatever
/// task asked (an editor's connection, the store's writer, a hand-off). So the same
/// merge is done here with its error kept: the integrated state (`encode_diff_v1`),
/// the waiting update, the waiting deletions. When the merge fails, or what it makes
/// does not decode (that happens too), the answer leaves the waiting parts out: no
/// editor has seen them, and the key's log still holds the updates they came in.
pub fn encode_state<T: yrs::ReadTxn>(txn: &T, since: &yrs::StateVector) -> Vec<u8> {
    use yrs::updates::encoder::Encode;
    if !txn.has_missing_updates() {
        return txn.encode_state_as_update_v1(since);
    }
    let store = txn.store();
    let mut parts = vec![txn.encode_diff_v1(since)];
    if let Some(pending) = store.pending_update() {
        parts.push(pending.update.encode_v1());
    }
    if let Some(deleted) = store.pending_ds() {
        // An update of no blocks (zero clients) and these deletions.
        let mut update = vec![0];
        update.extend(deleted.encode_v1());
        parts.push(update);
    }
    // What yrs makes of some waiting updates does not always read back: checked, as
    // the answer goes into snapshots and hand-offs.
    match yrs::merge_updates_v1(&parts)
        .map_err(|e| e.to_string())
        .and_then(|whole| {
            decode_yjs(&whole)?;
            Ok(whole)
        }) {
        Ok(whole) => whole,
        Err(e) => {
            tracing::warn!(error = %e, "a document's waiting updates do not merge; left out of its state");
            parts.swap_remove(0)
        }
    }
}

/// Decodes a document update (as [`decode_yjs`]) and checks that, applied
/// to a document, it leaves one whose state reads back. yrs 0.28 takes some updates it
/// then cannot encode readably (an empty JSON block: found by `fuzz/doc_update`); once
/// in a document, every snapshot and hand-off of it would carry a state the next
/// owner cannot read. Such an update is refused where it enters: the owner, before it
/// is logged. Costs a second application of the update, to an empty document.
pub fn check_update(update: &[u8]) -> Result<(), String> {
    use yrs::Transact;
    let decoded = decode_yjs(update)?;
    let doc = yrs::Doc::new();
    if doc.transact_mut().apply_update(decoded).is_err() {
        // The document it is meant for decides (it refuses what does not apply).
        return Ok(());
    }
    let state = encode_state(&doc.transact(), &yrs::StateVector::default());
    decode_yjs(&state)
        .map(|_| ())
        .map_err(|e| format!("once applied, the document does not read back ({e})"))
}

/// Refuses a client message, one or more y-protocol messages, in which any awareness
/// update or sync step 1 claims more entries than its bytes can hold. A message cut
/// short passes: yrs stops reading there too.
pub fn check(data: &[u8]) -> Result<(), String> {
    let mut r = Reader { data, at: 0 };
    match walk(&mut r) {
        Ok(()) | Err(Stop::End) => Ok(()),
        Err(Stop::Refused(reason)) => Err(reason),
    }
}

/// Why the walk ended early.
enum Stop {
    /// The bytes ran out: yrs ends there without an error.
    End,
    /// A claim the bytes cannot hold, or something yrs refuses too.
    Refused(String),
}

/// yrs's message tags (`yrs::sync::protocol`).
const SYNC: u8 = 0;
const AWARENESS: u8 = 1;
const AUTH: u8 = 2;
const QUERY_AWARENESS: u8 = 3;
const STEP_1: u8 = 0;
const STEP_2: u8 = 1;
const UPDATE: u8 = 2;
const PERMISSION_DENIED: u8 = 0;

fn walk(r: &mut Reader<'_>) -> Result<(), Stop> {
    while r.at < r.data.len() {
        match r.u8()? {
            SYNC => match r.u8()? {
                STEP_1 => {
                    let sv = r.buf()?;
                    let mut inner = Reader { data: sv, at: 0 };
                    let entries = u64::from(inner.u32()?);
                    claims(entries, 2, sv.len() - inner.at, "state vector")?;
                }
                STEP_2 | UPDATE => {
                    r.buf()?;
                }
                other => return Err(Stop::Refused(format!("unknown sync message {other}"))),
            },
            AWARENESS => {
                let update = r.buf()?;
                let mut inner = Reader {
                    data: update,
                    at: 0,
                };
                let clients = inner.u64()?;
                claims(clients, 3, update.len() - inner.at, "awareness update")?;
            }
            AUTH => {
                if r.u8()? == PERMISSION_DENIED {
                    r.buf()?;
                }
            }
            QUERY_AWARENESS => {}
            _ => {
                r.buf()?;
            }
        }
    }
    Ok(())
}

/// `count` entries of at least `size` bytes each in `left` bytes?
fn claims(count: u64, size: u64, left: usize, what: &str) -> Result<(), Stop> {
    if count.saturating_mul(size) > left as u64 {
        return Err(Stop::Refused(format!(
            "a {what} claiming {count} entries in {left} bytes"
        )));
    }
    Ok(())
}

/// Reads as yrs's `Cursor` and `VarInt` do: little-endian base-128 integers of up to
/// eleven bytes, shifts wrapping, and a length before every buffer.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, Stop> {
        let b = *self.data.get(self.at).ok_or(Stop::End)?;
        self.at += 1;
        Ok(b)
    }

    /// yrs's `read_var_u64`.
    fn u64(&mut self) -> Result<u64, Stop> {
        let (mut num, mut len) = (0u64, 0u32);
        loop {
            let b = self.byte()?;
            num |= u64::from(b & 0x7f).wrapping_shl(len);
            len += 7;
            if b < 0x80 {
                return Ok(num);
            }
            if len > 70 {
                return Err(Stop::Refused("an integer longer than 70 bits".into()));
            }
        }
    }

    /// yrs's `read_var_u32`.
    fn u32(&mut self) -> Result<u32, Stop> {
        let (mut num, mut len) = (0u32, 0u32);
        loop {
            let b = self.byte()?;
            num |= u32::from(b & 0x7f).wrapping_shl(len);
            len += 7;
            if b < 0x80 {
                return Ok(num);
            }
            if len > 70 {
                return Err(Stop::Refused("an integer longer than 70 bits".into()));
            }
        }
    }

    /// yrs's `VarInt for u8`: a `u32` that must fit.
    fn u8(&mut self) -> Result<u8, Stop> {
        let value = self.u32()?;
        u8::try_from(value).map_err(|_| Stop::Refused(format!("a tag of {value}")))
    }

    /// yrs's `read_buf`: a `u32` length, then that many bytes.
    fn buf(&mut self) -> Result<&'a [u8], Stop> {
        let len = self.u32()? as usize;
        let end = self.at.checked_add(len).ok_or(Stop::End)?;
        let buf = self.data.get(self.at..end).ok_or(Stop::End)?;
        self.at = end;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_awareness_claim_its_bytes_cannot_hold_is_refused() {
        // Found by fuzz/doc_update: awareness, 8 bytes, claiming ~2^34 clients.
        let bomb = [0x01, 0x08, 0xff, 0xff, 0xff, 0xcd, 0xff, 0x04, 0x00, 0x00];
        assert!(check(&bomb).unwrap_err().contains("awareness update"));
        // The same claim after a harmless message is found too.
        let mut after = vec![0x03];
        after.extend_from_slice(&bomb);
        assert!(check(&after).is_err());
    }

    #[test]
    fn an_update_that_leaves_an_unreadable_document_is_refused() {
        // fuzz/open/doc_update-pending-state-undecodable: an empty JSON block.
        let update = [
            0x01, 0x01, 0x0a, 0x00, 0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00,
        ];
        assert!(super::decode_yjs(&update).is_ok());
        assert!(check_update(&update)
            .unwrap_err()
            .contains("does not read back"));
        // An ordinary edit passes.
        let hello = [
            0x01, 0x01, 0x01, 0x00, 0x04, 0x01, 0x01, 0x74, 0x05, 0x68, 0x65, 0x6c, 0x6c, 0x6f,
            0x00,
        ];
        assert_eq!(check_update(&hello), Ok(()));
    }

    #[test]
    fn a_state_vector_claim_its_bytes_cannot_hold_is_refused() {
        // sync step 1 with a state vector of 3 bytes claiming 2^28 entries.
        let bomb = [0x00, 0x00, 0x05, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert!(check(&bomb).unwrap_err().contains("state vector"));
    }

    #[test]
    fn what_stock_editors_send_passes() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
                .collect()
        };
        for message in [
            "00020f01010100040101740568656c6c6f00", // update
            "000003010106",                         // sync step 1
            "00000100",                             // sync step 1, empty
            "0119010701157b2275736572223a7b226e616d65223a2261227d7d", // awareness
            "03",                                   // awareness query
            "00020f01010100040101740568",           // cut short: yrs stops there
        ] {
            assert_eq!(check(&hex(message)), Ok(()), "{message}");
        }
    }
}
