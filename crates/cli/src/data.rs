//! Datasets over the portal's REST API: what it answers, how the user names one
//! (`digits`, `alice/digits`, `7`, each with an optional `@VERSION`), and `data pull`, which
//! streams a version's archive into a folder and keeps a file only once its SHA-256 is the one
//! the version lists.
//!
//! The archive is the portal's, yet it is unpacked as if it were anyone's: only regular files
//! and folders, at relative names without `..`, each named in the version's file list, nothing
//! written through a symbolic link already in the folder.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::{ClientError, Portal};
use crate::pack::{hash_reader, Hashing};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Portal(#[from] ClientError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("no dataset {0} of yours or shared with you")]
    NotFound(String),
    #[error("several datasets named {name} are shared with you ({}): say which, as OWNER/NAME", .choices.join(", "))]
    Ambiguous { name: String, choices: Vec<String> },
    #[error("the archive's entry {name:?} is {why}: refused")]
    Unsafe { name: String, why: &'static str },
    #[error("the archive holds {0:?}, which is not in the version's file list: refused")]
    NotListed(String),
    #[error("the archive holds {0:?} twice: refused")]
    Twice(String),
    #[error("{name} arrived as {actual} ({size} bytes), not {expected} as the version lists it: not kept")]
    ChecksumMismatch { name: String, expected: String, actual: String, size: u64 },
    #[error("the archive lacks {} of the version's files: {}", .0.len(), .0.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    Missing(Vec<String>),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("unpacking stopped: {0}")]
    Unpacking(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_owned(), source }
}

/// A dataset as `GET /datasets` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetView {
    pub dataset_id: u64,
    pub name: String,
    pub owner: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub created_ms: u64,
    /// 0: no version yet.
    #[serde(default)]
    pub latest_version: u32,
    #[serde(default)]
    pub mine: bool,
    #[serde(default)]
    pub shared_with: Vec<String>,
}

/// `GET /datasets/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct DatasetDetail {
    #[serde(flatten)]
    pub dataset: DatasetView,
    #[serde(default)]
    pub versions: Vec<VersionSummary>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VersionSummary {
    pub version: u32,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub created_ms: u64,
    #[serde(default)]
    pub items: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub added: u64,
    #[serde(default)]
    pub removed: u64,
    #[serde(default)]
    pub modified: u64,
}

/// A version as made (`POST /datasets/{id}/versions`) or read (`GET …/versions/{v}`, which
/// adds `files`).
#[derive(Debug, Clone, Deserialize)]
pub struct VersionView {
    #[serde(flatten)]
    pub summary: VersionSummary,
    #[serde(default)]
    pub rejected: Vec<Rejected>,
    #[serde(default)]
    pub labels: BTreeMap<String, u64>,
    #[serde(default)]
    pub duplicates: u64,
    #[serde(default)]
    pub annotations: u64,
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// A file the portal did not import, and why.
#[derive(Debug, Clone, Deserialize)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
    #[serde(default)]
    pub kind: Option<String>,
}

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    #[serde(default)]
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {problem}")]
pub struct NameError {
    pub text: String,
    pub problem: &'static str,
}

/// How the user names a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetName {
    /// Its numeric `dataset_id`.
    Id(u64),
    /// One of mine by that name, else the one shared with me.
    Name(String),
    /// `owner/name`.
    Owned { owner: String, name: String },
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatasetName::Id(id) => write!(f, "{id}"),
            DatasetName::Name(name) => write!(f, "{name}"),
            DatasetName::Owned { owner, name } => write!(f, "{owner}/{name}"),
        }
    }
}

/// `NAME[@VERSION]` → the name and the version, if one is named (a positive number).
pub fn split_version(text: &str) -> Result<(&str, Option<u32>), NameError> {
    let wrong = |problem| NameError { text: text.to_owned(), problem };
    let (name, version) = match text.rsplit_once('@') {
        None => (text, None),
        Some((name, version)) => {
            let number = version.parse::<u32>().ok().filter(|v| *v > 0).ok_or_else(|| wrong("the version after @ is a number from 1"))?;
            (name, Some(number))
        }
    };
    if name.is_empty() {
        return Err(wrong("a name is missing"));
    }
    Ok((name, version))
}

/// `DATASET[@VERSION]`, DATASET being an ID, a name or `owner/name`.
pub fn parse_dataset(text: &str) -> Result<(DatasetName, Option<u32>), NameError> {
    let (name, version) = split_version(text)?;
    Ok((parse_dataset_name(name)?, version))
}

