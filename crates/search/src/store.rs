//! The saved form of a [`LibraryIndex`]: a directory holding a JSON header, `index.json`,
//! and the usearch data file it names.
//!
//! ```json
//! {
//!   "format": "suanli.vector-index/1",
//!   "model": "resnet18w32@sha256:…",
//!   "dim": 512,
//!   "metric": "cos",
//!   "count": 1234,
//!   "data": "vectors.3.usearch",
//!   "data_bytes": 2859122,
//!   "data_sha256": "…",
//!   "params": { "connectivity": 16, "expansion_add": 128, "expansion_search": 64 }
//! }
//! ```
//!
//! # Why it looks like this
//!
//! * **Crash safety without a journal.** A save writes the data under a *new* name
//!   (`vectors.<n>.usearch`, `n` one above any present), flushes it, then writes the header
//!   to a temporary file and renames it over `index.json`; the rename is the commit. A crash
//!   at any point leaves the previous header naming the previous, untouched data file.
//!   Files of older generations and leftovers of interrupted saves are removed only after
//!   the commit.
//! * **Refuse, don't guess.** The header is versioned (`format`); anything but
//!   [`FORMAT_V1`] is refused with [`SearchError::Format`]. The data file's length and
//!   SHA-256 are in the header and checked before usearch reads it: usearch trusts its
//!   input (neighbour ids index memory directly), so a truncated or altered file must never
//!   reach it. The header's model, dimension, metric and count are checked against the
//!   data file's own header as well.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use usearch::{Index, MetricKind, ScalarKind};

use crate::error::SearchError;
use crate::index::{native_options, usearch_error, IndexParams, LibraryIndex};
use crate::model::{ModelVersion, Space};

/// The header's format tag this version writes and reads.
pub const FORMAT_V1: &str = "suanli.vector-index/1";

/// The header's file name inside an index directory.
pub const HEADER_FILE: &str = "index.json";

const METRIC_COS: &str = "cos";
const DATA_PREFIX: &str = "vectors.";
const DATA_SUFFIX: &str = ".usearch";
const TMP_MARKER: &str = ".tmp-";

/// Just the format tag, read first so that other versions are refused by name.
#[derive(Deserialize)]
struct FormatOnly {
    format: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeaderV1 {
    format: String,
    model: ModelVersion,
    dim: u32,
    metric: String,
    count: u64,
    data: String,
    data_bytes: u64,
    data_sha256: String,
    params: IndexParams,
}

/// A data file written and flushed, whose header is not yet committed.
pub(crate) struct PendingSave {
    dir: PathBuf,
    header: HeaderV1,
}

impl LibraryIndex {
    /// Opens the index saved in `dir`.
    ///
    /// Refuses, with [`SearchError::Format`], a header of another format version or that
    /// does not parse, and a data file that is missing, of the wrong length or checksum, or
    /// whose contents disagree with the header. A missing `index.json` is
    /// [`SearchError::Io`] (`NotFound`): there is no saved index, rather than a broken one.
    pub fn open(dir: &Path) -> Result<Self, SearchError> {
        let header = read_header(dir)?;
        let space = Space { model: header.model.clone(), dim: header.dim };
        let data = dir.join(&header.data);
        verify_data_file(&data, &header)?;

        let data_str = data.to_str().ok_or_else(|| SearchError::Format(format!("path {} is not UTF-8", data.display())))?;
        let meta = Index::metadata(data_str).map_err(|e| SearchError::Format(format!("data file header: {e}")))?;
        if meta.dimensions != u64::from(header.dim)
            || meta.metric != MetricKind::Cos
            || meta.quantization != ScalarKind::F32
            || meta.multi
            || meta.count_present != header.count
        {
            return Err(SearchError::Format(format!(
                "data file disagrees with the header: dim {} metric {:?} scalar {:?} multi {} count {} \
                 (header: dim {} cos f32 count {})",
                meta.dimensions, meta.metric, meta.quantization, meta.multi, meta.count_present, header.dim, header.count
            )));
        }

        let index = Index::new(&native_options(&space, &header.params)).map_err(usearch_error)?;
        index.load(data_str).map_err(|e| SearchError::Format(format!("data file: {e}")))?;
        if index.size() as u64 != header.count || index.dimensions() != header.dim as usize {
            return Err(SearchError::Format(format!(
                "data file holds {} vectors of {} dimensions, the header says {} of {}",
                index.size(),
                index.dimensions(),
                header.count,
                header.dim
            )));
        }
        let mut this = LibraryIndex::from_parts(space, header.params, index);
        this.reserve_contexts()?;
        Ok(this)
    }

