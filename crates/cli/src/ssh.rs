//! `suanli ssh` and `suanli vnc`: the OpenSSH client, set up for one lease.
//!
//! The CLI keeps a key of its own (`ssh/id_ed25519` in its configuration folder, made with
//! `ssh-keygen` on first use), has the platform sign a short-lived certificate for it for the
//! lease's logins (one file per lease), and pins the node's host key in a `known_hosts` of its
//! own under the name `suanli-node-<id>` (`HostKeyAlias`): `ssh` then checks that node against
//! the key the platform recorded for that node, whatever host name the node's supplier gave,
//! and offers nothing but that key and certificate.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One node of a lease, as `GET /api/v1/leases/{id}/access` describes it.
#[derive(Clone, Debug, Deserialize)]
pub struct NodeLogin {
    pub node_id: u64,
    pub login: String,
    pub ssh_host: String,
    pub ssh_port: u32,
    pub known_hosts_line: String,
    pub vnc_port: u32,
}

#[derive(Debug, Deserialize)]
pub struct Access {
    pub lease_id: u64,
    pub state: String,
    pub nodes: Vec<NodeLogin>,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("lease {lease} has no node to log in to (it is {state})")]
    NoNodes { lease: u64, state: String },
    #[error("lease {lease} has no node {node} (its nodes: {known})")]
    NoSuchNode { lease: u64, node: u64, known: String },
    #[error("lease {lease}'s node {node} offers no VNC")]
    NoVnc { lease: u64, node: u64 },
    #[error("the portal gave no usable host key line for node {0}")]
    NoHostKey(u64),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("ssh-keygen could not make {path}: {detail}")]
    Keygen { path: PathBuf, detail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SshError {
    let what = what.into();
    move |source| SshError::Io { what, source }
}

impl Access {
    /// The node asked for, or the lease's first.
    pub fn node(&self, node: Option<u64>) -> Result<&NodeLogin, SshError> {
        let first = self.nodes.first().ok_or_else(|| SshError::NoNodes { lease: self.lease_id, state: self.state.clone() })?;
        let Some(wanted) = node else { return Ok(first) };
        self.nodes.iter().find(|n| n.node_id == wanted).ok_or_else(|| SshError::NoSuchNode {
            lease: self.lease_id,
            node: wanted,
            known: self.nodes.iter().map(|n| n.node_id.to_string()).collect::<Vec<_>>().join(", "),
        })
    }
}

/// The files `ssh` is given, in the CLI's configuration folder.
pub struct Files {
    pub key: PathBuf,
    pub certificate: PathBuf,
    pub known_hosts: PathBuf,
}

impl Files {
    /// The files for a login to `lease`'s nodes.
    pub fn in_dir(config_dir: &Path, lease: u64) -> Files {
        let dir = config_dir.join("ssh");
        Files { key: dir.join("id_ed25519"), certificate: dir.join(format!("lease-{lease}-cert.pub")), known_hosts: dir.join("known_hosts") }
    }

    /// The public key line, making the key pair first if there is none.
    pub fn public_key(&self) -> Result<String, SshError> {
        if !self.key.exists() {
            let dir = self.key.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            let out = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "suanli", "-f"])
                .arg(&self.key)
                .output()
                .map_err(io("running ssh-keygen"))?;
            if !out.status.success() {
                return Err(SshError::Keygen { path: self.key.clone(), detail: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
            }
        }
        let public = self.key.with_extension("pub");
        let line = std::fs::read_to_string(&public).map_err(io(format!("reading {}", public.display())))?;
        Ok(line.trim().to_owned())
    }

    pub fn save_certificate(&self, certificate: &str) -> Result<(), SshError> {
        std::fs::write(&self.certificate, format!("{}\n", certificate.trim())).map_err(io(format!("writing {}", self.certificate.display())))
    }

    /// Pins the node's host key (the key of the platform's line, under the node's alias),
    /// replacing what was pinned for that node before.
    pub fn trust_host(&self, node: &NodeLogin) -> Result<(), SshError> {
        let line = node.known_hosts_line.trim();
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(kind), Some(key), false) = (fields.get(1), fields.get(2), line.contains('\n')) else {
            return Err(SshError::NoHostKey(node.node_id));
        };
        let alias = host_alias(node);
        let pinned = format!("{alias} {kind} {key}");
        let known = std::fs::read_to_string(&self.known_hosts).unwrap_or_default();
        let mut lines: Vec<&str> = known.lines().filter(|l| l.split_whitespace().next() != Some(alias.as_str())).collect();
        lines.push(&pinned);
        std::fs::write(&self.known_hosts, format!("{}\n", lines.join("\n"))).map_err(io(format!("writing {}", self.known_hosts.display())))
    }

    /// The `ssh` arguments that reach `node` with this key and certificate only, checking its
    /// host key strictly against this `known_hosts`, then `extra` (a command, or `-N -L …`).
    pub fn ssh_args(&self, node: &NodeLogin, extra: &[String]) -> Vec<String> {
        let option = |name: &str, value: &Path| format!("{name}={}", value.display());
        let mut args = vec![
            "-i".to_owned(),
            self.key.display().to_string(),
            "-o".into(),
            option("CertificateFile", &self.certificate),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            option("UserKnownHostsFile", &self.known_hosts),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("HostKeyAlias={}", host_alias(node)),
            "-p".into(),
            node.ssh_port.to_string(),
            "-l".into(),
            node.login.clone(),
            // The host is never read as an option, whatever the supplier named it.
            "--".into(),
            node.ssh_host.clone(),
        ];
        args.extend(extra.iter().cloned());
        args
    }
}

