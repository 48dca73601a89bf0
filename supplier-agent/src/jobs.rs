//! Runs the job attempts the scheduler placed on this node's cards (DESIGN flow 4).
//!
//! Every half second the runner asks the broker which jobs hold this node's cards. A placed
//! attempt it has not started is started as the lease's Unix account, inside the lease's
//! control groups, with `CUDA_VISIBLE_DEVICES` naming exactly the placed cards of this node;
//! its output goes to `job.log` in the attempt's directory under the lease's home. An attempt
//! the platform asked to stop, or that is no longer current, is killed. When a process ends the
//! runner reports it; a multi-node job's outcome is its rank-0 node's, and any other rank
//! reports only a failure.
//!
//! Data moves through the artifact store: inputs are downloaded into `in/` (verified against
//! the spec's hashes) before the program starts; the job's latest checkpoint — the file
//! `$SUANLI_CHECKPOINT_DIR/checkpoint`, which the job replaces atomically (write, rename) —
//! is uploaded whenever it changes and recorded with the broker, and the next attempt, on any
//! node, finds it at `$SUANLI_RESUME_FROM`; the outputs the spec names are uploaded from
//! `out/` when rank 0 succeeds. Files the job wrote are read only if they are regular files
//! owned by the lease's account (opened without following links), so a job cannot make the
//! agent read someone else's file.
//!
//! The last line of the attempt's output that is a JSON object (the JSON-lines progress of
//! `suanli-job`: step, loss, metrics, ETA) is relayed to the broker every few seconds, and the
//! output itself is sent to the broker's leader as it grows (`AppendJobLog`, from where the
//! leader asks, its last 4 MiB at most), for the researcher to watch; what the process wrote
//! before it ended is sent before its end is reported.
//!
//! A marker file per started attempt (in the agent's state directory) survives an agent
//! restart: an attempt marked but not running here any more died with the previous agent, and
//! is reported as `node_lost` (the platform's fault, so it does not count against the job),
//! never started a second time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use suanli_proto::convert::job_end_reason_to_wire;
use suanli_proto::decode_status;
use suanli_proto::v1::{self, job_service_client::JobServiceClient};
use suanli_types::{JobEndReason, JobRun, JobSpec, NodeId};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use suanli_artifacts::ArtifactClient;

use crate::access::firewall::{self, FirewallKind, Opening, RendezvousFirewall};
use crate::access::gateway::session_env;
use crate::access::lease_fs::{LeaseDir, LeaseFsError};
use crate::access::Access;
use crate::identity::BrokerTls;

pub struct JobRunner {
    pub brokers: Vec<String>,
    pub tls: BrokerTls,
    pub access: Arc<Access>,
    pub node: NodeId,
    /// Where attempt markers are kept.
    pub state_dir: PathBuf,
    /// `suanli-job`, for built-in CV tasks; `None` where it is not installed.
    pub job_binary: Option<PathBuf>,
    /// Where job inputs, outputs and checkpoints go; `None`: jobs with inputs cannot start
    /// and checkpoints stay on the node.
    pub artifacts: Option<ArtifactStore>,
    /// Each attempt's latest capability for the store, as the broker listed it (a finished
    /// attempt's outputs are uploaded with the last one it had).
    pub capabilities: std::sync::Mutex<BTreeMap<Key, String>>,
    /// Caps on the agent's file work in a lease's directories.
    pub files: FileLimits,
    /// Without a broker answering this long, every attempt here is stopped (self-fencing):
    /// the scheduler requeues a silent node's jobs elsewhere, and two copies must never run.
    pub fence_after: Duration,
    /// Keeps each attempt's rendezvous port to the lease's own processes while it runs.
    pub firewall: Arc<RendezvousFirewall>,
}

/// The artifact store as this node reaches it: per attempt with the capability the broker
/// issued for it (its own inputs and checkpoint, uploads charged to its owner), or with a
/// store-wide token where the store takes no capabilities.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    pub url: String,
    pub token: Option<String>,
    /// The CA an `https://` store's certificate must come from (the cluster CA).
    pub ca_pem: Option<String>,
}

impl ArtifactStore {
    fn client(&self, capability: Option<&str>) -> Option<ArtifactClient> {
        let credential = capability.filter(|c| !c.is_empty()).or(self.token.as_deref())?;
        ArtifactClient::for_store(&self.url, credential, self.ca_pem.as_deref())
            .map_err(|e| tracing::error!(error = %e, "the artifact store's CA is unusable"))
            .ok()
    }
}

/// Bounds on what one attempt's files may cost the node's runner.
#[derive(Clone, Copy, Debug)]
pub struct FileLimits {
    /// The largest checkpoint or output the agent reads from a lease's directory.
    pub max_bytes: u64,
    /// How long one transfer (an input down, a checkpoint or the outputs up) may take.
    pub deadline: Duration,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits { max_bytes: 64 << 30, deadline: Duration::from_secs(30 * 60) }
    }
}

/// One attempt: (job, attempt number).
pub use crate::access::firewall::Key;

struct Running {
    kill: Option<oneshot::Sender<()>>,
    /// This node's cards (CUDA ordinals) the process uses, until it has exited.
    devices: Vec<u32>,
    /// Whether it is a sharing (inference) job, which may share its card with others.
    shared: bool,
    /// Rank 0 uploads checkpoints: where, as whom, and what was last uploaded.
    checkpoint: Option<Checkpoint>,
}

impl Running {
    /// An attempt with no process here (it could not start, it ended, or it died with an
    /// earlier agent).
    fn done() -> Running {
        Running { kill: None, devices: Vec::new(), shared: false, checkpoint: None }
    }

