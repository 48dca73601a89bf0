//! The artifact store as the portal reaches it (`--artifacts-url`): to stream a job's outputs
//! to their owner. The portal holds no store-wide credential: for each download the broker
//! signs the owner a short-lived, read-only capability for that job's outputs
//! (`JobService.GrantJobOutputs`, asked with the owner's own broker token), and the store
//! checks it.

use suanli_artifacts::ArtifactClient;

pub struct ArtifactStoreLink {
    url: String,
    /// The CA an `https://` store's certificate must come from (the cluster CA).
    ca_pem: Option<String>,
}

impl ArtifactStoreLink {
    /// `url` is `https://…`, or `http://` to this machine only (a capability is a bearer
    /// credential).
    pub fn new(url: &str, ca_pem: Option<String>) -> Result<ArtifactStoreLink, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("artifacts url {url:?}: {e}"))?;
        let host = parsed.host_str().unwrap_or_default();
        let loopback = host == "localhost" || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        match parsed.scheme() {
            "https" => {}
            "http" if loopback => {}
            _ => return Err(format!("artifacts url {url:?}: https://, or http:// to this machine only")),
        }
        Ok(ArtifactStoreLink { url: url.trim_end_matches('/').to_owned(), ca_pem })
    }

    pub fn client(&self, capability: &str) -> Result<ArtifactClient, String> {
        ArtifactClient::for_store(&self.url, capability, self.ca_pem.as_deref()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_goes_over_https_or_to_this_machine_only() {
        assert!(ArtifactStoreLink::new("https://store.example:8443", None).is_ok());
        assert!(ArtifactStoreLink::new("http://127.0.0.1:9000", None).is_ok());
        assert!(ArtifactStoreLink::new("http://localhost:9000/", None).is_ok());
        for refused in ["http://store.example:9000", "http://localhost.example", "ftp://127.0.0.1", "store:9000"] {
            assert!(ArtifactStoreLink::new(refused, None).is_err(), "{refused}");
        }
    }
}