    /// Saves the index into `dir` (created if missing), atomically: until the header is
    /// renamed into place, a previous save in `dir` stays intact and is what
    /// [`open`](Self::open) reads. Not for two processes saving into one directory at once.
    pub fn save(&self, dir: &Path) -> Result<(), SearchError> {
        let pending = self.write_data(dir)?;
        pending.commit()
    }

    /// Step one of [`save`](Self::save): writes and flushes a new data file; the directory's
    /// current header (if any) still names the previous one.
    pub(crate) fn write_data(&self, dir: &Path) -> Result<PendingSave, SearchError> {
        fs::create_dir_all(dir)?;
        let generation = next_generation(dir)?;
        let name = format!("{DATA_PREFIX}{generation}{DATA_SUFFIX}");
        let tmp = dir.join(tmp_name(&name));
        let tmp_str =
            tmp.to_str().ok_or_else(|| SearchError::Io(io::Error::new(io::ErrorKind::InvalidInput, format!("path {} is not UTF-8", tmp.display()))))?;
        let written = self.index.save(tmp_str).map_err(usearch_error).and_then(|()| {
            let (len, sha) = digest_file(&tmp)?;
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, dir.join(&name))?;
            Ok((len, sha))
        });
        let (data_bytes, data_sha256) = match written {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        Ok(PendingSave {
            dir: dir.to_owned(),
            header: HeaderV1 {
                format: FORMAT_V1.to_owned(),
                model: self.space.model.clone(),
                dim: self.space.dim,
                metric: METRIC_COS.to_owned(),
                count: self.len() as u64,
                data: name,
                data_bytes,
                data_sha256,
                params: self.params,
            },
        })
    }

    /// Ensures usearch has capacity for the loaded vectors and one search context per
    /// search slot (a freshly loaded index has none to spare).
    fn reserve_contexts(&mut self) -> Result<(), SearchError> {
        let members = self.index.capacity().max(self.len());
        self.reserve_exact(members)
    }
}

impl PendingSave {
    /// Step two of a save: writes the header to a temporary file, flushes it, renames it
    /// over `index.json` (the commit), flushes the directory, then removes data files of
    /// older generations and leftovers of interrupted saves.
    pub(crate) fn commit(self) -> Result<(), SearchError> {
        let mut bytes = serde_json::to_vec_pretty(&self.header).map_err(|e| SearchError::Io(io::Error::other(e)))?;
        bytes.push(b'\n');
        let tmp = self.dir.join(tmp_name(HEADER_FILE));
        let written = write_and_rename(&tmp, &bytes, &self.dir.join(HEADER_FILE));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        // Best effort: a leftover file costs disk space, never correctness.
        let _ = remove_stale_files(&self.dir, &self.header.data);
        Ok(())
    }
}

/// Writes `bytes` to `tmp`, flushes it, renames it to `dest` and flushes the directory.
fn write_and_rename(tmp: &Path, bytes: &[u8], dest: &Path) -> io::Result<()> {
    let mut f = File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(tmp, dest)?;
    match dest.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

fn read_header(dir: &Path) -> Result<HeaderV1, SearchError> {
    let bytes = fs::read(dir.join(HEADER_FILE))?;
    let FormatOnly { format } = serde_json::from_slice(&bytes).map_err(|e| SearchError::Format(format!("{HEADER_FILE}: {e}")))?;
    if format != FORMAT_V1 {
        return Err(SearchError::Format(format!("unsupported format {format:?} (this build reads {FORMAT_V1:?})")));
    }
    let header: HeaderV1 = serde_json::from_slice(&bytes).map_err(|e| SearchError::Format(format!("{HEADER_FILE}: {e}")))?;
    if header.metric != METRIC_COS {
        return Err(SearchError::Format(format!("unsupported metric {:?}", header.metric)));
    }
    if parse_generation(&header.data).is_none() {
        return Err(SearchError::Format(format!("data file name {:?} is not vectors.<n>.usearch", header.data)));
    }
    if header.dim == 0 {
        return Err(SearchError::Format("dimension 0".to_owned()));
    }
    Ok(header)
}

fn verify_data_file(path: &Path, header: &HeaderV1) -> Result<(), SearchError> {
    let (len, sha) = match digest_file(path) {
        Ok(v) => v,
        Err(SearchError::Io(e)) if e.kind() == io::ErrorKind::NotFound => return Err(SearchError::Format(format!("data file {} is missing", header.data))),
        Err(e) => return Err(e),
    };
    if len != header.data_bytes {
        return Err(SearchError::Format(format!("data file {} has {len} bytes, the header says {}", header.data, header.data_bytes)));
    }
    if !sha.eq_ignore_ascii_case(&header.data_sha256) {
        return Err(SearchError::Format(format!("data file {} does not match its checksum", header.data)));
    }
    Ok(())
}

/// Length and hex SHA-256 of a file, streamed.
fn digest_file(path: &Path) -> Result<(u64, String), SearchError> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex::encode(hasher.finalize())))
}