    /// The attempt's process has ended: it keeps only its checkpoint, whose last version is
    /// saved before the end is reported (what the next attempt resumes from).
    fn ended(self) -> Running {
        let checkpoint = self.checkpoint.map(|cp| Checkpoint { ending: Some(Ending::Pending), ..cp });
        Running { checkpoint, ..Running::done() }
    }

    /// Whether the end can be reported: no last checkpoint or output is still to be sent.
    fn end_reportable(&self) -> bool {
        self.checkpoint.as_ref().is_none_or(|cp| cp.ending == Some(Ending::Saved) && cp.log.done)
    }
}

fn is_shared(job: &v1::Job) -> bool {
    serde_json::from_str::<JobSpec>(&job.spec_json).is_ok_and(|s| s.resources.shared)
}

struct Checkpoint {
    /// The attempt's directory, opened without following links.
    dir: Arc<LeaseDir>,
    last: Option<Stamp>,
    /// An upload in flight, and the file stamp it is of.
    uploading: Option<(CheckpointUpload, Stamp)>,
    /// What of `job.log` was read for progress lines.
    log_read: u64,
    progress: Option<String>,
    progress_sent: Option<std::time::Instant>,
    progress_reports: u64,
    log: LogShipping,
    /// Set once the process has ended: the checkpoint it left is saved once more, then the
    /// end is reported.
    ending: Option<Ending>,
}

/// How much of an attempt's `job.log` the broker's leader has.
#[derive(Default)]
struct LogShipping {
    /// Where the leader asked the next append to begin.
    shipped: u64,
    /// The log's length when the process ended: sent up to there, the end may be reported.
    until: Option<u64>,
    /// Nothing more will be sent (all of it was, or the broker will not take it).
    done: bool,
    /// Rounds since the process ended: the output is given up after [`LOG_GIVE_UP_AFTER`].
    rounds_since_end: u32,
}

/// The most of an attempt's output the leader keeps (`job_logs.rs` in the broker): a log
/// further behind than this is sent from its last this many bytes.
const LOG_WINDOW: u64 = 4 << 20;
/// The most one append sends.
const LOG_CHUNK: u64 = 1 << 20;
/// After the process has ended, the rounds its output may take to send (4 MiB in 1 MiB appends,
/// a leader change, a broker away for a while) before it is given up: the end is reported
/// without the rest, which stays in the lease's home.
const LOG_GIVE_UP_AFTER: u32 = 40;

/// The last checkpoint of an attempt whose process has ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ending {
    /// Not looked at since the end.
    Pending,
    /// One upload started after the end; its result settles it (a file still changing after
    /// that is not chased: another process of the lease could change it forever).
    Uploading,
    /// Saved, unchanged, absent or refused: the end may be reported.
    Saved,
}

/// A file's modification time (seconds, nanoseconds) and size: whether it changed.
type Stamp = (i64, i64, u64);
type CheckpointUpload = tokio::task::JoinHandle<Result<suanli_artifacts::Digest, String>>;

/// Progress is relayed at most this often per attempt (each relay is a replicated write).
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

const CHECKPOINT: &str = "checkpoint/checkpoint";
/// The file in the state directory naming the agent's nftables table.
pub const RENDEZVOUS_TABLE_FILE: &str = "rendezvous.table";
const LOG: &str = "job.log";

/// Where an attempt's files are, for uploading its outputs.
#[derive(Clone)]
struct Outputs {
    dir: Arc<LeaseDir>,
    names: Vec<String>,
}

struct Ended {
    key: Key,
    rank: usize,
    reason: JobEndReason,
    outputs: Option<Outputs>,
}

/// Uploads of finished attempts' outputs, each on its own task, so that a slow or hostile
/// attempt never holds up the runner's loop.
type Uploads = HashMap<Key, tokio::task::JoinHandle<Result<HashMap<String, String>, String>>>;

