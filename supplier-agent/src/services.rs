//! Services on leased cards (issue 23): long-running processes the portal asks for through the
//! tunnel (`suanli_tunnel::control`), each run as its lease's user, in the lease's sandbox
//! (control groups, private `/tmp`), on its cards, supervised here and reached by the tunnel
//! only.
//!
//! **Reach.** The agent binds each process's listening Unix socket itself, in its own state
//! directory (root's alone), and hands the process the bound socket (`fd:<n>`: socket
//! activation). The tunnel connects to that path: no path the lease can change lies between the
//! agent and the service, and no other lease, nor anything else on the node, can connect.
//!
//! **Files.** What the portal sends for a service (a model's files) arrives in the agent's own
//! directory, checked against its SHA-256, and is copied into the lease's home for each
//! generation (through `lease_fs`, as a job's inputs are): the service reads them as the lease.
//!
//! **Supervision.** A replica that ends is started again after a pause that doubles up to a
//! minute (back to a second once a run lasted a minute), each end written to the service's log
//! with how it ended. A replica takes requests once `GET /v1/health` answers. Nothing of a
//! service survives its lease: a lease no longer live here stops it (its processes die with
//! the lease's), and it is never started again.
//!
//! **Updates.** A higher generation starts beside the serving one and takes the requests once
//! one of its replicas answers; the older one stops after a drain pause, so the requests it
//! holds finish.
//!
//! The portal is the source of truth: nothing here is kept across an agent restart (the
//! processes an earlier agent left are killed at start), and the portal sends every service
//! again when the tunnel opens.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use sha2::Digest as _;
use suanli_tunnel::agent::Address;
use suanli_tunnel::control::{path, ControlError, ServiceKind, ServiceSpec, ServiceState, ServiceStatus};
use suanli_tunnel::wire::AgentError;
use tokio::sync::watch;

use crate::access::lease_fs::LeaseDir;
use crate::access::{Access, LiveLease};
use crate::runtime::lock;

/// Pauses before a replica that ended is started again: from the first to the longest.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(60);
/// A run this long resets the pause to the first.
const STEADY_RUN: Duration = Duration::from_secs(60);
/// How long a replica may take to answer its first health check before it is started again.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// After a newer generation takes the requests, how long the older one keeps running for the
/// requests it already holds.
const DRAIN: Duration = Duration::from_secs(3);
/// How long a stopped process has after `SIGTERM` before `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The largest file the portal may send for a service.
const MAX_FILE_BYTES: u64 = 4 << 30;
/// A service's log is rotated (one older part kept) past this size.
const LOG_BYTES: u64 = 1 << 20;
/// Replicas one service may ask for.
const MAX_REPLICAS: u32 = 16;

pub struct Services {
    access: Arc<Access>,
    /// `<state_dir>/services`: root's alone (0700).
    root: PathBuf,
    /// `suanli-job`, which serves models; `None` where it is not installed.
    job_binary: Option<PathBuf>,
    /// The environments services run in (JupyterLab's).
    templates: crate::templates::Templates,
    table: Mutex<HashMap<u64, Arc<Service>>>,
}

struct Service {
    id: u64,
    lease: u64,
    dir: PathBuf,
    /// Oldest first; the last is the newest.
    generations: Mutex<Vec<Arc<Generation>>>,
    restarts: AtomicU32,
    last_exit: Mutex<Option<String>>,
    log: ServiceLog,
    /// Turns over the ready replicas.
    next: AtomicUsize,
}

struct Generation {
    number: u64,
    spec: ServiceSpec,
    replicas: Vec<Arc<Replica>>,
    stop: watch::Sender<bool>,
}

struct Replica {
    socket: PathBuf,
    ready: AtomicBool,
}

impl Generation {
    fn new(service: &Service, spec: ServiceSpec) -> Arc<Generation> {
        let (stop, _) = watch::channel(false);
        let replicas = (0..spec.replicas)
            .map(|k| Arc::new(Replica { socket: service.dir.join(format!("g{}-{k}.sock", spec.generation)), ready: AtomicBool::new(false) }))
            .collect();
        Arc::new(Generation { number: spec.generation, spec, replicas, stop })
    }

