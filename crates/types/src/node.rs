//! Nodes (servers a supplier enrolls) and the GPU cards in them.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Validator};

/// Most cards one server can hold; more is a malformed inventory.
pub const MAX_CARDS_PER_NODE: usize = 64;

/// One GPU card as the node reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardSpec {
    /// Index on the node (the CUDA/NVML ordinal).
    pub index: u32,
    /// The driver's stable UUID (`GPU-…`).
    pub uuid: String,
    /// Model as reported, e.g. `NVIDIA A100-SXM4-80GB`.
    pub model: String,
    pub vram_mib: u64,
    /// `0000:3B:00.0`; empty where the source cannot tell.
    pub pci_bus_id: String,
    /// Enforced power limit in milliwatts; 0 where unknown.
    pub power_limit_mw: u32,
}

/// Every card is its own unit of compute with its own status (SPEC §2).
///
/// `Reserved` and `Busy` are set only by lease commands: a card is `Reserved` while a lease
/// that holds it waits for approval or provisioning, and `Busy` exactly while that lease is
/// active. `Offline` and `Faulty` are set by the supplier or its agent and take the card out of
/// the market.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CardStatus {
    Idle,
    Reserved,
    Busy,
    Offline,
    Faulty,
}

impl CardStatus {
    pub const ALL: [CardStatus; 5] = [CardStatus::Idle, CardStatus::Reserved, CardStatus::Busy, CardStatus::Offline, CardStatus::Faulty];

    pub fn as_str(self) -> &'static str {
        match self {
            CardStatus::Idle => "idle",
            CardStatus::Reserved => "reserved",
            CardStatus::Busy => "busy",
            CardStatus::Offline => "offline",
            CardStatus::Faulty => "faulty",
        }
    }

    /// Whether a supplier or agent may put a card into this status directly (the other
    /// statuses belong to the lease lifecycle).
    pub fn settable_by_supplier(self) -> bool {
        matches!(self, CardStatus::Idle | CardStatus::Offline | CardStatus::Faulty)
    }
}

impl fmt::Display for CardStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the platform's monitoring last concluded about a card, independent of leases. An
/// unhealthy card that is idle leaves the market (offline or faulty); an unhealthy card under a
/// lease keeps its lease, and the fault is on record for the lessee's service credit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CardHealth {
    #[default]
    Healthy,
    /// The driver lost the card (NVML `GPU_IS_LOST`, XID 79) or it vanished from the node.
    Lost,
    /// At or above the overheating threshold.
    Overheating,
    /// A critical XID error was reported.
    XidError,
    /// The node's agent stopped reporting.
    AgentSilent,
}

impl CardHealth {
    pub const ALL: [CardHealth; 5] = [CardHealth::Healthy, CardHealth::Lost, CardHealth::Overheating, CardHealth::XidError, CardHealth::AgentSilent];

    pub fn as_str(self) -> &'static str {
        match self {
            CardHealth::Healthy => "healthy",
            CardHealth::Lost => "lost",
            CardHealth::Overheating => "overheating",
            CardHealth::XidError => "xid_error",
            CardHealth::AgentSilent => "agent_silent",
        }
    }

    /// The status an idle card takes while in this health: unreachable cards are offline,
    /// misbehaving ones faulty.
    pub fn idle_status(self) -> CardStatus {
        match self {
            CardHealth::Healthy => CardStatus::Idle,
            CardHealth::Lost | CardHealth::AgentSilent => CardStatus::Offline,
            CardHealth::Overheating | CardHealth::XidError => CardStatus::Faulty,
        }
    }
}

impl fmt::Display for CardHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an enrolling node reports about itself: what a listing needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInventory {
    pub hostname: String,
    pub cpu_model: String,
    pub vcpus: u32,
    pub memory_gib: u32,
    pub cards: Vec<CardSpec>,
    /// e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os: String,
    /// Total local disk capacity.
    pub disk_gib: u64,
    /// NVIDIA driver and CUDA driver API versions; empty without a driver.
    pub driver_version: String,
    pub cuda_version: String,
}

