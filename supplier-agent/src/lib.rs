//! `suanli-agent`: the daemon a supplier runs on every node it shares (SPEC §2, §4–§5).
//!
//! - [`config`]: TOML + environment + flags.
//! - [`host`]: host facts for the inventory and node metrics from `/proc`.
//! - [`source`]: the GPUs — NVML or simulated.
//! - [`identity`]: one-time-token enrollment; mutual TLS with the node's key from then on.
//! - [`access`]: per-lease Unix accounts and the SSH gateway that admits their researchers.
//! - [`doctor`]: which protections between leases and the node are active here.
//! - [`runtime`]: the sampler and the state the tasks share.
//! - [`outbox`]: sequence-numbered samples awaiting (and retained after) acknowledgement.
//! - [`uplink`]: the telemetry stream to the broker, with reconnects and backpressure.
//! - [`probe`]: network quality to the broker.
//! - [`jobs`]: runs the job attempts the scheduler placed on this node's leased cards.
//! - [`services`]: services on leased cards (demos), run and supervised for the portal.
//! - [`templates`]: the environments services run in (JupyterLab), installed once per node.
//! - [`bridge`]: carries a service's connections to a program that listens on a path (JupyterLab).
//! - [`terminal`]: a lease's terminal in the browser (a service the agent serves itself).
//! - [`tunnel`]: the tunnel to the portal, through which the portal reaches and controls them.
//! - [`provisioner`]: follows this node's leases: provisions access, confirms Class B leases.
//! - [`exporter`]: `/metrics` (DCGM names), `/healthz`, simulated-GPU controls.

pub mod access;
pub mod bridge;
pub mod config;
pub mod doctor;
pub mod exporter;
pub mod fence_guard;
pub mod host;
pub mod identity;
pub mod jobs;
pub mod outbox;
pub mod probe;
pub mod provisioner;
pub mod runtime;
pub mod services;
pub mod source;
pub mod templates;
pub mod terminal;
pub mod tunnel;
pub mod uplink;

use suanli_telemetry::CardInfo;
use suanli_types::{CardSpec, NodeInventory};

/// What the node reports at enrollment: the host and every card.
pub fn inventory(facts: &host::HostFacts, cards: &[CardInfo]) -> NodeInventory {
    NodeInventory {
        hostname: facts.hostname.clone(),
        cpu_model: facts.cpu_model.clone(),
        vcpus: facts.vcpus,
        memory_gib: facts.memory_gib,
        cards: cards
            .iter()
            .map(|c| CardSpec {
                index: c.index,
                uuid: c.uuid.clone(),
                model: c.model.clone(),
                vram_mib: c.vram_mib,
                pci_bus_id: c.pci_bus_id.clone(),
                power_limit_mw: c.power_limit_mw,
            })
            .collect(),
        os: facts.os.clone(),
        disk_gib: facts.disk_gib,
        driver_version: cards.first().map(|c| c.driver_version.clone()).unwrap_or_default(),
        cuda_version: cards.first().map(|c| c.cuda_version.clone()).unwrap_or_default(),
    }
}
