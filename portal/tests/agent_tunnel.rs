//! A supplier's agent keeps a tunnel to the portal (`suanli-tunnel`, issue 23), opened with a
//! ticket the broker issued for its node; its supplier sees it open. Nobody gets a tunnel
//! without such a ticket (no ticket, a forged or expired one, another version), and a copy of
//! the open tunnel's ticket takes nothing over.
//! Real processes: a broker, the portal, an agent.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{start_agent_with, Backend, World};

const WAIT: Duration = Duration::from_secs(30);

/// The supplier's view of its node's tunnel, once it is open.
async fn tunnel_of(supplier: &support::Api, node: u64) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, nodes) = supplier.get("/api/v1/supplier/nodes").await?;
        anyhow::ensure!(status == StatusCode::OK, "nodes: {status} {nodes}");
        let tunnel = nodes.as_array().into_iter().flatten().find(|n| n["node_id"] == node).map(|n| n["tunnel"].clone()).unwrap_or_default();
        if !tunnel.is_null() {
            return Ok(tunnel);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "node {node}'s tunnel never opened: {nodes}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A dial to the portal's tunnel endpoint as an agent would make it, with `ticket`.
async fn dial(url: &str, upgrade: &str, ticket: Option<&str>) -> anyhow::Result<(StatusCode, String)> {
    let mut request = reqwest::Client::new().get(format!("{url}/api/v1/agent-tunnel")).header("connection", "upgrade").header("upgrade", upgrade);
    if let Some(ticket) = ticket {
        request = request.header("authorization", format!("Bearer {ticket}"));
    }
    let response = request.send().await?;
    Ok((response.status(), response.text().await.unwrap_or_default()))
}

#[tokio::test]
async fn an_agent_keeps_a_tunnel_and_only_a_broker_ticket_opens_one() -> anyhow::Result<()> {
    let Some(w) = World::start(Backend::Sqlite).await? else { return Ok(()) };
    let result = async {
        let supplier = w.person("supplier", "tunnel_supplier").await?;
        let (status, token) = supplier.post("/api/v1/supplier/enrollment-tokens", json!({"valid_seconds": 600})).await?;
        anyhow::ensure!(status == StatusCode::CREATED, "enrollment token: {status} {token}");
        let portal = w.portal.url.trim_start_matches("http://").to_owned();
        let agent =
            start_agent_with(&w, token["token"].as_str().unwrap_or_default(), "tunnel-node", "A100 80GB", 2, false, &["--portal".into(), portal]).await?;
        let node: u64 = agent.get("node")?.parse()?;
        let tunnel = tunnel_of(&supplier, node).await?;
        let (since, expires) = (tunnel["since_ms"].as_i64().unwrap_or_default(), tunnel["expires_ms"].as_i64().unwrap_or_default());
        anyhow::ensure!(since > 0 && expires - since > 9 * 60_000 && expires - since <= 10 * 60_000, "a ten-minute ticket: {tunnel}");

        // Nobody else gets a tunnel: no ticket, one signed with another key, one signed with the
        // real key (the World's, which broker and portal share) that has expired, garbage,
        // another version.
        let real = suanli_pki::tunnel_ticket::TunnelKey::load(&w.dir.path().join("tunnel-key"), false)?;
        let forged = suanli_pki::tunnel_ticket::TunnelKey::generate().sign(&suanli_pki::tunnel_ticket::TunnelTicket { node, expires_ms: expires });
        let expired = real.sign(&suanli_pki::tunnel_ticket::TunnelTicket { node, expires_ms: since - 1 });
        // A copy of the open tunnel's ticket (same node, same expiry), or an older one, takes
        // nothing over.
        let copy = real.sign(&suanli_pki::tunnel_ticket::TunnelTicket { node, expires_ms: expires });
        let older = real.sign(&suanli_pki::tunnel_ticket::TunnelTicket { node, expires_ms: expires - 1_000 });
        for (what, upgrade, ticket, want) in [
            ("no ticket", "suanli-tunnel/1", None, StatusCode::UNAUTHORIZED),
            ("a forged ticket", "suanli-tunnel/1", Some(forged.as_str()), StatusCode::UNAUTHORIZED),
            ("an expired ticket", "suanli-tunnel/1", Some(expired.as_str()), StatusCode::UNAUTHORIZED),
            ("garbage", "suanli-tunnel/1", Some("tt1.1.2.3"), StatusCode::UNAUTHORIZED),
            ("another version", "suanli-tunnel/0", Some(forged.as_str()), StatusCode::UPGRADE_REQUIRED),
            ("a copy of the open tunnel's ticket", "suanli-tunnel/1", Some(copy.as_str()), StatusCode::CONFLICT),
            ("an older ticket", "suanli-tunnel/1", Some(older.as_str()), StatusCode::CONFLICT),
        ] {
            let (status, body) = dial(&w.portal.url, upgrade, ticket).await?;
            anyhow::ensure!(status == want, "{what}: {status} {body}");
        }
        // The agent's tunnel is still the one open.
        anyhow::ensure!(tunnel_of(&supplier, node).await? == tunnel, "the agent's tunnel stands");
        // A stranger's view of nodes shows none of it.
        let researcher = w.person("researcher", "tunnel_researcher").await?;
        let (status, body) = researcher.get("/api/v1/supplier/nodes").await?;
        anyhow::ensure!(status == StatusCode::FORBIDDEN, "a researcher lists no nodes: {status} {body}");
        Ok(())
    }
    .await;
    w.explain(result)
}
