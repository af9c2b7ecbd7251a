//! The host's trust store, handed to the bundle: the real hosts of intercepted (credential)
//! connections are verified against the compiled-in public roots *and* the certificates the
//! host trusts, so that credential injection works behind a TLS-inspecting corporate proxy
//! (whose CA the host trusts, Mozilla's list does not).
//!
//! `start` reads the store on the host (`$SSL_CERT_FILE`, else the first of
//! [`SYSTEM_TRUST_STORES`] that exists), at most [`MAX_TRUST_STORE_BYTES`], and copies it into
//! the bottle's run directory ([`RunDir::trust_store`]), which the bundle sees beside its logs.

use crate::host::run_dir::RunDir;
use std::io::Read;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The variable naming the host's trust store (a PEM bundle), as OpenSSL reads it.
pub const TRUST_STORE_ENV: &str = "SSL_CERT_FILE";
/// Where the system trust store is, tried in order when [`TRUST_STORE_ENV`] is not set:
/// Debian/Ubuntu/Alpine/Arch/NixOS, Fedora/RHEL, macOS/BSD.
pub const SYSTEM_TRUST_STORES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];
/// Largest trust store a bottle takes, in bytes: a full system bundle is about 200 KiB; a
/// bundle far larger is not a list of CAs (and the bundle's memory is capped).
pub const MAX_TRUST_STORE_BYTES: u64 = 4 * 1024 * 1024;
/// File name of the copied trust store in the bottle's run directory.

#[derive(Debug, thiserror::Error)]
pub enum TrustStoreError {
    #[error("cannot read the trust store {path} (set {TRUST_STORE_ENV} to a readable PEM bundle of CA certificates)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the trust store {path} is larger than {} MiB: set {TRUST_STORE_ENV} to a PEM bundle of CA certificates", MAX_TRUST_STORE_BYTES / (1024 * 1024))]
    TooLarge { path: PathBuf },
    #[error("the trust store {path} holds no readable PEM certificate ({skipped} could not be parsed): set {TRUST_STORE_ENV} to a PEM bundle of CA certificates")]
    Empty { path: PathBuf, skipped: usize },
    #[error("cannot copy the trust store into {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The certificates of a trust store, and how many of its PEM sections could not be parsed.
#[derive(Debug)]
pub struct TrustedCerts {
    pub certs: Vec<CertificateDer<'static>>,
    pub skipped: usize,
}

/// The host's trust store: `ssl_cert_file` (the value of [`TRUST_STORE_ENV`]) when set, else
/// the first of `candidates` for which `exists` holds; none: only the compiled-in roots.
pub fn host_trust_store(
    ssl_cert_file: Option<std::ffi::OsString>,
    candidates: &[&str],
    exists: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    match ssl_cert_file.filter(|v| !v.is_empty()) {
        Some(path) => Some(PathBuf::from(path)),
        None => candidates
            .iter()
            .map(PathBuf::from)
            .find(|p| exists(p.as_path())),
    }
}

/// Read `path`, at most [`MAX_TRUST_STORE_BYTES`].
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, TrustStoreError> {
    let read_err = |source| TrustStoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_TRUST_STORE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_TRUST_STORE_BYTES {
        return Err(TrustStoreError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// The certificates in a PEM bundle (`path` names it in the error); a section that does not
/// parse is skipped and counted; none at all is an error.
pub fn parse(pem: &[u8], path: &Path) -> Result<TrustedCerts, TrustStoreError> {
    let mut certs = Vec::new();
    let mut skipped = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        match cert {
            Ok(cert) => certs.push(cert),
            Err(_) => skipped += 1,
        }
    }
    if certs.is_empty() {
        return Err(TrustStoreError::Empty {
            path: path.to_path_buf(),
            skipped,
        });
    }
    Ok(TrustedCerts { certs, skipped })
}

/// Read and parse the trust store at `path` (in the bundle: the copy `start` made).
pub fn load(path: &Path) -> Result<TrustedCerts, TrustStoreError> {
    parse(&read_bounded(path)?, path)
}

/// Copy the host's trust store (found by [`host_trust_store`] from this process's
/// environment) into the run directory; checked here, so that the user hears
/// about a bad store from `start`, not from the bundle. Returns whether a store was copied.
pub fn stage(run: &RunDir) -> Result<bool, TrustStoreError> {
    let Some(source) = host_trust_store(
        std::env::var_os(TRUST_STORE_ENV),
        SYSTEM_TRUST_STORES,
        Path::exists,
    ) else {
        return Ok(false);
    };
    let pem = read_bounded(&source)?;
    parse(&pem, &source)?;
    let target = run.trust_store();
    std::fs::write(&target, &pem).map_err(|source| TrustStoreError::Write {
        path: target,
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn ssl_cert_file_wins_over_the_system_stores() {
        let found = host_trust_store(Some("/tmp/mine.pem".into()), SYSTEM_TRUST_STORES, |_| true);

        assert_eq!(found, Some(PathBuf::from("/tmp/mine.pem")));
    }

    #[test]
    fn without_ssl_cert_file_the_first_existing_system_store_is_used() {
        let found = host_trust_store(None, SYSTEM_TRUST_STORES, |p| {
            p != Path::new(SYSTEM_TRUST_STORES[0])
        });

        assert_eq!(found, Some(PathBuf::from(SYSTEM_TRUST_STORES[1])));
    }

    #[test]
    fn no_store_anywhere_means_only_the_compiled_in_roots() {
        let found = host_trust_store(Some("".into()), SYSTEM_TRUST_STORES, |_| false);

        assert_eq!(found, None);
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_skipped_and_counted() {
        let bad = "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
        let pem = format!("{}{bad}{}", ca_pem(), ca_pem());

        let got = parse(pem.as_bytes(), Path::new("store.pem")).unwrap();

        assert_eq!((got.certs.len(), got.skipped), (2, 1));
    }

    #[test]
    fn a_store_without_certificates_is_an_error_naming_it() {
        let err = parse(b"not a certificate\n", Path::new("/x/store.pem")).unwrap_err();

        assert!(err.to_string().contains("/x/store.pem"), "{err}");
    }

    #[test]
    fn a_store_over_the_bound_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.pem");
        std::fs::write(&path, vec![b'\n'; MAX_TRUST_STORE_BYTES as usize + 1]).unwrap();

        let err = load(&path).unwrap_err();

        assert!(
            matches!(&err, TrustStoreError::TooLarge { path: p } if p == &path),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_store_is_an_error_naming_it() {
        let err = load(Path::new("/nonexistent/store.pem")).unwrap_err();

        assert!(err.to_string().contains("/nonexistent/store.pem"), "{err}");
    }
}
