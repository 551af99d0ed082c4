//! A private certificate authority for a benchmark's lab: what a community running its own
//! server and relays over HTTPS would have. Go clients (`tailscaled`, `derper`'s peers) and
//! tsunagud trust it through `SSL_CERT_FILE`; servers get certificates naming their lab
//! address (an IP address SAN, as the lab has no DNS names).

use anyhow::{Context as _, Result};
use std::path::{Path, PathBuf};

/// The CA: its certificate as a PEM file, and its key in memory to issue server
/// certificates.
pub struct LabCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    /// The CA certificate (PEM), for `SSL_CERT_FILE`.
    pub ca_file: PathBuf,
}

impl LabCa {
    /// A fresh CA, its certificate written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> Result<LabCa> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tsunagu bench lab CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)
            .context("self-signing the lab CA")?;
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, issuer.pem())
            .with_context(|| format!("writing {}", ca_file.display()))?;
        Ok(LabCa { issuer, ca_file })
    }

    /// A server certificate for `name` (an IP address becomes an IP SAN), written as PEM
    /// to `cert` and its key (PKCS#8) to `key`.
    pub fn issue(&self, name: &str, cert: &Path, key: &Path) -> Result<()> {
        let pair = rcgen::KeyPair::generate()?;
        let signed = rcgen::CertificateParams::new(vec![name.to_owned()])?
            .signed_by(&pair, &self.issuer)
            .with_context(|| format!("signing a certificate for {name}"))?;
        std::fs::write(cert, signed.pem())
            .with_context(|| format!("writing {}", cert.display()))?;
        crate::wg::write_secret(key, &pair.serialize_pem())
    }

    /// `SSL_CERT_FILE=<the CA>`, the environment a client needs to trust it.
    pub fn env(&self) -> String {
        format!("SSL_CERT_FILE={}", self.ca_file.display())
    }
}
