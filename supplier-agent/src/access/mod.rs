//! Lease access on this node (SPEC §3; DESIGN flows 2–3): a Unix account per live lease, and
//! the SSH gateway (`gateway.rs`) that admits exactly the lease's researcher to it.
//!
//! The broker is the source of truth: every poll of this node's state (`provisioner.rs`) is
//! handed to [`Access::sync`], which provisions accounts for new leases, updates the keys the
//! gateway accepts, and tears down leases that are no longer live — their sessions are cut,
//! every process of their user is killed and the account and its home are removed.
//!
//! Fail closed: a lease past its `paid_until` (plus a short grace for the broker's own reaper)
//! is ended here by [`Access::expire`] even when no broker answers, and not provisioned again.

pub mod accounts;
pub mod cgroup;
pub mod devices;
pub mod firewall;
pub mod gateway;
pub mod lease_fs;
pub mod listeners;
#[allow(unsafe_code)] // between fork and exec; see the module's documentation
pub mod sandbox;
pub mod throttle;
pub mod vnc;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use russh::keys::PublicKey;
use suanli_proto::v1;
use tokio::sync::{watch, Notify};

pub use accounts::Account;

use crate::runtime::lock;

#[derive(Clone, Debug)]
pub struct AccessConfig {
    /// Lease homes go here, one directory per lease account.
    pub home_root: PathBuf,
    /// A lease's login is `<login_prefix><lease id>`.
    pub login_prefix: String,
    pub shell: PathBuf,
    /// OpenSSH's SFTP server, run as the lease's user for `sftp` and `scp`.
    pub sftp_server: PathBuf,
    /// Failed logins per source address per minute before it is refused outright (a login
    /// may fail three times as often, from all sources together).
    pub max_login_failures: u32,
    /// Where the cards' device nodes (`nvidiaN`) are: `/dev`, or stand-ins in tests.
    pub devices_dir: PathBuf,
    /// TigerVNC's `Xvnc`, where installed: leases get a VNC display on demand.
    pub xvnc: Option<PathBuf>,
    /// Where the control-group hierarchies are mounted (`/sys/fs/cgroup`); `None`: no groups.
    pub cgroup_root: Option<PathBuf>,
    /// The supplier's policy for a lease's home (its scratch) at the end.
    pub scratch: ScratchPolicy,
    /// The agent's state directory: its record of accounts, the leases' private `/tmp`s.
    pub state_dir: PathBuf,
    /// The UIDs this agent gives lease accounts (inclusive; disjoint from every other agent's
    /// on the host and from the host's own users).
    pub uid_range: (u32, u32),
    /// Which of `/tmp`, `/var/tmp` and `/dev/shm` each lease gets a private one of (in a mount
    /// namespace of its own, with its own System V IPC; needs root's `CAP_SYS_ADMIN`). All
    /// three unless configured otherwise; none switches the namespaces off.
    pub private_dirs: Vec<String>,
    /// The fraction of the node's memory and CPU that leases share between them, each in
    /// proportion to its cards; the rest stays the node's.
    pub lease_fraction: f64,
    /// The node's memory and CPUs, for the leases' limits.
    pub host_memory_bytes: u64,
    pub host_cpus: u32,
    /// How long past `paid_until` a lease the broker still lists is ended here anyway.
    pub expiry_grace: Duration,
    /// New SSH connections one source address may open per minute.
    pub connections_per_source: u32,
    /// How a job attempt's rendezvous port is kept to the lease's own processes
    /// (`firewall.rs`).
    pub rendezvous_firewall: firewall::FirewallKind,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    HomeRoot(String),
    #[error(transparent)]
    Accounts(#[from] accounts::AccountError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScratchPolicy {
    /// Deleted with the account.
    Wipe,
    /// Moved to `<home_root>/.ended/<login>-<time>`, root's alone, for the supplier to keep or
    /// clear as its own retention rules say.
    Keep,
}

/// A live lease of this node, as the gateway admits it.
#[derive(Clone, Debug)]
pub struct LiveLease {
    pub id: u64,
    pub account: Account,
    pub authorized_keys: Vec<PublicKey>,
    /// This node's cards in the lease: `CUDA_VISIBLE_DEVICES`.
    pub card_indexes: Vec<u32>,
    /// Logins are admitted only once the lease is active.
    pub active: bool,
    /// The lease password's hash, once the researcher has had one drawn.
    pub password_hash: Option<suanli_types::SecretHash>,
    /// Serials of the lease's SSH certificates withdrawn before they expire.
    pub revoked_certificates: BTreeSet<u64>,
    /// The `cgroup.procs` files of the lease's control groups, which its sessions enter.
    pub cgroup_procs: Vec<PathBuf>,
    /// The lease's private temporary directories (`sandbox.rs`), where the node makes them.
    pub private_tmp: Option<PathBuf>,
    /// Paid up to here (Unix milliseconds); 0: unknown.
    pub paid_until_ms: i64,
}

impl LiveLease {
    pub fn authorizes(&self, key: &PublicKey) -> bool {
        self.authorized_keys.iter().any(|k| k.key_data() == key.key_data())
    }

