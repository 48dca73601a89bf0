//! The platform's SSH user CA: short-lived OpenSSH user certificates for a lease's login.
//! Broker nodes share the key (a file, like the agent CA); agents learn its public half from
//! the broker over mutual TLS and trust certificates it signed, for their own lease logins only.

use std::path::Path;

use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{LineEnding, PrivateKey, PublicKey};

use crate::{write_private_file, PkiError};

/// Longest certificate a researcher can ask for.
pub const MAX_CERTIFICATE_SECONDS: u64 = 24 * 3600;
/// Tolerated clock skew between the broker and agents.
const BACKDATE_SECONDS: u64 = 300;

pub struct SshCa {
    key: PrivateKey,
}

/// What a certificate is for.
pub struct UserCertificate<'a> {
    /// The subject's key, an OpenSSH public key line.
    pub public_key: &'a str,
    /// Logins it is valid for; never empty (an empty list would mean "any").
    pub principals: &'a [String],
    pub key_id: &'a str,
    pub serial: u64,
    /// Unix seconds.
    pub now: u64,
    pub valid_until: u64,
}

/// The SSH public keys in the file at `path`, one OpenSSH line each (blank lines and `#`
/// comments skipped): further user CAs whose certificates are admitted while the SSH user CA
/// is rotated. Each is read back as a key, so a typo is refused here, not at a login.
pub fn public_lines(path: &Path) -> Result<Vec<String>, PkiError> {
    let text = std::fs::read_to_string(path).map_err(|e| PkiError::Io(path.to_owned(), e))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())).filter(|(_, l)| !l.is_empty() && !l.starts_with('#')) {
        let key = ssh_key::PublicKey::from_openssh(line).map_err(|e| PkiError::Key(format!("{}:{n}: {e}", path.display())))?;
        let line = key.to_openssh().map_err(|e| PkiError::Key(e.to_string()))?;
        keys.push(line.split_whitespace().take(2).collect::<Vec<_>>().join(" "));
    }
    Ok(keys)
}

impl SshCa {
    /// Reads the CA key (OpenSSH format) at `path`; with `create`, makes an Ed25519 one
    /// (mode 0600) first if there is none.
    pub fn load(path: &Path, create: bool) -> Result<SshCa, PkiError> {
        let io = |e: std::io::Error| PkiError::Io(path.to_owned(), e);
        if create && !path.exists() {
            let seed: [u8; 32] = rand::random();
            let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
            let text = key.to_openssh(LineEnding::LF).map_err(|e| PkiError::Key(e.to_string()))?;
            write_private_file(path, &text)?;
            return Ok(SshCa { key });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let key = PrivateKey::from_openssh(text).map_err(|e| PkiError::Key(format!("{}: {e}", path.display())))?;
        Ok(SshCa { key })
    }

    /// The CA's public key as an OpenSSH line (`TrustedUserCAKeys` format).
    pub fn public_line(&self) -> String {
        let line = self.key.public_key().to_openssh().unwrap_or_default();
        line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    /// A user certificate, as the OpenSSH line a client saves as `<key>-cert.pub`.
    pub fn sign_user(&self, request: &UserCertificate<'_>) -> Result<String, PkiError> {
        let bad = |e: ssh_key::Error| PkiError::Certificate(e.to_string());
        if request.principals.is_empty() {
            return Err(PkiError::Certificate("a certificate names at least one login".into()));
        }
        let subject = PublicKey::from_openssh(request.public_key).map_err(|e| PkiError::Key(e.to_string()))?;
        let valid_before = request.valid_until.min(request.now + MAX_CERTIFICATE_SECONDS);
        let nonce: [u8; 32] = rand::random();
        let mut builder = Builder::new(nonce.to_vec(), subject.key_data().clone(), request.now.saturating_sub(BACKDATE_SECONDS), valid_before).map_err(bad)?;
        builder.serial(request.serial).map_err(bad)?;
        builder.cert_type(CertType::User).map_err(bad)?;
        builder.key_id(request.key_id).map_err(bad)?;
        for principal in request.principals {
            builder.valid_principal(principal.clone()).map_err(bad)?;
        }
        for extension in ["permit-pty", "permit-port-forwarding"] {
            builder.extension(extension, "").map_err(bad)?;
        }
        let certificate = builder.sign(&self.key).map_err(bad)?;
        certificate.to_openssh().map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECT: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMV4T2iYcMXkWXuwkZpCOdzWuOF6Ml3Q8d5nbZ1JBOU1 alice";

    #[test]
    fn a_user_certificate_names_its_logins_and_its_ca() {
        let dir = tempfile::TempDir::new().expect("dir");
        let ca = SshCa::load(&dir.path().join("ca"), true).expect("ca");
        let again = SshCa::load(&dir.path().join("ca"), false).expect("reload");
        assert_eq!(ca.public_line(), again.public_line());
        let principals = vec!["sl7".to_owned()];
        let request = UserCertificate { public_key: SUBJECT, principals: &principals, key_id: "lease-7", serial: 42, now: 1_000_000, valid_until: 1_003_600 };
        let line = ca.sign_user(&request).expect("signed");
        let cert = ssh_key::Certificate::from_openssh(&line).expect("parses");
        assert_eq!(cert.valid_principals(), ["sl7"]);
        assert_eq!((cert.serial(), cert.key_id()), (42, "lease-7"));
        assert!(cert.cert_type().is_user());
        assert_eq!(cert.valid_before(), 1_003_600);
        assert_eq!(cert.signature_key(), PublicKey::from_openssh(&ca.public_line()).expect("ca key").key_data());
        let long = UserCertificate { valid_until: u64::MAX, ..request };
        let cert = ssh_key::Certificate::from_openssh(&ca.sign_user(&long).expect("signed")).expect("parses");
        assert_eq!(cert.valid_before(), 1_000_000 + MAX_CERTIFICATE_SECONDS, "capped");
        let none: Vec<String> = Vec::new();
        assert!(ca.sign_user(&UserCertificate { principals: &none, ..long }).is_err(), "never a golden ticket");
    }
}