impl NodeInventory {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Validator::new();
        v.text("hostname", &self.hostname, true, 253);
        v.check(self.hostname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'), "hostname", "letters, digits, '-' and '.' only");
        v.text("cpu_model", &self.cpu_model, false, 128);
        v.text("os", &self.os, false, 128);
        v.text("driver_version", &self.driver_version, false, 32);
        v.text("cuda_version", &self.cuda_version, false, 32);
        v.check(self.vcpus > 0, "vcpus", "must be positive");
        v.check(self.memory_gib > 0, "memory_gib", "must be positive");
        v.check(self.cards.len() <= MAX_CARDS_PER_NODE, "cards", format!("at most {MAX_CARDS_PER_NODE} cards per node"));
        let mut indexes = BTreeSet::new();
        let mut uuids = BTreeSet::new();
        for (i, card) in self.cards.iter().enumerate() {
            let field = format!("cards[{i}]");
            v.check(indexes.insert(card.index), &format!("{field}.index"), "duplicate card index");
            v.text(&format!("{field}.uuid"), &card.uuid, true, 96);
            v.check(uuids.insert(card.uuid.as_str()), &format!("{field}.uuid"), "duplicate card uuid");
            v.text(&format!("{field}.model"), &card.model, true, 128);
            v.check(card.vram_mib > 0, &format!("{field}.vram_mib"), "must be positive");
            v.text(&format!("{field}.pci_bus_id"), &card.pci_bus_id, false, 32);
        }
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> NodeInventory {
        NodeInventory {
            hostname: "gpu-01.sz".into(),
            cpu_model: "AMD EPYC 7763".into(),
            vcpus: 128,
            memory_gib: 1024,
            cards: (0..2).map(|i| CardSpec { index: i, uuid: format!("GPU-{i}"), model: "A100 80GB".into(), vram_mib: 81920, ..Default::default() }).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_inventory_passes() {
        inventory().validate().unwrap();
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut inv = inventory();
        inv.hostname = "bad host".into();
        inv.vcpus = 0;
        inv.cards[1].index = 0;
        inv.cards[1].uuid = "GPU-0".into();
        let err = inv.validate().unwrap_err();
        let fields: Vec<_> = err.field_errors().iter().map(|e| e.field.clone()).collect();
        assert_eq!(fields, ["hostname", "vcpus", "cards[1].index", "cards[1].uuid"]);
    }
}

/// Where researchers reach a node's access gateway, as its agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAccess {
    pub ssh_host: String,
    pub ssh_port: u16,
    /// The gateway's host key: what a researcher's `known_hosts` must hold.
    pub host_key: crate::SshPublicKey,
    /// A lease's login on this node is `<login_prefix><lease id>`.
    pub login_prefix: String,
}

/// Longest login prefix: with a 20-digit lease ID it stays within Linux's 32-character names.
pub const MAX_LOGIN_PREFIX: usize = 8;
pub const LOGIN_PREFIX_RULE: &str = "1 to 8 lowercase letters and digits, starting and ending with a letter";

/// What a lease login's prefix may be (the broker checks what agents report, agents their
/// configuration). It ends with a letter so that a login names one lease across the whole
/// platform: with prefixes "sl1" and "sl", lease 23 on one node and lease 123 on another would
/// both be "sl123".
pub fn valid_login_prefix(prefix: &str) -> bool {
    let mut bytes = prefix.bytes();
    prefix.len() <= MAX_LOGIN_PREFIX
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && prefix.bytes().last().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl NodeAccess {
    /// Checks every field; problems are reported together, by field.
    pub fn new(ssh_host: &str, ssh_port: u32, host_key: &str, login_prefix: &str) -> Result<NodeAccess, DomainError> {
        let mut v = Validator::new();
        v.text("ssh_host", ssh_host, true, 253);
        v.check(ssh_host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b)), "ssh_host", "a host name or IP address");
        v.check((1..=u32::from(u16::MAX)).contains(&ssh_port), "ssh_port", "between 1 and 65535");
        let key = crate::SshPublicKey::parse(host_key);
        if let Err(e) = &key {
            v.check(false, "host_key", e.to_string());
        }
        v.check(valid_login_prefix(login_prefix), "login_prefix", LOGIN_PREFIX_RULE);
        v.finish()?;
        let host_key = key?;
        Ok(NodeAccess { ssh_host: ssh_host.to_owned(), ssh_port: ssh_port as u16, host_key, login_prefix: login_prefix.to_owned() })
    }

    pub fn login(&self, lease: crate::LeaseId) -> String {
        format!("{}{}", self.login_prefix, lease.0)
    }

    /// The gateway as OpenSSH names it in `known_hosts`: `host`, or `[host]:port` off port 22.
    pub fn known_hosts_name(&self) -> String {
        if self.ssh_port == 22 {
            self.ssh_host.clone()
        } else {
            format!("[{}]:{}", self.ssh_host, self.ssh_port)
        }
    }

    /// A ready `known_hosts` line (the key without its comment).
    pub fn known_hosts_line(&self) -> String {
        let key: Vec<&str> = self.host_key.as_str().split_whitespace().take(2).collect();
        format!("{} {}", self.known_hosts_name(), key.join(" "))
    }

    pub fn ssh_command(&self, lease: crate::LeaseId) -> String {
        format!("ssh -p {} {}@{}", self.ssh_port, self.login(lease), self.ssh_host)
    }
}

#[cfg(test)]
mod access_tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1xyz gateway@gpu-1";

    #[test]
    fn access_lines_are_ready_to_paste() {
        let a = NodeAccess::new("gpu-1.example", 2222, KEY, "sl").unwrap();
        assert_eq!(a.login(crate::LeaseId(42)), "sl42");
        assert_eq!(a.known_hosts_line(), "[gpu-1.example]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1xyz");
        assert_eq!(a.ssh_command(crate::LeaseId(42)), "ssh -p 2222 sl42@gpu-1.example");
        assert_eq!(NodeAccess::new("10.0.0.7", 22, KEY, "sl").unwrap().known_hosts_name(), "10.0.0.7");
        // A prefix ending in a digit would make logins ambiguous across nodes.
        assert!(valid_login_prefix("gpu7x") && !valid_login_prefix("sl1") && !valid_login_prefix("7sl"));
    }

    #[test]
    fn every_bad_access_field_is_named() {
        let Err(DomainError::Invalid(fields)) = NodeAccess::new("bad host!", 0, "ssh-dss AAAA", "9x") else { panic!("must be refused") };
        let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
        for field in ["ssh_host", "ssh_port", "host_key", "login_prefix"] {
            assert!(names.contains(&field), "{field} not reported: {names:?}");
        }
    }
}

/// A lease's VNC display on a node: 10 plus its first card's index there, so leases sharing a
/// node never share a display. The port is the display's RFB port, on the node's loopback.
pub fn vnc_display(card_indexes: &[u32]) -> Option<u32> {
    card_indexes.iter().min().map(|first| 10 + first)
}

pub fn vnc_port(card_indexes: &[u32]) -> Option<u16> {
    vnc_display(card_indexes).and_then(|d| u16::try_from(5900 + d).ok())
}