impl JobRunner {
    pub async fn run(self, every: Duration) {
        let markers = self.state_dir.join("jobs");
        if let Err(e) = std::fs::create_dir_all(&markers) {
            tracing::error!(error = %e, dir = %markers.display(), "job runner: no state directory; jobs will not run");
            return;
        }
        // What an earlier agent started is killed before the rules that kept its rendezvous
        // port go (each is still reported as lost once a broker answers). The table's name is
        // kept beside the markers, for whoever cleans up after this agent (test harnesses).
        for marker in std::fs::read_dir(&markers).into_iter().flatten().flatten() {
            kill_orphan(&marker.path());
        }
        if self.firewall.kind() == FirewallKind::Nftables {
            let _ = std::fs::write(self.state_dir.join(RENDEZVOUS_TABLE_FILE), self.firewall.table());
        }
        if let Err(e) = self.firewall.reset().await {
            tracing::error!(error = %e, "the rendezvous firewall is unusable: job attempts will not start");
        }
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<Ended>();
        let mut running: BTreeMap<Key, Running> = BTreeMap::new();
        let mut to_report: Vec<Ended> = Vec::new();
        let mut uploads: Uploads = HashMap::new();
        let mut channel: Option<Channel> = None;
        let mut which = 0usize;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_contact = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(ended) = ended_rx.recv() => note_ended(&mut running, &mut to_report, ended),
            }
            while let Ok(ended) = ended_rx.try_recv() {
                note_ended(&mut running, &mut to_report, ended);
            }
            if last_contact.elapsed() > self.fence_after {
                fence(&mut running, last_contact.elapsed());
            }
            if channel.is_none() {
                match self.tls.connect(&self.brokers[which % self.brokers.len()]).await {
                    Ok(c) => channel = Some(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "job runner: broker unreachable");
                        which += 1;
                        continue;
                    }
                }
            }
            let Some(c) = channel.clone() else { continue };
            let mut client = JobServiceClient::new(c);
            to_report = self.report(&mut client, std::mem::take(&mut to_report), &running, &mut uploads).await;
            let jobs = match client.list_node_jobs(v1::ListNodeJobsRequest {}).await {
                Ok(r) => {
                    last_contact = std::time::Instant::now();
                    r.into_inner().jobs
                }
                Err(status) => {
                    tracing::warn!(error = %decode_status(&status), "job runner: could not list this node's jobs");
                    channel = None;
                    which += 1;
                    continue;
                }
            };
            self.follow(&mut client, &jobs, &mut running, &ended_tx).await;
            self.sync_checkpoints(&mut client, &mut running).await;
            self.sync_progress(&mut client, &mut running).await;
            sync_logs(&mut client, &mut running).await;
        }
    }

    /// Reports ended attempts; returns those that could not be reported yet (their outputs are
    /// still uploading, or the broker did not answer).
    async fn report(&self, client: &mut JobServiceClient<Channel>, ended: Vec<Ended>, running: &BTreeMap<Key, Running>, uploads: &mut Uploads) -> Vec<Ended> {
        let mut left = Vec::new();
        for e in ended {
            let (job, attempt) = e.key;
            let marker = self.marker(e.key);
            if !running.get(&e.key).is_none_or(Running::end_reportable) {
                left.push(e); // its last checkpoint is still being saved
                continue;
            }
            // A secondary rank that finished waits for rank 0 to speak for the job.
            if e.rank > 0 && e.reason == JobEndReason::Completed {
                let _ = std::fs::remove_file(&marker);
                continue;
            }
            let mut outputs = HashMap::new();
            // Outputs to upload (none named: reported at once, as before any upload existed).
            if let (JobEndReason::Completed, Some(out)) = (&e.reason, e.outputs.as_ref().filter(|o| !o.names.is_empty())) {
                let upload = uploads.entry(e.key).or_insert_with(|| tokio::spawn(self.upload_outputs(e.key, out.clone())));
                if !upload.is_finished() {
                    left.push(e);
                    continue;
                }
                let Some(upload) = uploads.remove(&e.key) else { continue };
                match upload.await.map_err(|e| e.to_string()).and_then(|r| r) {
                    Ok(uploaded) => outputs = uploaded,
                    Err(why) => {
                        // The next round starts a fresh upload.
                        tracing::warn!(job, attempt, %why, "could not upload outputs; will retry");
                        left.push(e);
                        continue;
                    }
                }
            }
            let request = v1::ReportJobEndedRequest {
                request_id: format!("job-ended-{job}-{attempt}-{}", self.node.0),
                job_id: job,
                attempt,
                reason: Some(job_end_reason_to_wire(&e.reason)),
                outputs,
            };
            match client.report_job_ended(request).await {
                Ok(_) => {
                    tracing::info!(job, attempt, reason = %e.reason, "job attempt ended");
                    let _ = std::fs::remove_file(&marker);
                }
                Err(status) => {
                    let err = decode_status(&status);
                    if err.code == suanli_types::ErrorCode::Unavailable {
                        left.push(e);
                    } else {
                        // Superseded (another node reported, the job was requeued or cancelled).
                        tracing::info!(job, attempt, error = %err, "job end not recorded");
                        let _ = std::fs::remove_file(&marker);
                    }
                }
            }
        }
        left
    }

    /// Uploads the outputs the spec names, within the deadline. An output the job left as
    /// something other than a regular file of its own (a link, a FIFO, too large) is refused
    /// and, like one it never wrote, absent from the record.
    fn upload_outputs(&self, key: Key, out: Outputs) -> impl std::future::Future<Output = Result<HashMap<String, String>, String>> + Send + 'static {
        let store = self.store_for(key);
        let (staging, limits) = (self.staging_dir(), self.files);
        async move {
            let mut uploaded = HashMap::new();
            if out.names.is_empty() {
                return Ok(uploaded);
            }
            let store = store.ok_or("no artifact store configured for the job's outputs")?;
            let work = async {
                for name in &out.names {
                    let rel = Path::new("out").join(name);
                    match upload_from_lease(&store, out.dir.clone(), rel, &staging, limits).await {
                        Ok(Some(digest)) => {
                            uploaded.insert(name.clone(), digest.to_hex());
                        }
                        Ok(None) => {}
                        Err(UploadError::Lease(why)) => tracing::warn!(%why, "output refused"),
                        Err(UploadError::Transient(why)) => return Err(why),
                    }
                }
                Ok(())
            };
            match tokio::time::timeout(limits.deadline, work).await {
                Ok(Ok(())) => Ok(uploaded),
                Ok(Err(why)) => Err(why),
                Err(_) => Err(format!("outputs not uploaded within {:?}", limits.deadline)),
            }
        }
    }

    /// The store as attempt `key` reaches it (its latest capability).
    fn store_for(&self, key: Key) -> Option<ArtifactClient> {
        let capability = self.capabilities.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        self.artifacts.as_ref()?.client(capability.as_deref())
    }

    fn staging_dir(&self) -> PathBuf {
        self.state_dir.join("staging")
    }

    /// Relays each running rank-0 attempt's latest JSON progress line (the last line of its
    /// output that is a JSON object), at most every [`PROGRESS_EVERY`].
    async fn sync_progress(&self, client: &mut JobServiceClient<Channel>, running: &mut BTreeMap<Key, Running>) {
        use std::io::{Read, Seek};
        for ((job, attempt), r) in running.iter_mut() {
            let Some(cp) = r.checkpoint.as_mut() else { continue };
            // The log may be any size; only its tail is read. A FIFO or a link is refused.
            let Ok(Some((mut file, len))) = cp.dir.open_for_reading(Path::new(LOG), u64::MAX) else { continue };
            let meta_len = len;
            if meta_len <= cp.log_read {
                continue;
            }
            // Only whole lines, and at most the last 64 KiB of what is new.
            let from = cp.log_read.max(meta_len.saturating_sub(64 * 1024));
            let mut fresh = Vec::new();
            if file.seek(std::io::SeekFrom::Start(from)).is_err() || file.take(meta_len - from).read_to_end(&mut fresh).is_err() {
                continue;
            }
            let Some(end) = fresh.iter().rposition(|b| *b == b'\n') else { continue };
            cp.log_read = from + end as u64 + 1;
            let latest = String::from_utf8_lossy(&fresh[..end])
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| l.len() <= 1024 && serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l).is_ok())
                .map(str::to_owned);
            if latest.is_some() {
                cp.progress = latest;
            }
            let due = cp.progress_sent.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
            let (Some(progress), true) = (cp.progress.clone(), due) else { continue };
            cp.progress_reports += 1;
            let request = v1::ReportJobProgressRequest {
                request_id: format!("prog-{job}-{attempt}-{}", cp.progress_reports),
                job_id: *job,
                attempt: *attempt,
                progress_json: progress,
            };
            match client.report_job_progress(request).await {
                Ok(_) => {
                    cp.progress_sent = Some(std::time::Instant::now());
                    cp.progress = None;
                }
                Err(status) => tracing::debug!(job, error = %decode_status(&status), "progress not relayed"),
            }
        }
    }
}

