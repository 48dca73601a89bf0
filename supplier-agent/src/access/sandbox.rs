//! How every program of a lease starts (its SSH sessions, SFTP, its jobs, its VNC display): in
//! the forked child, while still root and before the program's first instruction,
//!
//! 1. into the lease's control groups (`cgroup.procs`, on every hierarchy), so nothing the
//!    program forks is ever outside its limits — root does the move, which works on cgroup v2
//!    too, where a process may not move itself out of the agent's group;
//! 2. into a mount and an IPC namespace of its own: `/tmp`, `/var/tmp` and `/dev/shm` are the
//!    lease's private directories bind-mounted over the shared ones (as systemd's
//!    `PrivateTmp`), and System V IPC objects die with the namespace, so no lease reads what
//!    another left there or leaves anything for the next renter;
//! 3. then, and only then, the lease's user and group, with no supplementary groups.
//!
//! The closure runs between `fork` and `exec` in a multi-threaded process: it only makes raw
//! system calls on values prepared beforehand (no allocation, no locks).

use std::ffi::{CStr, CString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags};

/// Where each private directory is mounted, and what it is called in the lease's own
/// directory of them.
pub const PRIVATE_DIRS: [(&str, &str); 3] = [("/tmp", "tmp"), ("/var/tmp", "var-tmp"), ("/dev/shm", "shm")];

/// What a lease's child does before `exec`.
#[derive(Clone, Debug)]
pub struct Sandbox {
    cgroup_procs: Vec<CString>,
    /// (source, target) bind mounts; empty: the child shares the node's `/tmp`. Every source
    /// is opened before the first mount (once `/tmp` is covered, a source path below `/tmp`
    /// would no longer lead where it did) and mounted through its descriptor.
    mounts: Vec<(CString, CString)>,
    uid: u32,
    gid: u32,
}

