//! Datasets as a service of their own: resumable uploads, imports into versions, per-image
//! content addressing, archives for jobs and for `suanli data pull`.
//!
//! Where things live:
//! - **Bytes**: every image once, by its SHA-256, in a content-addressed store of the portal's
//!   own (`suanli_artifacts::Store`: a local folder by default, an S3 bucket where configured);
//!   two datasets (or two versions, or two accounts) holding the same picture hold one copy.
//! - **What a version is**: rows in SQL (`datasets`, `dataset_versions`, `dataset_files`); a
//!   version never changes once committed, so a job that trained on `digits@2` can be traced to
//!   the exact bytes.
//! - **Uploads under way**: `<staging>/<upload id>`, one file per upload, grown by tus `PATCH`es
//!   (`api/datasets.rs`); the SQL row says how long it will be and which SHA-256 it must have.
//!
//! Why the portal and not the job artifact store: datasets are personal data with owners,
//! shares and quotas, which only the portal knows; the artifact store keeps what jobs read and
//! write, and gets a version's archive when a job names the version as an input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use suanli_artifacts::{Digest, Store, StoreError};
use suanli_cv::annotation::{self, Object};
use suanli_cv::intake::{IntakeLimits, RejectKind, Rejected};

/// Where datasets' bytes go, and the limits on them.
pub struct DatasetStore {
    blobs: Arc<dyn Store>,
    staging: PathBuf,
    /// Bytes one account's datasets and unfinished uploads may take.
    pub quota_bytes: u64,
    /// The largest single upload.
    pub max_upload_bytes: u64,
    /// Uploads with a `PATCH` under way: a second one at the same time is refused, so two
    /// writers never interleave their bytes in one file.
    patching: Mutex<HashSet<String>>,
    /// Held from an upload's quota check to its record.
    pub quota_lock: tokio::sync::Mutex<()>,
    /// Thumbnails decoded at once.
    pub thumbnails: tokio::sync::Semaphore,
}

/// The defaults: 20 GiB an account, 64 GiB an upload.
pub const DEFAULT_QUOTA_BYTES: u64 = 20 << 30;
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 64 << 30;
/// One file inside an archive is read into memory to be checked: at most this large.
const MAX_FILE_BYTES: u64 = 256 << 20;
/// Thumbnails decoded at the same time (each may take a large picture's pixels).
const THUMBNAILS_AT_ONCE: usize = 4;
/// The largest picture a thumbnail is made of (64 M pixels, 192 MiB as RGB).
pub const THUMBNAIL_MAX_PIXELS: u64 = 64 << 20;
/// A version holds at most this many files.
pub const MAX_ITEMS: usize = 2_000_000;

impl DatasetStore {
    /// `staging` is created if missing; what an earlier run left there stays (uploads resume
    /// across restarts).
    pub fn new(blobs: Arc<dyn Store>, staging: &Path, quota_bytes: u64, max_upload_bytes: u64) -> std::io::Result<DatasetStore> {
        std::fs::create_dir_all(staging)?;
        Ok(DatasetStore {
            blobs,
            staging: staging.to_owned(),
            quota_bytes,
            max_upload_bytes,
            patching: Mutex::new(HashSet::new()),
            quota_lock: tokio::sync::Mutex::new(()),
            thumbnails: tokio::sync::Semaphore::new(THUMBNAILS_AT_ONCE),
        })
    }

    /// The embedded default: blobs and staging under one folder.
    pub fn local(dir: &Path, quota_bytes: u64) -> Result<DatasetStore, StoreError> {
        let blobs = suanli_artifacts::LocalStore::open(&dir.join("blobs"), MAX_FILE_BYTES.max(DEFAULT_MAX_UPLOAD_BYTES))?;
        Ok(DatasetStore::new(Arc::new(blobs), &dir.join("uploads"), quota_bytes, DEFAULT_MAX_UPLOAD_BYTES)?)
    }

    pub fn blobs(&self) -> &Arc<dyn Store> {
        &self.blobs
    }

    /// The staging file of an upload. IDs are checked to be the portal's own shape first.
    pub fn staged(&self, upload: &str) -> Option<PathBuf> {
        is_upload_id(upload).then(|| self.staging.join(upload))
    }

