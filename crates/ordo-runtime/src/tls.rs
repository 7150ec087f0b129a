//! TLS for every Ordo process: the `--tls-*` flags, loading and checking the
//! PEM files at start-up, and the one process-wide setting every server and
//! channel reads.
//!
//! - `--tls-cert` + `--tls-key`: the process's identity. Servers (gRPC, and
//!   the push-gateway's Server-Sent Events) terminate TLS with it; channels
//!   present it as their client certificate when a peer asks (mTLS).
//! - `--tls-client-ca`: gRPC servers REQUIRE a client certificate signed by
//!   this CA (mTLS). SSE is for browsers and never asks for one.
//! - `--tls-ca`: the CA a process trusts when it dials its peers; when set,
//!   bare `host:port` peers are dialed over `https`.
//! - `--redis-ca`: the CA trusted for `rediss://` (default: `--tls-ca`, and
//!   without either the system roots).
//! - `--tls-server-name`: the name checked in peers' certificates instead of
//!   the host dialed (peers dialed by IP, e.g. found through DNS).
//!
//! Why process-wide ([`install`], read by [`settings`]): a process has one
//! identity and one set of trust anchors, like the system trust store, and
//! channels are built deep inside libraries (the result sink, the worker
//! pool, remote operations) from nothing but an address. Threading a TLS
//! config through every constructor would change a dozen signatures for no
//! choice anyone makes per call. `app::run` installs it once, before the
//! service runs; in-process tests that need a different setting use the
//! explicit variants (`GrpcServer::with_tls`, `client::traced_with`).
//!
//! The crypto provider is ring, for the whole workspace: reqwest's
//! `rustls-tls`, tonic's `tls-ring`, redis and lapin all run on it, and
//! [`ensure_crypto_provider`] installs it as the process default once, so no
//! library ever panics for want of (or because of two) providers.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Once, OnceLock},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// The TLS flags every service takes (flattened into `app::CommonArgs`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) of this process: its servers speak TLS with
    /// it, and it is the client certificate shown to peers that ask (mTLS).
    /// Needs --tls-key.
    #[arg(long, env = "ORDO_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "ORDO_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: the gRPC server then requires client certificates
    /// signed by it (mTLS). Needs --tls-cert and --tls-key.
    #[arg(long, env = "ORDO_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA bundle trusted when dialing other Ordo services; when set,
    /// peers given as host:port are dialed over https (http://… stays plaintext).
    #[arg(long, env = "ORDO_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Name expected in peers' certificates instead of the host dialed
    /// (for peers dialed by IP address, e.g. discovered through DNS).
    #[arg(long, env = "ORDO_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// PEM CA bundle trusted for rediss:// URLs (default: --tls-ca; without
    /// either, the system roots).
    #[arg(long, env = "ORDO_REDIS_CA", value_name = "PEM")]
    pub redis_ca: Option<PathBuf>,
}

/// A bad TLS file or flag combination (a configuration error: exit 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// PEM text and the certificates parsed from it.
#[derive(Clone)]
struct Pem {
    path: PathBuf,
    text: Vec<u8>,
}

/// A certificate chain with its private key, both as PEM.
#[derive(Clone)]
pub struct Identity {
    cert: Pem,
    key: Pem,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Identity").field("cert", &self.cert.path).finish_non_exhaustive()
    }
}

impl Identity {
    /// The certificate chain as PEM.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert.text
    }

    /// The private key as PEM.
    pub fn key_pem(&self) -> &[u8] {
        &self.key.text
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        certificates(&self.cert)
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.key.text)
            .map_err(|e| TlsError(format!("--tls-key {}: no usable PEM private key: {e}", self.key.path.display())))
    }
}

/// What a process loaded from its `--tls-*` flags (empty: plaintext).
#[derive(Clone, Default)]
pub struct TlsSettings {
    identity: Option<Identity>,
    client_ca: Option<Pem>,
    ca: Option<Pem>,
    server_name: Option<String>,
    redis_ca: Option<Pem>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = |pem: &Option<Pem>| pem.as_ref().map(|p| p.path.clone());
        f.debug_struct("TlsSettings")
            .field("identity", &self.identity)
            .field("client_ca", &path(&self.client_ca))
            .field("ca", &path(&self.ca))
            .field("server_name", &self.server_name)
            .field("redis_ca", &path(&self.redis_ca))
            .finish()
    }
}

