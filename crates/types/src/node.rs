//! Nodes (servers a supplier enrolls) and the GPU cards in them.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Validator};

/// Most cards one server can hold; more is a malformed inventory.
pub const MAX_CARDS_PER_NODE: usize = 64;

/// One GPU card as the node reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardSpec {
    /// Index on the node (the CUDA/NVML ordinal).
    pub index: u32,
    /// The driver's stable UUID (`GPU-…`).
    pub uuid: String,
    /// Model as reported, e.g. `NVIDIA A100-SXM4-80GB`.
    pub model: String,
    pub vram_mib: u64,
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
    pub const ALL: [CardStatus; 5] =
        [CardStatus::Idle, CardStatus::Reserved, CardStatus::Busy, CardStatus::Offline, CardStatus::Faulty];

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

/// What an enrolling node reports about itself: what a listing needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInventory {
    pub hostname: String,
    pub cpu_model: String,
    pub vcpus: u32,
    pub memory_gib: u32,
    pub cards: Vec<CardSpec>,
}

impl NodeInventory {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Validator::new();
        v.text("hostname", &self.hostname, true, 253);
        v.check(
            self.hostname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
            "hostname",
            "letters, digits, '-' and '.' only",
        );
        v.text("cpu_model", &self.cpu_model, false, 128);
        v.check(self.vcpus > 0, "vcpus", "must be positive");
        v.check(self.memory_gib > 0, "memory_gib", "must be positive");
        v.check(
            self.cards.len() <= MAX_CARDS_PER_NODE,
            "cards",
            format!("at most {MAX_CARDS_PER_NODE} cards per node"),
        );
        let mut indexes = BTreeSet::new();
        let mut uuids = BTreeSet::new();
        for (i, card) in self.cards.iter().enumerate() {
            let field = format!("cards[{i}]");
            v.check(indexes.insert(card.index), &format!("{field}.index"), "duplicate card index");
            v.text(&format!("{field}.uuid"), &card.uuid, true, 96);
            v.check(uuids.insert(card.uuid.as_str()), &format!("{field}.uuid"), "duplicate card uuid");
            v.text(&format!("{field}.model"), &card.model, true, 128);
            v.check(card.vram_mib > 0, &format!("{field}.vram_mib"), "must be positive");
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
            cards: (0..2)
                .map(|i| CardSpec { index: i, uuid: format!("GPU-{i}"), model: "A100 80GB".into(), vram_mib: 81920 })
                .collect(),
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