    /// Marks `upload` as being written; `None` while another request writes it.
    pub fn begin_patch(&self, upload: &str) -> Option<PatchGuard<'_>> {
        let mut busy = self.patching.lock().unwrap_or_else(|e| e.into_inner());
        busy.insert(upload.to_owned()).then(|| PatchGuard { store: self, upload: upload.to_owned() })
    }

    /// Where uploads are staged (and archives for jobs are built).
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }
}

/// Stores one file's bytes unless the same content is stored already.
pub async fn keep_blob(blobs: &dyn Store, bytes: Vec<u8>, digest: Digest) -> Result<(), StoreError> {
    match blobs.size(digest).await {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound(_)) => blobs.put(Box::new(std::io::Cursor::new(bytes)), Some(digest)).await.map(|_| ()),
        Err(e) => Err(e),
    }
}

/// While held, its upload is being written.
pub struct PatchGuard<'a> {
    store: &'a DatasetStore,
    upload: String,
}

impl Drop for PatchGuard<'_> {
    fn drop(&mut self) {
        self.store.patching.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.upload);
    }
}

/// Upload IDs are 32 lower-case hex digits (128 random bits).
pub fn new_upload_id() -> String {
    hex::encode(crate::crypto::random_bytes::<16>())
}

pub fn is_upload_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How labels are read from an import.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// The first folder of a file's name is its class (`cats/a.jpg` → `cats`).
    #[default]
    Folders,
    /// No class labels (annotation files still count).
    None,
}

/// One image of a version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileEntry {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub label: Option<String>,
    pub width: u32,
    pub height: u32,
    /// Boxes, polygons and points from COCO, VOC or YOLO files that came with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub objects: Vec<Object>,
}

/// What one import found, file by file.
#[derive(Debug, Default)]
pub struct Imported {
    pub files: Vec<FileEntry>,
    /// The first rejections (`ImportLimits::rejections_listed`); `rejected_count` counts all.
    pub rejected: Vec<Rejected>,
    pub rejected_count: u64,
    /// `(name, name of the first file with the same bytes)`: kept once.
    pub duplicates: Vec<(String, String)>,
    /// Objects attached to images from annotation files.
    pub annotations: u64,
}

/// What an upload holds, as an import reads it.
pub enum UploadKind {
    Image,
    Tar { gzip: bool },
}

impl UploadKind {
    pub fn of(filename: &str) -> UploadKind {
        let lower = filename.to_ascii_lowercase();
        if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
            UploadKind::Tar { gzip: true }
        } else if lower.ends_with(".tar") {
            UploadKind::Tar { gzip: false }
        } else {
            UploadKind::Image
        }
    }
}

/// A file name inside a dataset: relative, `/`-separated, no `.`/`..`/empty parts, printable,
/// at most 512 bytes. The same rule for uploads' own names and for archive entries, so a
/// name can always be written back out as a path under a folder (`suanli data pull`).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 512 {
        return Err("a name of 1 to 512 bytes".into());
    }
    if name.starts_with('/') || name.contains('\\') || name.chars().any(char::is_control) {
        return Err("a relative path with '/' between folders, no control characters".into());
    }
    if name.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err("no empty, '.' or '..' parts".into());
    }
    Ok(())
}

/// What an import may take: bytes of accepted pictures (the account's quota left), entries
/// read, and rejections listed one by one (the rest are counted).
#[derive(Clone, Copy, Debug)]
pub struct ImportLimits {
    pub bytes: u64,
    pub entries: usize,
    pub rejections_listed: usize,
}

impl ImportLimits {
    pub fn with_bytes(bytes: u64) -> ImportLimits {
        ImportLimits { bytes, entries: MAX_ITEMS, rejections_listed: 1_000 }
    }
}