    fn ready(&self) -> Vec<&Arc<Replica>> {
        self.replicas.iter().filter(|r| r.ready.load(Ordering::Relaxed)).collect()
    }
}

impl Service {
    /// The generation taking requests: the newest with a replica answering.
    fn serving(&self) -> Option<Arc<Generation>> {
        lock(&self.generations).iter().rev().find(|g| !g.ready().is_empty()).cloned()
    }

    fn status(&self) -> ServiceStatus {
        let generations = lock(&self.generations);
        let serving = generations.iter().rev().find(|g| !g.ready().is_empty());
        let newest = generations.last();
        let state = match (serving, newest) {
            (_, None) => ServiceState::Stopped,
            (Some(_), _) => ServiceState::Ready,
            (None, Some(_)) if self.restarts.load(Ordering::Relaxed) > 0 => ServiceState::Restarting,
            (None, Some(_)) => ServiceState::Starting,
        };
        ServiceStatus {
            id: self.id,
            lease: self.lease,
            generation: serving.or(newest).map_or(0, |g| g.number),
            state,
            ready_replicas: serving.map_or(0, |g| g.ready().len() as u32),
            restarts: self.restarts.load(Ordering::Relaxed),
            last_exit: lock(&self.last_exit).clone(),
        }
    }
}

/// A service's output and the agent's notes on it, in the agent's directory, rotated.
struct ServiceLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl ServiceLog {
    fn new(path: PathBuf) -> ServiceLog {
        ServiceLog { path, file: Mutex::new(None) }
    }

    fn write(&self, line: &str) {
        let mut file = lock(&self.file);
        if file.as_ref().and_then(|f| f.metadata().ok()).is_some_and(|m| m.len() > LOG_BYTES) {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            *file = None;
        }
        if file.is_none() {
            *file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).ok();
        }
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }

    /// The agent's own lines, told apart from the service's output.
    fn note(&self, note: &str) {
        self.write(&format!("[suanli-agent {}] {note}", crate::runtime::now_ms()));
    }

    /// The last `bytes` of the log (reaching into the rotated part).
    fn tail(&self, bytes: usize) -> String {
        let mut all = std::fs::read(self.path.with_extension("log.1")).unwrap_or_default();
        all.extend(std::fs::read(&self.path).unwrap_or_default());
        let start = all.len().saturating_sub(bytes);
        String::from_utf8_lossy(&all[start..]).into_owned()
    }
}

fn refusal(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ControlError { code: code.to_owned(), message: message.into() })).into_response()
}

impl Services {
    /// Kills what an earlier agent's services left running and starts with none.
    pub fn new(access: Arc<Access>, state_dir: &Path, job_binary: Option<PathBuf>, templates: crate::templates::Templates) -> std::io::Result<Arc<Services>> {
        let root = state_dir.join("services");
        if root.exists() {
            for marker in glob_markers(&root) {
                crate::jobs::kill_orphan(&marker);
            }
            std::fs::remove_dir_all(&root)?;
        }
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        Ok(Arc::new(Services { access, root, job_binary, templates, table: Mutex::default() }))
    }

    fn live_lease(&self, lease: u64) -> Option<Arc<LiveLease>> {
        self.access.lease_for(&self.access.login(lease)).filter(|l| l.active)
    }

    fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(path::SERVICES, get(list))
            .route(&format!("{}/{{id}}", path::SERVICES), put(ensure).delete(stop))
            .route(&format!("{}/{{id}}/files/{{name}}", path::SERVICES), put(put_file))
            .route(&format!("{}/{{id}}/log", path::SERVICES), get(log))
            .fallback(|| async { refusal(StatusCode::NOT_FOUND, "NOT_FOUND", "no such control request") })
            .with_state(self.clone())
    }

    fn files_dir(&self, id: u64) -> PathBuf {
        self.root.join(id.to_string()).join("files")
    }

    /// Starts the replicas of `generation` (already in `service`'s list).
    fn launch(self: &Arc<Self>, service: &Arc<Service>, generation: Arc<Generation>) {
        service.log.note(&format!("generation {} starting with {} replica(s)", generation.number, generation.replicas.len()));
        for k in 0..generation.replicas.len() {
            tokio::spawn(self.clone().supervise(service.clone(), generation.clone(), k));
        }
        // Once the new generation answers, and still does after the drain pause, the older
        // ones stop.
        let (this, service, newest) = (self.clone(), service.clone(), generation);
        tokio::spawn(async move {
            let mut stopped = newest.stop.subscribe();
            loop {
                if !newest.ready().is_empty() {
                    tokio::time::sleep(DRAIN).await;
                    if !newest.ready().is_empty() {
                        break;
                    }
                }
                if *stopped.borrow() {
                    return;
                }
                tokio::select! {
                    _ = stopped.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            let older: Vec<Arc<Generation>> = lock(&service.generations).iter().filter(|g| g.number < newest.number).cloned().collect();
            let mut left = Vec::new();
            for g in older {
                service.log.note(&format!("generation {} stops: generation {} took the requests", g.number, newest.number));
                g.stop.send_replace(true);
                left.extend((0..g.replicas.len()).map(|k| replica_folder(service.id, g.number, k)));
            }
            lock(&service.generations).retain(|g| g.number >= newest.number);
            // Their copies of the model's files go too: a home would fill up update by update.
            this.clear_in_home(&service, left);
        });
    }

    /// Removes what a service left in its lease's home (`rels`, relative to it) as the lease's
    /// own user in its sandbox: root never acts on a path the lease can write. A lease no longer
    /// live here is skipped (its home goes with it).
    fn clear_in_home(self: &Arc<Self>, service: &Arc<Service>, rels: Vec<PathBuf>) {
        let Some(lease) = self.live_lease(service.lease) else { return };
        if rels.is_empty() {
            return;
        }
        let mut command = tokio::process::Command::new("/bin/rm");
        command
            .arg("-rf")
            .arg("--")
            .args(&rels)
            .env_clear()
            .current_dir(&lease.account.home)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        match self.access.sandbox(&lease) {
            Ok(sandbox) => sandbox.apply(&mut command),
            Err(e) => return service.log.note(&format!("old files not removed: the lease's sandbox: {e}")),
        }
        let service = service.clone();
        tokio::spawn(async move {
            match command.output().await {
                Ok(out) if out.status.success() => {}
                Ok(out) => service.log.note(&format!("old files not removed: {}", String::from_utf8_lossy(&out.stderr).trim())),
                Err(e) => service.log.note(&format!("old files not removed: {e}")),
            }
        });
    }

    /// Runs replica `k` of `generation` until it is stopped or its lease is over, starting it
    /// again whenever it ends.
    async fn supervise(self: Arc<Self>, service: Arc<Service>, generation: Arc<Generation>, k: usize) {
        if generation.spec.kind == ServiceKind::Terminal {
            return self.serve_terminal(service, generation, k).await;
        }
        let replica = generation.replicas[k].clone();
        let mut stop = generation.stop.subscribe();
        let mut pause = FIRST_PAUSE;
        loop {
            if *stop.borrow() {
                break;
            }
            let Some(lease) = self.live_lease(service.lease) else {
                service.log.note(&format!("lease {} is not live on this node: not started", service.lease));
                break;
            };
            let started = Instant::now();
            let ended = match self.spawn(&service, &generation, k, &lease).await {
                Err(e) => {
                    service.log.note(&format!("replica {k} of generation {} did not start: {e}", generation.number));
                    Some(format!("did not start: {e}"))
                }
                Ok(mut child) => {
                    let marker = replica.socket.with_extension("pid");
                    if let Some(pid) = child.id() {
                        let _ = std::fs::write(&marker, format!("{pid} {}", crate::jobs::start_time(pid).unwrap_or(0)));
                    }
                    let health = healthy(&replica.socket, health_path(&generation.spec.kind));
                    tokio::pin!(health);
                    let mut answered = false;
                    let ended = loop {
                        tokio::select! {
                            status = child.wait() => break Some(describe_exit(status)),
                            () = stopped(&mut stop) => break None,
                            ok = &mut health, if !answered => {
                                answered = true;
                                if ok {
                                    replica.ready.store(true, Ordering::Relaxed);
                                    service.log.note(&format!("replica {k} of generation {} answers", generation.number));
                                } else {
                                    service.log.note(&format!("replica {k} of generation {} did not answer within {} s: stopped", generation.number, START_TIMEOUT.as_secs()));
                                    terminate(&mut child).await;
                                    break Some("no answer to its health check".to_owned());
                                }
                            }
                        }
                    };
                    replica.ready.store(false, Ordering::Relaxed);
                    if ended.is_none() {
                        terminate(&mut child).await;
                    }
                    let _ = std::fs::remove_file(&marker);
                    ended
                }
            };
            let Some(how) = ended else {
                service.log.note(&format!("replica {k} of generation {} stopped", generation.number));
                break;
            };
            if self.live_lease(service.lease).is_none() {
                service.log.note(&format!("replica {k} of generation {} ended ({how}) with its lease", generation.number));
                break;
            }
            service.restarts.fetch_add(1, Ordering::Relaxed);
            *lock(&service.last_exit) = Some(how.clone());
            if started.elapsed() >= STEADY_RUN {
                pause = FIRST_PAUSE;
            }
            service.log.note(&format!("replica {k} of generation {} ended ({how}): starting again in {} ms", generation.number, pause.as_millis()));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stopped(&mut stop) => break,
            }
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
        let _ = std::fs::remove_file(&replica.socket);
    }

    /// A terminal the agent serves itself (`terminal.rs`): its shells are the lease's processes,
    /// started per browser; nothing runs between them, so there is nothing to restart.
    async fn serve_terminal(self: Arc<Self>, service: Arc<Service>, generation: Arc<Generation>, k: usize) {
        let replica = generation.replicas[k].clone();
        let mut stop = generation.stop.subscribe();
        let started = async {
            let lease = self.live_lease(service.lease).ok_or_else(|| format!("lease {} is not live on this node", service.lease))?;
            let sandbox = self.access.sandbox(&lease).map_err(|e| format!("the lease's sandbox: {e}"))?;
            let _ = std::fs::remove_file(&replica.socket);
            let listener = tokio::net::UnixListener::bind(&replica.socket).map_err(|e| format!("{}: {e}", replica.socket.display()))?;
            std::fs::set_permissions(&replica.socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
            let (services, lease_id) = (self.clone(), service.lease);
            let live = Arc::new(move || services.live_lease(lease_id).is_some());
            Ok::<_, String>((listener, crate::terminal::router(lease, sandbox, self.access.config.shell.clone(), live, generation.stop.subscribe())))
        };
        match started.await {
            Err(e) => service.log.note(&format!("the terminal did not start: {e}")),
            Ok((listener, app)) => {
                replica.ready.store(true, Ordering::Relaxed);
                service.log.note(&format!("the terminal of generation {} answers", generation.number));
                let served = axum::serve(listener, app).with_graceful_shutdown(async move { stopped(&mut stop).await }).await;
                replica.ready.store(false, Ordering::Relaxed);
                service.log.note(&format!(
                    "the terminal of generation {} stopped{}",
                    generation.number,
                    served.err().map(|e| format!(": {e}")).unwrap_or_default()
                ));
            }
        }
        let _ = std::fs::remove_file(&replica.socket);
    }

    /// Starts replica `k`: its files copied into the lease's home, its socket bound here and
    /// handed over, its output into the service's log.
    async fn spawn(&self, service: &Arc<Service>, generation: &Generation, k: usize, lease: &LiveLease) -> Result<tokio::process::Child, String> {
        let replica = &generation.replicas[k];
        let account = &lease.account;
        let home = LeaseDir::open_home(&account.home, account.uid, account.gid).map_err(|e| e.to_string())?;
        // One folder per replica, so that no two processes share files being copied in.
        let rel = replica_folder(service.id, generation.number, k);
        let dir = home.make_dirs(&rel).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&replica.socket);
        let listener = std::os::unix::net::UnixListener::bind(&replica.socket).map_err(|e| format!("{}: {e}", replica.socket.display()))?;
        std::fs::set_permissions(&replica.socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
        let listener = Arc::new(OwnedFd::from(listener));
        let listen = format!("fd:{}", listener.as_raw_fd());
        let (program, args): (PathBuf, Vec<String>) = match &generation.spec.kind {
            ServiceKind::ClassifierDemo { files } => {
                // Copies of what may be gigabytes: off the runtime's own threads' work.
                tokio::task::block_in_place(|| files.iter().try_for_each(|(name, sha256)| copy_in(&self.files_dir(service.id).join(sha256), &dir, name)))?;
                let binary = self.job_binary.clone().ok_or("suanli-job is not installed on this node")?;
                let params = serde_json::json!({"model": dir.path(), "listen": listen, "mode": "classify"});
                (binary, vec!["--task".into(), "serve".into(), "--params-json".into(), params.to_string()])
            }
            ServiceKind::Jupyter => {
                let venv = self.templates.jupyterlab(|note| service.log.note(note)).await?;
                // The install may have taken minutes: the lease must still be live.
                if self.live_lease(lease.id).is_none() {
                    return Err(format!("lease {} ended while JupyterLab was installed", lease.id));
                }
                // JupyterLab listens only on a path of its own: the bridge, as the lease's user,
                // carries the handed-over socket's connections there (`bridge.rs`).
                let socket = dir.path().join("jupyter.sock");
                let agent = std::env::current_exe().map_err(|e| format!("the agent's own program: {e}"))?;
                let mut args: Vec<String> =
                    vec!["service-bridge".into(), "--listen".into(), listen, "--socket".into(), socket.display().to_string(), "--".into()];
                args.push(venv.join("bin/jupyter-lab").display().to_string());
                args.extend([
                    "--no-browser".to_owned(),
                    format!("--ServerApp.sock={}", socket.display()),
                    "--ServerApp.sock_mode=0600".to_owned(),
                    // The portal's proxy lets the lease's owner alone through, and only from
                    // the service's own origin; JupyterLab's own token would ask them again.
                    "--IdentityProvider.token=".to_owned(),
                    "--ServerApp.password=".to_owned(),
                    "--ServerApp.allow_origin=*".to_owned(),
                    format!("--ServerApp.root_dir={}", account.home.display()),
                ]);
                (agent, args)
            }
            ServiceKind::Terminal => return Err("a terminal is served by the agent itself".to_owned()),
        };
        let mut env = crate::access::gateway::session_env(lease, &[("SUANLI_SERVICE_ID".to_owned(), service.id.to_string())]);
        // A demo's replicas take one card each, in turn; anything else has all of the lease's.
        if matches!(generation.spec.kind, ServiceKind::ClassifierDemo { .. }) {
            let card = lease.card_indexes.get(k % lease.card_indexes.len().max(1)).map(u32::to_string).unwrap_or_default();
            env.retain(|(key, _)| key != "CUDA_VISIBLE_DEVICES");
            env.push(("CUDA_VISIBLE_DEVICES".to_owned(), card));
        }
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&args)
            .env_clear()
            .envs(env)
            // The home, whose own name the lease cannot change (its parent is root's): never a
            // folder below it, which root would enter before the sandbox drops to the lease.
            .current_dir(&account.home)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so stopping it stops what it forked.
            .process_group(0);
        let sandbox = self.access.sandbox(lease).map_err(|e| format!("the lease's sandbox: {e}"))?;
        sandbox.apply(&mut command);
        crate::access::sandbox::hand_over(&mut command, listener);
        let mut child = command.spawn().map_err(|e| format!("{}: {e}", program.display()))?;
        drop(command);
        if let Some(out) = child.stdout.take() {
            copy_lines(out, service.clone());
        }
        if let Some(err) = child.stderr.take() {
            copy_lines(err, service.clone());
        }
        service.log.note(&format!("replica {k} of generation {} started (pid {})", generation.number, child.id().unwrap_or(0)));
        Ok(child)
    }

    fn service(&self, id: u64) -> Option<Arc<Service>> {
        lock(&self.table).get(&id).cloned()
    }

    /// A service's status; one whose lease is no longer live here is stopped, whatever its
    /// replicas last did.
    fn status_of(&self, service: &Service) -> ServiceStatus {
        let mut status = service.status();
        if self.live_lease(service.lease).is_none() {
            status.state = ServiceState::Stopped;
            status.ready_replicas = 0;
        }
        status
    }
}

/// The longest line of a service's output kept whole; a longer one is cut into pieces.
const LONGEST_LINE: usize = 16 << 10;

/// Writes a process's output into the service's log, line by line (output without newlines in
/// pieces of [`LONGEST_LINE`], so no process makes the agent hold more).
fn copy_lines(mut output: impl tokio::io::AsyncRead + Unpin + Send + 'static, service: Arc<Service>) {
    use tokio::io::AsyncReadExt as _;
    tokio::spawn(async move {
        let (mut pending, mut chunk) = (Vec::new(), vec![0u8; 8 << 10]);
        loop {
            let n = match output.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..n]);
            while let Some(end) = pending.iter().position(|b| *b == b'\n').or((pending.len() >= LONGEST_LINE).then_some(LONGEST_LINE)) {
                let line: Vec<u8> = pending.drain(..end.min(pending.len())).collect();
                if pending.first() == Some(&b'\n') {
                    pending.remove(0);
                }
                service.log.write(String::from_utf8_lossy(&line).trim_end_matches('\r'));
            }
        }
        if !pending.is_empty() {
            service.log.write(&String::from_utf8_lossy(&pending));
        }
    });
}