/// Sends each rank-0 attempt's new output to the broker's leader, one append per attempt a
/// round, from where the leader asks. After the process has ended, the output up to the
/// length it had then is sent before the end is reported (`Running::end_reportable`). The
/// file is read as the lease's account left it: a link or a FIFO is refused
/// (`LeaseDir::open_for_reading`), and a log that grows faster than it is sent is sent from
/// its last [`LOG_WINDOW`] bytes.
async fn sync_logs(client: &mut JobServiceClient<Channel>, running: &mut BTreeMap<Key, Running>) {
    use std::io::{Read, Seek};
    for ((job, attempt), r) in running.iter_mut() {
        let Some(cp) = r.checkpoint.as_mut() else { continue };
        let ended = cp.ending.is_some();
        let log = &mut cp.log;
        if log.done {
            continue;
        }
        let Ok(Some((mut file, len))) = cp.dir.open_for_reading(Path::new(LOG), u64::MAX) else {
            log.done = ended; // nothing (more) to send
            continue;
        };
        let until = if ended { (*log.until.get_or_insert(len)).min(len) } else { len };
        let from = log.shipped.max(until.saturating_sub(LOG_WINDOW));
        if ended {
            log.rounds_since_end += 1;
        }
        if from >= until || log.rounds_since_end > LOG_GIVE_UP_AFTER {
            log.done = ended;
            continue;
        }
        let mut data = Vec::new();
        if file.seek(std::io::SeekFrom::Start(from)).is_err() || file.take((until - from).min(LOG_CHUNK)).read_to_end(&mut data).is_err() {
            log.done = ended;
            continue;
        }
        // While the process runs, a character it is halfway through writing waits for the rest.
        if !ended {
            data.truncate(without_cut_character(&data));
            if data.is_empty() {
                continue;
            }
        }
        let request = v1::AppendJobLogRequest { job_id: *job, attempt: *attempt, offset: from, data, start_here: from > log.shipped };
        match client.append_job_log(request).await {
            Ok(reply) => log.shipped = reply.into_inner().next_offset,
            // Not this node's to send (the attempt is over or not rank 0 here), or a broker that
            // takes no output: it stays in the lease's home. Anything else: tried next round.
            Err(status) if status.code() == tonic::Code::Unimplemented || decode_status(&status).code == suanli_types::ErrorCode::PermissionDenied => {
                tracing::debug!(job, attempt, error = %decode_status(&status), "output not sent to the broker");
                log.done = true;
            }
            Err(status) => tracing::debug!(job, attempt, error = %decode_status(&status), "output not sent to the broker yet"),
        }
    }
}

/// The port a multi-node attempt's processes meet on at rank 0: one of 2,000 from 29500 (the
/// port `torchrun` defaults to), by job and attempt, so that a retry does not find its
/// predecessor's socket and two jobs meeting on one node rarely share one.
fn rendezvous_port(job: u64, attempt: u32) -> u16 {
    29_500 + (job.wrapping_mul(7).wrapping_add(u64::from(attempt)) % 2_000) as u16
}

/// How much of `data` (output that may go on) to send now: all of it but a UTF-8 sequence cut
/// off at its end. Bytes that are not UTF-8 at all are sent as they are.
fn without_cut_character(data: &[u8]) -> usize {
    let len = data.len();
    for back in 1..=len.min(3) {
        let byte = data[len - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: its lead is further back
        }
        let needs = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if back < needs { len - back } else { len };
    }
    len
}

