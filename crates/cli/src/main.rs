//! `suanli`: see the crate's documentation, and `suanli --help`.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use suanli_cli::client::{segment, Portal};
use suanli_cli::data::{self, DataError, DatasetName, DatasetView, VersionView};
use suanli_cli::models::{self, Comparison, ModelSummary, ModelVersionView, ModelView};
use suanli_cli::upload::{ResumeBook, StderrProgress, Tus};
use suanli_cli::{config, images, pack, query, ssh, table};

mod supplier;

#[derive(Parser)]
#[command(name = "suanli", version, about = "The Suanli marketplace from a terminal: search, lease, run jobs, keep datasets and models.", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  suanli login --portal https://portal.example      (paste an API token from your account page)
  suanli search 'gpu=A100 vram>=80 price<2.5 region=shenzhen class=B' --sort price
  suanli lease create 12 --cards 2 --mode hourly --periods 4
  suanli job submit train.yaml --follow             (its output as it runs)
  suanli job logs 42 --follow
  suanli job pull 42 --dir out                       (the files it left, checked by SHA-256)
  suanli ssh 7 -- nvidia-smi                         (a certificate for the CLI's own key)
  suanli vnc 7 --local-port 5901
  suanli data push ./digits --to digits --create -m 'first cut'   (a folder per class: its labels)
  suanli data push more/ extra.tar.gz --to digits    (run it again after an interruption: it resumes)
  suanli data ls digits                              (its versions)
  suanli data pull digits@2 --dir data/digits        (alice/digits@2 for one shared with you)
  suanli data share digits alice
  suanli model register digits-cls --job 42 --card MODEL.md
  suanli model pull digits-cls -o model.safetensors  (the serving version, checked by SHA-256)
  suanli model compare digits-cls 1 2
  suanli model promote digits-cls 2
  suanli node enroll-token                           (suppliers: for a new node's agent)
  suanli cluster publish cluster.toml                (suppliers: see `suanli cluster publish --help`)";

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
    /// Jobs: list, show, submit (YAML or JSON), follow, cancel.
    #[command(subcommand)]
    Job(JobCommand),
    /// Datasets: list, create, push (folders, images, tar archives), pull, share.
    ///
    /// A DATASET is named by its numeric ID, its name (yours first, then one shared with you)
    /// or OWNER/NAME.
    #[command(subcommand)]
    Data(DataCommand),
    /// Models: versions registered from jobs' outputs; list, register, pull, promote, compare.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Similar pictures in your image library and the global one: `suanli search-images
    /// QUERY.jpg --library mine --top 20`.
    SearchImages {
        /// A JPEG, PNG or TIFF file.
        query: std::path::PathBuf,
        /// mine, global or all.
        #[arg(long, default_value = "all")]
        library: String,
        #[arg(long, default_value_t = 20)]
        top: u32,
        /// Only pictures from this dataset (ID, name or OWNER/NAME).
        #[arg(long)]
        dataset: Option<String>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Image libraries for `search-images`: status, add a dataset version, remove a picture, rebuild.
    #[command(subcommand)]
    Library(LibraryCommand),
    /// Suppliers: enrollment tokens for new nodes, your enrolled nodes.
    #[command(subcommand)]
    Node(supplier::NodeCommand),
    /// Suppliers: publish enrolled nodes as a cluster from a TOML file, list your clusters.
    #[command(subcommand)]
    Cluster(supplier::ClusterCommand),
    /// Log in to a lease's node with OpenSSH: a certificate for the CLI's own key, the node's
    /// host key checked; arguments after `--` go to ssh (a command to run).
    Ssh {
        lease: u64,
        /// The node (its ID); the lease's first by default.
        #[arg(long)]
        node: Option<u64>,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Print the shell's completion script: `suanli completions bash > ~/.local/share/bash-completion/completions/suanli`.
    Completions { shell: clap_complete::Shell },
    /// Forward a local port to the node's VNC desktop through SSH (until interrupted), then
    /// point a VNC viewer at 127.0.0.1:PORT.
    Vnc {
        lease: u64,
        #[arg(long)]
        node: Option<u64>,
        #[arg(long, default_value_t = 5901)]
        local_port: u16,
    },
}

#[derive(Subcommand)]
enum LibraryCommand {
    /// Your library and the global one, with what is indexed, waiting and failed.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Add a dataset's pictures (a version: DATASET@N; the latest by default) to a library;
    /// they are indexed in the background.
    Add {
        dataset: String,
        /// mine or global (global: everyone sees the pictures; only your own datasets).
        #[arg(long, default_value = "mine")]
        library: String,
    },
    /// Remove a picture (by its SHA-256) from a library.
    Rm {
        sha256: String,
        #[arg(long, default_value = "mine")]
        library: String,
    },
    /// Index your library again with the embedder's current model.
    Rebuild,
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
        /// Print its state and output until it ends; the exit status says whether it succeeded.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        request_id: Option<String>,
    },
    Cancel {
        id: u64,
    },
    /// Submit a job again with its spec, changed by `--set path=value` (dotted paths into the
    /// spec; values read as JSON where they are JSON, else as text).
    Resubmit {
        id: u64,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        follow: bool,
        /// Idempotency key: running the same resubmission again submits once.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Download the files a job left (its outputs) into a folder, each checked against the
    /// SHA-256 the job recorded.
    Pull {
        id: u64,
        /// Only this output.
        #[arg(long)]
        output: Option<String>,
        /// Where to put them (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// A job's output (what it printed, stdout and stderr together).
    Logs {
        id: u64,
        /// Keep printing as it runs, through every attempt, until the job ends; the exit
        /// status says whether it succeeded.
        #[arg(long, short)]
        follow: bool,
        /// The attempt (1, 2, …); the latest by default.
        #[arg(long)]
        attempt: Option<u32>,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Your datasets and those shared with you; with DATASET, its versions.
    Ls {
        dataset: Option<String>,
        /// The portal's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make an empty dataset of yours (versions come with `data push`).
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// Send folders, images or tar archives as a new version of a dataset.
    ///
    /// A folder is packed into a tar of its regular files (symbolic links are skipped, and said
    /// so); its subfolders are the labels unless --no-labels. An interrupted push, run again,
    /// resumes its uploads. Files the portal rejects are listed; the rest is the new version.
    Push {
        /// Folders, images, or .tar/.tar.gz/.tgz archives (sent as they are).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// The dataset: an ID, a name or OWNER/NAME.
        #[arg(long, value_name = "DATASET")]
        to: String,
        /// What changed, for the version's history.
        #[arg(long, short)]
        message: Option<String>,
        /// Import no labels from the folders' names.
        #[arg(long)]
        no_labels: bool,
        /// Make the dataset (a name of yours) if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Download a version (DATASET@VERSION; the latest by default) into a folder.
    ///
    /// Each file is checked against the SHA-256 the version lists; files already there and
    /// right are kept.
    Pull {
        #[arg(value_name = "DATASET[@VERSION]")]
        dataset: String,
        /// Where to put it (created if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Let another user read one of your datasets.
    Share { dataset: String, username: String },
    /// Stop sharing one of your datasets with a user.
    Unshare { dataset: String, username: String },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Your models; with NAME, its versions (`*`: serving).
    Ls {
        name: Option<String>,
        /// The portal's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Register a succeeded job's output as the model's next version (the model is made on
    /// first use).
    Register {
        name: String,
        #[arg(long, value_name = "ID")]
        job: u64,
        /// The job's output to take; may be left out when the job left exactly one.
        #[arg(long)]
        output: Option<String>,
        /// A Markdown file describing the version (its model card).
        #[arg(long, value_name = "FILE.md")]
        card: Option<PathBuf>,
    },
    /// Download a version (NAME@VERSION; else the serving one, else the latest), checked by SHA-256.
    Pull {
        #[arg(value_name = "NAME[@VERSION]")]
        model: String,
        /// The file to write; the output's own name by default.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Make a version the serving one (an older one: a rollback).
    Promote { name: String, version: u32 },
    /// Two versions' metrics side by side, with B − A.
    Compare {
        name: String,
        a: u32,
        b: u32,
        /// The portal's JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "suanli", &mut std::io::stdout());
        return Ok(());
    }
    let dir = config::dir()?;
    if let Command::Login { portal } = &cli.command {
        return login(&dir, portal).await;
    }
    let login = config::load(&dir)?;
    let portal = Portal::new(&login.portal, &login.token);
    match cli.command {
        Command::Login { .. } | Command::Completions { .. } => unreachable!("handled above"),
        Command::Whoami => {
            let me: Value = portal.get("/api/v1/me", &[]).await?;
            println!("{} ({}, {})", text(&me["username"]), text(&me["kind"]), text(&me["market_account"]));
        }
        Command::Search { query, sort, page, json } => search(&portal, &query, sort, page, json).await?,
        Command::Lease(command) => lease(&portal, command).await?,
        Command::Job(command) => job(&portal, command).await?,
        Command::Data(command) => dataset(&portal, &dir, command).await?,
        Command::Model(command) => model(&portal, command).await?,
        Command::SearchImages { query, library, top, dataset, label, json } => search_images(&portal, &query, &library, top, dataset, label, json).await?,
        Command::Library(command) => image_library(&portal, command).await?,
        Command::Node(command) => supplier::node(&portal, command).await?,
        Command::Cluster(command) => supplier::cluster(&portal, command).await?,
        Command::Ssh { lease, node, args } => ssh(&portal, &dir, lease, node, Forward::Command(args)).await?,
        Command::Vnc { lease, node, local_port } => ssh(&portal, &dir, lease, node, Forward::Vnc(local_port)).await?,
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
        JobCommand::Resubmit { id, set, follow, request_id } => {
            let job: Value = portal.get(&format!("/api/v1/jobs/{id}"), &[]).await?;
            let mut spec = job["spec"].clone();
            for change in &set {
                apply_change(&mut spec, change)?;
            }
            let made: Value = portal.post("/api/v1/jobs", &json!({ "spec": spec, "request_id": request_id })).await?;
            let new_id = made["job_id"].as_u64().context("the portal's answer names no job")?;
            println!("job {new_id} submitted (job {id} with {} change{})", set.len(), if set.len() == 1 { "" } else { "s" });
            if follow {
                return follow_job(portal, new_id, None).await;
            }
        }
        JobCommand::Pull { id, output, dir } => pull(portal, id, output.as_deref(), &dir).await?,
        JobCommand::Logs { id, follow: true, attempt } => return follow_job(portal, id, attempt).await,
        JobCommand::Logs { id, follow: false, attempt } => return print_log(portal, id, attempt).await,
        JobCommand::Submit { file, follow, request_id } => {
            let text_spec = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            // YAML is a superset of JSON: one parser reads both.
            let spec: Value = serde_yaml::from_str(&text_spec).with_context(|| format!("{} is neither YAML nor JSON", file.display()))?;
            let job: Value = portal.post("/api/v1/jobs", &json!({"spec": spec, "request_id": request_id})).await?;
            let id = job["job_id"].as_u64().context("the portal's answer names no job")?;
            println!("job {id} submitted");
            if follow {
                return follow_job(portal, id, None).await;
            }
        }
    }
    Ok(())
}

/// Applies `path=value` to a job spec: `resources.cards=2`, `name=run-2`,
/// `run.command.args=["train.py","--lr","0.01"]`; a path's missing objects are made.
fn apply_change(spec: &mut Value, change: &str) -> anyhow::Result<()> {
    let (path, raw) = change.split_once('=').with_context(|| format!("--set {change}: PATH=VALUE"))?;
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("--set {change}: an empty name in {path:?}");
    }
    let mut at = spec;
    for key in &keys[..keys.len() - 1] {
        let Some(object) = at.as_object_mut() else { bail!("--set {change}: {key:?} is inside something that is not an object") };
        at = object.entry(key.to_string()).or_insert_with(|| json!({}));
    }
    let Some(object) = at.as_object_mut() else { bail!("--set {change}: the place of {path:?} is not an object") };
    object.insert(keys[keys.len() - 1].to_owned(), value);
    Ok(())
}

/// Downloads a job's outputs (or the one named) into `dir`.
async fn pull(portal: &Portal, id: u64, only: Option<&str>, dir: &std::path::Path) -> anyhow::Result<()> {
    let job: Value = portal.get(&format!("/api/v1/jobs/{id}"), &[]).await?;
    let outputs: std::collections::BTreeMap<String, String> = serde_json::from_value(job["outputs"].clone()).context("the job's outputs")?;
    if let Some(name) = only.filter(|n| !outputs.contains_key(*n)) {
        bail!("job {id} left no output {name:?} (it left: {})", outputs.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    if outputs.is_empty() {
        bail!("job {id} left no outputs (it is {})", text(&job["state"]));
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    for (name, sha) in outputs.iter().filter(|(n, _)| only.is_none_or(|o| o == n.as_str())) {
        // Output names are the job spec's (letters, digits, '.', '_', '-'): anything else the
        // portal says is refused, so nothing lands outside `dir` and the name needs no escaping.
        let plain = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !plain || name.is_empty() || name.starts_with('.') {
            bail!("output {name:?}: not a plain file name, not written");
        }
        let dest = dir.join(name);
        let size = portal.download(&format!("/api/v1/jobs/{id}/outputs/{name}"), &dest, sha).await?;
        println!("{}  {size} bytes  sha256:{sha}", dest.display());
    }
    Ok(())
}

async fn dataset(portal: &Portal, dir: &std::path::Path, command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Ls { dataset: None, json: json_out } => list_datasets(portal, json_out).await?,
        DataCommand::Ls { dataset: Some(wanted), json: json_out } => list_versions(portal, &data::parse_dataset_name(&wanted)?, json_out).await?,
        DataCommand::Create { name, description } => {
            let made = create_dataset(portal, &name, description.as_deref()).await?;
            println!("dataset {} ({}) created", made.name, made.dataset_id);
        }
        DataCommand::Push { paths, to, message, no_labels, create } => {
            let target = data::parse_dataset_name(&to)?;
            let dataset = push_target(portal, &target, create).await?;
            let labels = if no_labels { "none" } else { "folders" };
            let version = push(portal, dir, &dataset, &paths, message.as_deref(), labels).await?;
            print_version(&dataset, &version);
        }
        DataCommand::Pull { dataset: wanted, dir: into } => {
            let (name, version) = data::parse_dataset(&wanted)?;
            let found = data::find(portal, &name).await?;
            let (view, done) = data::pull(portal, found.dataset_id, version.unwrap_or(0), &into).await?;
            println!(
                "{}/{}@{} in {}: {} files written ({}), {} already there",
                found.owner,
                found.name,
                view.summary.version,
                into.display(),
                done.written,
                table::size(done.bytes),
                done.present
            );
        }
        DataCommand::Share { dataset: wanted, username } => {
            let found = data::find(portal, &data::parse_dataset_name(&wanted)?).await?;
            let path = format!("/api/v1/datasets/{}/shares/{}", found.dataset_id, segment(&username));
            portal.no_content(reqwest::Method::PUT, &path).await?;
            println!("{} is shared with {username}", found.name);
        }
        DataCommand::Unshare { dataset: wanted, username } => {
            let found = data::find(portal, &data::parse_dataset_name(&wanted)?).await?;
            let path = format!("/api/v1/datasets/{}/shares/{}", found.dataset_id, segment(&username));
            portal.no_content(reqwest::Method::DELETE, &path).await?;
            println!("{} is no longer shared with {username}", found.name);
        }
    }
    Ok(())
}

async fn list_datasets(portal: &Portal, json_out: bool) -> anyhow::Result<()> {
    let listed: Value = portal.get("/api/v1/datasets", &[]).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(());
    }
    let datasets: Vec<DatasetView> = serde_json::from_value(listed).context("the portal's list of datasets")?;
    let rows: Vec<Vec<String>> = datasets
        .iter()
        .map(|d| {
            let latest = if d.latest_version == 0 { "-".to_owned() } else { d.latest_version.to_string() };
            let shared = match (d.mine, d.shared_with.is_empty()) {
                (false, _) => "with you".to_owned(),
                (true, true) => "-".to_owned(),
                (true, false) => d.shared_with.join(","),
            };
            vec![d.dataset_id.to_string(), d.name.clone(), d.owner.clone(), latest, shared]
        })
        .collect();
    print!("{}", table::render(&["ID", "NAME", "OWNER", "LATEST", "SHARED"], &rows));
    Ok(())
}

async fn list_versions(portal: &Portal, wanted: &DatasetName, json_out: bool) -> anyhow::Result<()> {
    let found = data::find(portal, wanted).await?;
    let detail: Value = portal.get(&format!("/api/v1/datasets/{}", found.dataset_id), &[]).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&detail)?);
        return Ok(());
    }
    let detail: data::DatasetDetail = serde_json::from_value(detail).context("the portal's dataset")?;
    let about = detail.dataset.description.as_deref().filter(|d| !d.is_empty()).map(|d| format!(": {d}")).unwrap_or_default();
    println!("{}/{} ({}){about}", detail.dataset.owner, detail.dataset.name, detail.dataset.dataset_id);
    let rows: Vec<Vec<String>> = detail
        .versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.items.to_string(),
                table::size(v.bytes),
                format!("+{} -{} ~{}", v.added, v.removed, v.modified),
                table::date(v.created_ms),
                v.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!("{}", table::render(&["VERSION", "ITEMS", "SIZE", "CHANGES", "CREATED", "MESSAGE"], &rows));
    Ok(())
}

async fn create_dataset(portal: &Portal, name: &str, description: Option<&str>) -> anyhow::Result<DatasetView> {
    Ok(portal.post("/api/v1/datasets", &json!({"name": name, "description": description.unwrap_or_default()})).await?)
}

/// The dataset a push goes to; with `create`, a name of the caller's that does not exist yet is
/// made.
async fn push_target(portal: &Portal, target: &DatasetName, create: bool) -> anyhow::Result<DatasetView> {
    match data::find(portal, target).await {
        Ok(found) => Ok(found),
        Err(DataError::NotFound(_)) if create => {
            let DatasetName::Name(name) = target else { bail!("--create makes a dataset of yours by its name, not {target}") };
            let made = create_dataset(portal, name, None).await?;
            eprintln!("dataset {} ({}) created", made.name, made.dataset_id);
            Ok(made)
        }
        Err(DataError::NotFound(_)) => bail!("no dataset {target} of yours or shared with you (--create makes it)"),
        Err(e) => Err(e.into()),
    }
}

/// Uploads each path (packing folders), then makes them a version of `dataset`.
async fn push(
    portal: &Portal,
    dir: &std::path::Path,
    dataset: &DatasetView,
    paths: &[PathBuf],
    message: Option<&str>,
    labels: &str,
) -> anyhow::Result<VersionView> {
    let mut book = ResumeBook::open(dir)?;
    let tus = Tus::new(portal);
    let (mut uploads, mut keys) = (Vec::new(), Vec::new());
    for path in paths {
        // One at a time: a folder's temporary tar is gone before the next is packed.
        let item = pack::prepare(path)?;
        for skipped in &item.skipped {
            eprintln!("warning: {} skipped: {}", skipped.path.display(), skipped.reason);
        }
        let key = ResumeBook::key(&item.sha256, item.size);
        if keys.contains(&key) {
            eprintln!("warning: {} holds the same bytes as a path before it: sent once", path.display());
            continue;
        }
        uploads.push(tus.upload(&item, &mut book, &mut StderrProgress::default()).await?);
        keys.push(key);
    }
    let mut body = json!({"uploads": uploads, "labels": labels});
    if let Some(message) = message {
        body["message"] = json!(message);
    }
    let version: VersionView = portal.post(&format!("/api/v1/datasets/{}/versions", dataset.dataset_id), &body).await?;
    // The uploads are used up: nothing is left to resume.
    for key in &keys {
        book.remove(key)?;
    }
    Ok(version)
}

fn print_version(dataset: &DatasetView, version: &VersionView) {
    let v = &version.summary;
    println!(
        "{}/{}@{}: {} items, {} (+{} added, -{} removed, ~{} modified; {} duplicates, {} annotations)",
        dataset.owner,
        dataset.name,
        v.version,
        v.items,
        table::size(v.bytes),
        v.added,
        v.removed,
        v.modified,
        version.duplicates,
        version.annotations
    );
    if !version.labels.is_empty() {
        // `""` counts the files without a class label.
        let labels: Vec<String> = version.labels.iter().map(|(label, n)| format!("{} {n}", if label.is_empty() { "(none)" } else { label })).collect();
        println!("labels: {}", labels.join(", "));
    }
    if !version.rejected.is_empty() {
        println!("rejected: {} file{} (not in the version)", version.rejected.len(), if version.rejected.len() == 1 { "" } else { "s" });
        let rows: Vec<Vec<String>> =
            version.rejected.iter().map(|r| vec![format!("  {}", r.name), r.kind.clone().unwrap_or_else(|| "-".into()), r.reason.clone()]).collect();
        print!("{}", table::render(&["  FILE", "KIND", "REASON"], &rows));
    }
}

async fn model(portal: &Portal, command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Ls { name: None, json: json_out } => {
            let listed: Value = portal.get("/api/v1/models", &[]).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&listed)?);
                return Ok(());
            }
            let models: Vec<ModelSummary> = serde_json::from_value(listed).context("the portal's list of models")?;
            let rows: Vec<Vec<String>> = models
                .iter()
                .map(|m| vec![m.name.clone(), m.versions.to_string(), m.serving.map_or_else(|| "-".into(), |v| v.to_string()), table::date(m.created_ms)])
                .collect();
            print!("{}", table::render(&["NAME", "VERSIONS", "SERVING", "CREATED"], &rows));
        }
        ModelCommand::Ls { name: Some(name), json: json_out } => {
            let view: Value = portal.get(&format!("/api/v1/models/{}", segment(&name)), &[]).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(());
            }
            print_model(&serde_json::from_value(view).context("the portal's model")?);
        }
        ModelCommand::Register { name, job, output, card } => {
            let card = card.map(|path| std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))).transpose()?;
            let mut body = json!({"name": name, "job_id": job});
            if let Some(output) = output {
                body["output"] = json!(output);
            }
            if let Some(card) = card {
                body["card"] = json!(card);
            }
            let made: ModelVersionView = portal.post("/api/v1/models", &body).await?;
            println!(
                "{}@{}: job {} ({}), {} sha256:{}",
                made.model,
                made.version,
                made.job_id,
                made.job_name.as_deref().unwrap_or("-"),
                made.output,
                made.sha256
            );
        }
        ModelCommand::Pull { model: wanted, file } => pull_model(portal, &wanted, file).await?,
        ModelCommand::Promote { name, version } => {
            let view: ModelView = portal.post(&format!("/api/v1/models/{}/promote", segment(&name)), &json!({"version": version})).await?;
            println!("{}: version {} is serving", view.name, view.serving.map_or_else(|| "-".into(), |v| v.to_string()));
        }
        ModelCommand::Compare { name, a, b, json: json_out } => {
            let compared: Value = portal.get(&format!("/api/v1/models/{}/compare", segment(&name)), &[("a", a.to_string()), ("b", b.to_string())]).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&compared)?);
                return Ok(());
            }
            print_comparison(&serde_json::from_value(compared).context("the portal's comparison")?);
        }
    }
    Ok(())
}

