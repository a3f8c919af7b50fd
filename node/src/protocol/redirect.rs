//! Redirect URLs: where a client is sent when its key lives on another node.

/// `base` + `path` + `query` with `rv` set to `ring_version` (replacing any `rv`).
pub fn redirect_url(base: &str, path: &str, query: &str, ring_version: u64) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != "rv" {
            out.append_pair(&k, &v);
        }
    }
    out.append_pair("rv", &ring_version.to_string());
    format!("{base}{path}?{}", out.finish())
}

/// `url` as logs may show it: the values of credentials in its query (`ticket`,
/// `resume`, `token`) replaced by `REDACTED`. Secrets and tickets are never logged.
pub fn redacted(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "ticket" | "resume" | "token" => out.append_pair(&k, "REDACTED"),
            _ => out.append_pair(&k, &v),
        };
    }
    format!("{base}?{}", out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redacted("ws://h:1/v1/connect?key=user%3A1&ticket=v1.abc&resume=r.x&since=4"),
            "ws://h:1/v1/connect?key=user%3A1&ticket=REDACTED&resume=REDACTED&since=4"
        );
        assert_eq!(redacted("http://h/v1/ring"), "http://h/v1/ring");
    }

    #[test]
    fn redirect_urls_replace_rv() {
        assert_eq!(
            redirect_url("ws://h:1", "/v1/connect", "key=user%3A1&since=4&rv=2", 9),
            "ws://h:1/v1/connect?key=user%3A1&since=4&rv=9"
        );
        assert_eq!(
            redirect_url("http://h", "/v1/sse", "", 3),
            "http://h/v1/sse?rv=3"
        );
    }
}