impl JobRunner {
    /// Uploads each running rank-0 attempt's checkpoint that changed since the last upload, on
    /// a task of its own with a deadline, and records finished uploads with the broker.
    async fn sync_checkpoints(&self, client: &mut JobServiceClient<Channel>, running: &mut BTreeMap<Key, Running>) {
        for ((job, attempt), r) in running.iter_mut() {
            let Some(cp) = r.checkpoint.as_mut() else { continue };
            let Some(store) = self.store_for((*job, *attempt)) else {
                if cp.ending.is_some() {
                    cp.ending = Some(Ending::Saved); // nowhere to save it
                }
                continue;
            };
            if let Some((upload, stamp)) = cp.uploading.take() {
                if !upload.is_finished() {
                    cp.uploading = Some((upload, stamp));
                    continue;
                }
                match upload.await.map_err(|e| e.to_string()).and_then(|r| r) {
                    Ok(digest) => {
                        let request = v1::ReportJobCheckpointRequest {
                            request_id: format!("ckpt-{job}-{attempt}-{}", &digest.to_hex()[..16]),
                            job_id: *job,
                            attempt: *attempt,
                            sha256: digest.to_hex(),
                        };
                        match client.report_job_checkpoint(request).await {
                            Ok(_) => {
                                tracing::info!(job, attempt, %digest, "checkpoint saved");
                                cp.last = Some(stamp);
                            }
                            Err(status) => {
                                let error = decode_status(&status);
                                tracing::warn!(job, %error, "checkpoint not recorded");
                                if error.code == suanli_types::ErrorCode::Unavailable {
                                    // Not recorded yet, not refused: uploaded and reported again
                                    // next round (a dying attempt's end waits for it, as the
                                    // end's own report would wait for the broker anyway).
                                    if cp.ending == Some(Ending::Uploading) {
                                        cp.ending = Some(Ending::Pending);
                                    }
                                    continue;
                                }
                            }
                        }
                    }
                    Err(why) => {
                        tracing::warn!(job, %why, "checkpoint not uploaded");
                        cp.last = Some(stamp); // not again until it changes
                    }
                }
                if cp.ending == Some(Ending::Uploading) {
                    cp.ending = Some(Ending::Saved);
                }
                continue;
            }
            if cp.ending.is_some_and(|e| e != Ending::Pending) {
                continue; // ended, and its last version already handled
            }
            let settle = |cp: &mut Checkpoint| {
                if cp.ending.is_some() {
                    cp.ending = Some(Ending::Saved);
                }
            };
            let stamp = match cp.dir.stamp(Path::new(CHECKPOINT), self.files.max_bytes) {
                Ok(Some(stamp)) => stamp,
                Ok(None) => {
                    settle(cp);
                    continue;
                }
                Err(why) => {
                    if cp.last.is_none() {
                        tracing::warn!(job, %why, "checkpoint refused");
                    }
                    cp.last = Some((0, 0, 0));
                    settle(cp);
                    continue;
                }
            };
            if cp.last == Some(stamp) {
                settle(cp);
                continue;
            }
            if cp.ending.is_some() {
                cp.ending = Some(Ending::Uploading);
            }
            let (store, dir, staging, limits) = (store.clone(), cp.dir.clone(), self.staging_dir(), self.files);
            let upload = tokio::spawn(async move {
                let work = upload_from_lease(&store, dir, PathBuf::from(CHECKPOINT), &staging, limits);
                match tokio::time::timeout(limits.deadline, work).await {
                    Ok(Ok(Some(digest))) => Ok(digest),
                    Ok(Ok(None)) => Err("the checkpoint vanished".to_owned()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("not uploaded within {:?}", limits.deadline)),
                }
            });
            cp.uploading = Some((upload, stamp));
        }
    }

    fn marker(&self, (job, attempt): Key) -> PathBuf {
        self.state_dir.join("jobs").join(format!("{job}-{attempt}.started"))
    }

    async fn follow(
        &self,
        client: &mut JobServiceClient<Channel>,
        jobs: &[v1::Job],
        running: &mut BTreeMap<Key, Running>,
        ended: &mpsc::UnboundedSender<Ended>,
    ) {
        // Which attempts this node still holds; everything else running here is killed first,
        // and a new attempt waits while a process of another attempt still has its cards: the
        // broker may already have given them away (a requeue after this node looked silent),
        // but two attempts never run on one card at once here.
        let wanted: BTreeSet<Key> = jobs.iter().filter_map(|j| j.attempts.last().map(|a| (j.job_id, a.number))).collect();
        {
            // The latest capability of each attempt listed; those of attempts no longer listed
            // stay while the attempt is known here (its outputs may still be uploading).
            let mut capabilities = self.capabilities.lock().unwrap_or_else(|p| p.into_inner());
            for job in jobs {
                if let Some(a) = job.attempts.last().filter(|_| !job.artifact_capability.is_empty()) {
                    capabilities.insert((job.job_id, a.number), job.artifact_capability.clone());
                }
            }
            capabilities.retain(|key, _| wanted.contains(key) || running.contains_key(key));
        }
        for (key, r) in running.iter_mut() {
            if !wanted.contains(key) {
                if let Some(kill) = r.kill.take() {
                    tracing::info!(job = key.0, attempt = key.1, "job attempt no longer placed here; killing it");
                    let _ = kill.send(());
                }
            }
        }
        // Forgotten once over: no longer placed here and no process left.
        running.retain(|key, r| wanted.contains(key) || r.kill.is_some() || !r.devices.is_empty());
        // An attempt's rendezvous rules last as long as the broker lists it here.
        for key in self.firewall.opened().await {
            if !running.contains_key(&key) {
                self.firewall.close(key).await;
            }
        }
        self.firewall.retry().await;
        for job in jobs {
            let Some(attempt) = job.attempts.last() else { continue };
            let key = (job.job_id, attempt.number);
            if job.stop_requested.is_some() {
                if let Some(r) = running.get_mut(&key) {
                    if let Some(kill) = r.kill.take() {
                        tracing::info!(job = job.job_id, attempt = attempt.number, "stopping job attempt as asked");
                        let _ = kill.send(());
                    }
                }
                continue;
            }
            if running.contains_key(&key) {
                continue;
            }
            let mine: BTreeSet<u32> = (0..attempt.card_ids.len())
                .filter(|i| attempt.node_ids.get(*i) == Some(&self.node.0))
                .filter_map(|i| attempt.card_indexes.get(i).copied())
                .collect();
            let shares = |r: &Running| r.devices.iter().any(|d| mine.contains(d)) && !(r.shared && is_shared(job));
            if running.values().any(shares) {
                continue; // the previous holder's process is still being stopped
            }
            let marker = self.marker(key);
            if marker.exists() {
                // Started by an earlier incarnation of this agent: whatever of it survived that
                // agent is killed before anything runs on its cards again.
                kill_orphan(&marker);
                let _ = ended.send(Ended { key, rank: 0, reason: JobEndReason::NodeLost(self.node), outputs: None });
                running.insert(key, Running::done());
                continue;
            }
            match self.start(job, attempt, &marker, ended.clone()).await {
                Ok(Some(r)) => {
                    running.insert(key, r);
                    let request = v1::ReportJobStartedRequest {
                        request_id: format!("job-started-{}-{}-{}", job.job_id, attempt.number, self.node.0),
                        job_id: job.job_id,
                        attempt: attempt.number,
                    };
                    if let Err(status) = client.report_job_started(request).await {
                        tracing::warn!(job = job.job_id, error = %decode_status(&status), "could not report the start");
                    }
                }
                Ok(None) => {} // the lease's account is not ready yet: next round
                Err(why) => {
                    tracing::warn!(job = job.job_id, %why, "could not start job attempt");
                    let _ = ended.send(Ended { key, rank: 0, reason: JobEndReason::StartFailed(why), outputs: None });
                    running.insert(key, Running::done());
                }
            }
        }
    }