/// The name a node's host key is pinned under: its ID, not the host name its supplier gave.
fn host_alias(node: &NodeLogin) -> String {
    format!("suanli-node-{}", node.node_id)
}

/// `ssh` arguments that forward `local_port` on this machine to the node's VNC server.
pub fn vnc_forward(lease: u64, node: &NodeLogin, local_port: u16) -> Result<Vec<String>, SshError> {
    if node.vnc_port == 0 {
        return Err(SshError::NoVnc { lease, node: node.node_id });
    }
    Ok(vec!["-N".into(), "-L".into(), format!("127.0.0.1:{local_port}:127.0.0.1:{}", node.vnc_port)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> NodeLogin {
        NodeLogin {
            node_id: id,
            login: "l7".into(),
            ssh_host: "gpu-1.example".into(),
            ssh_port: 2222,
            known_hosts_line: "[gpu-1.example]:2222 ssh-ed25519 AAAAC3Nza".into(),
            vnc_port: 0,
        }
    }

    #[test]
    fn a_node_is_picked_by_id_or_first_and_a_missing_one_is_named() {
        let access = Access { lease_id: 7, state: "active".into(), nodes: vec![node(3), node(4)] };
        assert_eq!(access.node(None).expect("first").node_id, 3);
        assert_eq!(access.node(Some(4)).expect("node 4").node_id, 4);
        let err = access.node(Some(9)).expect_err("no node 9").to_string();
        assert!(err.contains("no node 9") && err.contains("3, 4"), "{err}");
        let ended = Access { lease_id: 7, state: "ended".into(), nodes: vec![] };
        assert!(ended.node(None).expect_err("none").to_string().contains("it is ended"));
    }

    #[test]
    fn the_host_key_is_pinned_per_node_and_replaced_not_added() {
        let dir = tempfile::tempdir().expect("dir");
        let files = Files { key: dir.path().join("k"), certificate: dir.path().join("k-cert.pub"), known_hosts: dir.path().join("known_hosts") };
        files.trust_host(&node(3)).expect("trusted");
        files.trust_host(&node(3)).expect("again");
        files.trust_host(&node(4)).expect("another node");
        let rekeyed = NodeLogin { known_hosts_line: "[gpu-1.example]:2222 ssh-ed25519 AAAANEW".into(), ..node(3) };
        files.trust_host(&rekeyed).expect("re-keyed");
        let known = std::fs::read_to_string(&files.known_hosts).expect("read");
        assert_eq!(known, "suanli-node-4 ssh-ed25519 AAAAC3Nza\nsuanli-node-3 ssh-ed25519 AAAANEW\n");
        for forged in ["a ssh-ed25519 AAAA\n* ssh-ed25519 BBBB", "", "onlyahost"] {
            let bad = NodeLogin { known_hosts_line: forged.into(), ..node(5) };
            assert!(matches!(files.trust_host(&bad), Err(SshError::NoHostKey(5))), "{forged:?}");
        }
        assert_eq!(std::fs::read_to_string(&files.known_hosts).expect("read"), known, "nothing changed");
    }

    #[test]
    fn ssh_is_told_to_check_the_host_and_offer_only_this_key() {
        let files = Files::in_dir(Path::new("/c"), 7);
        let args = files.ssh_args(&node(3), &["nvidia-smi".to_owned()]);
        let joined = args.join(" ");
        assert!(joined.contains("-o StrictHostKeyChecking=yes") && joined.contains("-o IdentitiesOnly=yes"), "{joined}");
        assert!(joined.contains("-o UserKnownHostsFile=/c/ssh/known_hosts") && joined.contains("-o CertificateFile=/c/ssh/lease-7-cert.pub"), "{joined}");
        assert!(joined.contains("-o HostKeyAlias=suanli-node-3"), "{joined}");
        assert!(joined.ends_with("-p 2222 -l l7 -- gpu-1.example nvidia-smi"), "{joined}");
        assert!(vnc_forward(7, &node(3), 5901).is_err(), "no VNC on the node");
        let vnc = NodeLogin { vnc_port: 5900, ..node(3) };
        assert_eq!(vnc_forward(7, &vnc, 5901).expect("forward").join(" "), "-N -L 127.0.0.1:5901:127.0.0.1:5900");
    }
}
