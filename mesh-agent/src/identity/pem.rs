//! PEM in and out: certificates read from files and PEM texts, and written for operators.
use std::fs;
use std::path::Path;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

use super::IdentityError;

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        error: source,
    })
}

pub(super) fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE block found".into());
    }
    Ok(certs)
}

pub(super) fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    parse_pem_certs(&read_file(path)?).map_err(|reason| IdentityError::Pem {
        path: path.to_path_buf(),
        reason,
    })
}

/// One certificate as a PEM `CERTIFICATE` block: 64-column lines and LF line ends, as rcgen
/// writes the files of a generated root, so a root read back from them encodes byte for byte.
pub(super) fn encode_cert(der: &[u8]) -> String {
    ::pem::encode_config(
        &::pem::Pem::new("CERTIFICATE", der),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_round_trips() {
        for len in [1usize, 2, 3, 4, 5, 47, 48, 49, 300] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let pem = encode_cert(&der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), &der[..], "len {len}");
        }
    }

    #[test]
    fn pem_encoding_has_64_column_lf_lines() {
        let der: Vec<u8> = (0..100u8).collect();
        assert_eq!(
            encode_cert(&der),
            "-----BEGIN CERTIFICATE-----\n\
             AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v\n\
             MDEyMzQ1Njc4OTo7PD0+P0BBQkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWltcXV5f\n\
             YGFiYw==\n\
             -----END CERTIFICATE-----\n"
        );
    }
}