/// The markers of processes an earlier agent started (`<root>/<service>/g<gen>-<k>.pid`).
fn glob_markers(root: &Path) -> Vec<PathBuf> {
    let dirs = std::fs::read_dir(root).into_iter().flatten().flatten().map(|e| e.path());
    dirs.flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "pid")).collect()
}

/// Copies a file the portal sent (in the agent's directory) into the lease's directory, as a
/// new file of the lease's user.
fn copy_in(from: &Path, into: &LeaseDir, name: &str) -> Result<(), String> {
    let mut source = std::fs::File::open(from).map_err(|e| format!("the service's file {name} was not sent ({e})"))?;
    let _ = into.remove_file(name);
    let mut target = into.create_file(name, 0o600).map_err(|e| e.to_string())?;
    std::io::copy(&mut source, &mut target).map_err(|e| format!("copying {name}: {e}"))?;
    Ok(())
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => "ended".to_owned(),
        },
        Err(e) => format!("lost: {e}"),
    }
}

/// Resolves once the generation is told to stop (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// `SIGTERM` to the process group, `SIGKILL` after the grace.
async fn terminate(child: &mut tokio::process::Child) {
    let group = child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
    if let Some(group) = group {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::TERM);
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _ = child.kill().await;
}

/// Where a service of `kind` says it is up.
fn health_path(kind: &ServiceKind) -> &'static str {
    match kind {
        ServiceKind::ClassifierDemo { .. } | ServiceKind::Terminal => "/v1/health",
        ServiceKind::Jupyter => "/api",
    }
}