impl TlsArgs {
    /// Reads and checks every file: the certificate and key parse and belong
    /// together, each CA bundle holds at least one valid certificate. The
    /// message names the flag and the file.
    pub fn load(&self) -> Result<TlsSettings, TlsError> {
        ensure_crypto_provider();
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let identity = Identity { cert: read("--tls-cert", cert)?, key: read("--tls-key", key)? };
                check_identity(&identity)?;
                Some(identity)
            }
            (None, None) => None,
            (Some(_), None) => return Err(TlsError("--tls-cert needs --tls-key (ORDO_TLS_KEY) as well".into())),
            (None, Some(_)) => return Err(TlsError("--tls-key needs --tls-cert (ORDO_TLS_CERT) as well".into())),
        };
        let client_ca = self.tls_client_ca.as_deref().map(|p| read_ca("--tls-client-ca", p)).transpose()?;
        if client_ca.is_some() && identity.is_none() {
            return Err(TlsError(
                "--tls-client-ca needs --tls-cert and --tls-key: only a TLS server can require client certificates"
                    .into(),
            ));
        }
        let server_name = match self.tls_server_name.as_deref().map(str::trim) {
            None => None,
            Some(name) => match rustls::pki_types::ServerName::try_from(name) {
                Ok(_) => Some(name.to_owned()),
                Err(e) => return Err(TlsError(format!("--tls-server-name {name:?}: {e}"))),
            },
        };
        Ok(TlsSettings {
            identity,
            client_ca,
            ca: self.tls_ca.as_deref().map(|p| read_ca("--tls-ca", p)).transpose()?,
            server_name,
            redis_ca: self.redis_ca.as_deref().map(|p| read_ca("--redis-ca", p)).transpose()?,
        })
    }
}

fn read(flag: &str, path: &Path) -> Result<Pem, TlsError> {
    let text = std::fs::read(path).map_err(|e| TlsError(format!("{flag} {}: cannot read: {e}", path.display())))?;
    Ok(Pem { path: path.to_path_buf(), text })
}

fn certificates(pem: &Pem) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&pem.text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: not a PEM certificate file: {e}", pem.path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            pem.path.display()
        )));
    }
    Ok(certs)
}

fn read_ca(flag: &str, path: &Path) -> Result<Pem, TlsError> {
    let pem = read(flag, path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&pem).map_err(|e| TlsError(format!("{flag} {e}")))? {
        roots
            .add(cert)
            .map_err(|e| TlsError(format!("{flag} {}: not a usable CA certificate: {e}", path.display())))?;
    }
    Ok(pem)
}

fn check_identity(identity: &Identity) -> Result<(), TlsError> {
    let chain = identity.chain().map_err(|e| TlsError(format!("--tls-cert {e}")))?;
    let key = identity.private_key()?;
    // Building a server config checks that the key is usable and is the
    // certificate's (rustls compares the public keys).
    rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).map_err(|e| {
        TlsError(format!(
            "--tls-cert {} and --tls-key {} do not make an identity: {e}",
            identity.cert.path.display(),
            identity.key.path.display()
        ))
    })?;
    Ok(())
}

impl TlsSettings {
    /// Whether any TLS is configured.
    pub fn is_empty(&self) -> bool {
        self.identity.is_none() && self.ca.is_none() && self.redis_ca.is_none()
    }

    /// The process's certificate and key, if any.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Whether gRPC servers require client certificates.
    pub fn requires_client_certs(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The gRPC server's TLS (with client verification when `--tls-client-ca`).
    pub fn grpc_server(&self) -> Option<tonic::transport::ServerTlsConfig> {
        let identity = self.identity.as_ref()?;
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(identity.cert_pem(), identity.key_pem()));
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(&ca.text));
        }
        Some(config)
    }

    /// A rustls server config for HTTP/1.1 (the SSE listener): the same
    /// identity, no client certificates (browsers).
    pub fn http_server(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        let Some(identity) = &self.identity else { return Ok(None) };
        ensure_crypto_provider();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(identity.chain()?, identity.private_key()?)
            .map_err(|e| TlsError(format!("--tls-cert/--tls-key: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    /// The channel TLS towards Ordo peers: `Some` when `--tls-ca` is set
    /// (then peers are dialed over https), presenting the identity if any.
    pub fn grpc_client(&self) -> Option<tonic::transport::ClientTlsConfig> {
        let ca = self.ca.as_ref()?;
        let mut config =
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&ca.text));
        if let Some(identity) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(identity.cert_pem(), identity.key_pem()));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Some(config)
    }

    /// The channel TLS for an explicit `https://` peer: [`Self::grpc_client`]
    /// when `--tls-ca` is set, else the system roots.
    pub fn grpc_client_or_system_roots(&self) -> tonic::transport::ClientTlsConfig {
        self.grpc_client().unwrap_or_else(|| {
            let config = tonic::transport::ClientTlsConfig::new().with_native_roots();
            match &self.identity {
                Some(identity) => {
                    config.identity(tonic::transport::Identity::from_pem(identity.cert_pem(), identity.key_pem()))
                }
                None => config,
            }
        })
    }

    /// The CA bundle (PEM) trusted for `rediss://`: `--redis-ca`, else `--tls-ca`.
    pub fn redis_ca_pem(&self) -> Option<&[u8]> {
        self.redis_ca.as_ref().or(self.ca.as_ref()).map(|pem| pem.text.as_slice())
    }

    /// The CA bundle (PEM) of `--tls-ca`, for other TLS clients (AMQP).
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.ca.as_ref().map(|pem| pem.text.as_slice())
    }
}