fn c_path(path: &Path) -> CString {
    // Paths the agent made itself; none holds a NUL byte.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

impl Sandbox {
    /// `private`: the lease's directory of private temporary directories (made by
    /// [`make_private_dirs`]) and which of [`PRIVATE_DIRS`] to cover with them; `None` to
    /// share the node's.
    pub fn new(uid: u32, gid: u32, cgroup_procs: &[PathBuf], private: Option<(&Path, &[String])>) -> std::io::Result<Sandbox> {
        let mut mounts = Vec::new();
        if let Some((root, which)) = private {
            let wanted = |target: &str| which.iter().any(|w| w == target) && Path::new(target).is_dir();
            for (target, name) in PRIVATE_DIRS.iter().filter(|(target, _)| wanted(target)) {
                let source = root.join(name);
                if !source.is_dir() {
                    return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} is missing", source.display())));
                }
                mounts.push((c_path(&source), c_path(Path::new(target))));
            }
        }
        Ok(Sandbox { cgroup_procs: cgroup_procs.iter().map(|p| c_path(p)).collect(), mounts, uid, gid })
    }

    /// The control groups' `cgroup.procs` files every process of the lease joins.
    pub fn cgroup_procs(&self) -> Vec<&Path> {
        self.cgroup_procs.iter().map(|p| Path::new(std::ffi::OsStr::from_bytes(p.as_bytes()))).collect()
    }

    /// Installs the steps on a command (its own `uid`/`gid` settings must stay unset: they
    /// would drop root before the steps run).
    pub fn apply(&self, command: &mut tokio::process::Command) {
        let steps = self.clone();
        // SAFETY: `enter` makes only raw system calls on data owned by the closure.
        unsafe {
            command.pre_exec(move || steps.enter());
        }
    }

    /// As [`Sandbox::apply`], for a program on a terminal.
    pub fn apply_pty(&self, command: pty_process::Command) -> pty_process::Command {
        let steps = self.clone();
        // SAFETY: as in `apply`.
        unsafe { command.pre_exec(move || steps.enter()) }
    }

    fn enter(&self) -> std::io::Result<()> {
        for procs in &self.cgroup_procs {
            let fd = rustix::fs::open(procs.as_c_str(), OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
            // "0": the writing process itself, on both hierarchies.
            rustix::io::write(&fd, b"0")?;
        }
        if !self.mounts.is_empty() {
            // SAFETY: the child has one thread; nothing shares its file table or filesystem view.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS | rustix::thread::UnshareFlags::NEWIPC)? };
            // Nothing mounted here may leak back into the node's namespace.
            rustix::mount::mount_change(c"/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)?;
            // Sources first, all of them, in this namespace (a mount's source must be in the
            // caller's namespace), then the mounts, each from its descriptor.
            let mut sources: [Option<std::os::fd::OwnedFd>; PRIVATE_DIRS.len()] = Default::default();
            for (slot, (source, _)) in sources.iter_mut().zip(&self.mounts) {
                let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                *slot = Some(rustix::fs::open(source.as_c_str(), flags, Mode::empty())?);
            }
            for (fd, (_, target)) in sources.iter().flatten().zip(&self.mounts) {
                let mut buf = [0u8; 32];
                rustix::mount::mount_bind(fd_path(fd.as_raw_fd(), &mut buf), target.as_c_str())?;
                let flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV;
                rustix::mount::mount_remount(target.as_c_str(), flags, c"")?;
            }
        }
        rustix::thread::set_thread_groups(&[])?;
        let (uid, gid) = (rustix::fs::Uid::from_raw(self.uid), rustix::fs::Gid::from_raw(self.gid));
        rustix::thread::set_thread_res_gid(gid, gid, gid)?;
        rustix::thread::set_thread_res_uid(uid, uid, uid)?;
        Ok(())
    }
}

/// Hands `listener` to the program `command` starts, at the same descriptor number (socket
/// activation: the program is told `fd:<n>`). The descriptor stays close-on-exec in the agent,
/// so no other program it starts inherits it; only this child clears the flag, after the fork.
pub fn hand_over(command: &mut tokio::process::Command, listener: std::sync::Arc<std::os::fd::OwnedFd>) {
    // SAFETY: one raw system call on a descriptor the closure keeps open.
    unsafe {
        command.pre_exec(move || {
            rustix::io::fcntl_setfd(&*listener, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
}

/// The listening Unix socket at descriptor `fd` that this process was started with
/// ([`hand_over`]): what `suanli-agent service-bridge` serves, as the lease's user.
pub fn inherited_listener(fd: i32) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::fd::FromRawFd as _;
    // Only a descriptor past the standard streams, and open: ownership of a closed number could
    // later be claimed by another file this process opens.
    if fd < 3 || !Path::new(&format!("/proc/self/fd/{fd}")).exists() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("fd:{fd} is not a descriptor this process was given")));
    }
    // SAFETY: the descriptor is open and was handed to this process at its start to own;
    // nothing else in the process uses it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // A descriptor that is not a Unix socket fails here.
    listener.local_addr()?;
    // A copy that is close-on-exec again (the handed-over number closes with the original), so
    // what this process starts does not inherit the listener.
    let listener = listener.try_clone()?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// `/proc/self/fd/<fd>` in `buf`, without allocating (this runs between fork and exec).
fn fd_path(fd: i32, buf: &mut [u8; 32]) -> &CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let (mut n, mut len) = (fd.unsigned_abs(), 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/")
}

/// Makes the lease's private temporary directories under `root` (root's, 0755, in the agent's
/// state directory, which the lease cannot rename or replace): each owned by the lease, 0700.
pub fn make_private_dirs(root: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
    for (_, name) in PRIVATE_DIRS {
        let dir = root.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // The parent is root's: the entry is the directory made here, never a lease's link.
        let meta = std::fs::symlink_metadata(&dir)?;
        if !meta.is_dir() {
            return Err(std::io::Error::other(format!("{} is not a directory", dir.display())));
        }
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Whether this process may make mount namespaces (root with `CAP_SYS_ADMIN`, not confined by
/// a seccomp filter that forbids it): tried in a short-lived child.
pub fn namespaces_available() -> bool {
    let mut probe = std::process::Command::new("/bin/true");
    // SAFETY: one raw system call in the single-threaded child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut probe, || {
            rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS | rustix::thread::UnshareFlags::NEWIPC).map_err(Into::into)
        });
    }
    probe.status().is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    #[test]
    fn descriptor_paths_are_written_without_allocating() {
        let mut buf = [0u8; 32];
        assert_eq!(super::fd_path(0, &mut buf), c"/proc/self/fd/0");
        assert_eq!(super::fd_path(1234, &mut buf), c"/proc/self/fd/1234");
        assert_eq!(super::fd_path(i32::MAX, &mut buf), c"/proc/self/fd/2147483647");
    }
}
