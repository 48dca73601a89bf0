//! Catalogue queries: a filter on every listing field (SPEC §2) and cursor pagination.

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterClass, ClusterState, Listing};
use crate::error::{DomainError, Validator};
use crate::ids::ClusterId;
use crate::money::{BillingMode, Currency};

/// Every field is optional; an empty filter lists every listed cluster. Text fields match
/// case-insensitively: `gpu_model` and `vendor` as substrings, `region` exactly (region
/// matching is a first-class field, "Shenzhen" must not match "Shenzhen-North" by accident).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogueFilter {
    pub class: Option<ClusterClass>,
    pub gpu_model: Option<String>,
    pub min_vram_gib: Option<u32>,
    /// Clusters with at least this many idle cards now.
    pub min_idle_cards: Option<u32>,
    pub min_memory_gib: Option<u32>,
    pub min_vcpus: Option<u32>,
    pub vendor: Option<String>,
    pub region: Option<String>,
    pub min_storage_gb: Option<u64>,
    /// Only clusters offering this billing mode; with `max_price_minor`, at most that price per
    /// card per period of this mode.
    pub billing_mode: Option<BillingMode>,
    pub max_price_minor: Option<i64>,
    pub currency: Option<Currency>,
    /// Operators and the owning supplier may want to see delisted clusters too.
    pub include_delisted: bool,
}

/// What the filter is matched against: a listing plus the facts only the broker knows.
pub struct CatalogueFacts<'a> {
    pub class: ClusterClass,
    pub state: ClusterState,
    pub listing: &'a Listing,
    pub idle_cards: u32,
}

impl CatalogueFilter {
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Validator::new();
        for (field, value) in [("gpu_model", &self.gpu_model), ("vendor", &self.vendor), ("region", &self.region)] {
            if let Some(value) = value {
                v.text(field, value, false, 64);
            }
        }
        if let Some(price) = self.max_price_minor {
            v.check(price >= 0, "max_price_minor", "must not be negative");
            v.check(self.billing_mode.is_some(), "billing_mode", "a price limit needs a billing mode");
        }
        v.finish()
    }

    pub fn matches(&self, c: &CatalogueFacts<'_>) -> bool {
        let l = c.listing;
        let contains = |hay: &str, needle: &Option<String>| needle.as_ref().is_none_or(|n| hay.to_lowercase().contains(&n.to_lowercase()));
        let at_least = |have: u64, want: Option<u64>| want.is_none_or(|w| have >= w);
        (self.include_delisted || c.state == ClusterState::Listed)
            && self.class.is_none_or(|class| class == c.class)
            && contains(&l.gpu_model, &self.gpu_model)
            && contains(&l.vendor, &self.vendor)
            && self.region.as_ref().is_none_or(|r| l.region.eq_ignore_ascii_case(r.trim()))
            && at_least(l.vram_gib.into(), self.min_vram_gib.map(Into::into))
            && at_least(c.idle_cards.into(), self.min_idle_cards.map(Into::into))
            && at_least(l.memory_gib.into(), self.min_memory_gib.map(Into::into))
            && at_least(l.vcpus.into(), self.min_vcpus.map(Into::into))
            && at_least(l.local_storage.total_data_gb(), self.min_storage_gb)
            && self.currency.as_ref().is_none_or(|cur| *cur == l.prices.currency)
            && self.billing_mode.is_none_or(|mode| match l.prices.per_card.get(&mode) {
                None => false,
                Some(price) => self.max_price_minor.is_none_or(|max| *price <= max),
            })
    }
}

/// Keyset pagination: results are ordered by ID; `after` is the last ID of the previous page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    pub after: Option<ClusterId>,
    /// 0 means the default.
    pub limit: u32,
}

impl PageRequest {
    pub const DEFAULT_LIMIT: u32 = 50;
    pub const MAX_LIMIT: u32 = 500;

    pub fn effective_limit(&self) -> Result<usize, DomainError> {
        Self::limit_of(self.limit)
    }

    /// The page size a request asked for: 0 is the default; more than the maximum is refused
    /// (never silently shortened: a client would take the short page for the last one).
    pub fn limit_of(asked: u32) -> Result<usize, DomainError> {
        match asked {
            0 => Ok(Self::DEFAULT_LIMIT as usize),
            n if n <= Self::MAX_LIMIT => Ok(n as usize),
            _ => Err(DomainError::invalid("page.limit", format!("at most {}", Self::MAX_LIMIT))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::listing;

    fn facts(l: &Listing) -> CatalogueFacts<'_> {
        CatalogueFacts { class: ClusterClass::A, state: ClusterState::Listed, listing: l, idle_cards: 8 }
    }

    #[test]
    fn each_field_filters() {
        let l = listing();
        let f = facts(&l);
        assert!(CatalogueFilter::default().matches(&f));
        let cases: Vec<(CatalogueFilter, bool)> = vec![
            (CatalogueFilter { class: Some(ClusterClass::B), ..Default::default() }, false),
            (CatalogueFilter { gpu_model: Some("a100".into()), ..Default::default() }, true),
            (CatalogueFilter { gpu_model: Some("H100".into()), ..Default::default() }, false),
            (CatalogueFilter { min_vram_gib: Some(81), ..Default::default() }, false),
            (CatalogueFilter { min_idle_cards: Some(9), ..Default::default() }, false),
            (CatalogueFilter { min_memory_gib: Some(1024), ..Default::default() }, true),
            (CatalogueFilter { min_vcpus: Some(256), ..Default::default() }, false),
            (CatalogueFilter { vendor: Some("inspur".into()), ..Default::default() }, true),
            (CatalogueFilter { region: Some("shenzhen".into()), ..Default::default() }, true),
            (CatalogueFilter { region: Some("Shen".into()), ..Default::default() }, false),
            (CatalogueFilter { min_storage_gb: Some(8000), ..Default::default() }, false),
            (CatalogueFilter { billing_mode: Some(BillingMode::Hourly), ..Default::default() }, false),
            (CatalogueFilter { billing_mode: Some(BillingMode::Monthly), max_price_minor: Some(531_250), ..Default::default() }, true),
            (CatalogueFilter { billing_mode: Some(BillingMode::Monthly), max_price_minor: Some(531_249), ..Default::default() }, false),
        ];
        for (filter, want) in cases {
            assert_eq!(filter.matches(&f), want, "{filter:?}");
        }
        let delisted = CatalogueFacts { state: ClusterState::Delisted, ..facts(&l) };
        assert!(!CatalogueFilter::default().matches(&delisted));
    }
}