static PROCESS: OnceLock<TlsSettings> = OnceLock::new();

/// Makes `settings` the process's TLS (see the module doc for why it is
/// process-wide). The first call wins; later calls return `false`.
pub fn install(settings: TlsSettings) -> bool {
    ensure_crypto_provider();
    PROCESS.set(settings).is_ok()
}

/// The process's TLS: what [`install`] set, else none (plaintext).
pub fn settings() -> &'static TlsSettings {
    static NONE: OnceLock<TlsSettings> = OnceLock::new();
    PROCESS.get().unwrap_or_else(|| NONE.get_or_init(TlsSettings::default))
}

/// Installs ring as rustls's process-wide provider (once). redis and lapin
/// build their rustls configs from the process default; without one they
/// would panic on the first `rediss://` or `amqps://` connection.
pub fn ensure_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err only when one is installed already: then that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// A CA and a leaf it signed, as PEM files in a temp dir.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("a temp dir");
            let ca_key = rcgen::KeyPair::generate().expect("a key");
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).expect("a CA");
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let leaf_key = rcgen::KeyPair::generate().expect("a key");
            let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
                .expect("params")
                .signed_by(&leaf_key, &issuer)
                .expect("a leaf");
            let other_key = rcgen::KeyPair::generate().expect("a key");
            let files = Self { dir };
            files.write("ca.pem", &ca.pem());
            files.write("cert.pem", &leaf.pem());
            files.write("key.pem", &leaf_key.serialize_pem());
            files.write("other-key.pem", &other_key.serialize_pem());
            files.write("garbage.pem", "not a certificate\n");
            files
        }

        fn write(&self, name: &str, text: &str) {
            let mut file = std::fs::File::create(self.dir.path().join(name)).expect("create");
            file.write_all(text.as_bytes()).expect("write");
        }

        fn path(&self, name: &str) -> Option<PathBuf> {
            Some(self.dir.path().join(name))
        }
    }

    fn error(args: TlsArgs) -> String {
        match args.load() {
            Ok(settings) => panic!("expected an error, loaded {settings:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn a_full_configuration_loads() {
        let f = Files::new();
        let settings = TlsArgs {
            tls_cert: f.path("cert.pem"),
            tls_key: f.path("key.pem"),
            tls_client_ca: f.path("ca.pem"),
            tls_ca: f.path("ca.pem"),
            ..TlsArgs::default()
        }
        .load()
        .expect("valid files load");
        assert!(settings.grpc_server().is_some());
        assert!(settings.grpc_client().is_some());
        assert!(settings.requires_client_certs());
        assert!(settings.http_server().expect("an http config").is_some());
        assert_eq!(settings.redis_ca_pem(), settings.ca_pem(), "rediss trusts --tls-ca by default");
        assert!(TlsArgs::default().load().expect("nothing is fine").is_empty());
    }

    #[test]
    fn bad_combinations_and_files_are_named() {
        let f = Files::new();
        let cert_only = error(TlsArgs { tls_cert: f.path("cert.pem"), ..TlsArgs::default() });
        assert!(cert_only.contains("--tls-cert needs --tls-key"), "{cert_only}");
        let key_only = error(TlsArgs { tls_key: f.path("key.pem"), ..TlsArgs::default() });
        assert!(key_only.contains("--tls-key needs --tls-cert"), "{key_only}");
        let client_ca_alone = error(TlsArgs { tls_client_ca: f.path("ca.pem"), ..TlsArgs::default() });
        assert!(client_ca_alone.contains("--tls-client-ca needs --tls-cert"), "{client_ca_alone}");
        let missing = error(TlsArgs { tls_ca: f.path("nope.pem"), ..TlsArgs::default() });
        assert!(missing.contains("--tls-ca") && missing.contains("nope.pem") && missing.contains("cannot read"));
        let garbage = error(TlsArgs { tls_ca: f.path("garbage.pem"), ..TlsArgs::default() });
        assert!(garbage.contains("--tls-ca") && garbage.contains("no PEM certificate"), "{garbage}");
        let mismatch =
            error(TlsArgs { tls_cert: f.path("cert.pem"), tls_key: f.path("other-key.pem"), ..TlsArgs::default() });
        assert!(mismatch.contains("do not make an identity"), "{mismatch}");
        let key_is_cert =
            error(TlsArgs { tls_cert: f.path("cert.pem"), tls_key: f.path("cert.pem"), ..TlsArgs::default() });
        assert!(key_is_cert.contains("--tls-key"), "{key_is_cert}");
    }
}