/// Resolves `true` once `GET <path>` on the socket answers 200, `false` after
/// [`START_TIMEOUT`].
async fn healthy(socket: &Path, path: &str) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if health_check(socket, path).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

async fn health_check(socket: &Path, path: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::UnixStream::connect(socket)).await else { return false };
    if stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    matches!(tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut head)).await, Ok(Ok(_))) && head.starts_with(b"HTTP/1.1 200")
}

/// What the tunnel asks of the node's services (`tunnel.rs` puts them behind its `Resolve`).
impl Services {
    /// Where the service the portal names listens now: a ready replica of its serving
    /// generation, in turn.
    pub async fn resolve(self: &Arc<Self>, service: &str) -> Result<Address, AgentError> {
        let id: u64 = service.parse().map_err(|_| AgentError::UnknownService)?;
        let service = self.service(id).ok_or(AgentError::UnknownService)?;
        if self.live_lease(service.lease).is_none() {
            return Err(AgentError::UnknownService);
        }
        let generation = service.serving().ok_or(AgentError::Unreachable)?;
        let ready = generation.ready();
        let replica = ready.get(service.next.fetch_add(1, Ordering::Relaxed) % ready.len().max(1)).ok_or(AgentError::Unreachable)?;
        Ok(Address::Unix(replica.socket.clone()))
    }

