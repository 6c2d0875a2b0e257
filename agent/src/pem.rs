//! PEM certificates as rustls takes them: one reader for every place that loads or pins
//! certificates (the agent's pinned controller CA, an extra CA for Git, the controller's
//! gateway certificate, its `check` and its Git server). Errors say what is wrong with the
//! text; callers add the path.

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Every `CERTIFICATE` block of `pem`, in order; none at all is an error.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading PEM: {e}"))?;
    if certs.is_empty() {
        return Err("the PEM holds no CERTIFICATE block".to_owned());
    }
    Ok(certs)
}

/// The first private key block of `pem` (PKCS#8, PKCS#1 or SEC1); none at all is an error.
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("reading PEM: {e}"))?
        .ok_or_else(|| "the PEM holds no private key block".to_owned())
}

/// A root store trusting exactly the certificates of `pem`.
pub fn roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_and_roots_name_what_is_wrong() {
        let pki = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let pem = pki.cert.pem();
        assert_eq!(certificates(pem.as_bytes()).unwrap().len(), 1);
        assert_eq!(roots(pem.as_bytes()).unwrap().len(), 1);
        assert_eq!(
            certificates(b"no pem here").unwrap_err(),
            "the PEM holds no CERTIFICATE block"
        );
        private_key(pki.signing_key.serialize_pem().as_bytes()).unwrap();
        assert_eq!(
            private_key(pem.as_bytes()).unwrap_err(),
            "the PEM holds no private key block"
        );
        let torn = "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n";
        assert!(
            roots(torn.as_bytes())
                .unwrap_err()
                .starts_with("reading PEM:")
        );
    }
}
