//! `suanli`: see the crate's documentation, and `suanli --help`.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use suanli_cli::client::Portal;
use suanli_cli::{config, query, table};

#[derive(Parser)]
#[command(name = "suanli", version, about = "The Suanli marketplace from a terminal: search, lease, run jobs.", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  suanli login --portal https://portal.example      (paste an API token from your account page)
  suanli search 'gpu=A100 vram>=80 price<2.5 region=shenzhen class=B' --sort price
  suanli lease create 12 --cards 2 --mode hourly --periods 4
  suanli job submit train.yaml --follow";

#[derive(Subcommand)]
enum Command {
    /// Store the portal's address and an API token (read from standard input, or
    /// $SUANLI_TOKEN), after checking them; the file is readable by you only.
    Login {
        #[arg(long)]
        portal: String,
    },
    /// Who the stored token acts as.
    Whoami,
    /// Search the catalogue: terms like `gpu=A100 vram>=80 price<2.5 region=shenzhen class=B
    /// mode=hourly cards>=8` (fields: gpu, vram, cards, idle, memory, vcpus, storage, vendor,
    /// region, class, mode, price in yuan per card per period, currency).
    Search {
        /// The query; empty: everything.
        #[arg(default_value = "")]
        query: String,
        /// newest, price, -price, idle or vram (price needs `mode=…`; hourly by default).
        #[arg(long)]
        sort: Option<String>,
        #[arg(long, default_value_t = 1)]
        page: u32,
        /// The portal's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Leases: list, show, create, extend, end.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Jobs: list, show, submit (YAML or JSON), cancel.
    #[command(subcommand)]
    Job(JobCommand),
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// Your leases.
    Ls {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: u64,
    },
    /// Lease cards of a cluster (Class B: `--cards`; Class A: `--node` for each whole node).
    Create {
        cluster: u64,
        #[arg(long, default_value_t = 0)]
        cards: u32,
        #[arg(long = "node")]
        nodes: Vec<u64>,
        #[arg(long, default_value = "hourly")]
        mode: String,
        #[arg(long, default_value_t = 1)]
        periods: u32,
        /// Idempotency key: the same key again leases once and answers the same.
        #[arg(long)]
        request_id: Option<String>,
    },
    Extend {
        id: u64,
        #[arg(long)]
        periods: u32,
    },
    End {
        id: u64,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    Ls {
        /// Only queued, placed and running jobs.
        #[arg(long)]
        live: bool,
        #[arg(long)]
        json: bool,
    },
    Show {
        id: u64,
    },
    /// Submit a job spec (YAML or JSON, as `suanli-scheduler validate` documents it).
    Submit {
        file: PathBuf,
        /// Print its progress until it ends; the exit status says whether it succeeded.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        request_id: Option<String>,
    },
    Cancel {
        id: u64,
    },
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("suanli: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = config::dir()?;
    if let Command::Login { portal } = &cli.command {
        return login(&dir, portal).await;
    }
    let login = config::load(&dir)?;
    let portal = Portal::new(&login.portal, &login.token);
    match cli.command {
        Command::Login { .. } => unreachable!("handled above"),
        Command::Whoami => {
            let me: Value = portal.get("/api/v1/me", &[]).await?;
            println!("{} ({}, {})", text(&me["username"]), text(&me["kind"]), text(&me["market_account"]));
        }
        Command::Search { query, sort, page, json } => search(&portal, &query, sort, page, json).await?,
        Command::Lease(command) => lease(&portal, command).await?,
        Command::Job(command) => job(&portal, command).await?,
    }
    Ok(())
}

async fn login(dir: &std::path::Path, portal: &str) -> anyhow::Result<()> {
    if !token_may_go_to(portal) {
        bail!("{portal}: the portal is reached over https:// (plain http only on this machine): the token must not cross a network in the clear");
    }
    let token = match std::env::var("SUANLI_TOKEN") {
        Ok(token) => token,
        Err(_) => {
            eprintln!("API token (make one on your account page in the portal):");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("reading the token")?;
            line
        }
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("no token given");
    }
    let me: Value = Portal::new(portal, &token).get("/api/v1/me", &[]).await.context("checking the token")?;
    let path = config::save(dir, &config::Login { portal: portal.trim_end_matches('/').to_owned(), token })?;
    println!("logged in as {} ({}); saved in {}", text(&me["username"]), text(&me["kind"]), path.display());
    Ok(())
}

async fn search(portal: &Portal, text_query: &str, sort: Option<String>, page: u32, json_out: bool) -> anyhow::Result<()> {
    let mut search = query::parse(text_query).map_err(|e| anyhow::anyhow!("the query does not parse:\n{e}"))?;
    if let Some(sort) = sort {
        // Prices compare within one billing mode: hourly unless the query names one.
        if sort.contains("price") && search.get("billing_mode").is_none() {
            search.params.push(("billing_mode", "hourly".into()));
        }
        search.params.push(("sort", sort));
    }
    search.params.push(("page", page.to_string()));
    let found: Value = portal.get("/api/v1/catalogue", &search.params).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    let clusters = found["clusters"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .map(|c| {
            let prices: Vec<String> = c["prices"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}/{}", table::money(p["per_card_minor"].as_i64().unwrap_or(0)), text(&p["billing_mode"])))
                .collect();
            vec![
                c["cluster_id"].to_string(),
                text(&c["class"]),
                text(&c["gpu_model"]),
                c["vram_gib"].to_string(),
                format!("{}/{}", c["idle_cards"], c["total_cards"]),
                text(&c["region"]),
                format!("{} {}", prices.join(" "), text(&c["currency"])),
                text(&c["title"]),
            ]
        })
        .collect();
    print!("{}", table::render(&["ID", "CLASS", "GPU", "VRAM", "IDLE", "REGION", "PRICE/CARD", "TITLE"], &rows));
    println!("{} of {} (page {})", clusters.len(), found["total"], found["page"]);
    Ok(())
}

async fn lease(portal: &Portal, command: LeaseCommand) -> anyhow::Result<()> {
    let shown: Value = match command {
        LeaseCommand::Ls { json: json_out } => {
            let leases: Value = portal.get("/api/v1/leases", &[]).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&leases)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = leases
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    vec![
                        l["lease_id"].to_string(),
                        l["cluster_id"].to_string(),
                        text(&l["state"]),
                        l["card_ids"].as_array().map_or(0, Vec::len).to_string(),
                        format!("{} × {}", l["periods"], text(&l["billing_mode"])),
                        format!("{} {}", table::money(l["amount_minor"].as_i64().unwrap_or(0)), text(&l["currency"])),
                    ]
                })
                .collect();
            print!("{}", table::render(&["ID", "CLUSTER", "STATE", "CARDS", "PERIODS", "AMOUNT"], &rows));
            return Ok(());
        }
        LeaseCommand::Show { id } => portal.get(&format!("/api/v1/leases/{id}"), &[]).await?,
        LeaseCommand::Create { cluster, cards, nodes, mode, periods, request_id } => {
            let body = json!({"cluster_id": cluster, "cards": cards, "node_ids": nodes, "billing_mode": mode, "periods": periods, "request_id": request_id});
            portal.post("/api/v1/leases", &body).await?
        }
        LeaseCommand::Extend { id, periods } => portal.post(&format!("/api/v1/leases/{id}/extend"), &json!({"periods": periods})).await?,
        LeaseCommand::End { id } => portal.post(&format!("/api/v1/leases/{id}/end"), &json!({})).await?,
    };
    println!("{}", serde_json::to_string_pretty(&shown)?);
    Ok(())
}

async fn job(portal: &Portal, command: JobCommand) -> anyhow::Result<()> {
    match command {
        JobCommand::Ls { live, json: json_out } => {
            let jobs: Value = portal.get("/api/v1/jobs", &[("live", live.to_string())]).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = jobs
                .as_array()
                .into_iter()
                .flatten()
                .map(|j| {
                    vec![j["job_id"].to_string(), text(&j["name"]), text(&j["kind"]), text(&j["state"]), table::money(j["cost_minor"].as_i64().unwrap_or(0))]
                })
                .collect();
            print!("{}", table::render(&["ID", "NAME", "KIND", "STATE", "COST"], &rows));
        }
        JobCommand::Show { id } => println!("{}", serde_json::to_string_pretty(&portal.get::<Value>(&format!("/api/v1/jobs/{id}"), &[]).await?)?),
        JobCommand::Cancel { id } => {
            println!("{}", serde_json::to_string_pretty(&portal.post::<Value>(&format!("/api/v1/jobs/{id}/cancel"), &json!({})).await?)?)
        }
        JobCommand::Submit { file, follow, request_id } => {
            let text_spec = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            // YAML is a superset of JSON: one parser reads both.
            let spec: Value = serde_yaml::from_str(&text_spec).with_context(|| format!("{} is neither YAML nor JSON", file.display()))?;
            let job: Value = portal.post("/api/v1/jobs", &json!({"spec": spec, "request_id": request_id})).await?;
            let id = job["job_id"].as_u64().context("the portal's answer names no job")?;
            println!("job {id} submitted");
            if follow {
                return follow_job(portal, id).await;
            }
        }
    }
    Ok(())
}

/// Prints a job's state and progress as they change, until it ends; an error unless it
/// succeeded.
async fn follow_job(portal: &Portal, id: u64) -> anyhow::Result<()> {
    let mut last = (String::new(), Value::Null);
    loop {
        let job: Value = portal.get(&format!("/api/v1/jobs/{id}"), &[]).await?;
        let state = text(&job["state"]);
        if state != last.0 {
            println!("job {id}: {state}");
        }
        if job["progress"] != last.1 && !job["progress"].is_null() {
            println!("  {}", job["progress"]);
        }
        match state.as_str() {
            "succeeded" => return Ok(()),
            "failed" | "cancelled" => bail!("job {id} {state}: {}", text(&job["end_reason"])),
            _ => {}
        }
        last = (state, job["progress"].clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether an API token may be sent to `portal`: over https, or in the clear to this machine's
/// loopback only (the host itself, parsed: `http://localhost.example` is not loopback).
fn token_may_go_to(portal: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(portal) else { return false };
    let host = url.host_str().unwrap_or("");
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => !host.is_empty(),
        "http" => loopback,
        _ => false,
    }
}

/// A JSON value as a table cell: strings without their quotes, absent as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::token_may_go_to;

    #[test]
    fn a_token_goes_over_https_or_to_this_machine_only() {
        for ok in ["https://portal.example", "https://10.0.0.5:8443", "http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"] {
            assert!(token_may_go_to(ok), "{ok}");
        }
        for refused in [
            "http://portal.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example",
            "http://10.0.0.5",
            "ftp://127.0.0.1",
            "portal.example",
            "",
        ] {
            assert!(!token_may_go_to(refused), "{refused}");
        }
    }
}