    /// Answers the portal's control requests (`suanli_tunnel::control`).
    pub async fn control(self: &Arc<Self>, request: http::Request<suanli_tunnel::Body>) -> http::Response<suanli_tunnel::Body> {
        use tower::ServiceExt as _;
        let request = request.map(axum::body::Body::new);
        match self.router().oneshot(request).await {
            Ok(response) => response.map(suanli_tunnel::body),
            Err(never) => match never {},
        }
    }
}

async fn list(State(services): State<Arc<Services>>) -> Json<Vec<ServiceStatus>> {
    let all: Vec<Arc<Service>> = lock(&services.table).values().cloned().collect();
    let mut statuses: Vec<ServiceStatus> = all.iter().map(|s| services.status_of(s)).collect();
    statuses.sort_by_key(|s| s.id);
    Json(statuses)
}

/// `PUT /v1/services/{id}`: run `spec` (idempotent for a generation already running).
async fn ensure(State(services): State<Arc<Services>>, UrlPath(id): UrlPath<u64>, body: axum::body::Bytes) -> Response {
    let spec: ServiceSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => return refusal(StatusCode::BAD_REQUEST, "BAD_SPEC", format!("the service's spec: {e}")),
    };
    if !(1..=MAX_REPLICAS).contains(&spec.replicas) {
        return refusal(StatusCode::BAD_REQUEST, "BAD_SPEC", format!("replicas must be 1 to {MAX_REPLICAS}"));
    }
    let Some(lease) = services.live_lease(spec.lease) else {
        return refusal(StatusCode::NOT_FOUND, "UNKNOWN_LEASE", format!("lease {} is not live on this node", spec.lease));
    };
    if spec.replicas as usize > lease.card_indexes.len().max(1) {
        return refusal(StatusCode::BAD_REQUEST, "BAD_SPEC", format!("{} replicas on {} card(s) of the lease here", spec.replicas, lease.card_indexes.len()));
    }
    if !matches!(spec.kind, ServiceKind::ClassifierDemo { .. }) && spec.replicas != 1 {
        return refusal(StatusCode::BAD_REQUEST, "BAD_SPEC", "only a demo has more than one replica");
    }
    if matches!(spec.kind, ServiceKind::ClassifierDemo { .. }) && services.job_binary.is_none() {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "NOT_INSTALLED", "suanli-job is not installed on this node");
    }
    if let Some(missing) = spec.kind.files().iter().find(|(_, sha)| !services.files_dir(id).join(sha).is_file()) {
        return refusal(StatusCode::CONFLICT, "FILE_MISSING", format!("{} ({}) has not been sent", missing.0, missing.1));
    }
    // Decided and recorded under the table's lock, so two requests for one service (the API's
    // and a reconcile's) never start it, or one generation of it, twice.
    let decided = {
        let mut table = lock(&services.table);
        let service = match table.get(&id) {
            Some(service) => service.clone(),
            None => {
                let dir = services.root.join(id.to_string());
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    return refusal(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string());
                }
                let service = Arc::new(Service {
                    id,
                    lease: spec.lease,
                    log: ServiceLog::new(dir.join("service.log")),
                    dir,
                    generations: Mutex::default(),
                    restarts: AtomicU32::new(0),
                    last_exit: Mutex::new(None),
                    next: AtomicUsize::new(0),
                });
                table.insert(id, service.clone());
                service
            }
        };
        if service.lease != spec.lease {
            return refusal(StatusCode::CONFLICT, "OTHER_LEASE", format!("service {id} runs for lease {}", service.lease));
        }
        let mut generations = lock(&service.generations);
        match generations.last() {
            Some(g) if g.number > spec.generation => return refusal(StatusCode::CONFLICT, "STALE_GENERATION", format!("generation {} is running", g.number)),
            Some(g) if g.number == spec.generation && g.spec != spec => {
                return refusal(StatusCode::CONFLICT, "STALE_GENERATION", format!("generation {} runs another spec: raise the generation", g.number))
            }
            Some(g) if g.number == spec.generation => Err(service.clone()),
            _ => {
                let generation = Generation::new(&service, spec);
                generations.push(generation.clone());
                Ok((service.clone(), generation))
            }
        }
    };
    match decided {
        Ok((service, generation)) => {
            services.launch(&service, generation);
            Json(services.status_of(&service)).into_response()
        }
        // That generation runs already: a retried request gets the same answer.
        Err(service) => Json(services.status_of(&service)).into_response(),
    }
}

