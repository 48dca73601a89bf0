//! Root's file work inside directories a lease can write, without ever acting on something the
//! lease planted there.
//!
//! A lease's user owns its home and everything under it, so any path component there may be
//! replaced, at any moment, by a symbolic link, a hard link, a FIFO, a device node or a huge
//! sparse file. Everything here therefore works relative to directory descriptors:
//!
//! - every component is opened with `O_NOFOLLOW` (a directory with `O_DIRECTORY` too), so a
//!   link anywhere on the way fails the operation instead of redirecting it; `..` and absolute
//!   names are refused before any system call;
//! - files are first opened `O_PATH` (which opens nothing) and checked with `fstat`: only a
//!   regular file owned by the lease's user, with one link, below a size cap, is then reopened
//!   for reading through that handle (a FIFO never blocks the agent, a device is never opened,
//!   a hard link to someone else's file is refused);
//! - root changes ownership only of what it has just made itself (`mkdirat`, `O_CREAT |
//!   O_EXCL`), through the descriptor (`fchown`), never by name;
//! - renames and removals name one component in a pinned directory (`renameat`, `unlinkat`),
//!   which never follow a link.
//!
//! Architecture invariant: nothing else in the agent touches a path under a lease's home as
//! root. (Sessions and jobs run as the lease's user and may do as they like there.)

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::Errno;

#[derive(Debug, thiserror::Error)]
pub enum LeaseFsError {
    #[error("{0}: not a plain relative path (no '..', no leading '/')")]
    BadName(PathBuf),
    #[error("{path}: {why}")]
    Refused { path: PathBuf, why: &'static str },
    #[error("{path}: {size} bytes, above the cap of {cap}")]
    TooLarge { path: PathBuf, size: u64, cap: u64 },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn io(path: &Path, e: impl Into<std::io::Error>) -> LeaseFsError {
    LeaseFsError::Io(path.to_owned(), e.into())
}

/// A directory inside (or being) a lease's home, opened without following links, together with
/// the lease's user and group. Paths kept here are for messages only; no call uses them.
#[derive(Debug)]
pub struct LeaseDir {
    fd: OwnedFd,
    path: PathBuf,
    uid: u32,
    gid: u32,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// The components of `rel`, if each is a plain name.
fn plain_components(rel: &Path) -> Result<Vec<&std::ffi::OsStr>, LeaseFsError> {
    rel.components()
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(LeaseFsError::BadName(rel.to_owned())),
        })
        .collect()
}

impl LeaseDir {
    /// Opens the lease's home itself. The home's parent is root's (the lease homes), so the
    /// name is opened by path; the home itself must be a directory (not a link) of the lease.
    pub fn open_home(home: &Path, uid: u32, gid: u32) -> Result<LeaseDir, LeaseFsError> {
        let fd = rustix::fs::openat(CWD, home, DIR_FLAGS, Mode::empty()).map_err(|e| io(home, e))?;
        let dir = LeaseDir { fd, path: home.to_owned(), uid, gid };
        dir.expect_owner(&dir.fd, &dir.path, true)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn expect_owner(&self, fd: &OwnedFd, path: &Path, directory: bool) -> Result<rustix::fs::Stat, LeaseFsError> {
        let st = rustix::fs::fstat(fd).map_err(|e| io(path, e))?;
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        let wanted = if directory { rustix::fs::FileType::Directory } else { rustix::fs::FileType::RegularFile };
        if kind != wanted {
            return Err(LeaseFsError::Refused { path: path.to_owned(), why: if directory { "not a directory" } else { "not a regular file" } });
        }
        if st.st_uid != self.uid {
            return Err(LeaseFsError::Refused { path: path.to_owned(), why: "not owned by the lease's user" });
        }
        if !directory && st.st_nlink != 1 {
            return Err(LeaseFsError::Refused { path: path.to_owned(), why: "has more than one link" });
        }
        Ok(st)
    }

    /// The directory `rel` below this one, each missing component made (mode 0700, owned by
    /// the lease through its descriptor), each existing one required to be a real directory of
    /// the lease's user.
    pub fn make_dirs(&self, rel: &Path) -> Result<LeaseDir, LeaseFsError> {
        let mut path = self.path.clone();
        let mut current: Option<OwnedFd> = None;
        for name in plain_components(rel)? {
            path.push(name);
            let parent = current.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
            let made = match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => true,
                Err(Errno::EXIST) => false,
                Err(e) => return Err(io(&path, e)),
            };
            let fd = rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()).map_err(|e| refused_link(&path, e))?;
            if made {
                // Made a moment ago by root; the lease cannot have swapped it for a directory
                // of its own that root would then hand over, since fchown acts on this fd.
                let st = rustix::fs::fstat(&fd).map_err(|e| io(&path, e))?;
                if st.st_uid == 0 {
                    rustix::fs::fchown(&fd, Some(uid(self.uid)), Some(gid(self.gid))).map_err(|e| io(&path, e))?;
                }
            }
            self.expect_owner(&fd, &path, true)?;
            current = Some(fd);
        }
        let fd = match current {
            Some(fd) => fd,
            None => self.fd.try_clone().map_err(|e| io(&path, e))?,
        };
        Ok(LeaseDir { fd, path, uid: self.uid, gid: self.gid })
    }

