//! Clusters: what a supplier publishes to the catalogue (SPEC §2, §3).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, FieldError, Validator};
use crate::money::PriceList;

/// Class A: bare-metal servers, leased whole, reached by SSH or VNC, approved by the supplier
/// with an authorization code. Class B: virtualized servers shared by several users, leased by
/// the card, activated automatically when the agent has provisioned them.
/// (Named `A`/`B` in JSON, `a`/`b` accepted; postcard in the Raft log encodes the variant
/// index, so the names are free to read more spellings.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ClusterClass {
    #[serde(alias = "a")]
    A,
    #[serde(alias = "b")]
    B,
}

impl ClusterClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterClass::A => "A",
            ClusterClass::B => "B",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        match raw {
            "A" | "a" => Ok(ClusterClass::A),
            "B" | "b" => Ok(ClusterClass::B),
            _ => Err(FieldError::new("class", format!("expected A or B, got {raw:?}"))),
        }
    }
}

impl fmt::Display for ClusterClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SPEC §2 names GPU as the resource type; the field exists so the contract does not change
/// when other accelerators are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResourceType {
    Gpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClusterState {
    Listed,
    /// Delisted clusters take no new lease; live leases run to their end.
    Delisted,
}

/// (Named `nvme`, `ssd`, `hdd` in JSON, and read as `Nvme`, `Ssd`, `Hdd` too, which JSON
/// written before said; postcard in the Raft log encodes the variant index.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMedium {
    #[serde(alias = "Nvme")]
    Nvme,
    #[serde(alias = "Ssd")]
    Ssd,
    #[serde(alias = "Hdd")]
    Hdd,
}

impl DiskMedium {
    pub const ALL: [DiskMedium; 3] = [DiskMedium::Nvme, DiskMedium::Ssd, DiskMedium::Hdd];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskMedium::Nvme => "nvme",
            DiskMedium::Ssd => "ssd",
            DiskMedium::Hdd => "hdd",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        Self::ALL.into_iter().find(|m| m.as_str() == raw).ok_or_else(|| FieldError::new("medium", format!("expected nvme, ssd or hdd, got {raw:?}")))
    }
}

impl fmt::Display for DiskMedium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Local storage per node, e.g. "2*3.84TB SSD data + 480GB system".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalStorage {
    pub data_disks: u32,
    pub data_disk_gb: u32,
    pub system_disk_gb: u32,
    pub medium: DiskMedium,
}

impl LocalStorage {
    pub fn total_data_gb(&self) -> u64 {
        self.data_disks as u64 * self.data_disk_gb as u64
    }
}

/// The fields a supplier states when publishing (SPEC §2). Card count and the per-card
/// inventory come from the enrolled nodes, not from the supplier's word.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub title: String,
    pub resource_type: ResourceType,
    /// e.g. "A100 80GB".
    pub gpu_model: String,
    /// Memory per card ("capacity 80GB").
    pub vram_gib: u32,
    /// Host memory per node.
    pub memory_gib: u32,
    /// Virtual cores per node.
    pub vcpus: u32,
    pub vendor: String,
    /// Where the hardware is, e.g. "Shenzhen"; matched against researchers' regions.
    pub region: String,
    pub local_storage: LocalStorage,
    pub prices: PriceList,
    /// How a Class A cluster is used (SPEC §3): required for Class A, empty for Class B.
    pub usage_instructions: String,
}

pub const MAX_USAGE_INSTRUCTIONS: usize = 8 * 1024;

impl Listing {
    pub fn validate(&self, class: ClusterClass) -> Result<(), DomainError> {
        let mut v = Validator::new();
        v.text("title", &self.title, true, 120);
        v.text("gpu_model", &self.gpu_model, true, 64);
        v.check(self.vram_gib > 0 && self.vram_gib <= 4096, "vram_gib", "between 1 and 4096");
        v.check(self.memory_gib > 0, "memory_gib", "must be positive");
        v.check(self.vcpus > 0, "vcpus", "must be positive");
        v.text("vendor", &self.vendor, true, 64);
        v.text("region", &self.region, true, 64);
        v.check(self.local_storage.system_disk_gb > 0, "local_storage.system_disk_gb", "must be positive");
        v.check(
            (self.local_storage.data_disks == 0) == (self.local_storage.data_disk_gb == 0),
            "local_storage.data_disk_gb",
            "give both the number and the size of data disks, or neither",
        );
        v.nested("", self.prices.validate());
        v.text("usage_instructions", &self.usage_instructions, class == ClusterClass::A, MAX_USAGE_INSTRUCTIONS);
        if class == ClusterClass::B {
            v.check(
                self.usage_instructions.is_empty(),
                "usage_instructions",
                "only Class A clusters carry usage instructions; Class B is reached through the platform",
            );
        }
        v.finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::money::{BillingMode, Currency};

    pub fn listing() -> Listing {
        Listing {
            title: "8*A100 80GB, Shenzhen".into(),
            resource_type: ResourceType::Gpu,
            gpu_model: "A100 80GB".into(),
            vram_gib: 80,
            memory_gib: 1024,
            vcpus: 128,
            vendor: "Inspur".into(),
            region: "Shenzhen".into(),
            local_storage: LocalStorage { data_disks: 2, data_disk_gb: 3840, system_disk_gb: 480, medium: DiskMedium::Nvme },
            prices: PriceList { currency: Currency::cny(), per_card: BTreeMap::from([(BillingMode::Monthly, 531_250)]) },
            usage_instructions: "SSH as the account shown after verification.".into(),
        }
    }

    #[test]
    fn classes_and_media_have_one_name_each_in_json_and_in_text() {
        for class in [ClusterClass::A, ClusterClass::B] {
            assert_eq!(serde_json::to_value(class).unwrap(), class.as_str());
            assert_eq!(ClusterClass::parse(class.as_str()).unwrap(), class);
            assert_eq!(serde_json::from_value::<ClusterClass>(class.as_str().to_lowercase().into()).unwrap(), class);
        }
        for medium in DiskMedium::ALL {
            assert_eq!(serde_json::to_value(medium).unwrap(), medium.as_str());
            assert_eq!(DiskMedium::parse(medium.as_str()).unwrap(), medium);
        }
        assert!(DiskMedium::parse("tape").is_err());
        assert_eq!(serde_json::from_value::<DiskMedium>("Ssd".into()).unwrap(), DiskMedium::Ssd, "JSON written before still reads");
        assert!(serde_json::from_value::<ClusterClass>("C".into()).is_err());
    }

    #[test]
    fn class_a_needs_usage_instructions_and_class_b_has_none() {
        let mut l = listing();
        l.validate(ClusterClass::A).unwrap();
        assert!(l.validate(ClusterClass::B).is_err());
        l.usage_instructions.clear();
        l.validate(ClusterClass::B).unwrap();
        let err = l.validate(ClusterClass::A).unwrap_err();
        assert_eq!(err.field_errors()[0].field, "usage_instructions");
    }

    #[test]
    fn negative_price_and_missing_fields_are_each_reported() {
        let mut l = listing();
        l.title.clear();
        l.region.clear();
        l.prices.per_card.insert(BillingMode::Hourly, -5);
        let err = l.validate(ClusterClass::A).unwrap_err();
        let fields: Vec<_> = err.field_errors().iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"title"), "{fields:?}");
        assert!(fields.contains(&"region"), "{fields:?}");
        assert!(fields.iter().any(|f| f.ends_with("prices.hourly")), "{fields:?}");
    }
}