    /// Starts this node's part of an attempt. `Ok(None)`: not possible yet (the lease's account
    /// is still being provisioned).
    async fn start(
        &self,
        job: &v1::Job,
        attempt: &v1::JobAttempt,
        marker: &std::path::Path,
        ended: mpsc::UnboundedSender<Ended>,
    ) -> Result<Option<Running>, String> {
        let mine: Vec<usize> = (0..attempt.card_ids.len()).filter(|i| attempt.node_ids.get(*i) == Some(&self.node.0)).collect();
        let Some(&first) = mine.first() else { return Err("no placed card on this node".into()) };
        let nodes: Vec<u64> = attempt.node_ids.iter().fold(Vec::new(), |mut v, n| {
            if !v.contains(n) {
                v.push(*n);
            }
            v
        });
        let rank = nodes.iter().position(|n| *n == self.node.0).unwrap_or(0);
        let lease_id = attempt.lease_ids.get(first).copied().unwrap_or(0);
        let Some(lease) = self.access.lease_for(&self.access.login(lease_id)) else { return Ok(None) };
        if !lease.active {
            return Ok(None);
        }
        let spec: JobSpec = serde_json::from_str(&job.spec_json).map_err(|e| format!("unreadable spec: {e}"))?;
        let (program, args, user_env) = match &spec.run {
            JobRun::Command { program, args, env } => (PathBuf::from(program), args.clone(), env.clone()),
            JobRun::Builtin { task, params } => {
                let binary = self.job_binary.clone().ok_or("suanli-job is not installed on this node")?;
                let params = serde_json::to_string(params).unwrap_or_default();
                (binary, vec!["--task".into(), task.clone(), "--params-json".into(), params], BTreeMap::new())
            }
        };
        let account = &lease.account;
        let key = (job.job_id, attempt.number);
        // The port is kept to the lease before anything of the attempt happens here (its inputs
        // may take a while; rank 0 may already trust this node), until the attempt is over.
        if self.firewall.kind() == FirewallKind::Nftables {
            let opening = self.rendezvous_opening(attempt, &nodes, rank, account.uid, job.job_id).await?;
            self.firewall.open(key, opening).await.map_err(|e| e.to_string())?;
        }
        // Everything below the lease's home is the lease's to change at any moment: it is
        // reached through descriptors, never followed through a link (lease_fs.rs).
        let lease_error = |e: LeaseFsError| e.to_string();
        let home = LeaseDir::open_home(&account.home, account.uid, account.gid).map_err(lease_error)?;
        let attempt_dir = Arc::new(home.make_dirs(&Path::new(".suanli-jobs").join(format!("{}-{}", job.job_id, attempt.number))).map_err(lease_error)?);
        let dir = attempt_dir.path().to_owned();
        let input_dir = attempt_dir.make_dirs(Path::new("in")).map_err(lease_error)?;
        let checkpoint_dir = attempt_dir.make_dirs(Path::new("checkpoint")).map_err(lease_error)?;
        attempt_dir.make_dirs(Path::new("out")).map_err(lease_error)?;
        let (inputs, outputs, checkpoints) = (dir.join("in"), dir.join("out"), dir.join("checkpoint"));
        // Inputs and the checkpoint to resume from arrive verified before the program starts.
        let mut fetch: Vec<(String, &LeaseDir, String)> = spec.inputs.iter().map(|i| (i.sha256.clone(), &input_dir, i.name.clone())).collect();
        let resume = checkpoints.join("resume");
        if !job.checkpoint_sha256.is_empty() {
            fetch.push((job.checkpoint_sha256.clone(), &checkpoint_dir, "resume".to_owned()));
        }
        if !fetch.is_empty() {
            let store = self
                .artifacts
                .as_ref()
                .and_then(|s| s.client(Some(&job.artifact_capability)))
                .ok_or("this node has no artifact store configured for the job's data")?;
            for (sha, into, name) in &fetch {
                let digest = sha.parse().map_err(|e: suanli_artifacts::StoreError| e.to_string())?;
                download_into_lease(&store, digest, into, name, self.files.deadline).await?;
            }
        }
        let log = attempt_dir.create_file(LOG, 0o600).map_err(lease_error)?;
        let devices: Vec<String> = mine.iter().filter_map(|i| attempt.card_indexes.get(*i)).map(u32::to_string).collect();
        let mut extra: Vec<(String, String)> = user_env.into_iter().collect();
        extra.extend([
            ("SUANLI_JOB_ID".to_owned(), job.job_id.to_string()),
            ("SUANLI_JOB_ATTEMPT".to_owned(), attempt.number.to_string()),
            ("SUANLI_JOB_DIR".to_owned(), dir.display().to_string()),
            ("SUANLI_JOB_RANK".to_owned(), rank.to_string()),
            ("SUANLI_JOB_NODES".to_owned(), nodes.len().to_string()),
            ("SUANLI_NODE_ID".to_owned(), self.node.0.to_string()),
            ("SUANLI_INPUT_DIR".to_owned(), inputs.display().to_string()),
            ("SUANLI_OUTPUT_DIR".to_owned(), outputs.display().to_string()),
            ("SUANLI_CHECKPOINT_DIR".to_owned(), checkpoints.display().to_string()),
        ]);
        // The rendezvous `torchrun` (and torch.distributed's env:// init) expects: the attempt's
        // nodes meet at rank 0's host, on a port of this job and attempt.
        let master = if attempt.rendezvous_host.is_empty() { "127.0.0.1".to_owned() } else { attempt.rendezvous_host.clone() };
        extra.extend([
            ("MASTER_ADDR".to_owned(), master),
            ("MASTER_PORT".to_owned(), rendezvous_port(job.job_id, attempt.number).to_string()),
            ("NNODES".to_owned(), nodes.len().to_string()),
            ("NODE_RANK".to_owned(), rank.to_string()),
            ("NPROC_PER_NODE".to_owned(), mine.len().max(1).to_string()),
        ]);
        if !job.checkpoint_sha256.is_empty() {
            extra.push(("SUANLI_RESUME_FROM".to_owned(), resume.display().to_string()));
        }
        let mut env = session_env(&lease, &extra);
        env.retain(|(k, _)| k != "CUDA_VISIBLE_DEVICES");
        env.push(("CUDA_VISIBLE_DEVICES".to_owned(), devices.join(",")));
        std::fs::write(marker, b"").map_err(|e| format!("{}: {e}", marker.display()))?;
        let stderr = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = tokio::process::Command::new(&program);
        command.args(&args).env_clear().envs(env).current_dir(&dir).stdin(std::process::Stdio::null()).stdout(log).stderr(stderr).kill_on_drop(true);
        // Its own process group, so stopping it stops what it forked.
        command.process_group(0);
        let sandbox = self.access.sandbox(&lease).map_err(|e| format!("the lease's sandbox: {e}"))?;
        sandbox.apply(&mut command);
        let mut child = command.spawn().map_err(|e| {
            let _ = std::fs::remove_file(marker);
            format!("{}: {e}", program.display())
        })?;
        let mut guard = None;
        if let Some(pid) = child.id() {
            // Which process it was, for an agent restarted after a crash (`kill_orphan`).
            let started = start_time(pid).unwrap_or(0);
            let _ = std::fs::write(marker, format!("{pid} {started}"));
            // And what stops it should this agent not come back (fence_guard.rs).
            match crate::fence_guard::spawn(pid, started, self.fence_after, &sandbox.cgroup_procs()) {
                Ok(g) => guard = Some(g),
                Err(e) => {
                    let _ = std::fs::remove_file(marker);
                    if let Some(group) = rustix::process::Pid::from_raw(pid as i32) {
                        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                    }
                    let _ = child.wait().await;
                    return Err(format!("the job's fence guard: {e}"));
                }
            }
        }
        tracing::info!(job = job.job_id, attempt = attempt.number, devices = %devices.join(","), "job attempt started");
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let out = Outputs { dir: attempt_dir.clone(), names: spec.outputs.clone() };
        let checkpoint = (rank == 0).then(|| Checkpoint {
            dir: attempt_dir.clone(),
            last: None,
            uploading: None,
            log_read: 0,
            progress: None,
            progress_sent: None,
            progress_reports: 0,
            log: LogShipping::default(),
            ending: None,
        });
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx => {
                    if let Some(group) = child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32)) {
                        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                    }
                    let _ = child.kill().await;
                    child.wait().await
                }
            };
            if let Some(mut guard) = guard {
                // The job has ended: the pipe's end tells the guard, which then finds no job.
                drop(guard.stdin.take());
                let _ = guard.wait().await;
            }
            let reason = match status {
                Ok(s) if s.success() => JobEndReason::Completed,
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    JobEndReason::ExitStatus(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)))
                }
                Err(e) => JobEndReason::StartFailed(e.to_string()),
            };
            let _ = ended.send(Ended { key, rank, reason, outputs: Some(out) });
        });
        let devices = mine.iter().filter_map(|i| attempt.card_indexes.get(*i).copied()).collect();
        Ok(Some(Running { kill: Some(kill_tx), devices, shared: spec.resources.shared, checkpoint }))
    }
}

