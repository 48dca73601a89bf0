//! A supplier's node for tests: `suanli-agent` with simulated A10 cards (device-node stand-ins
//! made with `mknod`, major 195 as the NVIDIA driver's), its SSH gateway on loopback, enrolled
//! at a broker for a supplier, its cards published as a Class B cluster. Lease accounts are
//! Unix users, so the agent needs root ([`crate::require_root`]).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use suanli_proto::convert::{cluster_class_to_wire, listing_to_wire};
use suanli_proto::v1::{self, supplier_service_client::SupplierServiceClient};
use suanli_types::ClusterClass;

use crate::cluster::BrokerCluster;
use crate::{fixtures, Service};

/// A running agent and the cluster its cards were published as.
pub struct SimulatedNode {
    pub agent: Service,
    pub node: u64,
    pub cluster: u64,
    /// The login prefix of this run's lease accounts (`t`, six hex digits, `z`).
    pub prefix: String,
}

/// Starts an agent with `cards` simulated cards under `dir` (state in `dir/agent`, homes in
/// `dir/homes`, devices in `dir/dev`), enrolled at node 1 of `broker` with a token of the
/// supplier `supplier_token`, and publishes its cards as a Class B cluster.
pub async fn start(
    broker: &BrokerCluster,
    dir: &Path,
    supplier_token: &str,
    agent_binary: &Path,
    cards: u32,
    extra_flags: &[&str],
) -> anyhow::Result<SimulatedNode> {
    let channel = suanli_proto::client::channel(&format!("http://{}", broker.address(1)?)).await?;
    let mut icpcss = SupplierServiceClient::with_interceptor(channel, suanli_proto::client::bearer(Some(supplier_token))?);
    let token = icpcss
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest { request_id: "t".into(), valid_seconds: 600 })
        .await
        .context("an enrollment token")?
        .into_inner()
        .token;
    let devices = dir.join("dev");
    std::fs::create_dir_all(&devices)?;
    for card in 0..cards {
        let out = std::process::Command::new("mknod").arg(devices.join(format!("nvidia{card}"))).args(["c", "195", &card.to_string()]).output()?;
        ensure!(out.status.success(), "mknod: {}", String::from_utf8_lossy(&out.stderr));
    }
    let prefix = format!("t{:06x}z", random_u32() & 0x00ff_ffff);
    let mut args: Vec<String> = [
        "run",
        "--broker",
        &broker.agent_endpoint(1)?,
        "--broker-ca",
        &broker.agent_ca_cert().display().to_string(),
        "--state-dir",
        &dir.join("agent").display().to_string(),
        "--enrollment-token",
        &token,
        "--hostname",
        "gpu-access",
        "--source",
        "simulated",
        "--sim-model",
        "A10",
        "--sim-cards",
        &cards.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--ssh-listen",
        "127.0.0.1:0",
        "--home-root",
        &dir.join("homes").display().to_string(),
        "--login-prefix",
        &prefix,
        "--devices-dir",
        &devices.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra_flags.iter().map(|s| s.to_string()));
    let agent = Service::start("agent", agent_binary, &args, &[], dir, Duration::from_secs(30)).await?;
    let node: u64 = agent.get("node").context("the agent's node")?.parse()?;
    let mut supplier = broker.client(1, supplier_token).await?;
    let cluster = supplier
        .publish_cluster(v1::PublishClusterRequest {
            request_id: "publish".into(),
            class: cluster_class_to_wire(ClusterClass::B),
            node_ids: vec![node],
            listing: Some(listing_to_wire(&fixtures::listing(ClusterClass::B))),
        })
        .await
        .context("publishing the node's cards")?
        .into_inner()
        .cluster_id;
    Ok(SimulatedNode { agent, node, cluster, prefix })
}

/// Enough to keep concurrent runs' login prefixes apart.
fn random_u32() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}