    /// A new, empty regular file `name` in this directory, owned by the lease (mode 0600 unless
    /// `mode` says otherwise), open for writing. Whatever had that name (a link, a FIFO, an old
    /// file) is removed first, never opened.
    pub fn create_file(&self, name: &str, mode: u32) -> Result<File, LeaseFsError> {
        let path = self.path.join(name);
        single(name, &path)?;
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(io(&path, e)),
        }
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode)).map_err(|e| io(&path, e))?;
        rustix::fs::fchown(&fd, Some(uid(self.uid)), Some(gid(self.gid))).map_err(|e| io(&path, e))?;
        Ok(File::from(fd))
    }

    /// Renames `from` to `to`, both names in this directory (replacing whatever `to` was).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), LeaseFsError> {
        single(from, &self.path.join(from))?;
        single(to, &self.path.join(to))?;
        rustix::fs::renameat(&self.fd, from, &self.fd, to).map_err(|e| io(&self.path.join(to), e))
    }

    /// Removes the file `name` from this directory, if there.
    pub fn remove_file(&self, name: &str) -> Result<(), LeaseFsError> {
        single(name, &self.path.join(name))?;
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io(&self.path.join(name), e)),
        }
    }

    /// Opens `rel` below this directory for reading, if it is a regular file of the lease's
    /// user with one link and at most `cap` bytes; `Ok(None)` if nothing has that name. Never
    /// blocks: a FIFO or a device is refused, not opened for reading.
    pub fn open_for_reading(&self, rel: &Path, cap: u64) -> Result<Option<(File, u64)>, LeaseFsError> {
        let names = plain_components(rel)?;
        let Some((last, dirs)) = names.split_last() else { return Err(LeaseFsError::BadName(rel.to_owned())) };
        let mut path = self.path.clone();
        let mut current: Option<OwnedFd> = None;
        for name in dirs {
            path.push(name);
            let parent = current.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
            match rustix::fs::openat(parent, *name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => current = Some(fd),
                Err(Errno::NOENT) => return Ok(None),
                Err(e) => return Err(refused_link(&path, e)),
            }
        }
        path.push(last);
        let parent = current.as_ref().map_or(self.fd.as_fd(), |fd| fd.as_fd());
        // First a handle that opens nothing (O_PATH): a FIFO, a device or a link is looked at,
        // never opened, so no device's open has side effects and nothing blocks.
        let probe = match rustix::fs::openat(parent, *last, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(refused_link(&path, e)),
        };
        let st = self.expect_owner(&probe, &path, false)?;
        let size = st.st_size as u64;
        if size > cap {
            return Err(LeaseFsError::TooLarge { path, size, cap });
        }
        // Then that very inode, reopened for reading through its handle (never by name again:
        // the lease may have swapped the name meanwhile).
        let reopen = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&probe));
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(reopen.as_str(), flags, Mode::empty()).map_err(|e| io(&path, e))?;
        Ok(Some((File::from(fd), size)))
    }

    /// The modification time and size of `rel`, as `open_for_reading` would find it.
    pub fn stamp(&self, rel: &Path, cap: u64) -> Result<Option<(i64, i64, u64)>, LeaseFsError> {
        Ok(self.open_for_reading(rel, cap)?.map(|(file, size)| {
            let st = rustix::fs::fstat(&file).ok();
            (st.map_or(0, |s| s.st_mtime), st.map_or(0, |s| s.st_mtime_nsec as i64), size)
        }))
    }

    /// Copies `rel` (as `open_for_reading` finds it) into `dest`, a file of the agent's own,
    /// reading at most `cap` bytes even if the file grows meanwhile. `Ok(false)`: no such file.
    pub fn copy_out(&self, rel: &Path, cap: u64, dest: &Path) -> Result<bool, LeaseFsError> {
        let Some((file, _)) = self.open_for_reading(rel, cap)? else { return Ok(false) };
        let mut out = File::create(dest).map_err(|e| io(dest, e))?;
        let copied = std::io::copy(&mut file.take(cap.saturating_add(1)), &mut out).map_err(|e| io(dest, e))?;
        if copied > cap {
            let _ = std::fs::remove_file(dest);
            return Err(LeaseFsError::TooLarge { path: self.path.join(rel), size: copied, cap });
        }
        out.flush().map_err(|e| io(dest, e))?;
        Ok(true)
    }
}

fn single(name: &str, path: &Path) -> Result<(), LeaseFsError> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains('/');
    if ok {
        Ok(())
    } else {
        Err(LeaseFsError::BadName(path.to_owned()))
    }
}

/// `ELOOP` (a link where `O_NOFOLLOW` stood) and `ENOTDIR` (a file or link where a directory
/// was expected) are the lease's doing, said as such.
fn refused_link(path: &Path, e: Errno) -> LeaseFsError {
    match e {
        Errno::LOOP | Errno::NOTDIR | Errno::MLINK => {
            LeaseFsError::Refused { path: path.to_owned(), why: "a link or a non-directory where a directory or file belongs" }
        }
        e => io(path, e),
    }
}

fn uid(raw: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(raw)
}

fn gid(raw: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(raw)
}