impl JobRunner {
    /// What this node opens for an attempt's rendezvous port: locally, to the lease's user
    /// only; on rank 0, from outside, to the attempt's other nodes only.
    async fn rendezvous_opening(&self, attempt: &v1::JobAttempt, nodes: &[u64], rank: usize, uid: u32, job: u64) -> Result<Opening, String> {
        let port = rendezvous_port(job, attempt.number);
        if rank > 0 {
            return Ok(Opening { port, uid, peers: None });
        }
        if nodes.len() > 1 && attempt.node_hosts.len() != nodes.len() {
            return Err("the broker did not name the hosts of the attempt's nodes (an older broker): the rendezvous port cannot be kept to them".into());
        }
        let mut peers = Vec::new();
        for host in attempt.node_hosts.iter().skip(1) {
            peers.extend(firewall::resolve(host).await.map_err(|e| e.to_string())?);
        }
        Ok(Opening { port, uid, peers: Some(peers) })
    }
}

/// An attempt's process has ended (or never started): its cards are free, but the attempt
/// stays known here until the broker stops listing it: its end may still be saving its last
/// checkpoint, uploading its outputs or waiting for a broker, and must never look like an
/// attempt of an earlier agent, nor be started again.
fn note_ended(running: &mut BTreeMap<Key, Running>, to_report: &mut Vec<Ended>, ended: Ended) {
    let was = running.remove(&ended.key).map_or_else(Running::done, Running::ended);
    running.insert(ended.key, was);
    to_report.push(ended);
}