/// An ID, a name or `owner/name`.
pub fn parse_dataset_name(text: &str) -> Result<DatasetName, NameError> {
    let wrong = |problem| NameError { text: text.to_owned(), problem };
    if text.is_empty() {
        return Err(wrong("a name is missing"));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map(DatasetName::Id).map_err(|_| wrong("too large for an ID"));
    }
    match text.split_once('/') {
        None => Ok(DatasetName::Name(text.to_owned())),
        Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(DatasetName::Owned { owner: owner.to_owned(), name: name.to_owned() })
        }
        Some(_) => Err(wrong("OWNER/NAME has one / between two names")),
    }
}

/// The dataset `wanted` names among those listed: mine first, then those shared with me.
pub fn resolve<'a>(datasets: &'a [DatasetView], wanted: &DatasetName) -> Result<&'a DatasetView, DataError> {
    let not_found = || DataError::NotFound(wanted.to_string());
    match wanted {
        DatasetName::Id(id) => datasets.iter().find(|d| d.dataset_id == *id).ok_or_else(not_found),
        DatasetName::Owned { owner, name } => datasets.iter().find(|d| &d.owner == owner && &d.name == name).ok_or_else(not_found),
        DatasetName::Name(name) => {
            if let Some(mine) = datasets.iter().find(|d| d.mine && &d.name == name) {
                return Ok(mine);
            }
            let shared: Vec<&DatasetView> = datasets.iter().filter(|d| !d.mine && &d.name == name).collect();
            match shared[..] {
                [] => Err(not_found()),
                [one] => Ok(one),
                _ => Err(DataError::Ambiguous { name: name.clone(), choices: shared.iter().map(|d| format!("{}/{}", d.owner, d.name)).collect() }),
            }
        }
    }
}

/// Mine and those shared with me.
pub async fn list(portal: &Portal) -> Result<Vec<DatasetView>, DataError> {
    Ok(portal.get("/api/v1/datasets", &[]).await?)
}

/// The dataset the user named (an ID is asked for directly; a name is looked up in the list).
pub async fn find(portal: &Portal, wanted: &DatasetName) -> Result<DatasetView, DataError> {
    match wanted {
        DatasetName::Id(id) => Ok(portal.get::<DatasetDetail>(&format!("/api/v1/datasets/{id}"), &[]).await?.dataset),
        named => resolve(&list(portal).await?, named).cloned(),
    }
}

/// What `data pull` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Files written.
    pub written: u64,
    /// Files already there with the listed SHA-256, left as they were.
    pub present: u64,
    /// The bytes of the files written.
    pub bytes: u64,
}

/// Downloads version `version` (0: the latest) of dataset `id` into `dir`.
pub async fn pull(portal: &Portal, id: u64, version: u32, dir: &Path) -> Result<(VersionView, Unpacked), DataError> {
    let view: VersionView = portal.get(&format!("/api/v1/datasets/{id}/versions/{version}"), &[]).await?;
    // The version the listing named: "latest" must not move between the two requests.
    let number = view.summary.version;
    let mut response = portal.stream(&format!("/api/v1/datasets/{id}/versions/{number}/archive")).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    let (dir, files) = (dir.to_owned(), view.files.clone());
    // `tar` reads synchronously: it unpacks on a blocking thread while the bytes arrive.
    let unpacking = tokio::task::spawn_blocking(move || unpack(ChannelReader::new(receiver), &dir, &files));
    let mut broken = None;
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                // Refused: unpacking stopped, and its error says why.
                if sender.send(Ok(bytes)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = sender.send(Err(io::Error::other("the download broke off"))).await;
                broken = Some(portal.transport(e));
                break;
            }
        }
    }
    drop(sender);
    let unpacked = unpacking.await.map_err(|e| DataError::Unpacking(e.to_string()))?;
    match broken {
        Some(e) => Err(e.into()),
        None => unpacked.map(|u| (view, u)),
    }
}