fn print_model(view: &ModelView) {
    let rows: Vec<Vec<String>> = view
        .versions
        .iter()
        .map(|v| {
            let serving = if view.serving == Some(v.version) { "*" } else { "" };
            vec![
                format!("{}{serving}", v.version),
                v.job_id.to_string(),
                v.output.clone(),
                v.dataset.clone().unwrap_or_else(|| "-".into()),
                models::metrics_line(&v.metrics),
                table::date(v.created_ms),
            ]
        })
        .collect();
    print!("{}", table::render(&["VERSION", "JOB", "OUTPUT", "DATASET", "METRICS", "CREATED"], &rows));
}

fn print_comparison(compared: &Comparison) {
    let number = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v}"));
    let rows: Vec<Vec<String>> =
        compared.metrics.iter().map(|m| vec![m.metric.clone(), number(m.a), number(m.b), m.delta.map_or_else(|| "-".into(), |d| format!("{d:+}"))]).collect();
    let (a, b) = (format!("A (v{})", compared.a.version), format!("B (v{})", compared.b.version));
    print!("{}", table::render(&["METRIC", &a, &b, "DELTA"], &rows));
}

/// Downloads a model's version, checked against the SHA-256 it was registered with.
async fn pull_model(portal: &Portal, wanted: &str, file: Option<PathBuf>) -> anyhow::Result<()> {
    let (name, version) = data::split_version(wanted)?;
    let view: ModelView = portal.get(&format!("/api/v1/models/{}", segment(name)), &[]).await?;
    let chosen = view.pick(version)?;
    if chosen.sha256.is_empty() {
        bail!("{name}@{}: the portal lists no SHA-256 for it, so it could not be checked", chosen.version);
    }
    let dest = file.unwrap_or_else(|| PathBuf::from(models::default_file_name(chosen)));
    let path = format!("/api/v1/models/{}/versions/{}/download", segment(name), chosen.version);
    let size = portal.download(&path, &dest, &chosen.sha256).await?;
    println!("{name}@{} → {}  {}  sha256:{}", chosen.version, dest.display(), table::size(size), chosen.sha256);
    Ok(())
}

