//! The settlement journal: every finished cross-member lease's settlement, signed by both
//! members, one JSON line each in `<state_dir>/settlements.jsonl`, appended and synced before
//! it is acknowledged. Both members keep the same records (the owner when it gets the
//! countersignature, the requester when it makes it), so the report each computes from its own
//! journal — who owes whom how much — agrees.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use suanli_federation::{Membership, SignedSettlement};

/// The journal file's format (each line is a [`Line`]).
pub const JOURNAL_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Line {
    format: u32,
    settlement: SignedSettlement,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{path}:{line}: {why}")]
    Corrupt { path: String, line: usize, why: String },
    #[error("the settlement does not verify: {0}")]
    Settlement(#[from] suanli_federation::calls::SettlementError),
}

/// The journal, loaded; appends go to the file first.
#[derive(Clone)]
pub struct Journal {
    path: PathBuf,
    records: Arc<Mutex<BTreeMap<(String, u64), SignedSettlement>>>,
}

impl Journal {
    /// Opens (or starts) the journal in `dir`. A line that does not parse is refused with its
    /// number: money records are never skipped silently. A torn last line (a crash while
    /// appending, never acknowledged) is dropped.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        let path = dir.join("settlements.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(JournalError::Io(path.display().to_string(), e)),
        };
        let mut records = BTreeMap::new();
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let last = n + 1 == lines.len();
            match serde_json::from_str::<Line>(line) {
                Ok(Line { format: JOURNAL_FORMAT, settlement }) => {
                    records.insert((settlement.settlement.owner.clone(), settlement.settlement.owner_lease), settlement);
                }
                Ok(Line { format, .. }) => {
                    return Err(JournalError::Corrupt { path: path.display().to_string(), line: n + 1, why: format!("journal format {format}") })
                }
                Err(_) if last && !complete => tracing::warn!(path = %path.display(), "a torn last line (never acknowledged) dropped"),
                Err(e) => return Err(JournalError::Corrupt { path: path.display().to_string(), line: n + 1, why: e.to_string() }),
            }
        }
        Ok(Journal { path, records: Arc::new(Mutex::new(records)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u64), SignedSettlement>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a settlement both members signed (checked against `membership`); a record
    /// already kept is not written twice. Synced before returning.
    pub fn record(&self, settlement: SignedSettlement, membership: &Membership) -> Result<bool, JournalError> {
        settlement.verify(membership, true)?;
        let key = (settlement.settlement.owner.clone(), settlement.settlement.owner_lease);
        let mut records = self.lock();
        if records.contains_key(&key) {
            return Ok(false);
        }
        let io = |e| JournalError::Io(self.path.display().to_string(), e);
        let mut line = serde_json::to_string(&Line { format: JOURNAL_FORMAT, settlement: settlement.clone() }).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(io)?;
        file.write_all(line.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        records.insert(key, settlement);
        Ok(true)
    }

    /// The record of the owner's lease `owner_lease`, if journalled.
    pub fn get(&self, owner: &str, owner_lease: u64) -> Option<SignedSettlement> {
        self.lock().get(&(owner.to_owned(), owner_lease)).cloned()
    }

    pub fn all(&self) -> Vec<SignedSettlement> {
        self.lock().values().cloned().collect()
    }

    /// Who owes whom: one row per (requester, owner, currency), from every record.
    pub fn report(&self, membership: &Membership) -> Vec<ReportRow> {
        let name = |peer: &str| peer.parse().ok().and_then(|p| membership.member(&p).map(|m| m.name.clone())).unwrap_or_else(|| peer.to_owned());
        let mut rows: BTreeMap<(String, String, String), ReportRow> = BTreeMap::new();
        for s in self.lock().values().map(|s| &s.settlement) {
            let row = rows.entry((s.requester.clone(), s.owner.clone(), s.currency.clone())).or_insert_with(|| ReportRow {
                debtor: name(&s.requester),
                debtor_peer_id: s.requester.clone(),
                creditor: name(&s.owner),
                creditor_peer_id: s.owner.clone(),
                currency: s.currency.clone(),
                amount_minor: 0,
                leases: 0,
            });
            row.amount_minor += s.charged_minor;
            row.leases += 1;
        }
        rows.into_values().collect()
    }
}

/// `debtor` (the requesting member) owes `creditor` (the owning member) `amount_minor` for
/// `leases` settled leases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRow {
    pub debtor: String,
    pub debtor_peer_id: String,
    pub creditor: String,
    pub creditor_peer_id: String,
    pub currency: String,
    pub amount_minor: i64,
    pub leases: u64,
}