    /// Constant-time check of a password against the broker's hash.
    pub fn password_matches(&self, candidate: &str) -> bool {
        let domain = suanli_types::secret::lease_password_domain(suanli_types::LeaseId(self.id));
        self.password_hash.is_some_and(|h| h.matches(&suanli_types::SecretHash::of(&domain, candidate)))
    }

    pub fn cuda_visible_devices(&self) -> String {
        self.card_indexes.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    }
}

pub struct Access {
    pub config: AccessConfig,
    book: accounts::AccountBook,
    leases: RwLock<BTreeMap<String, Arc<LiveLease>>>,
    /// Open SSH sessions per login, to cut at lease end.
    sessions: Mutex<BTreeMap<String, Vec<russh::server::Handle>>>,
    /// Asks the provisioner to fetch the node's leases now rather than at its next tick.
    pub refresh: Notify,
    /// Counts completed syncs, so a login can wait for the one it asked for.
    synced: watch::Sender<u64>,
    pub throttle: Mutex<throttle::Throttle>,
    /// The platform's SSH user CAs, as the broker last said: the one that signs now, and any
    /// it still trusts while rotating to a new one.
    user_cas: RwLock<Vec<PublicKey>>,
    /// Leases ended here for want of payment, with the `paid_until_ms` they had: not
    /// provisioned again unless the broker reports them paid for longer (an extension).
    expired_here: Mutex<BTreeMap<u64, i64>>,
}

/// How long a login waits for a fresh view of a lease the broker may just have activated.
const REFRESH_WAIT: Duration = Duration::from_secs(3);

impl Access {
    /// Refuses a home root lease users could not enter, and opens the record of accounts.
    pub fn new(config: AccessConfig) -> Result<Arc<Access>, AccessError> {
        accounts::check_home_root(&config.home_root).map_err(AccessError::HomeRoot)?;
        let book = accounts::AccountBook::open(&config.state_dir, config.uid_range)?;
        Ok(Arc::new(Access {
            leases: RwLock::new(BTreeMap::new()),
            sessions: Mutex::new(BTreeMap::new()),
            refresh: Notify::new(),
            synced: watch::channel(0).0,
            user_cas: RwLock::new(Vec::new()),
            expired_here: Mutex::new(BTreeMap::new()),
            throttle: Mutex::new(throttle::Throttle::new(config.max_login_failures, Duration::from_secs(60))),
            book,
            config,
        }))
    }

    /// How every program of `lease` starts on this node.
    pub fn sandbox(&self, lease: &LiveLease) -> std::io::Result<sandbox::Sandbox> {
        let private = lease.private_tmp.as_deref().map(|root| (root, self.config.private_dirs.as_slice()));
        sandbox::Sandbox::new(lease.account.uid, lease.account.gid, &lease.cgroup_procs, private)
    }

    fn private_root(&self, login: &str) -> PathBuf {
        self.config.state_dir.join("lease-tmp").join(login)
    }

    fn expired(&self, paid_until_ms: i64, now_ms: i64) -> bool {
        paid_until_ms > 0 && now_ms > paid_until_ms.saturating_add(self.config.expiry_grace.as_millis() as i64)
    }

    /// Ends, here and now, every lease past its `paid_until` (and grace), whether or not a
    /// broker answers. Returns the leases ended.
    pub async fn expire(&self, now_ms: i64) -> Vec<u64> {
        let due: Vec<(String, u64, i64)> = {
            let leases = self.leases.read().unwrap_or_else(|p| p.into_inner());
            leases.iter().filter(|(_, l)| self.expired(l.paid_until_ms, now_ms)).map(|(login, l)| (login.clone(), l.id, l.paid_until_ms)).collect()
        };
        for (login, lease, paid_until_ms) in &due {
            tracing::warn!(lease, %login, paid_until_ms, "lease past its paid time: ended on this node");
            lock(&self.expired_here).insert(*lease, *paid_until_ms);
            self.end(login).await;
        }
        due.into_iter().map(|(_, id, _)| id).collect()
    }