/// Why an import stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the archive does not read: {0}")]
    Unreadable(std::io::Error),
    #[error("more than {0} entries")]
    TooManyEntries(usize),
    #[error("the pictures take more than the {0} bytes left of the quota")]
    OverQuota(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads an upload (`path`, staged whole and checked) into images and annotations. Runs on a
/// blocking thread: decoding is CPU work. Images go to the store through `keep` as they are
/// found (each content once); every bad file becomes a `Rejected` with its reason. An archive
/// is read as it streams (twice: once for its names, once for its files), so no more than one
/// file is in memory at a time.
pub fn import_upload(
    path: &Path,
    filename: &str,
    labels: LabelSource,
    limits: ImportLimits,
    keep: &mut dyn FnMut(Vec<u8>, Digest) -> Result<(), StoreError>,
) -> Result<Imported, ImportError> {
    let mut importer = Importer { labels, limits, out: Imported::default(), seen: HashMap::new(), notes: Vec::new(), accepted_bytes: 0, keep };
    match UploadKind::of(filename) {
        UploadKind::Image => {
            let size = std::fs::metadata(path).map_err(StoreError::from)?.len();
            if size > MAX_FILE_BYTES {
                importer.reject(filename.to_owned(), format!("{size} bytes; one file may have at most {MAX_FILE_BYTES}"), RejectKind::TooLarge);
            } else {
                // The name it was uploaded under, folders included (`red/new.png` is a `red`).
                importer.take(filename.to_owned(), std::fs::read(path).map_err(StoreError::from)?)?;
            }
        }
        UploadKind::Tar { gzip } => {
            let open = || -> Result<tar::Archive<Box<dyn Read>>, ImportError> {
                let file = std::fs::File::open(path).map_err(StoreError::from)?;
                let reader: Box<dyn Read> = if gzip { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
                Ok(tar::Archive::new(reader))
            };
            // A folder packed with its own name (`tar cf d.tar digits/`) reads like one packed
            // from inside it (`tar cf d.tar -C digits .`).
            let prefix = common_folder(&entry_names(open()?, limits.entries)?);
            importer.take_tar(open()?, prefix.as_deref())?;
        }
    }
    let Importer { mut out, notes, .. } = importer;
    attach_annotations(&mut out, notes);
    Ok(out)
}

/// The names of an archive's regular files (its first pass).
fn entry_names(mut archive: tar::Archive<Box<dyn Read>>, limit: usize) -> Result<Vec<String>, ImportError> {
    let mut names = Vec::new();
    for (n, entry) in archive.entries().map_err(ImportError::Unreadable)?.enumerate() {
        if n >= limit {
            return Err(ImportError::TooManyEntries(limit));
        }
        let entry = entry.map_err(ImportError::Unreadable)?;
        if matches!(entry.header().entry_type(), tar::EntryType::Regular | tar::EntryType::Continuous) {
            names.push(String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./").to_owned());
        }
    }
    Ok(names)
}

fn base_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// An annotation file, kept aside until every image of the import is known.
struct LabelFile {
    name: String,
    bytes: Vec<u8>,
}

/// Annotation files are small; one larger than this is refused rather than held.
const MAX_LABEL_FILE_BYTES: u64 = 64 << 20;

struct Importer<'k> {
    labels: LabelSource,
    limits: ImportLimits,
    out: Imported,
    /// SHA-256 → the first name it came under.
    seen: HashMap<String, String>,
    notes: Vec<LabelFile>,
    accepted_bytes: u64,
    keep: &'k mut dyn FnMut(Vec<u8>, Digest) -> Result<(), StoreError>,
}

impl Importer<'_> {
    fn reject(&mut self, name: String, reason: String, kind: RejectKind) {
        self.out.rejected_count += 1;
        if self.out.rejected.len() < self.limits.rejections_listed {
            self.out.rejected.push(Rejected { name, reason, kind });
        }
    }

    fn take_tar(&mut self, mut archive: tar::Archive<Box<dyn Read>>, prefix: Option<&str>) -> Result<(), ImportError> {
        for (n, entry) in archive.entries().map_err(ImportError::Unreadable)?.enumerate() {
            if n >= self.limits.entries {
                return Err(ImportError::TooManyEntries(self.limits.entries));
            }
            let mut entry = entry.map_err(ImportError::Unreadable)?;
            let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let mut name = raw_name.trim_start_matches("./").to_owned();
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {}
                tar::EntryType::Directory => continue,
                other => {
                    self.reject(name, format!("not a regular file ({other:?}): links are not followed"), RejectKind::UnsupportedFormat);
                    continue;
                }
            }
            if let Some(rest) = prefix.and_then(|p| name.strip_prefix(p)).and_then(|rest| rest.strip_prefix('/')) {
                name = rest.to_owned();
            }
            if let Err(why) = check_name(&name) {
                self.reject(name, format!("refused name: {why}"), RejectKind::Io);
                continue;
            }
            let size = entry.header().size().map_err(ImportError::Unreadable)?;
            let limit = if is_annotation_file(&name) { MAX_LABEL_FILE_BYTES } else { MAX_FILE_BYTES };
            if size > limit {
                self.reject(name, format!("{size} bytes; one such file may have at most {limit}"), RejectKind::TooLarge);
                continue;
            }
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).map_err(ImportError::Unreadable)?;
            self.take(name, bytes)?;
        }
        Ok(())
    }

    fn take(&mut self, name: String, bytes: Vec<u8>) -> Result<(), ImportError> {
        if is_annotation_file(&name) {
            self.notes.push(LabelFile { name, bytes });
            return Ok(());
        }
        let limits = IntakeLimits { max_file_bytes: MAX_FILE_BYTES, ..IntakeLimits::default() };
        let image = match suanli_cv::intake::inspect_bytes(name.clone(), &bytes, &limits) {
            Ok(image) => image,
            Err(e) => {
                self.reject(name, e.to_string(), e.kind());
                return Ok(());
            }
        };
        if let Some(first) = self.seen.get(&image.sha256) {
            self.out.duplicates.push((name, first.clone()));
            return Ok(());
        }
        let size = bytes.len() as u64;
        self.accepted_bytes += size;
        if self.accepted_bytes > self.limits.bytes {
            return Err(ImportError::OverQuota(self.limits.bytes));
        }
        self.seen.insert(image.sha256.clone(), name.clone());
        let digest: Digest = image.sha256.parse()?;
        (self.keep)(bytes, digest)?;
        let label = match self.labels {
            LabelSource::Folders => name.split_once('/').map(|(folder, _)| folder.to_owned()),
            LabelSource::None => None,
        };
        self.out.files.push(FileEntry { name, sha256: image.sha256, size, label, width: image.width, height: image.height, objects: Vec::new() });
        Ok(())
    }
}

