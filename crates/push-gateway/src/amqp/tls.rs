//! TLS for `amqps://` broker URLs: which CAs are trusted and which client
//! certificate is shown. Plain `amqp://` URLs ignore all of it.
//!
//! Trusted: the system roots, plus `--amqp-ca` if given, else the process's
//! `--tls-ca` (so one internal CA can serve Ordo and its broker). The client
//! certificate is the process's `--tls-cert`/`--tls-key` (RabbitMQ's
//! `ssl_options.verify = verify_peer` asks for it; otherwise it is unused).
//! The crypto provider is the workspace's (ring, see `ordo_runtime::tls`).

use std::path::Path;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject as _};

/// Reads and checks `--amqp-ca` (when given) and builds the TLS settings of
/// the broker connection. The error names the flag and the file.
pub fn config(ca_file: Option<&Path>) -> Result<OwnedTLSConfig, String> {
    ordo_runtime::tls::ensure_crypto_provider();
    let process = ordo_runtime::tls::settings();
    let cert_chain = match ca_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("--amqp-ca {}: cannot read: {e}", path.display()))?;
            let certs = CertificateDer::pem_slice_iter(text.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--amqp-ca {}: not a PEM certificate file: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("--amqp-ca {}: no PEM certificate in it", path.display()));
            }
            Some(text)
        }
        None => process.ca_pem().map(|pem| String::from_utf8_lossy(pem).into_owned()),
    };
    let identity =
        process.identity().map(|id| OwnedIdentity::PKCS8 { pem: id.cert_pem().to_vec(), key: id.key_pem().to_vec() });
    Ok(OwnedTLSConfig { identity, cert_chain })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lapin::{Connection, ConnectionProperties};
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[test]
    fn a_bad_ca_file_is_named() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let missing = dir.path().join("missing.pem");
        let error = config(Some(&missing)).expect_err("a missing file");
        assert!(error.contains("--amqp-ca") && error.contains("missing.pem"), "{error}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");
        let error = config(Some(&garbage)).expect_err("no certificate");
        assert!(error.contains("no PEM certificate"), "{error}");
    }

    /// amqps:// against a plaintext AMQP port: the broker answers a TLS
    /// ClientHello with its protocol header, and the connection must fail
    /// with a TLS error, not hang or succeed in plaintext.
    #[tokio::test]
    async fn amqps_against_a_plain_port_fails_with_a_tls_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let plain_broker = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                // What RabbitMQ sends to a client it cannot understand.
                let _ = socket.write_all(b"AMQP\x00\x00\x09\x01").await;
            }
        });
        let rcgen::CertifiedKey { cert, .. } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("a cert");
        let dir = tempfile::tempdir().expect("a temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("write");
        let tls = config(Some(&ca)).expect("a valid CA");
        assert!(tls.cert_chain.as_deref().is_some_and(|c| c.contains("BEGIN CERTIFICATE")), "the CA is trusted");
        let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f");
        let connect = Connection::connect_with_config(
            &url,
            ConnectionProperties::default(),
            tls,
            lapin::runtime::default_runtime().expect("a runtime"),
        );
        let outcome = tokio::time::timeout(Duration::from_secs(10), connect).await.expect("no hang");
        plain_broker.abort();
        let error = outcome.expect_err("TLS to a plaintext port must fail").to_string();
        let lower = error.to_lowercase();
        assert!(
            lower.contains("tls") || lower.contains("corrupt") || lower.contains("handshake"),
            "not a TLS error: {error}"
        );
    }
}