    /// The lease for `login` if it passes `admits`. A lease this node knows may have changed
    /// a moment ago (activated by this agent's confirmation or another node's, a new password):
    /// when it does not pass, ask for a fresh view and wait for it, briefly, before answering.
    pub async fn lease_where(&self, login: &str, admits: impl Fn(&LiveLease) -> bool) -> Option<Arc<LiveLease>> {
        let lease = self.lease_for(login)?;
        if admits(&lease) {
            return Some(lease);
        }
        let mut synced = self.synced.subscribe();
        synced.mark_unchanged();
        self.refresh.notify_one();
        tokio::time::timeout(REFRESH_WAIT, synced.changed()).await.ok()?.ok()?;
        self.lease_for(login).filter(|l| admits(l))
    }

    /// The broker answered a confirmation with the lease active.
    pub fn mark_active(&self, lease: u64) {
        let login = self.login(lease);
        let mut leases = self.leases.write().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = leases.get(&login).filter(|l| !l.active) {
            let updated = LiveLease { active: true, ..LiveLease::clone(known) };
            leases.insert(login, Arc::new(updated));
        }
    }

    pub fn login(&self, lease: u64) -> String {
        format!("{}{lease}", self.config.login_prefix)
    }

    pub fn user_cas(&self) -> Vec<PublicKey> {
        self.user_cas.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn lease_for(&self, login: &str) -> Option<Arc<LiveLease>> {
        self.leases.read().unwrap_or_else(|p| p.into_inner()).get(login).cloned()
    }

    /// Remembers an authenticated session so that the lease's end can cut it.
    pub fn register_session(&self, login: &str, handle: russh::server::Handle) {
        lock(&self.sessions).entry(login.to_owned()).or_default().push(handle);
    }

    /// Brings this node's lease accounts in line with the broker's view of its live leases.
    /// Returns the leases whose account is ready (what the provisioner may confirm).
    pub async fn sync(&self, node: &v1::AgentNode) -> BTreeSet<u64> {
        let lines = std::iter::once(&node.ssh_user_ca).chain(&node.ssh_user_cas_also_trusted).filter(|l| !l.is_empty());
        match lines.map(|l| PublicKey::from_openssh(l)).collect::<Result<Vec<_>, _>>() {
            Ok(cas) => *self.user_cas.write().unwrap_or_else(|p| p.into_inner()) = cas,
            Err(e) => {
                tracing::error!(error = %e, "the broker's SSH user CAs are unreadable; certificates are refused");
                self.user_cas.write().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
        let live = &node.leases;
        let mut ready = BTreeSet::new();
        let mut wanted = BTreeSet::new();
        let now_ms = unix_millis();
        let node_cards = node.cards.len().max(1) as f64;
        {
            // Forget what the broker no longer lists; it has ended those too.
            let listed: BTreeSet<u64> = live.iter().map(|l| l.lease_id).collect();
            lock(&self.expired_here).retain(|lease, _| listed.contains(lease));
        }
        for lease in live {
            let login = self.login(lease.lease_id);
            // Past its paid time (or ended here for it, and not extended since), a lease the
            // broker still lists stays ended here.
            let ended_here = lock(&self.expired_here).get(&lease.lease_id).is_some_and(|paid| *paid >= lease.paid_until_ms);
            if ended_here || self.expired(lease.paid_until_ms, now_ms) {
                continue;
            }
            wanted.insert(login.clone());
            let (account, created) = match accounts::ensure(&self.book, &login, &self.config.home_root, &format!("suanli lease {}", lease.lease_id)).await {
                Ok(made) => made,
                Err(e) => {
                    tracing::error!(lease = lease.lease_id, error = %e, "cannot provision the lease's account");
                    continue;
                }
            };
            let share = self.config.lease_fraction * lease.card_indexes.len() as f64 / node_cards;
            let limits = cgroup::Limits::share_of(share, self.config.host_memory_bytes, self.config.host_cpus);
            let cgroup_procs = match self.config.cgroup_root.clone().map(cgroup::Cgroups::new) {
                Some(groups) => match groups.create(&login, &limits) {
                    Ok(procs) => procs,
                    Err(e) => {
                        tracing::error!(lease = lease.lease_id, error = %e, "no control group for the lease; not admitted");
                        continue;
                    }
                },
                None => Vec::new(),
            };
            let private_tmp = if !self.config.private_dirs.is_empty() {
                let root = self.private_root(&login);
                if let Err(e) = sandbox::make_private_dirs(&root, account.uid, account.gid) {
                    tracing::error!(lease = lease.lease_id, error = %e, "no private /tmp for the lease; not admitted");
                    continue;
                }
                Some(root)
            } else {
                None
            };
            // Only into a home nobody has logged in to yet: once the lease's user can write
            // there, root writes nothing more into it.
            if created {
                let request_id = Some(lease.request_id.as_str()).filter(|id| !id.is_empty());
                tracing::info!(lease = lease.lease_id, %login, request_id, "lease account made");
            }
            if created && self.config.xvnc.is_some() {
                if let Err(e) = vnc::provision(&account) {
                    tracing::warn!(lease = lease.lease_id, error = %e, "cannot provision the lease's VNC password");
                }
            }
            let authorized_keys = lease
                .authorized_keys
                .iter()
                .filter_map(|line| match PublicKey::from_openssh(line) {
                    Ok(key) => Some(key),
                    Err(e) => {
                        tracing::warn!(lease = lease.lease_id, error = %e, "ignoring an unreadable SSH key");
                        None
                    }
                })
                .collect();
            let entry = LiveLease {
                id: lease.lease_id,
                account,
                authorized_keys,
                card_indexes: lease.card_indexes.clone(),
                active: lease.state() == v1::LeaseState::Active,
                password_hash: suanli_types::SecretHash::from_hex(&lease.password_hash),
                revoked_certificates: lease.revoked_certificate_serials.iter().copied().collect(),
                cgroup_procs,
                private_tmp,
                paid_until_ms: lease.paid_until_ms,
            };
            self.leases.write().unwrap_or_else(|p| p.into_inner()).insert(login, Arc::new(entry));
            ready.insert(lease.lease_id);
        }
        let mut ended: BTreeSet<String> = {
            let leases = self.leases.read().unwrap_or_else(|p| p.into_inner());
            leases.keys().filter(|login| !wanted.contains(*login)).cloned().collect()
        };
        // Accounts left by a lease that ended while the agent was not running: only those this
        // agent recorded making, never another agent's or the host's.
        ended.extend(self.book.recorded().into_iter().filter(|login| !wanted.contains(login)));
        for login in ended {
            self.end(&login).await;
        }
        // Each card's device node to the lease holding it, every other card's to root alone.
        let owners: BTreeMap<u32, u32> = {
            let leases = self.leases.read().unwrap_or_else(|p| p.into_inner());
            leases.values().flat_map(|l| l.card_indexes.iter().map(|i| (*i, l.account.gid))).collect()
        };
        if let Err(e) = devices::apply(&self.config.devices_dir, &owners) {
            tracing::error!(dir = %self.config.devices_dir.display(), error = %e, "cannot set the cards' device permissions");
        }
        self.synced.send_modify(|n| *n += 1);
        ready
    }

    /// The lease is over: no new logins, open sessions cut, every process killed, the
    /// account and its home (the scratch space) removed.
    async fn end(&self, login: &str) {
        self.leases.write().unwrap_or_else(|p| p.into_inner()).remove(login);
        let sessions = lock(&self.sessions).remove(login).unwrap_or_default();
        for handle in sessions {
            let cut = handle.disconnect(russh::Disconnect::ByApplication, "the lease has ended".into(), String::new());
            // A session blocked on a full window may not take the message: killing its
            // processes below ends it either way.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), cut).await;
        }
        if let Some(groups) = self.config.cgroup_root.clone().map(cgroup::Cgroups::new) {
            if let Err(e) = groups.destroy(login).await {
                tracing::warn!(%login, error = %e, "could not remove the lease's control group");
            }
        }
        let keep_in = (self.config.scratch == ScratchPolicy::Keep).then(|| self.config.home_root.join(".ended"));
        match accounts::remove(&self.book, login, &self.config.home_root.join(login), keep_in.as_deref()).await {
            Ok(()) => tracing::info!(%login, "lease ended: sessions cut, processes killed, account removed"),
            Err(e) => tracing::error!(%login, error = %e, "could not remove the lease's account"),
        }
        // Its private /tmp, /var/tmp and /dev/shm go with it, whatever the scratch policy (its
        // processes are dead, so nothing is mounted from there any more).
        let private = self.private_root(login);
        if let Err(e) = std::fs::remove_dir_all(&private) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%login, error = %e, "could not remove the lease's private /tmp");
            }
        }
    }
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