/// The one top-level folder every name is under, when the names below it still have folders
/// of their own (`digits/zero/a.png`): a lone class folder (`cats/a.png`) is a label, kept.
fn common_folder(names: &[String]) -> Option<String> {
    let mut common: Option<&str> = None;
    for name in names {
        let (first, _) = name.split_once('/')?;
        match common {
            None => common = Some(first),
            Some(c) if c == first => {}
            Some(_) => return None,
        }
    }
    let folder = common?;
    names.iter().any(|n| n[folder.len() + 1..].contains('/')).then(|| folder.to_owned())
}

fn is_annotation_file(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".json") || lower.ends_with(".xml") || lower.ends_with(".txt") || lower.ends_with(".names")
}

/// Reads COCO (`*.json`), Pascal VOC (`*.xml`) and YOLO (`*.txt` beside `classes.txt` or
/// `*.names`) files and attaches their objects to the images they name (by file name); a file
/// that does not read, or names no image of the import, is rejected with the reason.
fn attach_annotations(out: &mut Imported, notes: Vec<LabelFile>) {
    let mut by_base: HashMap<String, Vec<usize>> = HashMap::new();
    let mut by_stem: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, f) in out.files.iter().enumerate() {
        let base = base_name(&f.name).to_owned();
        let stem = base.rsplit_once('.').map_or(base.clone(), |(s, _)| s.to_owned());
        by_base.entry(base).or_default().push(i);
        by_stem.entry(stem).or_default().push(i);
    }
    let categories: Vec<String> = notes
        .iter()
        .find(|n| base_name(&n.name) == "classes.txt" || n.name.ends_with(".names"))
        .map(|n| annotation::yolo::read_classes(&String::from_utf8_lossy(&n.bytes)))
        .unwrap_or_default();
    let reject = |out: &mut Imported, name: &str, reason: String| {
        out.rejected_count += 1;
        out.rejected.push(Rejected { name: name.to_owned(), reason, kind: RejectKind::Corrupt });
    };
    for note in notes {
        let lower = note.name.to_ascii_lowercase();
        let base = base_name(&note.name);
        if base == "classes.txt" || lower.ends_with(".names") {
            continue;
        }
        if lower.ends_with(".json") {
            match annotation::coco::read(&note.bytes) {
                Ok(set) => {
                    for image in set.images {
                        match by_base.get(base_name(&image.file_name)) {
                            Some(found) => {
                                for &i in found {
                                    out.annotations += image.objects.len() as u64;
                                    out.files[i].objects.extend(image.objects.iter().cloned());
                                }
                            }
                            None if image.objects.is_empty() => {}
                            None => reject(out, &note.name, format!("COCO names {} which is not among the images", image.file_name)),
                        }
                    }
                }
                Err(e) => reject(out, &note.name, format!("not a COCO file: {e}")),
            }
        } else if lower.ends_with(".xml") {
            match annotation::voc::read(&note.bytes) {
                Ok(image) => match by_base.get(base_name(&image.file_name)) {
                    Some(found) => {
                        for &i in found {
                            out.annotations += image.objects.len() as u64;
                            out.files[i].objects.extend(image.objects.iter().cloned());
                        }
                    }
                    None => reject(out, &note.name, format!("VOC names {} which is not among the images", image.file_name)),
                },
                Err(e) => reject(out, &note.name, format!("not a Pascal VOC file: {e}")),
            }
        } else {
            let stem = base.rsplit_once('.').map_or(base, |(s, _)| s);
            let Some(found) = by_stem.get(stem).cloned() else {
                reject(out, &note.name, "a YOLO label file whose image is not among the images".into());
                continue;
            };
            if categories.is_empty() {
                reject(out, &note.name, "YOLO labels need classes.txt (or a .names file) with the class names".into());
                continue;
            }
            for i in found {
                let (w, h) = (out.files[i].width, out.files[i].height);
                match annotation::yolo::read(&String::from_utf8_lossy(&note.bytes), w, h, &categories) {
                    Ok(objects) => {
                        out.annotations += objects.len() as u64;
                        out.files[i].objects.extend(objects);
                    }
                    Err(e) => reject(out, &note.name, format!("not a YOLO label file: {e}")),
                }
            }
        }
    }
    out.rejected.sort_by(|a, b| a.name.cmp(&b.name));
}

