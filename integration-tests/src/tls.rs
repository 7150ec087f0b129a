//! Certificates generated at test time (rcgen) into a temporary directory:
//! a CA, a service certificate (SAN `127.0.0.1` and `localhost`, usable as
//! server and as client, as every Ordo service is both), a client
//! certificate for the test's own calls, and a second, unrelated CA with its
//! own client certificate (for "not signed by the CA we trust").
//!
//! [`TestPki::service_env`] is what a service needs (`ORDO_TLS_*`), the
//! `*_tls` methods give tonic client configs, and [`TestPki::reqwest`] an
//! HTTPS client for Server-Sent Events.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A CA with a service and a client certificate, and an unrelated CA.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
}

/// One generated CA (its certificate and the key that signs leaves).
struct Authority {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn authority(name: &str) -> anyhow::Result<Authority> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    Ok(Authority { pem: cert.pem(), issuer: Issuer::new(params, key) })
}

/// A leaf signed by `ca`: (certificate PEM, key PEM).
fn leaf(
    ca: &Authority,
    name: &str,
    sans: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = usages;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl TestPki {
    /// Generates everything into a fresh temporary directory.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ordo-pki-").tempdir().context("cannot create the PKI dir")?;
        let ca = authority("ordo test CA")?;
        let (service_cert, service_key) = leaf(
            &ca,
            "ordo service",
            &["127.0.0.1", "localhost"],
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        let (client_cert, client_key) = leaf(&ca, "ordo test client", &[], vec![ExtendedKeyUsagePurpose::ClientAuth])?;
        let other = authority("some other CA")?;
        let (other_cert, other_key) = leaf(
            &other,
            "stranger",
            &["127.0.0.1", "localhost"],
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        for (name, text) in [
            ("ca.pem", &ca.pem),
            ("service.pem", &service_cert),
            ("service-key.pem", &service_key),
            ("client.pem", &client_cert),
            ("client-key.pem", &client_key),
            ("other-ca.pem", &other.pem),
            ("stranger.pem", &other_cert),
            ("stranger-key.pem", &other_key),
        ] {
            std::fs::write(dir.path().join(name), text).with_context(|| format!("cannot write {name}"))?;
        }
        Ok(Self { dir })
    }

    /// A file of the PKI: `ca.pem`, `service.pem`, `service-key.pem`,
    /// `client.pem`, `client-key.pem`, `other-ca.pem`, `stranger.pem`,
    /// `stranger-key.pem`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn read(&self, name: &str) -> String {
        // Written by `generate` a moment ago: only a broken temp dir fails here.
        std::fs::read_to_string(self.path(name)).unwrap_or_else(|e| panic!("the test PKI lost {name}: {e}"))
    }

    /// The environment of a service with TLS on every server and channel;
    /// `mtls` also requires client certificates signed by the CA.
    pub fn service_env(&self, mtls: bool) -> Vec<(String, String)> {
        let path = |name: &str| self.path(name).display().to_string();
        let mut env = vec![
            ("ORDO_TLS_CERT".to_owned(), path("service.pem")),
            ("ORDO_TLS_KEY".to_owned(), path("service-key.pem")),
            ("ORDO_TLS_CA".to_owned(), path("ca.pem")),
        ];
        if mtls {
            env.push(("ORDO_TLS_CLIENT_CA".to_owned(), path("ca.pem")));
        }
        env
    }

    /// Trusts the CA and presents the test client's certificate.
    pub fn client_tls(&self) -> ClientTlsConfig {
        self.anonymous_tls().identity(Identity::from_pem(self.read("client.pem"), self.read("client-key.pem")))
    }

    /// Trusts the CA, presents no certificate.
    pub fn anonymous_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read("ca.pem")))
    }

    /// Trusts only the other CA (so not the services), with its certificate.
    pub fn stranger_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("other-ca.pem")))
            .identity(Identity::from_pem(self.read("stranger.pem"), self.read("stranger-key.pem")))
    }

    /// Trusts the CA, presents a certificate the CA did not sign.
    pub fn impostor_tls(&self) -> ClientTlsConfig {
        self.anonymous_tls().identity(Identity::from_pem(self.read("stranger.pem"), self.read("stranger-key.pem")))
    }

    /// An HTTPS client trusting only the CA (for Server-Sent Events).
    pub fn reqwest(&self) -> anyhow::Result<reqwest::Client> {
        let ca = reqwest::Certificate::from_pem(self.read("ca.pem").as_bytes())?;
        Ok(reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()?)
    }
}

/// The TLS a probe of a service started with `env` needs: `None` for a
/// plaintext service; else trust its `ORDO_TLS_CA` and present its own
/// certificate (valid as a client certificate under mTLS too).
pub fn probe_tls(env: &[(String, String)]) -> Option<ClientTlsConfig> {
    let get = |key: &str| env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let (cert, key) = (get("ORDO_TLS_CERT")?, get("ORDO_TLS_KEY")?);
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let mut config = ClientTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = get("ORDO_TLS_CA").and_then(read) {
        config = config.ca_certificate(Certificate::from_pem(ca));
    }
    Some(config)
}
