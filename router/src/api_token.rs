//! API tokens: what services and operators present (`authorization: Bearer <token>`)
//! to publish through the router, to ask a node for tickets, and to act on a node. Several are accepted at once so they can be
//! rotated; each is compared in constant time.

use std::net::IpAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::throttle::Throttle;
use crate::watch::Watched;

/// Why a request's API token was refused: 401 / `UNAUTHENTICATED`, or 429 /
/// `RESOURCE_EXHAUSTED` for a source past its failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("an API token is required (authorization: Bearer <token>)")]
    Missing,
    #[error("the API token is not accepted")]
    Wrong,
    #[error("too many failed authentications from this address; retry in {retry_after_ms} ms")]
    Throttled { retry_after_ms: u64 },
}

/// The API tokens in use (read again when their file changes) and the failure budget
/// of each source: what a request's `authorization` is checked against.
#[derive(Clone)]
pub struct Gate {
    tokens: Arc<Watched<ApiTokens>>,
    throttle: Arc<Throttle>,
}

impl Gate {
    pub fn new(tokens: Arc<Watched<ApiTokens>>, throttle: Arc<Throttle>) -> Gate {
        Gate { tokens, throttle }
    }

    /// Checks an `authorization` header's value from `source` (if known): refused
    /// unread while the source is past its failures, and a failure counted against it.
    pub fn check(
        &self,
        authorization: Option<&str>,
        source: Option<IpAddr>,
    ) -> Result<(), TokenError> {
        let now = tokio::time::Instant::now();
        if let Some(wait) = source.and_then(|ip| self.throttle.check(ip, now)) {
            return Err(TokenError::Throttled {
                retry_after_ms: wait.as_millis().max(1) as u64,
            });
        }
        let checked = self.tokens.get().check(authorization);
        if checked.is_err() {
            if let Some(ip) = source {
                self.throttle.failed(ip, now);
            }
        }
        checked
    }
}

/// The accepted API tokens, kept as SHA-256 digests: the tokens themselves are not
/// held, and digests of equal length compare in constant time whatever the input.
pub struct ApiTokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiTokens {
    /// Never the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiTokens({} tokens)", self.digests.len())
    }
}

impl ApiTokens {
    /// The tokens accepted; empty ones are skipped.
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> ApiTokens {
        ApiTokens {
            digests: tokens
                .iter()
                .map(|t| t.as_ref().trim())
                .filter(|t| !t.is_empty())
                .map(digest)
                .collect(),
        }
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Checks an `authorization` header's value.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), TokenError> {
        let token = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(TokenError::Missing)?;
        let presented = digest(token);
        // Every accepted token is compared, and each comparison looks at every byte.
        let matched = self.digests.iter().fold(false, |found, accepted| {
            let differ = accepted
                .iter()
                .zip(&presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found | (differ == 0)
        });
        if matched {
            Ok(())
        } else {
            Err(TokenError::Wrong)
        }
    }
}

/// The entries of a secrets or tokens file named by `flag`: one a line, trimmed, blank
/// lines skipped; an unreadable file or one with no entry is an error naming the flag
/// and the path, never an entry.
pub fn read_list(flag: &str, path: &std::path::Path) -> Result<Vec<String>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let entries: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if entries.is_empty() {
        return Err(format!("{flag} {}: no entry in it", path.display()));
    }
    Ok(entries)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_accepted_tokens_pass_and_rotation_keeps_both() {
        let tokens = ApiTokens::new(&["old-token", "new-token", ""]);
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.check(Some("Bearer old-token")), Ok(()));
        assert_eq!(tokens.check(Some("Bearer new-token")), Ok(()));
        assert_eq!(
            tokens.check(Some("Bearer new-tokeN")),
            Err(TokenError::Wrong)
        );
        assert_eq!(tokens.check(Some("new-token")), Err(TokenError::Missing));
        assert_eq!(tokens.check(Some("Bearer ")), Err(TokenError::Missing));
        assert_eq!(tokens.check(None), Err(TokenError::Missing));
        let rotated = ApiTokens::new(&["new-token"]);
        assert_eq!(
            rotated.check(Some("Bearer old-token")),
            Err(TokenError::Wrong)
        );
        assert_eq!(format!("{rotated:?}"), "ApiTokens(1 tokens)");
    }
}