enum Forward {
    Command(Vec<String>),
    Vnc(u16),
}

/// Runs `ssh` to the lease's node with a fresh certificate; its exit status is ours.
async fn ssh(portal: &Portal, dir: &std::path::Path, lease: u64, node: Option<u64>, forward: Forward) -> anyhow::Result<()> {
    let access: ssh::Access = portal.get(&format!("/api/v1/leases/{lease}/access"), &[]).await?;
    let node = access.node(node)?;
    let files = ssh::Files::in_dir(dir, lease);
    let public_key = files.public_key()?;
    let issued: Value = portal.post(&format!("/api/v1/leases/{lease}/ssh-certificate"), &json!({ "public_key": public_key })).await?;
    files.save_certificate(issued["certificate"].as_str().context("the portal's answer holds no certificate")?)?;
    files.trust_host(node)?;
    let extra = match forward {
        Forward::Command(args) => args,
        Forward::Vnc(local_port) => {
            eprintln!("VNC of lease {lease} at 127.0.0.1:{local_port}; Ctrl-C ends it");
            ssh::vnc_forward(lease, node, local_port)?
        }
    };
    let program = std::env::var_os("SUANLI_SSH").unwrap_or_else(|| "ssh".into());
    let status =
        std::process::Command::new(&program).args(files.ssh_args(node, &extra)).status().with_context(|| format!("running {}", program.to_string_lossy()))?;
    std::process::exit(status.code().unwrap_or(255));
}

