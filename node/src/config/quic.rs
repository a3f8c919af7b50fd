//! The settings of the QUIC listener (docs/protocol.md *QUIC*).

use std::net::SocketAddr;

use clap::Args;

/// `--quic-*`.
#[derive(Debug, Clone, Args)]
pub struct QuicArgs {
    /// Address of the QUIC (UDP) listener: `auto` (the default) is the HTTP listener's
    /// address and port number, over UDP (any free port if that one is taken); `off`
    /// serves no QUIC.
    #[arg(long, env = "RINGFEED_QUIC_LISTEN", default_value = "auto")]
    pub quic_listen: String,
    /// The host:port clients reach the QUIC listener at (default: the bound address).
    #[arg(long, env = "RINGFEED_ADVERTISE_QUIC")]
    pub advertise_quic: Option<String>,
    /// The QUIC certificate and key (PEM): with neither, the node's TLS pair
    /// (`--tls-cert`) if it has one, else a self-signed certificate made at start,
    /// whose SHA-256 the member record publishes for clients to pin.
    #[arg(long, env = "RINGFEED_QUIC_CERT", requires = "quic_key")]
    pub quic_cert: Option<std::path::PathBuf>,
    /// The key of `--quic-cert` (PEM).
    #[arg(long, env = "RINGFEED_QUIC_KEY", requires = "quic_cert")]
    pub quic_key: Option<std::path::PathBuf>,
}

/// Where the QUIC listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicListen {
    Off,
    At(SocketAddr),
}

impl QuicArgs {
    /// Where to bind, given the HTTP listener's configured address; the error names
    /// the setting.
    pub fn listen(&self, http: SocketAddr) -> Result<QuicListen, String> {
        match self.quic_listen.as_str() {
            "off" => Ok(QuicListen::Off),
            "auto" => Ok(QuicListen::At(http)),
            addr => addr
                .parse()
                .map(QuicListen::At)
                .map_err(|e| format!("--quic-listen {addr:?}: `auto`, `off` or an address ({e})")),
        }
    }

    /// Checks the settings; the error names the one that is wrong.
    pub fn validate(&self, http: SocketAddr) -> Result<(), String> {
        match self.listen(http)? {
            QuicListen::At(addr) if addr.ip().is_unspecified() && self.advertise_quic.is_none() => {
                Err("--advertise-quic is needed when --quic-listen is a wildcard address".into())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        let args = |listen: &str| QuicArgs {
            quic_listen: listen.into(),
            advertise_quic: None,
            quic_cert: None,
            quic_key: None,
        };
        let http: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        assert_eq!(args("auto").listen(http), Ok(QuicListen::At(http)));
        assert_eq!(args("off").listen(http), Ok(QuicListen::Off));
        assert!(args("nowhere")
            .listen(http)
            .unwrap_err()
            .contains("--quic-listen"));
        let wild: SocketAddr = "0.0.0.0:9".parse().unwrap();
        assert!(args("auto")
            .validate(wild)
            .unwrap_err()
            .contains("--advertise-quic"));
    }
}
