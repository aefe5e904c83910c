//! The API's HTTPS: the certificate and key worker.yml `api.tls` names, for rustls.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ApiTls;

/// Why `api.tls` cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("api.tls.certificate {}: {reason}", path.display())]
    Certificate { path: PathBuf, reason: String },
    #[error("api.tls.key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("api.tls: the key does not fit the certificate, or rustls refuses them: {0}")]
    Refused(String),
}

/// Reads the PEM files and builds the server's TLS configuration (HTTP/1.1 by ALPN).
pub fn load_tls(tls: &ApiTls) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    crate::image::install_crypto_provider();
    let certificate = |reason: String| TlsError::Certificate {
        path: tls.certificate.clone(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&read(&tls.certificate).map_err(certificate)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| certificate(format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(certificate("holds no PEM certificate".to_owned()));
    }
    let key = |reason: String| TlsError::Key {
        path: tls.key.clone(),
        reason,
    };
    let private = PrivateKeyDer::from_pem_slice(&read(&tls.key).map_err(key)?)
        .map_err(|e| key(format!("no PEM private key: {e}")))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))
}