/// One read of a job's output (`GET /api/v1/jobs/{id}/log`).
#[derive(serde::Deserialize)]
struct LogPiece {
    attempt: u32,
    from: u64,
    next: u64,
    ended: bool,
    text: String,
}

/// How long one read waits for more output while following.
const FOLLOW_WAIT_MS: u32 = 5_000;

async fn read_log(portal: &Portal, id: u64, attempt: u32, from: u64, wait_ms: u32) -> anyhow::Result<LogPiece> {
    let mut query = vec![("from", from.to_string()), ("wait_ms", wait_ms.to_string())];
    if attempt > 0 {
        query.push(("attempt", attempt.to_string()));
    }
    Ok(portal.get(&format!("/api/v1/jobs/{id}/log"), &query).await?)
}

/// Prints what the platform holds of an attempt's output.
async fn print_log(portal: &Portal, id: u64, attempt: Option<u32>) -> anyhow::Result<()> {
    let (mut attempt, mut from) = (attempt.unwrap_or(0), 0);
    loop {
        let piece = read_log(portal, id, attempt, from, 0).await?;
        if piece.from > from {
            eprintln!("[{} earlier bytes are no longer held; the whole output is job.log in the lease's home]", piece.from);
        }
        print!("{}", piece.text);
        if piece.next == piece.from {
            return Ok(());
        }
        (attempt, from) = (piece.attempt, piece.next);
    }
}