/// Unpacks the tar `archive` into `dir`, as the module says; each file is written beside its
/// place (`NAME.partial`) and renamed there once it hashes as `files` lists it.
pub fn unpack(archive: impl Read, dir: &Path, files: &[FileEntry]) -> Result<Unpacked, DataError> {
    let listed: HashMap<&str, &FileEntry> = files.iter().map(|f| (f.name.as_str(), f)).collect();
    let mut seen = BTreeSet::new();
    let mut done = Unpacked::default();
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut archive = tar::Archive::new(archive);
    for entry in archive.entries().map_err(io_error(dir))? {
        let mut entry = entry.map_err(io_error(dir))?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue; // metadata for what follows, not a file
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let relative = safe_relative(&name)?;
        if kind.is_dir() {
            make_folders(dir, &relative)?;
            continue;
        }
        if !kind.is_file() {
            return Err(DataError::Unsafe { name, why: entry_kind(kind) });
        }
        let key = slash_joined(&relative);
        let Some(expected) = listed.get(key.as_str()) else { return Err(DataError::NotListed(key)) };
        if !seen.insert(key.clone()) {
            return Err(DataError::Twice(key));
        }
        if let Some(parent) = relative.parent() {
            make_folders(dir, parent)?;
        }
        let dest = dir.join(&relative);
        if already_there(&dest, expected)? {
            done.present += 1;
            continue; // the archive's bytes of it are skipped by the next entry
        }
        done.bytes += write_verified(&mut entry, &dest, expected)?;
        done.written += 1;
    }
    let missing: Vec<String> = files.iter().filter(|f| !seen.contains(&f.name)).map(|f| f.name.clone()).collect();
    if !missing.is_empty() {
        return Err(DataError::Missing(missing));
    }
    Ok(done)
}

/// `name` as a path below the folder: relative, without `..`, not empty.
fn safe_relative(name: &str) -> Result<PathBuf, DataError> {
    let unsafe_entry = |why| DataError::Unsafe { name: name.to_owned(), why };
    let mut relative = PathBuf::new();
    for part in Path::new(name).components() {
        match part {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry("a path with `..`")),
            Component::RootDir | Component::Prefix(_) => return Err(unsafe_entry("an absolute path")),
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(unsafe_entry("a path to nowhere"));
    }
    Ok(relative)
}

fn slash_joined(relative: &Path) -> String {
    relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

fn entry_kind(kind: tar::EntryType) -> &'static str {
    if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_hard_link() {
        "a hard link"
    } else {
        "neither a regular file nor a folder"
    }
}

/// Makes the folders of `relative` below `dir`, refusing to go through a symbolic link (one
/// already in `dir` could lead anywhere).
fn make_folders(dir: &Path, relative: &Path) -> Result<(), DataError> {
    let mut at = dir.to_owned();
    for part in relative.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(DataError::Unsafe { name: at.display().to_string(), why: "below a symbolic link in the folder" });
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(DataError::Io { path: at, source: io::Error::new(io::ErrorKind::AlreadyExists, "a file where a folder goes") }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&at).map_err(io_error(&at))?,
            Err(e) => return Err(DataError::Io { path: at, source: e }),
        }
    }
    Ok(())
}

/// Whether `dest` is a regular file (not a link) that is already `expected`.
fn already_there(dest: &Path, expected: &FileEntry) -> Result<bool, DataError> {
    match std::fs::symlink_metadata(dest) {
        Ok(meta) if meta.is_file() && meta.len() == expected.size => {
            let file = std::fs::File::open(dest).map_err(io_error(dest))?;
            let (_, sha256) = hash_reader(file).map_err(io_error(dest))?;
            Ok(sha256.eq_ignore_ascii_case(&expected.sha256))
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(DataError::Io { path: dest.to_owned(), source: e }),
    }
}

/// Copies `entry` to `dest` by way of `dest.partial`, kept only if it hashes as expected.
fn write_verified(entry: &mut impl Read, dest: &Path, expected: &FileEntry) -> Result<u64, DataError> {
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = dest.with_file_name(format!("{file_name}.partial"));
    // What an interrupted pull left (or a link put there) goes first: create_new follows no link.
    std::fs::remove_file(&partial).or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) }).map_err(io_error(&partial))?;
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&partial).map_err(io_error(&partial))?;
    let written = copy_hashing(entry, file).map_err(io_error(&partial));
    let (size, actual) = match written {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    if size != expected.size || !actual.eq_ignore_ascii_case(&expected.sha256) {
        let _ = std::fs::remove_file(&partial);
        return Err(DataError::ChecksumMismatch { name: expected.name.clone(), expected: expected.sha256.clone(), actual, size });
    }
    std::fs::rename(&partial, dest).map_err(io_error(dest))?;
    Ok(size)
}

