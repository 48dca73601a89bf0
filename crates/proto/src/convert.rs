//! Wire ⇄ domain conversions for the types `suanli-types` owns. Wire → domain conversions
//! check what protobuf cannot (unset enums, unknown values, a currency code) and report every
//! bad field; the domain's own `validate` then checks the rules.

use std::collections::BTreeMap;

use suanli_types::cluster::DiskMedium;
use suanli_types::{
    AccountKind, BillingMode, CardHealth, CardSpec, CardStatus, CatalogueFilter, ClusterClass, Currency, DomainError, EndReason, FieldError, LeaseState,
    Listing, LocalStorage, Money, NodeInventory, PriceList, ResourceType, SupplierEndReason, Validator,
};

use crate::v1;

/// Reads a required enum field: unset or unknown values are a field error.
fn required<T>(field: &str, parsed: Option<T>, v: &mut Validator) -> Option<T> {
    if parsed.is_none() {
        v.push(FieldError::new(field, "required; unset or unknown value"));
    }
    parsed
}

pub fn cluster_class_from_wire(raw: i32) -> Option<ClusterClass> {
    match v1::ClusterClass::try_from(raw).ok()? {
        v1::ClusterClass::A => Some(ClusterClass::A),
        v1::ClusterClass::B => Some(ClusterClass::B),
        v1::ClusterClass::Unspecified => None,
    }
}

pub fn cluster_class_to_wire(class: ClusterClass) -> i32 {
    match class {
        ClusterClass::A => v1::ClusterClass::A,
        ClusterClass::B => v1::ClusterClass::B,
    }
    .into()
}

pub fn billing_mode_from_wire(raw: i32) -> Option<BillingMode> {
    match v1::BillingMode::try_from(raw).ok()? {
        v1::BillingMode::Hourly => Some(BillingMode::Hourly),
        v1::BillingMode::Daily => Some(BillingMode::Daily),
        v1::BillingMode::Monthly => Some(BillingMode::Monthly),
        v1::BillingMode::Yearly => Some(BillingMode::Yearly),
        v1::BillingMode::Unspecified => None,
    }
}

pub fn billing_mode_to_wire(mode: BillingMode) -> i32 {
    match mode {
        BillingMode::Hourly => v1::BillingMode::Hourly,
        BillingMode::Daily => v1::BillingMode::Daily,
        BillingMode::Monthly => v1::BillingMode::Monthly,
        BillingMode::Yearly => v1::BillingMode::Yearly,
    }
    .into()
}

pub fn card_status_from_wire(raw: i32) -> Option<CardStatus> {
    match v1::CardStatus::try_from(raw).ok()? {
        v1::CardStatus::Idle => Some(CardStatus::Idle),
        v1::CardStatus::Reserved => Some(CardStatus::Reserved),
        v1::CardStatus::Busy => Some(CardStatus::Busy),
        v1::CardStatus::Offline => Some(CardStatus::Offline),
        v1::CardStatus::Faulty => Some(CardStatus::Faulty),
        v1::CardStatus::Unspecified => None,
    }
}

pub fn card_status_to_wire(status: CardStatus) -> i32 {
    match status {
        CardStatus::Idle => v1::CardStatus::Idle,
        CardStatus::Reserved => v1::CardStatus::Reserved,
        CardStatus::Busy => v1::CardStatus::Busy,
        CardStatus::Offline => v1::CardStatus::Offline,
        CardStatus::Faulty => v1::CardStatus::Faulty,
    }
    .into()
}

pub fn lease_state_to_wire(state: LeaseState) -> i32 {
    match state {
        LeaseState::Requested => v1::LeaseState::Requested,
        LeaseState::Approved => v1::LeaseState::Approved,
        LeaseState::Active => v1::LeaseState::Active,
        LeaseState::Ended => v1::LeaseState::Ended,
        LeaseState::Expired => v1::LeaseState::Expired,
        LeaseState::Cancelled => v1::LeaseState::Cancelled,
    }
    .into()
}

pub fn lease_state_from_wire(raw: i32) -> Option<LeaseState> {
    LeaseState::ALL.into_iter().find(|s| lease_state_to_wire(*s) == raw)
}

pub fn end_reason_to_wire(reason: EndReason) -> i32 {
    use v1::EndReason as W;
    match reason {
        EndReason::ByResearcher => W::ByResearcher,
        EndReason::BySupplier(SupplierEndReason::HardwareFault) => W::SupplierHardwareFault,
        EndReason::BySupplier(SupplierEndReason::Maintenance) => W::SupplierMaintenance,
        EndReason::BySupplier(SupplierEndReason::PolicyViolation) => W::SupplierPolicyViolation,
        EndReason::BySupplier(SupplierEndReason::NonPayment) => W::SupplierNonPayment,
        EndReason::ByOperator => W::ByOperator,
        EndReason::TermElapsed => W::TermElapsed,
        EndReason::ReservationTimedOut => W::ReservationTimedOut,
        EndReason::AuthCodeAttemptsExhausted => W::AuthCodeAttemptsExhausted,
    }
    .into()
}