/// Prints a job's state changes and its output as it runs, through every attempt, until it
/// ends; an error unless it succeeded.
async fn follow_job(portal: &Portal, id: u64, first_attempt: Option<u32>) -> anyhow::Result<()> {
    use std::io::Write;
    let (mut attempt, mut from, mut state, mut announced) = (first_attempt.unwrap_or(0), 0u64, String::new(), 0u32);
    let mut transient = Transient::default();
    loop {
        let piece = match read_log(portal, id, attempt, from, FOLLOW_WAIT_MS).await {
            Ok(piece) => piece,
            Err(e) => {
                transient.wait_or_fail(e).await?;
                continue;
            }
        };
        if piece.attempt > 0 && piece.attempt != announced {
            eprintln!("[job {id}, attempt {}]", piece.attempt);
            announced = piece.attempt;
        }
        if piece.from > from {
            eprintln!("[{} bytes skipped: no longer held]", piece.from - from);
        }
        print!("{}", piece.text);
        std::io::stdout().flush()?;
        (attempt, from) = (piece.attempt, piece.next);
        if !piece.text.is_empty() && !piece.ended {
            continue;
        }
        let job: Value = match portal.get(&format!("/api/v1/jobs/{id}"), &[]).await {
            Ok(job) => job,
            Err(e) => {
                transient.wait_or_fail(e.into()).await?;
                continue;
            }
        };
        transient = Transient::default();
        let now = text(&job["state"]);
        if now != state {
            eprintln!("[job {id}: {now}]");
            state = now;
        }
        let latest = job["attempts"].as_array().and_then(|a| a.last()).and_then(|a| a["number"].as_u64()).unwrap_or(0) as u32;
        // A later attempt's output first (the job may already have ended with it).
        if piece.ended && latest > attempt && first_attempt.is_none() {
            (attempt, from) = (latest, 0);
            continue;
        }
        let finished = piece.ended || latest == 0;
        match state.as_str() {
            "succeeded" if finished => return Ok(()),
            "failed" | "cancelled" if finished => bail!("job {id} {state}: {}", text(&job["end_reason"])),
            _ if piece.ended && first_attempt.is_some() => return Ok(()), // the attempt asked for is over
            // The attempt is over and the next not placed yet: its output cannot be waited for.
            _ if piece.ended => tokio::time::sleep(Duration::from_secs(1)).await,
            _ => {}
        }
    }
}