/// The SHA-256 of a whole file, on a blocking thread.
pub async fn hash_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Gives a file's bytes, for writing an archive.
pub type OpenFile<'a> = dyn FnMut(&FileEntry) -> Result<Box<dyn Read + 'a>, StoreError> + 'a;

/// Writes a version as a tar archive: every file at its name, in name order, with fixed
/// modes, owners and times, so the same version always makes the same bytes (and so the same
/// artifact when a job reads it). `open` gives each file's bytes.
pub fn write_archive<W: std::io::Write>(out: W, files: &[FileEntry], open: &mut OpenFile<'_>) -> Result<W, StoreError> {
    let mut sorted: Vec<&FileEntry> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Deterministic);
    for file in sorted {
        let mut header = tar::Header::new_gnu();
        header.set_size(file.size);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        let reader = open(file)?;
        builder.append_data(&mut header, &file.name, reader)?;
    }
    Ok(builder.into_inner()?)
}

/// Label counts of a version (`""` for unlabelled files).
pub fn label_counts(files: &[FileEntry]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for f in files {
        *counts.entry(f.label.clone().unwrap_or_default()).or_insert(0) += 1;
        for object in &f.objects {
            *counts.entry(format!("object:{}", object.category)).or_insert(0) += 1;
        }
    }
    counts
}

/// A reference to a dataset version as people write it: `name`, `name@3`, `owner/name@3`, or
/// the numeric ID in place of the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetRef {
    pub owner: Option<String>,
    pub name: String,
    /// `None`: the latest.
    pub version: Option<u32>,
}

