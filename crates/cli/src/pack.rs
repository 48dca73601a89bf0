//! What `suanli data push` sends: a folder packed into a tar that is the same bytes every time
//! (so its SHA-256 names it, and an interrupted upload of it can be resumed by a later run), or
//! a single image or archive as it is.
//!
//! A packed folder holds its regular files only, in the byte order of their names (relative to
//! the folder, `/` between parts), each with mode 0644, owner 0 and time 0: nothing of who packed
//! it, or when. Symbolic links are not followed (a link could lead out of the folder): they are
//! skipped and said so, as are sockets, pipes and devices.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: not a folder, an image or a .tar, .tar.gz or .tgz archive")]
    Unsupported(PathBuf),
    #[error("{0}: holds no file to send")]
    Empty(PathBuf),
    #[error("{path}: changed while it was packed ({expected} bytes, then {actual}); pack it again once it is still")]
    Changed { path: PathBuf, expected: u64, actual: u64 },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Io { path: path.to_owned(), source }
}

/// The extensions of the files the portal imports one by one, as images.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"];
/// The archives the portal unpacks.
const ARCHIVE_SUFFIXES: &[&str] = &[".tar", ".tar.gz", ".tgz"];

/// One thing ready to upload: a file, its name for the portal, its size and SHA-256.
#[derive(Debug)]
pub struct Prepared {
    /// Where its bytes are (the temporary tar of a folder, or the file itself).
    pub path: PathBuf,
    /// The name it is uploaded under: the file's, or the folder's with `.tar`.
    pub filename: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
    /// The files of a folder packed into it.
    pub files: u64,
    /// What of a folder was left out, and why.
    pub skipped: Vec<Skipped>,
    /// Keeps a packed folder's tar until the upload is done; removed when dropped.
    _temporary: Option<tempfile::NamedTempFile>,
}

/// Something in a folder that was not packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: &'static str,
}

/// Packs a folder into a temporary tar, or takes a single image or archive as it is.
pub fn prepare(path: &Path) -> Result<Prepared, PackError> {
    let meta = std::fs::metadata(path).map_err(io_error(path))?;
    if meta.is_dir() {
        return prepare_folder(path);
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !meta.is_file() || !sendable_as_is(&name) {
        return Err(PackError::Unsupported(path.to_owned()));
    }
    let file = File::open(path).map_err(io_error(path))?;
    let (size, sha256) = hash_reader(file).map_err(io_error(path))?;
    Ok(Prepared { path: path.to_owned(), filename: name, size, sha256, files: 1, skipped: Vec::new(), _temporary: None })
}

/// Whether a single file is one the portal takes as it is: an image or a tar archive.
pub fn sendable_as_is(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let image = lower.rsplit_once('.').is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext));
    image || ARCHIVE_SUFFIXES.iter().any(|suffix| lower.ends_with(suffix) && lower.len() > suffix.len())
}

fn prepare_folder(folder: &Path) -> Result<Prepared, PackError> {
    let temporary = tempfile::Builder::new().prefix("suanli-push-").suffix(".tar").tempfile().map_err(io_error(Path::new("a temporary file")))?;
    let out = temporary.as_file().try_clone().map_err(io_error(temporary.path()))?;
    let packed = pack_folder(folder, BufWriter::new(out))?;
    if packed.files == 0 {
        return Err(PackError::Empty(folder.to_owned()));
    }
    let base = folder.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "folder".into());
    Ok(Prepared {
        path: temporary.path().to_owned(),
        filename: format!("{base}.tar"),
        size: packed.size,
        sha256: packed.sha256,
        files: packed.files,
        skipped: packed.skipped,
        _temporary: Some(temporary),
    })
}

/// What [`pack_folder`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub size: u64,
    pub sha256: String,
    pub files: u64,
    pub skipped: Vec<Skipped>,
}

/// Writes `folder`'s regular files into `out` as a deterministic tar, hashing as it goes.
pub fn pack_folder(folder: &Path, out: impl Write) -> Result<Packed, PackError> {
    let (files, skipped) = list_files(folder)?;
    let mut builder = tar::Builder::new(Hashing::new(out));
    for (name, size) in &files {
        append_file(&mut builder, folder, name, *size)?;
    }
    let mut hashing = builder.into_inner().map_err(io_error(folder))?;
    hashing.flush().map_err(io_error(folder))?;
    let (_, size, sha256) = hashing.finish();
    Ok(Packed { size, sha256, files: files.len() as u64, skipped })
}

/// A file to pack: its name in the tar and its size.
type Listed = (String, u64);

/// The regular files below `folder` (names relative to it, `/`-separated, in byte order) and
/// what was left out.
fn list_files(folder: &Path) -> Result<(Vec<Listed>, Vec<Skipped>), PackError> {
    let (mut files, mut skipped) = (Vec::new(), Vec::new());
    let mut pending = vec![(folder.to_owned(), String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let path = entry.path();
            // The entry's own type: a symbolic link is a link here, never what it points at.
            let kind = entry.file_type().map_err(io_error(&path))?;
            let Some(name) = entry.file_name().to_str().map(|n| format!("{prefix}{n}")) else {
                skipped.push(Skipped { path, reason: "its name is not UTF-8" });
                continue;
            };
            if kind.is_dir() {
                pending.push((path, format!("{name}/")));
            } else if kind.is_file() {
                files.push((name, entry.metadata().map_err(io_error(&path))?.len()));
            } else if kind.is_symlink() {
                skipped.push(Skipped { path, reason: "a symbolic link (not followed)" });
            } else {
                skipped.push(Skipped { path, reason: "not a regular file" });
            }
        }
    }
    files.sort();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((files, skipped))
}