/// `vectors.<n>.usearch` → `n`.
fn parse_generation(name: &str) -> Option<u64> {
    let n = name.strip_prefix(DATA_PREFIX)?.strip_suffix(DATA_SUFFIX)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// One above the highest data file generation present (committed or stray), so a save
/// never overwrites a file that a header may name.
fn next_generation(dir: &Path) -> Result<u64, SearchError> {
    let mut max = 0;
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(g) = name.to_str().and_then(parse_generation) {
            max = max.max(g);
        }
    }
    Ok(max.saturating_add(1))
}

fn tmp_name(final_name: &str) -> String {
    format!(".{final_name}{TMP_MARKER}{}", std::process::id())
}

fn is_ours_and_stale(name: &str, current_data: &str) -> bool {
    if name == current_data {
        return false;
    }
    if parse_generation(name).is_some() {
        return true;
    }
    name.starts_with('.') && name.contains(TMP_MARKER) && (name.starts_with(&format!(".{HEADER_FILE}")) || name.starts_with(&format!(".{DATA_PREFIX}")))
}

fn remove_stale_files(dir: &Path, current_data: &str) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str() {
            if is_ours_and_stale(name, current_data) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_index() -> LibraryIndex {
        let space = Space { model: "m@1".parse().expect("model"), dim: 2 };
        let mut idx = LibraryIndex::create(space.clone(), IndexParams::default()).expect("create");
        idx.insert(1, &space.model, &[1.0, 0.0]).expect("insert");
        idx.insert(2, &space.model, &[0.0, 1.0]).expect("insert");
        idx
    }

    #[test]
    fn crash_between_data_and_header_leaves_previous_save_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut idx = small_index();
        idx.save(dir.path()).expect("first save");
        let model = idx.space().model.clone();
        idx.insert(3, &model, &[0.6, 0.8]).expect("insert");
        // The crash: the new data file is written, the header never committed.
        let pending = idx.write_data(dir.path()).expect("write data");
        assert!(dir.path().join(&pending.header.data).exists());
        drop(pending);
        let reopened = LibraryIndex::open(dir.path()).expect("previous save opens");
        assert_eq!(reopened.len(), 2);
        assert!(!reopened.contains(3));
        // The next full save skips the stray generation and cleans it up.
        idx.save(dir.path()).expect("second save");
        let reopened = LibraryIndex::open(dir.path()).expect("open");
        assert_eq!(reopened.len(), 3);
        let names: Vec<String> = fs::read_dir(dir.path()).expect("read_dir").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"vectors.3.usearch".to_owned()), "{names:?}");
    }

    #[test]
    fn generations_parse_strictly() {
        assert_eq!(parse_generation("vectors.1.usearch"), Some(1));
        assert_eq!(parse_generation("vectors.42.usearch"), Some(42));
        for bad in ["vectors..usearch", "vectors.-1.usearch", "../vectors.1.usearch", "vectors.1.usearch.tmp", "x"] {
            assert_eq!(parse_generation(bad), None, "{bad}");
        }
    }

    #[test]
    fn stale_file_selection_spares_foreign_files() {
        assert!(is_ours_and_stale("vectors.1.usearch", "vectors.2.usearch"));
        assert!(!is_ours_and_stale("vectors.2.usearch", "vectors.2.usearch"));
        assert!(is_ours_and_stale(".index.json.tmp-12", "vectors.2.usearch"));
        assert!(is_ours_and_stale(".vectors.3.usearch.tmp-12", "vectors.2.usearch"));
        assert!(!is_ours_and_stale("notes.txt", "vectors.2.usearch"));
        assert!(!is_ours_and_stale(HEADER_FILE, "vectors.2.usearch"));
    }
}
