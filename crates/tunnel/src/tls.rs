//! TLS on the agent's dial, for a portal that is not on the node's own host.
//!
//! Whoever answers the agent's dial controls the node's services (a shell as any live lease) and
//! gets the agent's ticket, so the agent sends nothing before the portal has proved its name
//! with a certificate from a CA the agent was given (the cluster CA by default, as for the
//! broker; a public CA's bundle where the portal sits behind a TLS-terminating proxy). The
//! agent offers only HTTP/1.1 by ALPN: the tunnel starts as an HTTP/1.1 upgrade, and a proxy in
//! front of the portal must not pick HTTP/2 for it.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use crate::TunnelError;

/// How the agent checks the portals it dials: the CAs it trusts for them.
#[derive(Clone)]
pub struct PortalTrust {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PortalTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortalTrust")
    }
}

impl PortalTrust {
    /// Trusts the CA certificates in `ca_pem` (one, or a bundle); refuses PEM holding none.
    pub fn from_pem(ca_pem: &[u8]) -> Result<PortalTrust, TunnelError> {
        let mut roots = rustls::RootCertStore::empty();
        let certificates =
            CertificateDer::pem_slice_iter(ca_pem).collect::<Result<Vec<_>, _>>().map_err(|e| TunnelError::Tls(format!("the portal's CA: {e}")))?;
        let (added, _unusable) = roots.add_parsable_certificates(certificates);
        if added == 0 {
            return Err(TunnelError::Tls("the portal's CA: no usable certificate in it".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TunnelError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(PortalTrust { config: Arc::new(config) })
    }

    /// Completes a TLS handshake on `tcp` with the portal that must be `host` (a DNS name or an
    /// IP address, as its certificate names it); fails unless its certificate is good for
    /// `host` and comes from a trusted CA.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> Result<TlsStream<TcpStream>, TunnelError> {
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let name = ServerName::try_from(host.to_owned()).map_err(|e| TunnelError::Tls(format!("{host:?} is no server name: {e}")))?;
        tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp).await.map_err(|e| TunnelError::Tls(format!("the portal at {host}: {e}")))
    }
}
