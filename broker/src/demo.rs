//! Demo marketplace content for `suanli-broker dev`, created through the public API like a real
//! supplier would: two suppliers enroll nodes and publish Class A and Class B clusters; one
//! researcher account is ready to lease.

use std::collections::BTreeMap;

use suanli_proto::convert::listing_to_wire;
use suanli_proto::v1::{self, AccountKind};
use suanli_types::cluster::DiskMedium;
use suanli_types::{BillingMode, Currency, Listing, LocalStorage, PriceList, ResourceType};
use tonic::transport::Channel;

use suanli_proto::client::{with_token, ClientError};

pub struct DemoAccounts {
    pub suppliers: Vec<(u64, String)>,
    pub researcher: (u64, String),
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Api(#[from] suanli_proto::ApiError),
}

impl From<tonic::Status> for DemoError {
    fn from(status: tonic::Status) -> Self {
        DemoError::Api(suanli_proto::decode_status(&status))
    }
}

struct DemoCluster<'a> {
    class: v1::ClusterClass,
    nodes: u32,
    cards_per_node: u32,
    model: &'a str,
    vram_gib: u32,
    memory_gib: u32,
    vcpus: u32,
    vendor: &'a str,
    region: &'a str,
    prices: &'a [(BillingMode, i64)],
}

const CLUSTERS: &[(usize, DemoCluster<'static>)] = &[
    (
        0,
        DemoCluster {
            class: v1::ClusterClass::A,
            nodes: 2,
            cards_per_node: 8,
            model: "A100 80GB",
            vram_gib: 80,
            memory_gib: 1024,
            vcpus: 128,
            vendor: "Inspur",
            region: "Shenzhen",
            prices: &[(BillingMode::Monthly, 531_250), (BillingMode::Yearly, 5_737_500)],
        },
    ),
    (
        0,
        DemoCluster {
            class: v1::ClusterClass::B,
            nodes: 2,
            cards_per_node: 8,
            model: "RTX 4090",
            vram_gib: 24,
            memory_gib: 512,
            vcpus: 64,
            vendor: "Supermicro",
            region: "Hangzhou",
            prices: &[(BillingMode::Hourly, 250), (BillingMode::Daily, 5_400)],
        },
    ),
    (
        1,
        DemoCluster {
            class: v1::ClusterClass::B,
            nodes: 1,
            cards_per_node: 4,
            model: "L40S",
            vram_gib: 48,
            memory_gib: 512,
            vcpus: 96,
            vendor: "Lenovo",
            region: "Beijing",
            prices: &[(BillingMode::Hourly, 600), (BillingMode::Monthly, 300_000)],
        },
    ),
    (
        1,
        DemoCluster {
            class: v1::ClusterClass::A,
            nodes: 1,
            cards_per_node: 8,
            model: "H800",
            vram_gib: 80,
            memory_gib: 2048,
            vcpus: 192,
            vendor: "H3C",
            region: "Shanghai",
            prices: &[(BillingMode::Monthly, 1_250_000)],
        },
    ),
];

fn listing(spec: &DemoCluster<'_>) -> Listing {
    Listing {
        title: format!("{}*{} · {}", spec.cards_per_node, spec.model, spec.region),
        resource_type: ResourceType::Gpu,
        gpu_model: spec.model.into(),
        vram_gib: spec.vram_gib,
        memory_gib: spec.memory_gib,
        vcpus: spec.vcpus,
        vendor: spec.vendor.into(),
        region: spec.region.into(),
        local_storage: LocalStorage { data_disks: 2, data_disk_gb: 3840, system_disk_gb: 480, medium: DiskMedium::Nvme },
        prices: PriceList { currency: Currency::cny(), per_card: BTreeMap::from_iter(spec.prices.iter().copied()) },
        usage_instructions: if spec.class == v1::ClusterClass::A {
            "Whole servers. After verifying the authorization code, log in over SSH with the account shown on the lease; VNC on request.".into()
        } else {
            String::new()
        },
    }
}

/// Publishes an agent's enrolled node as a Class B cluster of its own (`ops/run-local` does this
/// for its simulated agents). Returns the cluster ID.
pub async fn publish_agent_node(channel: Channel, supplier_token: &str, node: u64, model: &str, cards: u32, vram_gib: u32) -> Result<u64, DemoError> {
    let mut supplier = with_token(channel, Some(supplier_token))?;
    let spec = DemoCluster {
        class: v1::ClusterClass::B,
        nodes: 1,
        cards_per_node: cards,
        model,
        vram_gib,
        memory_gib: 256,
        vcpus: 32,
        vendor: "Suanli demo",
        region: "Local",
        prices: &[(BillingMode::Hourly, 300), (BillingMode::Daily, 6_000)],
    };
    let cluster = supplier
        .publish_cluster(v1::PublishClusterRequest {
            request_id: format!("demo-agent-node-{node}"),
            class: spec.class.into(),
            node_ids: vec![node],
            listing: Some(listing_to_wire(&listing(&spec))),
        })
        .await?
        .into_inner();
    Ok(cluster.cluster_id)
}

/// Creates the demo accounts, nodes and clusters. `platform_token` registers the accounts.
pub async fn seed(channel: Channel, platform_token: &str) -> Result<DemoAccounts, DemoError> {
    let mut platform = with_token(channel.clone(), Some(platform_token))?;
    let mut register = async |kind: AccountKind, n: usize| -> Result<(u64, String), DemoError> {
        let r = platform
            .register_account(v1::RegisterAccountRequest { request_id: format!("demo-account-{n}"), kind: kind.into(), token: String::new() })
            .await?
            .into_inner();
        Ok((r.account_id, r.token))
    };
    let suppliers = vec![register(AccountKind::Supplier, 0).await?, register(AccountKind::Supplier, 1).await?];
    let researcher = register(AccountKind::Researcher, 2).await?;
    // Leases are prepaid: the demo researcher starts with 100,000.00 CNY.
    let amount = v1::Money { currency: "CNY".into(), minor: 10_000_000 };
    platform.deposit(v1::DepositRequest { request_id: "demo-funds".into(), account_id: researcher.0, amount: Some(amount) }).await?;

    for (i, (owner, spec)) in CLUSTERS.iter().enumerate() {
        let mut supplier = with_token(channel.clone(), Some(&suppliers[*owner].1))?;
        let mut node_ids = Vec::new();
        for n in 0..spec.nodes {
            let inventory = v1::NodeInventory {
                hostname: format!("{}-gpu{n:02}.demo", spec.region.to_lowercase()),
                cpu_model: "AMD EPYC 9654".into(),
                vcpus: spec.vcpus,
                memory_gib: spec.memory_gib,
                cards: (0..spec.cards_per_node)
                    .map(|c| v1::CardSpec {
                        index: c,
                        uuid: format!("GPU-demo-{i}-{n}-{c}"),
                        model: spec.model.into(),
                        vram_mib: spec.vram_gib as u64 * 1024,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            let node = supplier.enroll_node(v1::EnrollNodeRequest { request_id: format!("demo-node-{i}-{n}"), inventory: Some(inventory) }).await?.into_inner();
            node_ids.push(node.node_id);
        }
        let listing = listing(spec);
        supplier
            .publish_cluster(v1::PublishClusterRequest {
                request_id: format!("demo-cluster-{i}"),
                class: spec.class.into(),
                node_ids,
                listing: Some(listing_to_wire(&listing)),
            })
            .await?;
    }
    Ok(DemoAccounts { suppliers, researcher })
}
