//! A lab certificate authority: the control server on HTTPS (and its relay on TLS) with a
//! certificate that clients trust through `SSL_CERT_FILE`, as a community running its
//! own CA would deploy it. Official clients reach relays over TLS only, so every lab with
//! an official client uses this.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::error::LabError;

/// The PEM files of a lab CA and one server certificate.
#[derive(Clone, Debug)]
pub struct LabTls {
    /// The CA certificate (give it to clients: `SSL_CERT_FILE=...`).
    pub ca: PathBuf,
    /// The server's certificate, signed by the CA.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

fn tls_err(what: &str, e: rcgen::Error) -> LabError {
    LabError::invalid("certificate", format!("{what}: {e}"))
}

/// Writes a fresh CA and a certificate for `server` (an IP address, as the lab's server
/// URL names it) into `dir`: `ca.pem`, `cert.pem`, `key.pem`.
pub fn lab_tls(dir: &Path, server: IpAddr) -> Result<LabTls, LabError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| tls_err("CA parameters", e))?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tsunagu lab CA");
    let ca_key = rcgen::KeyPair::generate().map_err(|e| tls_err("CA key", e))?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)
        .map_err(|e| tls_err("CA certificate", e))?;
    let key = rcgen::KeyPair::generate().map_err(|e| tls_err("server key", e))?;
    let cert = rcgen::CertificateParams::new(vec![server.to_string()])
        .map_err(|e| tls_err("server parameters", e))?
        .signed_by(&key, &ca)
        .map_err(|e| tls_err("server certificate", e))?;
    let out = LabTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    for (path, pem) in [
        (&out.ca, ca.pem()),
        (&out.cert, cert.pem()),
        (&out.key, key.serialize_pem()),
    ] {
        std::fs::write(path, pem)
            .map_err(|e| LabError::io(format!("writing {}", path.display()), e))?;
    }
    Ok(out)
}