/// Stops every attempt on this node: no broker has answered for `silent`.
fn fence(running: &mut BTreeMap<Key, Running>, silent: Duration) {
    for (key, r) in running.iter_mut() {
        if let Some(kill) = r.kill.take() {
            tracing::warn!(job = key.0, attempt = key.1, ?silent, "no broker reachable: stopping the job attempt (self-fencing)");
            let _ = kill.send(());
        }
    }
}

/// A process's start time (clock ticks since boot, `/proc/PID/stat` field 22): with the PID,
/// it names one process, never a later one that reused the PID.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Kills the process group an earlier agent recorded in `marker`, if its leader is still that
/// very process.
pub(crate) fn kill_orphan(marker: &Path) {
    let recorded = std::fs::read_to_string(marker).unwrap_or_default();
    let mut fields = recorded.split_whitespace().map(|f| f.parse::<u64>().ok());
    let (Some(Some(pid)), Some(Some(started))) = (fields.next(), fields.next()) else { return };
    let Ok(pid32) = u32::try_from(pid) else { return };
    if start_time(pid32) == Some(started) {
        if let Some(group) = rustix::process::Pid::from_raw(pid32 as i32) {
            tracing::warn!(pid, marker = %marker.display(), "killing a process that outlived the previous agent");
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

/// Why an upload from a lease's directory did not happen: the lease's doing (final) or the
/// store's or the network's (worth retrying).
#[derive(Debug, thiserror::Error)]
enum UploadError {
    #[error("{0}")]
    Lease(LeaseFsError),
    #[error("{0}")]
    Transient(String),
}

/// Copies `rel` out of the lease's directory into the agent's staging area (on a blocking
/// thread: the copy is capped, never follows a link, never opens a FIFO for reading), uploads
/// the copy and removes it. `Ok(None)`: the lease has no such file.
async fn upload_from_lease(
    store: &ArtifactClient,
    dir: Arc<LeaseDir>,
    rel: PathBuf,
    staging: &Path,
    limits: FileLimits,
) -> Result<Option<suanli_artifacts::Digest>, UploadError> {
    std::fs::create_dir_all(staging).map_err(|e| UploadError::Transient(format!("{}: {e}", staging.display())))?;
    let staged = staging.join(format!("{:016x}", rand::random::<u64>()));
    let copy_to = staged.clone();
    let copied =
        tokio::task::spawn_blocking(move || dir.copy_out(&rel, limits.max_bytes, &copy_to)).await.map_err(|e| UploadError::Transient(e.to_string()))?;
    match copied {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(LeaseFsError::Io(path, e)) if path.starts_with(staging) => return Err(UploadError::Transient(format!("{}: {e}", path.display()))),
        Err(e) => return Err(UploadError::Lease(e)),
    }
    let digest = store.upload_file(&staged).await.map_err(|e| UploadError::Transient(e.to_string()));
    let _ = std::fs::remove_file(&staged);
    digest.map(Some)
}

/// Downloads an artifact into `name` in a lease's directory: written as `name.partial`, a file
/// root creates (never opens) and hands to the lease, renamed into place once verified.
async fn download_into_lease(store: &ArtifactClient, digest: suanli_artifacts::Digest, into: &LeaseDir, name: &str, deadline: Duration) -> Result<(), String> {
    let partial = format!("{name}.partial");
    let file = into.create_file(&partial, 0o600).map_err(|e| e.to_string())?;
    let mut file = tokio::fs::File::from_std(file);
    let fetched = tokio::time::timeout(deadline, store.download_into(digest, &mut file)).await;
    let fetched = match fetched {
        Ok(Ok(_)) => file.sync_all().await.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not downloaded within {deadline:?}")),
    };
    drop(file);
    match fetched {
        Ok(()) => into.rename(&partial, name).map_err(|e| e.to_string()),
        Err(why) => {
            let _ = into.remove_file(&partial);
            Err(format!("{}: {why}", into.path().join(name).display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{rendezvous_port, without_cut_character};

    #[test]
    fn each_attempt_meets_on_a_port_of_its_own_in_the_range() {
        assert_ne!(rendezvous_port(12, 1), rendezvous_port(12, 2), "a retry does not meet its predecessor");
        assert_ne!(rendezvous_port(12, 1), rendezvous_port(13, 1));
        for job in [0, 1, u64::MAX] {
            assert!((29_500..31_500).contains(&rendezvous_port(job, u32::MAX)));
        }
    }

    #[test]
    fn a_character_cut_at_the_end_waits_and_everything_else_goes() {
        let text = "loss 步".as_bytes(); // 步 is three bytes
        assert_eq!(without_cut_character(text), text.len());
        assert_eq!(without_cut_character(&text[..text.len() - 1]), 5, "two of three bytes wait");
        assert_eq!(without_cut_character(&text[..text.len() - 2]), 5, "one of three bytes waits");
        assert_eq!(without_cut_character(b""), 0);
        assert_eq!(without_cut_character(&[0xff, 0xfe]), 2, "not UTF-8: sent as it is");
        assert_eq!(without_cut_character("😀".as_bytes()), 4);
        assert_eq!(without_cut_character(&"😀".as_bytes()[..3]), 0);
    }
}
