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

/// A certificate for `localhost` and `127.0.0.1` from a CA of its own: the files of the
/// certificate, its key and the CA's certificate, under `dir`.
fn tunnel_certificate(dir: &std::path::Path) -> anyhow::Result<[String; 3]> {
    let ca = suanli_pki::Ca::generate("the portal's CA")?;
    let issued = ca.named_server_certificate("suanli-portal tunnels", &["localhost".into(), "127.0.0.1".into()])?;
    let files = [dir.join("tunnel.pem"), dir.join("tunnel.key"), dir.join("tunnel-ca.pem")];
    for (file, pem) in files.iter().zip([&issued.cert_pem, &issued.key_pem, &ca.cert_pem().to_owned()]) {
        std::fs::write(file, pem)?;
    }
    Ok(files.map(|f| f.display().to_string()))
}

/// An agent off the portal's host dials the portal's tunnel port in TLS, and opens its tunnel
/// only where the portal's certificate comes from the CA it trusts (`--portal-ca`; by default
/// the cluster CA, which did not issue this one). The tunnel port serves tunnels and nothing
/// else.
#[tokio::test]
async fn an_agent_opens_its_tunnel_in_tls_only_to_a_portal_it_trusts() -> anyhow::Result<()> {
    let certificates = tempfile::TempDir::new()?;
    let [cert, key, ca] = tunnel_certificate(certificates.path())?;
    let flags = ["--tunnel-listen", "127.0.0.1:0", "--tunnel-tls-cert", &cert, "--tunnel-tls-key", &key].map(String::from);
    let Some(w) = World::start_with(Backend::Sqlite, &flags).await? else { return Ok(()) };
    let result = async {
        let port = w.portal.service.get("tunnel")?.rsplit_once(':').map(|(_, p)| p.to_owned()).unwrap_or_default();
        let portal = format!("https://localhost:{port}");
        let supplier = w.person("supplier", "tls_supplier").await?;
        let mut agents = Vec::new();
        for (hostname, trust) in [("trusting-node", Some(&ca)), ("cluster-ca-node", None)] {
            let (status, token) = supplier.post("/api/v1/supplier/enrollment-tokens", json!({"valid_seconds": 600})).await?;
            anyhow::ensure!(status == StatusCode::CREATED, "enrollment token: {status} {token}");
            let mut extra = vec!["--portal".to_owned(), portal.clone()];
            if let Some(ca) = trust {
                extra.extend(["--portal-ca".to_owned(), ca.clone()]);
            }
            agents.push(start_agent_with(&w, token["token"].as_str().unwrap_or_default(), hostname, "A100 80GB", 1, false, &extra).await?);
        }
        let trusting: u64 = agents[0].get("node")?.parse()?;
        tunnel_of(&supplier, trusting).await?;

        // The other agent trusts only the cluster CA: it stops at the handshake, again and again.
        let distrusting: u64 = agents[1].get("node")?.parse()?;
        let deadline = tokio::time::Instant::now() + WAIT;
        while !agents[1].log().contains("UnknownIssuer") {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the agent never refused the portal's certificate:\n{}", agents[1].log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (_, nodes) = supplier.get("/api/v1/supplier/nodes").await?;
        let view = nodes.as_array().into_iter().flatten().find(|n| n["node_id"] == distrusting).cloned().unwrap_or_default();
        anyhow::ensure!(view["tunnel"].is_null(), "no tunnel for an agent that does not trust the portal: {view}");

        // The tunnel port answers nothing but tunnels.
        let client = reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(std::fs::read(&ca)?.as_slice())?).build()?;
        for path in ["/api/v1/me", "/login", "/"] {
            let response = client.get(format!("{portal}{path}")).send().await?;
            anyhow::ensure!(response.status() == StatusCode::NOT_FOUND, "{path} on the tunnel port: {}", response.status());
        }
        Ok(())
    }
    .await;
    w.explain(result)
}

/// A tunnel port off loopback speaks TLS, or the portal does not start.
#[test]
fn a_tunnel_port_off_loopback_without_tls_stops_the_portal() -> anyhow::Result<()> {
    let dir = tempfile::TempDir::new()?;
    let tunnel_key = dir.path().join("tunnel-key");
    suanli_pki::tunnel_ticket::TunnelKey::load(&tunnel_key, true)?;
    let binary = suanli_testkit::workspace_binary("suanli-portal", "suanli-portal")?;
    let database = format!("sqlite://{}", dir.path().join("portal.db").display());
    let out = std::process::Command::new(binary)
        .args(["--database-url", &database, "--key-file", &dir.path().join("key").display().to_string()])
        .args(["--listen", "127.0.0.1:0", "--platform-token", "platform-token-of-a-test", "--tunnel-key-file", &tunnel_key.display().to_string()])
        .args(["--tunnel-listen", "0.0.0.0:0"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(!out.status.success() && stderr.contains("--tunnel-tls-cert"), "the portal must refuse: {} {stderr}", out.status);
    Ok(())
}
