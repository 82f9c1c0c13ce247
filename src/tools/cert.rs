//! `pairdb cert`: a cluster CA and node certificates for a test or small cluster
//! (docs/security.md, "TLS").
//!
//! In `--out-dir`: `ca.pem` and `ca.key` (made on the first run, reused after, so nodes added
//! later share the CA), and for every `--node NAME`: `NAME.pem` and `NAME.key`. A node
//! certificate names [`INTERNAL_NAME`] (what internal clients check), the node's name, and
//! every `--san` (a DNS name or an IP address: what HTTPS clients of a gateway check); it is
//! good for both server and client authentication, so one certificate serves a node's
//! listener and its calls to other nodes. Keys are written with mode 0600 and never
//! overwritten: an existing `NAME.pem` is refused (remove it to issue a new one).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

use crate::limits::valid_node_id;
use crate::rpc::tls::INTERNAL_NAME;

/// What `pairdb cert` was asked for.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub out_dir: PathBuf,
    pub nodes: Vec<String>,
    pub sans: Vec<String>,
    pub days: u32,
}

/// The files one run wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub ca_created: bool,
    pub files: Vec<PathBuf>,
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: a peer whose clock is a little behind accepts a certificate made now.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    params.serial_number = Some(SerialNumber::from_slice(
        uuid::Uuid::new_v4().as_bytes().as_slice(),
    ));
}

/// Writes `contents` to a new file `path` (mode `mode`); an existing file is an error.
fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// The CA of `dir`, made when absent.
fn load_or_make_ca(
    dir: &Path,
    days: u32,
    written: &mut Written,
) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() || key_path.exists() {
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("cannot read {}", cert_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a private key", key_path.display()))?;
        return Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("{} is not a CA certificate", cert_path.display()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "pairdb cluster CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    written.ca_created = true;
    written.files.extend([cert_path, key_path]);
    Ok(Issuer::new(params, key))
}

/// Makes the CA (when absent) and the requested node certificates.
pub fn make(request: &CertRequest) -> anyhow::Result<Written> {
    if request.days == 0 {
        anyhow::bail!("--days must be at least 1");
    }
    for name in &request.nodes {
        if !valid_node_id(name) {
            anyhow::bail!(
                "node name {name:?} must be 1..=128 characters of letters, digits, '-', '_' or '.'"
            );
        }
        let existing = request.out_dir.join(format!("{name}.pem"));
        if existing.exists() {
            anyhow::bail!(
                "{} exists; remove it to issue a new certificate",
                existing.display()
            );
        }
    }
    std::fs::create_dir_all(&request.out_dir)
        .with_context(|| format!("cannot create {}", request.out_dir.display()))?;
    let mut written = Written::default();
    let ca = load_or_make_ca(&request.out_dir, request.days.max(3650), &mut written)?;
    for name in &request.nodes {
        let mut names = vec![INTERNAL_NAME.to_owned(), name.clone()];
        names.extend(request.sans.iter().cloned());
        names.dedup();
        let mut params = CertificateParams::new(names)
            .with_context(|| format!("bad subject names for {name}"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, request.days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        let (cert_path, key_path) = (
            request.out_dir.join(format!("{name}.pem")),
            request.out_dir.join(format!("{name}.key")),
        );
        write_new(&key_path, &key.serialize_pem(), 0o600)?;
        write_new(&cert_path, &cert.pem(), 0o644)?;
        written.files.extend([cert_path, key_path]);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_reuses_the_ca_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let request = |nodes: &[&str]| CertRequest {
            out_dir: dir.path().to_owned(),
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            sans: vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            days: 30,
        };
        let first = make(&request(&["s1"])).expect("first");
        assert!(first.ca_created);
        let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
        let second = make(&request(&["s2"])).expect("second");
        assert!(!second.ca_created);
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca"), ca);
        assert!(make(&request(&["s1"])).is_err(), "s1 exists");
        assert!(make(&request(&["bad name"])).is_err());
        let mode = std::fs::metadata(dir.path().join("s2.key"))
            .expect("key")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Both load as a node's TLS files.
        for node in ["s1", "s2"] {
            crate::rpc::tls::InternalTls::load(
                &dir.path().join("ca.pem"),
                &dir.path().join(format!("{node}.pem")),
                &dir.path().join(format!("{node}.key")),
            )
            .expect("loads");
        }
    }
}
