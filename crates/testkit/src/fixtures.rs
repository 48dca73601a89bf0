//! Marketplace fixtures shared by the tests and benchmarks: one listing, one node inventory,
//! and the gRPC steps that register accounts and publish a cluster.

use std::collections::BTreeMap;

use suanli_proto::client::Client;
use suanli_proto::convert::{cluster_class_to_wire, inventory_to_wire, listing_to_wire};
use suanli_proto::v1::{self, AccountKind};
use suanli_types::cluster::DiskMedium;
use suanli_types::{BillingMode, CardSpec, ClusterClass, Currency, Listing, LocalStorage, NodeInventory, PriceList, ResourceType};

/// Per card: 6.00 CNY an hour, 3,000.00 CNY a month.
pub const HOURLY_PRICE: i64 = 600;
pub const MONTHLY_PRICE: i64 = 300_000;

/// An L40S listing in Beijing; Class A listings carry usage instructions.
pub fn listing(class: ClusterClass) -> Listing {
    Listing {
        title: "4*L40S".into(),
        resource_type: ResourceType::Gpu,
        gpu_model: "L40S".into(),
        vram_gib: 48,
        memory_gib: 512,
        vcpus: 96,
        vendor: "Lenovo".into(),
        region: "Beijing".into(),
        local_storage: LocalStorage { data_disks: 1, data_disk_gb: 3840, system_disk_gb: 480, medium: DiskMedium::Ssd },
        prices: PriceList { currency: Currency::cny(), per_card: BTreeMap::from([(BillingMode::Hourly, HOURLY_PRICE), (BillingMode::Monthly, MONTHLY_PRICE)]) },
        usage_instructions: if class == ClusterClass::A { "SSH in with the account shown on the lease.".into() } else { String::new() },
    }
}

/// A server named `{tag}.example` with `cards` L40S cards.
pub fn inventory(tag: &str, cards: u32) -> NodeInventory {
    NodeInventory {
        hostname: format!("{tag}.example"),
        cpu_model: "AMD EPYC 9654".into(),
        vcpus: 96,
        memory_gib: 512,
        cards: (0..cards)
            .map(|i| CardSpec { index: i, uuid: format!("GPU-{tag}-{i}"), model: "L40S".into(), vram_mib: 48 * 1024, ..Default::default() })
            .collect(),
        ..Default::default()
    }
}

/// What [`register`] pays in for every researcher: 1,000,000.00 CNY, enough for any test lease.
/// A request for `cards` cards of `cluster`, billed hourly for one period (the test worlds'
/// usual lease).
pub fn hourly_lease(request_id: impl Into<String>, cluster: u64, cards: u32) -> v1::RequestLeaseRequest {
    v1::RequestLeaseRequest {
        request_id: request_id.into(),
        cluster_id: cluster,
        node_ids: Vec::new(),
        cards,
        billing_mode: v1::BillingMode::Hourly.into(),
        periods: 1,
    }
}

pub const RESEARCHER_FUNDS: i64 = 100_000_000;

/// Registers an account with the platform token; returns its ID and API token. A researcher
/// gets [`RESEARCHER_FUNDS`] deposited, since leases are prepaid.
pub async fn register(platform: &mut Client, kind: AccountKind, request_id: &str) -> anyhow::Result<(u64, String)> {
    let r =
        platform.register_account(v1::RegisterAccountRequest { request_id: request_id.into(), kind: kind.into(), token: String::new() }).await?.into_inner();
    if kind == AccountKind::Researcher {
        deposit(platform, r.account_id, RESEARCHER_FUNDS, &format!("{request_id}-funds")).await?;
    }
    Ok((r.account_id, r.token))
}

/// Pays `minor` CNY fen in for a researcher, as the payment service would.
pub async fn deposit(platform: &mut Client, account: u64, minor: i64, request_id: &str) -> anyhow::Result<()> {
    let amount = v1::Money { currency: "CNY".into(), minor };
    platform.deposit(v1::DepositRequest { request_id: request_id.into(), account_id: account, amount: Some(amount) }).await?;
    Ok(())
}

/// Enrolls `nodes` servers of `cards_per_node` cards and publishes them as one cluster.
pub async fn publish(supplier: &mut Client, class: ClusterClass, nodes: u32, cards_per_node: u32, tag: &str) -> anyhow::Result<v1::Cluster> {
    let mut node_ids = Vec::new();
    for n in 0..nodes {
        let inventory = inventory_to_wire(&inventory(&format!("{tag}-{n}"), cards_per_node));
        let node = supplier.enroll_node(v1::EnrollNodeRequest { request_id: format!("node-{tag}-{n}"), inventory: Some(inventory) }).await?.into_inner();
        node_ids.push(node.node_id);
    }
    Ok(supplier
        .publish_cluster(v1::PublishClusterRequest {
            request_id: format!("cluster-{tag}"),
            class: cluster_class_to_wire(class),
            node_ids,
            listing: Some(listing_to_wire(&listing(class))),
        })
        .await?
        .into_inner())
}
