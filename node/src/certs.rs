//! `ringfeed-node certs`: a cluster CA and the certificates its processes present, for
//! local clusters and tests (`scripts/cluster --secure`). Production clusters bring
//! their own PKI; the files are ordinary PEM either way.
//!
//! Every certificate is for both ends of a connection (server and client auth), names
//! `localhost`, `127.0.0.1`, `::1` and any `--host`, and a node's also names it as
//! `{id}.node.ringfeed` — the identity a peer checks. An existing CA in `--out`
//! (`ca.pem` + `ca.key`) is kept and signs the new certificates, so running it again
//! issues fresh certificates (a rotation) that the cluster already trusts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Make a cluster CA (unless one is there) and certificates signed by it.
#[derive(Parser, Debug, Clone)]
#[command(name = "ringfeed-node certs", version)]
pub struct CertsArgs {
    /// Where to write `ca.pem`, `ca.key` and `{name}.pem` / `{name}.key`.
    #[arg(long)]
    pub out: PathBuf,
    /// A node's certificate, `node-{id}.pem`, naming it `{id}.node.ringfeed` (repeat).
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// Another certificate, `{name}.pem` (`router`, `client`…) (repeat).
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// More host names or addresses every certificate is valid for (repeat).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
}

const CA_NAME: &str = "ringfeed cluster CA";

/// The CA's parameters: the same every time, so a CA key read back signs as the CA
/// certificate says.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params
}

/// Runs `ringfeed-node certs`.
pub fn certs(args: CertsArgs) -> anyhow::Result<()> {
    if args.nodes.is_empty() && args.names.is_empty() {
        bail!("nothing to make: give --node ID or --name NAME");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let (ca_pem, ca_key) = (args.out.join("ca.pem"), args.out.join("ca.key"));
    let ca_key = if ca_pem.exists() && ca_key.exists() {
        let pem = std::fs::read_to_string(&ca_key)
            .with_context(|| format!("cannot read {}", ca_key.display()))?;
        KeyPair::from_pem(&pem).with_context(|| format!("{} is not a key", ca_key.display()))?
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write(&ca_pem, &cert.pem(), false)?;
        write(&ca_key, &key.serialize_pem(), true)?;
        key
    };
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    hosts.extend(args.hosts.iter().cloned());
    let leaves = args
        .nodes
        .iter()
        .map(|id| (format!("node-{id}"), ringfeed_router::tls::node_name(id)))
        .chain(
            args.names
                .iter()
                .map(|n| (n.clone(), format!("{n}.ringfeed"))),
        );
    for (file, identity) in leaves {
        let mut names = hosts.clone();
        names.push(identity.clone());
        let mut params = CertificateParams::new(names)
            .with_context(|| format!("a name of {file} is not a valid host name"))?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, identity);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(
            &args.out.join(format!("{file}.key")),
            &key.serialize_pem(),
            true,
        )?;
        write(&args.out.join(format!("{file}.pem")), &cert.pem(), false)?;
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file and a rename, so a process watching
/// `path` never reads half of it; keys are readable by their owner only.
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringfeed_router::tls::{load_identity, load_roots, names_node};

    #[test]
    fn a_node_certificate_names_its_node_and_a_reissue_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let args = |nodes: &[&str]| CertsArgs {
            out: dir.path().to_path_buf(),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            names: vec!["router".into()],
            hosts: vec![],
        };
        certs(args(&["n1", "n_2"])).unwrap();
        let leaf = |name: &str| {
            load_identity(
                &dir.path().join(format!("{name}.pem")),
                &dir.path().join(format!("{name}.key")),
            )
            .unwrap()
            .cert[0]
                .clone()
        };
        let n1 = leaf("node-n1");
        assert!(names_node(&n1, "n1"));
        assert!(!names_node(&n1, "n2"));
        assert!(names_node(&leaf("node-n_2"), "n_2"));
        assert!(!names_node(&leaf("router"), "n1"));
        let roots = load_roots(&dir.path().join("ca.pem")).unwrap();
        // Issued again with the kept CA: a different certificate, the same CA.
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        certs(args(&["n1"])).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        let again = leaf("node-n1");
        assert_ne!(again, n1);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            ringfeed_router::tls::provider(),
        )
        .build()
        .unwrap();
        for cert in [&n1, &again] {
            verifier
                .verify_client_cert(cert, &[], rustls::pki_types::UnixTime::now())
                .expect("signed by the CA");
        }
    }
}