impl DatasetRef {
    pub fn parse(s: &str) -> Result<DatasetRef, String> {
        let (path, version) = match s.rsplit_once('@') {
            Some((path, v)) => (path, Some(v.parse::<u32>().ok().filter(|v| *v > 0).ok_or_else(|| format!("{v:?} is not a version number"))?)),
            None => (s, None),
        };
        let (owner, name) = match path.split_once('/') {
            Some((owner, name)) => (Some(owner.to_owned()), name),
            None => (None, path),
        };
        if name.is_empty() || owner.as_deref() == Some("") {
            return Err(format!("{s:?}: write NAME, NAME@VERSION or OWNER/NAME@VERSION"));
        }
        Ok(DatasetRef { owner, name: name.to_owned(), version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, shade: u8) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(width, height, image::Rgb([shade, 0, 255 - shade]));
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).expect("png");
        out.into_inner()
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, bytes) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *bytes).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn import(entries: &[(&str, &[u8])], labels: LabelSource) -> (Imported, Vec<Digest>) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("up.tar");
        std::fs::write(&path, tar_of(entries)).expect("write");
        let mut kept = Vec::new();
        let imported = import_upload(&path, "up.tar", labels, ImportLimits::with_bytes(u64::MAX), &mut |_, d| {
            kept.push(d);
            Ok(())
        })
        .expect("import");
        (imported, kept)
    }

    #[test]
    fn class_folders_become_labels_and_a_wrapping_folder_is_dropped() {
        let (a, b) = (png(4, 3, 10), png(4, 3, 200));
        let (imported, kept) = import(&[("digits/zero/a.png", &a), ("digits/one/b.png", &b)], LabelSource::Folders);
        let names: Vec<(&str, Option<&str>)> = imported.files.iter().map(|f| (f.name.as_str(), f.label.as_deref())).collect();
        assert_eq!(names, [("zero/a.png", Some("zero")), ("one/b.png", Some("one"))]);
        assert_eq!((imported.files[0].width, imported.files[0].height), (4, 3));
        assert_eq!(kept.len(), 2);
    }

    #[test]
    fn a_lone_class_folder_stays_a_label() {
        let (a, b) = (png(4, 3, 10), png(4, 3, 200));
        let (imported, _) = import(&[("cats/a.png", &a), ("cats/b.png", &b)], LabelSource::Folders);
        let names: Vec<(&str, Option<&str>)> = imported.files.iter().map(|f| (f.name.as_str(), f.label.as_deref())).collect();
        assert_eq!(names, [("cats/a.png", Some("cats")), ("cats/b.png", Some("cats"))]);
    }

    #[test]
    fn an_import_stops_at_the_quota_left_and_lists_only_the_first_rejections() {
        let (a, b) = (png(8, 8, 1), png(8, 8, 2));
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("up.tar");
        std::fs::write(&path, tar_of(&[("x/a.png", &a), ("y/b.png", &b)])).expect("write");
        let over = import_upload(&path, "up.tar", LabelSource::Folders, ImportLimits::with_bytes(a.len() as u64 + 1), &mut |_, _| Ok(()));
        assert!(matches!(over, Err(ImportError::OverQuota(_))), "{over:?}");
        let junk: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("j/{i}.bin"), vec![1u8; 3])).collect();
        let entries: Vec<(&str, &[u8])> = junk.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        std::fs::write(&path, tar_of(&entries)).expect("write");
        let limits = ImportLimits { rejections_listed: 2, ..ImportLimits::with_bytes(u64::MAX) };
        let imported = import_upload(&path, "up.tar", LabelSource::Folders, limits, &mut |_, _| Ok(())).expect("import");
        assert_eq!((imported.rejected.len(), imported.rejected_count), (2, 5));
        let limits = ImportLimits { entries: 3, ..ImportLimits::with_bytes(u64::MAX) };
        assert!(matches!(import_upload(&path, "up.tar", LabelSource::Folders, limits, &mut |_, _| Ok(())), Err(ImportError::TooManyEntries(3))));
    }

    #[test]
    fn a_corrupt_image_is_named_with_its_reason_and_the_rest_imports() {
        let good = png(4, 4, 1);
        let mut cut = png(64, 64, 2);
        cut.truncate(cut.len() / 2);
        let (imported, kept) = import(&[("a/good.png", &good), ("b/cut.png", &cut), ("b/notes.bin", b"hello")], LabelSource::Folders);
        assert_eq!(imported.files.len(), 1);
        assert_eq!(kept.len(), 1);
        let rejected: Vec<(&str, RejectKind)> = imported.rejected.iter().map(|r| (r.name.as_str(), r.kind)).collect();
        assert!(rejected.contains(&("b/cut.png", RejectKind::Corrupt)), "{rejected:?}");
        assert!(rejected.contains(&("b/notes.bin", RejectKind::UnsupportedFormat)), "{rejected:?}");
    }

    #[test]
    fn the_same_picture_twice_is_stored_once() {
        let a = png(5, 5, 7);
        let (imported, kept) = import(&[("x/a.png", &a), ("y/a-copy.png", &a)], LabelSource::Folders);
        assert_eq!(imported.files.len(), 1);
        assert_eq!(imported.duplicates, vec![("y/a-copy.png".to_owned(), "x/a.png".to_owned())]);
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn links_and_escaping_names_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "evil.png", "/etc/shadow").expect("link");
        let bytes = b.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("l.tar");
        std::fs::write(&path, bytes).expect("write");
        let imported =
            import_upload(&path, "l.tar", LabelSource::None, ImportLimits::with_bytes(u64::MAX), &mut |_, _| panic!("nothing is kept")).expect("import");
        assert!(imported.files.is_empty());
        assert_eq!(imported.rejected[0].name, "evil.png");
        for bad in ["../x.png", "/abs.png", "a//b.png", "a/./b.png", ""] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("cats/白猫.png").is_ok());
    }

    #[test]
    fn yolo_labels_attach_to_their_images() {
        let img = png(10, 10, 3);
        let (imported, _) = import(&[("images/a.png", &img), ("labels/a.txt", b"0 0.5 0.5 0.2 0.2\n"), ("classes.txt", b"cat\n")], LabelSource::None);
        assert!(imported.rejected.is_empty(), "{:?}", imported.rejected);
        assert_eq!(imported.annotations, 1);
        assert_eq!(imported.files[0].objects[0].category, "cat");
    }

    #[test]
    fn a_bad_label_file_is_rejected_and_the_images_stay() {
        let img = png(10, 10, 3);
        let (imported, _) = import(&[("a.png", &img), ("a.xml", b"<not voc")], LabelSource::None);
        assert_eq!(imported.files.len(), 1);
        assert_eq!(imported.rejected.len(), 1);
        assert!(imported.rejected[0].reason.contains("VOC"), "{:?}", imported.rejected);
    }

    #[test]
    fn archives_are_the_same_bytes_every_time() {
        let files = vec![
            FileEntry { name: "b/2.png".into(), sha256: String::new(), size: 3, label: None, width: 1, height: 1, objects: vec![] },
            FileEntry { name: "a/1.png".into(), sha256: String::new(), size: 2, label: None, width: 1, height: 1, objects: vec![] },
        ];
        let make =
            || write_archive(Vec::new(), &files, &mut |f| Ok(Box::new(std::io::Cursor::new(vec![b'x'; f.size as usize])) as Box<dyn Read>)).expect("archive");
        let (one, two) = (make(), make());
        assert_eq!(one, two);
        let mut archive = tar::Archive::new(std::io::Cursor::new(one));
        let names: Vec<String> = archive.entries().expect("entries").map(|e| e.expect("entry").path().expect("path").display().to_string()).collect();
        assert_eq!(names, ["a/1.png", "b/2.png"]);
    }

    #[test]
    fn references_read_as_people_write_them() {
        assert_eq!(DatasetRef::parse("digits").unwrap(), DatasetRef { owner: None, name: "digits".into(), version: None });
        assert_eq!(DatasetRef::parse("bob/digits@3").unwrap(), DatasetRef { owner: Some("bob".into()), name: "digits".into(), version: Some(3) });
        for bad in ["", "@2", "digits@0", "digits@x", "/digits"] {
            assert!(DatasetRef::parse(bad).is_err(), "{bad:?}");
        }
    }
}