fn copy_hashing(from: &mut impl Read, to: std::fs::File) -> io::Result<(u64, String)> {
    let mut hashing = Hashing::new(BufWriter::new(to));
    io::copy(from, &mut hashing)?;
    hashing.flush()?;
    let (_, size, sha256) = hashing.finish();
    Ok((size, sha256))
}

/// A blocking reader of the chunks an async task sends; an error sent is the reader's error.
pub struct ChannelReader<B> {
    receiver: tokio::sync::mpsc::Receiver<io::Result<B>>,
    current: Option<B>,
    at: usize,
}

impl<B> ChannelReader<B> {
    pub fn new(receiver: tokio::sync::mpsc::Receiver<io::Result<B>>) -> Self {
        ChannelReader { receiver, current: None, at: 0 }
    }
}

impl<B: AsRef<[u8]>> Read for ChannelReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(rest) = self.current.as_ref().map(|c| &c.as_ref()[self.at..]).filter(|r| !r.is_empty()) {
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                self.at += n;
                return Ok(n);
            }
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => (self.current, self.at) = (Some(chunk), 0),
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn listed(name: &str, bytes: &[u8]) -> FileEntry {
        FileEntry { name: name.into(), sha256: hex::encode(sha2::Sha256::digest(bytes)), size: bytes.len() as u64, label: None }
    }

    /// A tar entry whose name is written as given: `tar`'s own setters refuse `..` and
    /// absolute names, and those are what an archive must not be trusted with.
    fn raw_entry(builder: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        if kind.is_symlink() {
            header.set_link_name("/etc/passwd").expect("link name");
        }
        header.set_cksum();
        builder.append(&header, data).expect("append");
    }

    fn archive(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            raw_entry(&mut builder, name, *kind, data);
        }
        builder.into_inner().expect("tar")
    }

    const FILE: tar::EntryType = tar::EntryType::Regular;

    #[test]
    fn a_version_unpacks_checked_file_by_file_and_what_is_there_already_is_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let out = dir.path().join("out");
        let tar = archive(&[("cats/", tar::EntryType::Directory, b""), ("cats/a.jpg", FILE, b"cat a"), ("./dogs/b.jpg", FILE, b"dog b")]);
        let files = [listed("cats/a.jpg", b"cat a"), listed("dogs/b.jpg", b"dog b")];
        assert_eq!(unpack(&tar[..], &out, &files).expect("unpack"), Unpacked { written: 2, present: 0, bytes: 10 });
        assert_eq!(std::fs::read(out.join("cats/a.jpg")).expect("a"), b"cat a");
        assert_eq!(std::fs::read(out.join("dogs/b.jpg")).expect("b"), b"dog b");
        assert!(!out.join("cats/a.jpg.partial").exists());

        // Again: a file that is right stays, a changed one is written anew.
        std::fs::write(out.join("dogs/b.jpg"), b"edited").expect("edit");
        assert_eq!(unpack(&tar[..], &out, &files).expect("again"), Unpacked { written: 1, present: 1, bytes: 5 });
        assert_eq!(std::fs::read(out.join("dogs/b.jpg")).expect("b"), b"dog b");
    }

    #[test]
    fn a_file_that_does_not_hash_as_listed_is_not_kept_and_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let tar = archive(&[("a.jpg", FILE, b"tampered")]);
        let wrong = unpack(&tar[..], dir.path(), &[listed("a.jpg", b"original")]).expect_err("refused");
        assert!(matches!(&wrong, DataError::ChecksumMismatch { name, .. } if name == "a.jpg"), "{wrong}");
        assert!(!dir.path().join("a.jpg").exists() && !dir.path().join("a.jpg.partial").exists());
    }

    #[test]
    fn entries_outside_the_folder_links_and_unlisted_files_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let out = dir.path().join("out");
        let files = [listed("x", b"x"), listed("a/x", b"x"), listed("link", b"")];
        for (name, kind, why) in [
            ("../x", FILE, "a path with `..`"),
            ("a/../../x", FILE, "a path with `..`"),
            ("/tmp/x", FILE, "an absolute path"),
            ("link", tar::EntryType::Symlink, "a symbolic link"),
            ("link", tar::EntryType::Link, "a hard link"),
            ("link", tar::EntryType::Fifo, "neither a regular file nor a folder"),
        ] {
            let refused = unpack(&archive(&[(name, kind, b"")])[..], &out, &files).expect_err(name);
            assert!(matches!(&refused, DataError::Unsafe { why: w, .. } if *w == why), "{name}: {refused}");
        }
        assert!(!dir.path().join("x").exists(), "nothing outside");
        let unlisted = unpack(&archive(&[("y", FILE, b"y")])[..], &out, &files).expect_err("unlisted");
        assert!(matches!(unlisted, DataError::NotListed(ref n) if n == "y"));
        let short = unpack(&archive(&[("x", FILE, b"x")])[..], &out, &files).expect_err("missing");
        assert!(matches!(short, DataError::Missing(ref m) if m == &["a/x".to_owned(), "link".to_owned()]));
    }

    #[test]
    fn nothing_is_written_through_a_symbolic_link_in_the_folder() {
        let dir = tempfile::tempdir().expect("dir");
        let (out, elsewhere) = (dir.path().join("out"), dir.path().join("elsewhere"));
        std::fs::create_dir_all(&out).expect("out");
        std::fs::create_dir_all(&elsewhere).expect("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, out.join("a")).expect("symlink");
        let refused = unpack(&archive(&[("a/x", FILE, b"x")])[..], &out, &[listed("a/x", b"x")]).expect_err("refused");
        assert!(matches!(refused, DataError::Unsafe { .. }), "{refused}");
        assert!(!elsewhere.join("x").exists());
    }

    #[test]
    fn a_channel_reads_as_one_stream_and_its_error_is_the_readers() {
        // Room for every piece: nothing reads until all are sent.
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let tar = archive(&[("a", FILE, b"hello")]);
        for piece in tar.chunks(100) {
            sender.blocking_send(Ok(piece.to_vec())).expect("send");
        }
        sender.blocking_send(Err(io::Error::other("cut"))).expect("send");
        drop(sender);
        let mut reader = ChannelReader::new(receiver);
        let mut read = vec![0; tar.len()];
        reader.read_exact(&mut read).expect("read");
        assert_eq!(read, tar);
        assert_eq!(reader.read(&mut [0; 8]).expect_err("the error").to_string(), "cut");
        assert_eq!(reader.read(&mut [0; 8]).expect("end"), 0);
    }

    #[test]
    fn datasets_are_named_by_id_name_or_owner_and_name_with_a_version() {
        assert_eq!(parse_dataset("digits").expect("name"), (DatasetName::Name("digits".into()), None));
        assert_eq!(parse_dataset("digits@2").expect("version"), (DatasetName::Name("digits".into()), Some(2)));
        assert_eq!(parse_dataset("17").expect("id"), (DatasetName::Id(17), None));
        assert_eq!(parse_dataset("alice/digits@3").expect("owned"), (DatasetName::Owned { owner: "alice".into(), name: "digits".into() }, Some(3)));
        for wrong in ["", "@2", "digits@", "digits@0", "digits@x", "digits@-1", "/digits", "alice/", "a/b/c", "99999999999999999999999"] {
            assert!(parse_dataset(wrong).is_err(), "{wrong}");
        }
        assert_eq!(split_version("digits-cls@12").expect("model"), ("digits-cls", Some(12)));
    }

    #[test]
    fn a_name_is_mine_first_then_shared_and_owner_name_picks_among_shared() {
        let view = |id, name: &str, owner: &str, mine| DatasetView {
            dataset_id: id,
            name: name.into(),
            owner: owner.into(),
            description: None,
            created_ms: 0,
            latest_version: 1,
            mine,
            shared_with: Vec::new(),
        };
        let all = [view(1, "digits", "bob", false), view(2, "digits", "me", true), view(3, "cats", "bob", false), view(4, "cats", "carol", false)];
        let id = |wanted: &str| resolve(&all, &parse_dataset_name(wanted).expect("name")).map(|d| d.dataset_id);
        assert_eq!(id("digits").expect("mine"), 2);
        assert_eq!(id("bob/digits").expect("shared"), 1);
        assert_eq!(id("4").expect("id"), 4);
        assert!(matches!(id("cats"), Err(DataError::Ambiguous { ref choices, .. }) if choices == &["bob/cats", "carol/cats"]));
        assert!(matches!(id("dogs"), Err(DataError::NotFound(_))));
        assert!(matches!(id("carol/digits"), Err(DataError::NotFound(_))));
    }
}
