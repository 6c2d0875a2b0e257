//! TLS material: generating a private CA and a server certificate for `init` and the demo,
//! and loading certificate and key files into a rustls server configuration.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// TLS material that could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate {what}: {reason}")]
    Generate { what: &'static str, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS file {path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("invalid TLS configuration with {path}: {reason}")]
    Config { path: String, reason: String },
}

/// A CA and a server certificate signed by it, in PEM.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

/// Generates a CA and a server certificate for `names` (DNS names or IP addresses).
pub fn generate(names: &[String]) -> Result<Pki, PkiError> {
    let gen_err = |what| {
        move |e: rcgen::Error| PkiError::Generate {
            what,
            reason: e.to_string(),
        }
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "unidesk-deploy CA");
    let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(gen_err("CA"))?;

    let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err("server"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "unidesk-controller");
    let key = KeyPair::generate().map_err(gen_err("server key"))?;
    let cert = params.signed_by(&key, &ca).map_err(gen_err("server"))?;
    Ok(Pki {
        ca_cert_pem: ca.pem(),
        ca_key_pem,
        server_cert_pem: cert.pem(),
        server_key_pem: key.serialize_pem(),
    })
}

/// Builds a rustls server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| PkiError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let certs = unidesk_agent::pem::certificates(&read(cert)?).map_err(|reason| PkiError::Pem {
        path: cert.display().to_string(),
        reason,
    })?;
    let key_der = unidesk_agent::pem::private_key(&read(key)?).map_err(|reason| PkiError::Pem {
        path: key.display().to_string(),
        reason,
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
    .map_err(|e| PkiError::Config {
        path: cert.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_loads() {
        let pki = generate(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("s.crt"), dir.path().join("s.key"));
        std::fs::write(&c, &pki.server_cert_pem).unwrap();
        std::fs::write(&k, &pki.server_key_pem).unwrap();
        server_config(&c, &k).unwrap();
        let err = server_config(&k, &k).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "TLS file {}: the PEM holds no CERTIFICATE block",
                k.display()
            )
        );
        let err = server_config(&c, &c).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "TLS file {}: the PEM holds no private key block",
                c.display()
            )
        );
    }
}