pub fn end_reason_from_wire(raw: i32) -> Option<EndReason> {
    EndReason::ALL.into_iter().find(|r| end_reason_to_wire(*r) == raw)
}

pub fn account_kind_from_wire(raw: i32) -> Option<AccountKind> {
    match v1::AccountKind::try_from(raw).ok()? {
        v1::AccountKind::Supplier => Some(AccountKind::Supplier),
        v1::AccountKind::Researcher => Some(AccountKind::Researcher),
        v1::AccountKind::Unspecified => None,
    }
}

pub fn account_kind_to_wire(kind: AccountKind) -> i32 {
    match kind {
        AccountKind::Supplier => v1::AccountKind::Supplier,
        AccountKind::Researcher => v1::AccountKind::Researcher,
    }
    .into()
}

fn disk_medium_from_wire(raw: i32) -> Option<DiskMedium> {
    match v1::DiskMedium::try_from(raw).ok()? {
        v1::DiskMedium::Nvme => Some(DiskMedium::Nvme),
        v1::DiskMedium::Ssd => Some(DiskMedium::Ssd),
        v1::DiskMedium::Hdd => Some(DiskMedium::Hdd),
        v1::DiskMedium::Unspecified => None,
    }
}

fn disk_medium_to_wire(medium: DiskMedium) -> i32 {
    match medium {
        DiskMedium::Nvme => v1::DiskMedium::Nvme,
        DiskMedium::Ssd => v1::DiskMedium::Ssd,
        DiskMedium::Hdd => v1::DiskMedium::Hdd,
    }
    .into()
}

pub fn money_from_wire(money: &v1::Money) -> Result<Money, FieldError> {
    Ok(Money::new(suanli_types::Currency::parse(&money.currency)?, money.minor))
}

pub fn money_to_wire(money: &Money) -> v1::Money {
    v1::Money { currency: money.currency.as_str().to_owned(), minor: money.minor }
}

/// A wire listing as a domain listing, or every field that could not be read. The listing's
/// rules (`Listing::validate`) are checked by the state machine.
pub fn listing_from_wire(wire: Option<v1::Listing>) -> Result<Listing, DomainError> {
    let Some(w) = wire else { return Err(DomainError::invalid("listing", "required")) };
    let mut v = Validator::new();
    let currency = Currency::parse(&w.currency).map_err(|e| v.push(e)).ok();
    let mut per_card = BTreeMap::new();
    for (i, price) in w.prices.iter().enumerate() {
        let field = format!("prices[{i}].mode");
        if let Some(mode) = required(&field, billing_mode_from_wire(price.mode), &mut v) {
            if per_card.insert(mode, price.per_card_minor).is_some() {
                v.push(FieldError::new(field, format!("{mode} is priced twice")));
            }
        }
    }
    let storage = w.local_storage.unwrap_or_default();
    let medium = required("local_storage.medium", disk_medium_from_wire(storage.medium), &mut v);
    v.finish()?;
    let (Some(currency), Some(medium)) = (currency, medium) else {
        return Err(DomainError::invalid("listing", "unreadable"));
    };
    Ok(Listing {
        title: w.title,
        resource_type: ResourceType::Gpu,
        gpu_model: w.gpu_model,
        vram_gib: w.vram_gib,
        memory_gib: w.memory_gib,
        vcpus: w.vcpus,
        vendor: w.vendor,
        region: w.region,
        local_storage: LocalStorage { data_disks: storage.data_disks, data_disk_gb: storage.data_disk_gb, system_disk_gb: storage.system_disk_gb, medium },
        prices: PriceList { currency, per_card },
        usage_instructions: w.usage_instructions,
    })
}

pub fn listing_to_wire(l: &Listing) -> v1::Listing {
    v1::Listing {
        title: l.title.clone(),
        gpu_model: l.gpu_model.clone(),
        vram_gib: l.vram_gib,
        memory_gib: l.memory_gib,
        vcpus: l.vcpus,
        vendor: l.vendor.clone(),
        region: l.region.clone(),
        local_storage: Some(v1::LocalStorage {
            data_disks: l.local_storage.data_disks,
            data_disk_gb: l.local_storage.data_disk_gb,
            system_disk_gb: l.local_storage.system_disk_gb,
            medium: disk_medium_to_wire(l.local_storage.medium),
        }),
        currency: l.prices.currency.as_str().to_owned(),
        prices: l.prices.per_card.iter().map(|(mode, price)| v1::Price { mode: billing_mode_to_wire(*mode), per_card_minor: *price }).collect(),
        usage_instructions: l.usage_instructions.clone(),
    }
}