/// Where replica `k` of a service's generation keeps its files, relative to the lease's home.
fn replica_folder(service: u64, generation: u64, k: usize) -> PathBuf {
    service_folder(service).join(format!("g{generation}-{k}"))
}

/// Everything a service keeps in the lease's home, relative to it.
fn service_folder(service: u64) -> PathBuf {
    PathBuf::from(".suanli-services").join(service.to_string())
}

/// `DELETE /v1/services/{id}`: stop every generation and forget the service.
async fn stop(State(services): State<Arc<Services>>, UrlPath(id): UrlPath<u64>) -> Response {
    let removed = lock(&services.table).remove(&id);
    if let Some(service) = removed {
        service.log.note("stopped by the portal");
        let generations: Vec<Arc<Generation>> = std::mem::take(&mut *lock(&service.generations));
        for g in generations {
            g.stop.send_replace(true);
        }
        // What the portal sent for it (a model's files) goes, and its copies in the lease's
        // home; its replicas' sockets go as they stop.
        let _ = std::fs::remove_dir_all(services.files_dir(id));
        services.clear_in_home(&service, vec![service_folder(id)]);
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(serde::Deserialize)]
struct FileQuery {
    sha256: String,
}

/// `PUT /v1/services/{id}/files/{name}?sha256=…`: a file for the service, kept by its hash.
async fn put_file(
    State(services): State<Arc<Services>>,
    UrlPath((id, name)): UrlPath<(u64, String)>,
    Query(q): Query<FileQuery>,
    body: axum::body::Body,
) -> Response {
    use futures::StreamExt as _;
    if !suanli_tunnel::control::valid_file_name(&name) {
        return refusal(StatusCode::BAD_REQUEST, "BAD_NAME", "a file name is letters, digits, '.', '-' and '_'");
    }
    if q.sha256.len() != 64 || !q.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return refusal(StatusCode::BAD_REQUEST, "BAD_SHA256", "sha256 is 64 lowercase hex digits");
    }
    let dir = services.files_dir(id);
    let target = dir.join(&q.sha256);
    if target.is_file() {
        return StatusCode::NO_CONTENT.into_response();
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return refusal(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string());
    }
    let partial = dir.join(format!(".{}.{}", q.sha256, rand::random::<u64>()));
    let written = async {
        let mut file = tokio::fs::File::create(&partial).await.map_err(|e| e.to_string())?;
        let (mut hash, mut len) = (sha2::Sha256::new(), 0u64);
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            len += chunk.len() as u64;
            if len > MAX_FILE_BYTES {
                return Err(format!("more than {MAX_FILE_BYTES} bytes"));
            }
            hash.update(&chunk);
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await.map_err(|e| e.to_string())?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| e.to_string())?;
        Ok(hex::encode(hash.finalize()))
    }
    .await;
    let outcome = match written {
        Ok(sha) if sha == q.sha256 => std::fs::rename(&partial, &target).map_err(|e| refusal(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string())),
        Ok(sha) => Err(refusal(StatusCode::BAD_REQUEST, "SHA256_MISMATCH", format!("the bytes hash to {sha}"))),
        Err(e) => Err(refusal(StatusCode::BAD_REQUEST, "BAD_BODY", e)),
    };
    let _ = std::fs::remove_file(&partial);
    match outcome {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => refused,
    }
}

/// `GET /v1/services/{id}/log`: the end of its log.
async fn log(State(services): State<Arc<Services>>, UrlPath(id): UrlPath<u64>) -> Response {
    match services.service(id) {
        Some(service) => service.log.tail(64 << 10).into_response(),
        None => refusal(StatusCode::NOT_FOUND, "UNKNOWN_SERVICE", format!("no service {id} here")),
    }
}
