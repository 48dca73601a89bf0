//! The supplier's commands: enrollment tokens for new nodes, the enrolled nodes, and clusters
//! published from a TOML file (the portal's `POST /api/v1/supplier/clusters` body, as TOML).

use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};
use suanli_cli::client::Portal;
use suanli_cli::table;

use crate::text;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// A one-time token a new node's agent enrolls with (`suanli-agent run --enrollment-token`).
    EnrollToken {
        /// How long it stays valid: 1 second to 7 days (default one day).
        #[arg(long)]
        valid_seconds: Option<u32>,
    },
    /// Your enrolled nodes and their cards.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Publish enrolled nodes as a cluster, from a TOML file:
    ///
    ///   class = "B"
    ///   node_ids = [12, 13]
    ///   [listing]
    ///   title = "A100 ×8 in Shenzhen"
    ///   gpu_model = "NVIDIA A100-SXM4-80GB"
    ///   vram_gib = 80
    ///   memory_gib = 512
    ///   vcpus = 64
    ///   vendor = "Inspur"
    ///   region = "Shenzhen"
    ///   currency = "CNY"
    ///   [listing.storage]
    ///   data_disks = 2
    ///   data_disk_gb = 3840
    ///   system_disk_gb = 480
    ///   medium = "nvme"
    ///   [[listing.prices]]
    ///   billing_mode = "hourly"
    ///   per_card_minor = 1200
    Publish {
        file: std::path::PathBuf,
        /// Idempotency key: the same key again publishes once and answers the same.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Your clusters.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

pub async fn node(portal: &Portal, command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::EnrollToken { valid_seconds } => {
            let made: Value = portal.post("/api/v1/supplier/enrollment-tokens", &json!({ "valid_seconds": valid_seconds })).await?;
            println!("{}", text(&made["token"]));
            eprintln!("valid until {}; on the new node: {}", table::date(made["expires_ms"].as_u64().unwrap_or(0)), text(&made["install_hint"]));
        }
        NodeCommand::Ls { json: json_out } => {
            let nodes: Value = portal.get("/api/v1/supplier/nodes", &[]).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = nodes
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    let cards = n["cards"].as_array().map_or(0, Vec::len);
                    vec![n["node_id"].to_string(), text(&n["hostname"]), cards.to_string(), text(&n["cluster_id"])]
                })
                .collect();
            print!("{}", table::render(&["node", "hostname", "cards", "cluster"], &rows));
        }
    }
    Ok(())
}

/// The publish request a cluster file describes, with `request_id` from the command line
/// when given.
pub fn publish_request(file: &Path, request_id: Option<String>) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed: toml::Table = toml::from_str(&text).with_context(|| format!("{} is not TOML", file.display()))?;
    let mut body = serde_json::to_value(parsed)?;
    if let (Some(key), Some(object)) = (request_id, body.as_object_mut()) {
        object.insert("request_id".into(), Value::String(key));
    }
    Ok(body)
}

pub async fn cluster(portal: &Portal, command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Publish { file, request_id } => {
            let body = publish_request(&file, request_id)?;
            let made: Value = portal.post("/api/v1/supplier/clusters", &body).await?;
            println!("cluster {} published: {} ({} cards)", made["cluster_id"], text(&made["title"]), made["total_cards"]);
        }
        ClusterCommand::Ls { json: json_out } => {
            let clusters: Value = portal.get("/api/v1/supplier/clusters", &[]).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&clusters)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = clusters
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let listed = if c["delisted"] == true { "delisted" } else { "listed" };
                    vec![
                        c["cluster_id"].to_string(),
                        text(&c["class"]),
                        format!("{}/{}", c["idle_cards"], c["total_cards"]),
                        listed.into(),
                        text(&c["title"]),
                        text(&c["region"]),
                    ]
                })
                .collect();
            print!("{}", table::render(&["cluster", "class", "idle/cards", "", "title", "region"], &rows));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_file_becomes_the_portals_publish_body() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("cluster.toml");
        std::fs::write(
            &file,
            "class = \"B\"\nnode_ids = [12]\n[listing]\ntitle = \"t\"\n[[listing.prices]]\nbilling_mode = \"hourly\"\nper_card_minor = 1200\n",
        )
        .expect("write");
        let body = publish_request(&file, Some("k1".into())).expect("body");
        assert_eq!(body["class"], "B");
        assert_eq!(body["node_ids"], json!([12]));
        assert_eq!(body["listing"]["prices"][0]["per_card_minor"], 1200);
        assert_eq!(body["request_id"], "k1");
        std::fs::write(&file, "class = ").expect("write");
        assert!(publish_request(&file, None).is_err());
    }
}