pub fn inventory_from_wire(wire: Option<v1::NodeInventory>) -> Result<NodeInventory, DomainError> {
    let Some(w) = wire else { return Err(DomainError::invalid("inventory", "required")) };
    Ok(NodeInventory {
        hostname: w.hostname,
        cpu_model: w.cpu_model,
        vcpus: w.vcpus,
        memory_gib: w.memory_gib,
        cards: w
            .cards
            .into_iter()
            .map(|c| CardSpec {
                index: c.index,
                uuid: c.uuid,
                model: c.model,
                vram_mib: c.vram_mib,
                pci_bus_id: c.pci_bus_id,
                power_limit_mw: c.power_limit_mw,
            })
            .collect(),
        os: w.os,
        disk_gib: w.disk_gib,
        driver_version: w.driver_version,
        cuda_version: w.cuda_version,
    })
}

pub fn card_spec_to_wire(c: &CardSpec) -> v1::CardSpec {
    v1::CardSpec {
        index: c.index,
        uuid: c.uuid.clone(),
        model: c.model.clone(),
        vram_mib: c.vram_mib,
        pci_bus_id: c.pci_bus_id.clone(),
        power_limit_mw: c.power_limit_mw,
    }
}

pub fn inventory_to_wire(i: &NodeInventory) -> v1::NodeInventory {
    v1::NodeInventory {
        hostname: i.hostname.clone(),
        cpu_model: i.cpu_model.clone(),
        vcpus: i.vcpus,
        memory_gib: i.memory_gib,
        cards: i.cards.iter().map(card_spec_to_wire).collect(),
        os: i.os.clone(),
        disk_gib: i.disk_gib,
        driver_version: i.driver_version.clone(),
        cuda_version: i.cuda_version.clone(),
    }
}

pub fn card_health_to_wire(health: CardHealth) -> i32 {
    let wire = match health {
        CardHealth::Healthy => v1::CardHealth::Healthy,
        CardHealth::Lost => v1::CardHealth::Lost,
        CardHealth::Overheating => v1::CardHealth::Overheating,
        CardHealth::XidError => v1::CardHealth::XidError,
        CardHealth::AgentSilent => v1::CardHealth::AgentSilent,
    };
    wire as i32
}

pub fn card_health_from_wire(raw: i32) -> Option<CardHealth> {
    CardHealth::ALL.into_iter().find(|h| card_health_to_wire(*h) == raw)
}

/// Reads a catalogue query; `0`/empty means "no constraint".
pub fn catalogue_filter_from_wire(w: &v1::ListCatalogueRequest) -> Result<CatalogueFilter, DomainError> {
    let mut v = Validator::new();
    let text = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
    let nonzero = |n: u32| (n > 0).then_some(n);
    let class = if w.class == 0 { None } else { required("class", cluster_class_from_wire(w.class), &mut v) };
    let billing_mode = if w.billing_mode == 0 { None } else { required("billing_mode", billing_mode_from_wire(w.billing_mode), &mut v) };
    let currency = if w.currency.is_empty() { None } else { Currency::parse(&w.currency).map_err(|e| v.push(e)).ok() };
    v.finish()?;
    let filter = CatalogueFilter {
        class,
        gpu_model: text(&w.gpu_model),
        min_vram_gib: nonzero(w.min_vram_gib),
        min_idle_cards: nonzero(w.min_idle_cards),
        min_memory_gib: nonzero(w.min_memory_gib),
        min_vcpus: nonzero(w.min_vcpus),
        vendor: text(&w.vendor),
        region: text(&w.region),
        min_storage_gb: (w.min_storage_gb > 0).then_some(w.min_storage_gb),
        billing_mode,
        max_price_minor: w.max_price_minor,
        currency,
        include_delisted: w.include_delisted,
    };
    filter.validate()?;
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip() {
        for s in LeaseState::ALL {
            assert_eq!(lease_state_from_wire(lease_state_to_wire(s)), Some(s));
        }
        for r in EndReason::ALL {
            assert_eq!(end_reason_from_wire(end_reason_to_wire(r)), Some(r));
        }
        for h in CardHealth::ALL {
            assert_eq!(card_health_from_wire(card_health_to_wire(h)), Some(h));
        }
        for s in CardStatus::ALL {
            assert_eq!(card_status_from_wire(card_status_to_wire(s)), Some(s));
        }
        for m in BillingMode::ALL {
            assert_eq!(billing_mode_from_wire(billing_mode_to_wire(m)), Some(m));
        }
        assert_eq!(cluster_class_from_wire(0), None);
        assert_eq!(cluster_class_from_wire(99), None);
    }

    #[test]
    fn unreadable_listing_names_every_field() {
        let wire = v1::Listing { currency: "yuan".into(), prices: vec![v1::Price { mode: 0, per_card_minor: 1 }], ..Default::default() };
        let err = listing_from_wire(Some(wire)).unwrap_err();
        let fields: Vec<_> = err.field_errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["currency", "prices[0].mode", "local_storage.medium"]);
    }
}