fn append_file<W: Write>(builder: &mut tar::Builder<W>, folder: &Path, name: &str, size: u64) -> Result<(), PackError> {
    let path = folder.join(name);
    let file = File::open(&path).map_err(io_error(&path))?;
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    // The header promised `size` bytes: a file that grew is cut there, one that shrank is
    // an error rather than a tar whose entries are out of step.
    let mut counted = Counting { inner: file.take(size), read: 0 };
    builder.append_data(&mut header, name, &mut counted).map_err(io_error(&path))?;
    if counted.read != size {
        return Err(PackError::Changed { path, expected: size, actual: counted.read });
    }
    Ok(())
}

/// The size and lower-case hex SHA-256 of everything `reader` gives.
pub fn hash_reader(mut reader: impl Read) -> io::Result<(u64, String)> {
    let mut hashing = Hashing::new(io::sink());
    io::copy(&mut reader, &mut hashing)?;
    let (_, size, sha256) = hashing.finish();
    Ok((size, sha256))
}

/// A writer that hashes and counts what passes through it.
pub(crate) struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W> Hashing<W> {
    pub(crate) fn new(inner: W) -> Self {
        Hashing { inner, hasher: Sha256::new(), written: 0 }
    }

    /// The writer back, with how many bytes went through it and their lower-case hex SHA-256.
    pub(crate) fn finish(self) -> (W, u64, String) {
        (self.inner, self.written, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that counts what it gave.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("cats")).expect("cats");
        std::fs::create_dir_all(root.join("dogs/puppies")).expect("dogs");
        std::fs::write(root.join("cats/b.jpg"), b"cat b").expect("write");
        std::fs::write(root.join("cats/a.jpg"), b"cat a").expect("write");
        std::fs::write(root.join("dogs/puppies/p.png"), vec![7u8; 1500]).expect("write");
        std::fs::write(root.join("labels.json"), b"{}").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", root.join("cats/outside.jpg")).expect("symlink");
        std::os::unix::fs::symlink(root.join("dogs"), root.join("linked-dir")).expect("symlink");
        dir
    }

    fn pack(root: &Path) -> (Vec<u8>, Packed) {
        let mut bytes = Vec::new();
        let packed = pack_folder(root, &mut bytes).expect("pack");
        (bytes, packed)
    }

    #[test]
    fn a_folder_packs_to_the_same_bytes_every_time() {
        let dir = folder();
        let (first, packed) = pack(dir.path());
        // Times and modes that differ on disk change nothing in the tar.
        std::fs::set_permissions(dir.path().join("labels.json"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        std::fs::write(dir.path().join("cats/a.jpg"), b"cat a").expect("rewrite, newer");
        let (second, again) = pack(dir.path());
        assert_eq!(first, second);
        assert_eq!(packed, again);
        assert_eq!(packed.size, first.len() as u64);
        assert_eq!(packed.sha256, hash_reader(&first[..]).expect("hash").1);
        assert_eq!(packed.files, 4);
    }

    #[test]
    fn a_packed_folder_holds_its_regular_files_by_relative_name_in_order_and_no_links() {
        let dir = folder();
        let (bytes, packed) = pack(dir.path());
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut names = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let header = entry.header();
            assert!(header.entry_type().is_file());
            assert_eq!(header.mode().expect("mode"), 0o644);
            assert_eq!(header.mtime().expect("mtime"), 0);
            assert_eq!(header.uid().expect("uid"), 0);
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).expect("read");
            assert_eq!(content, std::fs::read(dir.path().join(&name)).expect("the file"), "{name}");
            names.push(name);
        }
        assert_eq!(names, ["cats/a.jpg", "cats/b.jpg", "dogs/puppies/p.png", "labels.json"]);
        let skipped: Vec<_> = packed.skipped.iter().map(|s| (s.path.strip_prefix(dir.path()).expect("inside").to_owned(), s.reason)).collect();
        assert_eq!(
            skipped,
            [(PathBuf::from("cats/outside.jpg"), "a symbolic link (not followed)"), (PathBuf::from("linked-dir"), "a symbolic link (not followed)")]
        );
    }

    #[test]
    fn a_folder_is_packed_to_a_temporary_tar_named_after_it_and_single_files_go_as_they_are() {
        let dir = folder();
        let prepared = prepare(dir.path()).expect("prepare");
        let base = dir.path().file_name().expect("name").to_string_lossy().into_owned();
        assert_eq!(prepared.filename, format!("{base}.tar"));
        assert_eq!(std::fs::read(&prepared.path).expect("tar"), pack(dir.path()).0);
        let temporary = prepared.path.clone();
        drop(prepared);
        assert!(!temporary.exists(), "the temporary tar goes with it");

        let image = prepare(&dir.path().join("cats/a.jpg")).expect("an image");
        assert_eq!((image.filename.as_str(), image.size), ("a.jpg", 5));
        assert_eq!(image.sha256, hex::encode(Sha256::digest(b"cat a")));
        assert!(matches!(prepare(&dir.path().join("labels.json")), Err(PackError::Unsupported(_))));
        let empty = tempfile::tempdir().expect("empty");
        assert!(matches!(prepare(empty.path()), Err(PackError::Empty(_))));
        for (name, sendable) in [("x.TGZ", true), ("x.tar.gz", true), ("x.tar", true), ("x.jpeg", true), ("x.zip", false), (".tar", false), ("notes", false)] {
            assert_eq!(sendable_as_is(name), sendable, "{name}");
        }
    }
}