/// Following outlives a portal or broker that is briefly away (a restart, a leader election):
/// an unavailable answer or a broken connection is tried again, a second later, for a minute.
#[derive(Default)]
struct Transient {
    tries: u32,
}

impl Transient {
    async fn wait_or_fail(&mut self, e: anyhow::Error) -> anyhow::Result<()> {
        let passing = match e.downcast_ref::<suanli_cli::client::ClientError>() {
            Some(suanli_cli::client::ClientError::Transport(..)) => true,
            Some(suanli_cli::client::ClientError::Refused(r)) => r.status >= 500,
            _ => false,
        };
        self.tries += 1;
        if !passing || self.tries > 60 {
            return Err(e);
        }
        eprintln!("[{e:#}; trying again]");
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
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

async fn search_images(
    portal: &Portal,
    file: &std::path::Path,
    library: &str,
    top: u32,
    dataset: Option<String>,
    label: Option<String>,
    json_out: bool,
) -> anyhow::Result<()> {
    images::check_library(library, true).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mut query = vec![("library", library.to_owned()), ("top", top.to_string())];
    if let Some(wanted) = dataset {
        query.push(("dataset", data::find(portal, &data::parse_dataset_name(&wanted)?).await?.dataset_id.to_string()));
    }
    if let Some(label) = label {
        query.push(("label", label));
    }
    let request = portal.request(reqwest::Method::POST, "/api/v1/image-search").query(&query).header("Content-Type", "application/octet-stream").body(bytes);
    let answer: serde_json::Value = portal.send(request).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let results: images::Results = serde_json::from_value(answer)?;
    print!("{}", images::results_table(&results));
    for s in &results.skipped {
        eprintln!("{} not searched: {}", s.library, s.reason);
    }
    eprintln!("{} results in {:.0} ms (model {})", results.results.len(), results.took_ms, results.model);
    Ok(())
}

async fn image_library(portal: &Portal, command: LibraryCommand) -> anyhow::Result<()> {
    match command {
        LibraryCommand::Status { json: json_out } => {
            let libraries: serde_json::Value = portal.get("/api/v1/image-libraries", &[]).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&libraries)?);
            } else {
                print!("{}", images::libraries_table(&serde_json::from_value::<Vec<images::Library>>(libraries)?));
            }
        }
        LibraryCommand::Add { dataset, library } => {
            images::check_library(&library, false).map_err(anyhow::Error::msg)?;
            let (name, version) = data::parse_dataset(&dataset)?;
            let found = data::find(portal, &name).await?;
            let path = format!("/api/v1/image-libraries/{library}/datasets");
            let added: serde_json::Value = portal.post(&path, &json!({"dataset": found.dataset_id, "version": version.unwrap_or(0)})).await?;
            println!("{} pictures added to {library} (indexed in the background), {} already there", added["added"], added["already_present"]);
        }
        LibraryCommand::Rm { sha256, library } => {
            images::check_library(&library, false).map_err(anyhow::Error::msg)?;
            portal.no_content(reqwest::Method::DELETE, &format!("/api/v1/image-libraries/{library}/images/{}", segment(&sha256))).await?;
            println!("{sha256} removed from {library}");
        }
        LibraryCommand::Rebuild => {
            let view: images::Library = portal.post("/api/v1/image-libraries/mine/rebuild", &json!({})).await?;
            println!("{} pictures will be indexed again", view.images);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{apply_change, token_may_go_to};
    use serde_json::json;

    #[test]
    fn a_resubmission_changes_what_it_names_and_nothing_else() {
        let mut spec = json!({"name": "a", "resources": {"cards": 1}, "run": {"command": {"program": "p"}}});
        apply_change(&mut spec, "resources.cards=2").expect("cards");
        apply_change(&mut spec, "name=run-2").expect("name");
        apply_change(&mut spec, r#"run.command.args=["x","--lr","0.1"]"#).expect("args");
        apply_change(&mut spec, "resources.gpu_models=[\"A100\"]").expect("models");
        assert_eq!(
            spec,
            json!({"name": "run-2", "resources": {"cards": 2, "gpu_models": ["A100"]}, "run": {"command": {"program": "p", "args": ["x", "--lr", "0.1"]}}})
        );
        for wrong in ["cards", "resources..cards=1", "name.first=x"] {
            let before = spec.clone();
            assert!(apply_change(&mut spec, wrong).is_err(), "{wrong}");
            assert_eq!(spec, before, "{wrong} changed nothing");
        }
    }

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