// ---- jobs ------------------------------------------------------------------------------------

pub fn job_end_reason_to_wire(r: &suanli_types::JobEndReason) -> v1::JobEndReason {
    use suanli_types::JobEndReason as R;
    let mut w = v1::JobEndReason::default();
    w.kind = match r {
        R::Completed => "completed",
        R::ExitStatus(s) => {
            w.exit_status = *s;
            "exit_status"
        }
        R::StartFailed(d) => {
            w.detail = d.clone();
            "start_failed"
        }
        R::Preempted => "preempted",
        R::CardLost(c) => {
            w.card_id = c.0;
            "card_lost"
        }
        R::NodeLost(n) => {
            w.node_id = n.0;
            "node_lost"
        }
        R::LeaseEnded => "lease_ended",
        R::CancelledByUser => "cancelled_by_user",
        R::DeadlineMissed => "deadline_missed",
        R::BudgetExhausted => "budget_exhausted",
        R::Unplaceable(d) => {
            w.detail = d.clone();
            "unplaceable"
        }
    }
    .to_owned();
    w
}

/// `None` for an unknown kind; details longer than 1 KiB are cut (they are free text from an
/// agent and travel through the log).
pub fn job_end_reason_from_wire(w: &v1::JobEndReason) -> Option<suanli_types::JobEndReason> {
    use suanli_types::JobEndReason as R;
    let detail = || w.detail.chars().take(1024).collect::<String>();
    Some(match w.kind.as_str() {
        "completed" => R::Completed,
        "exit_status" => R::ExitStatus(w.exit_status),
        "start_failed" => R::StartFailed(detail()),
        "preempted" => R::Preempted,
        "card_lost" => R::CardLost(suanli_types::CardId(w.card_id)),
        "node_lost" => R::NodeLost(suanli_types::NodeId(w.node_id)),
        "lease_ended" => R::LeaseEnded,
        "cancelled_by_user" => R::CancelledByUser,
        "deadline_missed" => R::DeadlineMissed,
        "budget_exhausted" => R::BudgetExhausted,
        "unplaceable" => R::Unplaceable(detail()),
        _ => return None,
    })
}

pub fn ledger_account_to_wire(a: suanli_types::LedgerAccount) -> String {
    use suanli_types::LedgerAccount as A;
    match a {
        A::Available(id) => format!("available:{}", id.0),
        A::Held(id) => format!("held:{}", id.0),
        A::Earnings(id) => format!("earnings:{}", id.0),
        A::PlatformFees => "platform_fees".into(),
        A::Funding => "funding".into(),
        A::RemoteHeld(id) => format!("remote_held:{}", id.0),
        A::FederationPayable => "federation_payable".into(),
    }
}

pub fn transaction_to_wire(tx: &suanli_types::Transaction) -> v1::LedgerTransaction {
    v1::LedgerTransaction {
        transaction_id: tx.id,
        at_ms: tx.at.millis(),
        kind: tx.kind.as_str().into(),
        currency: tx.currency.as_str().into(),
        lease_id: tx.lease.map_or(0, |l| l.0),
        job_id: tx.job.map_or(0, |j| j.0),
        entries: tx.entries.iter().map(|e| v1::LedgerEntry { account: ledger_account_to_wire(e.account), minor: e.minor }).collect(),
    }
}

#[cfg(test)]
mod job_tests {
    use super::*;
    use suanli_types::JobEndReason as R;

    #[test]
    fn end_reasons_round_trip() {
        for r in [
            R::Completed,
            R::ExitStatus(3),
            R::StartFailed("no such program".into()),
            R::Preempted,
            R::CardLost(suanli_types::CardId(4)),
            R::NodeLost(suanli_types::NodeId(5)),
            R::LeaseEnded,
            R::CancelledByUser,
            R::DeadlineMissed,
            R::BudgetExhausted,
            R::Unplaceable("no A100".into()),
        ] {
            assert_eq!(job_end_reason_from_wire(&job_end_reason_to_wire(&r)), Some(r));
        }
        assert_eq!(job_end_reason_from_wire(&v1::JobEndReason { kind: "nope".into(), ..Default::default() }), None);
    }
}
