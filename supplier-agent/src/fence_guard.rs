//! A job must not outlive its agent for long. While the agent runs, it stops a node's jobs when
//! no broker has answered for `fence_after` (self-fencing, `jobs.rs`). A crashed or stopped
//! agent fences nothing, and after 30 s of silence the scheduler places the job again
//! elsewhere: two copies would run. So beside every job attempt the agent starts a small guard
//! (this binary, `suanli-agent fence-guard`), as root, in the lease's control groups (a
//! `systemctl stop` of the agent's unit does not take it along), holding the read end of a
//! pipe whose write end only the agent holds. The agent gone (crash, kill, stop), the pipe
//! reads end-of-file; if the job is still running `fence_after` later, the guard kills its
//! process group. An agent restarted meanwhile kills the job itself at once (`kill_orphan`),
//! and the guard, seeing the job gone, exits.
//!
//! The guard waits on descriptors only (the pipe and a pidfd of the job's leader, which names
//! that one process even if its PID is reused), never on a timer loop.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};

/// Why the guard ended.
#[derive(Debug, PartialEq, Eq)]
pub enum GuardEnd {
    /// The job ended first (or was never there): nothing to do.
    JobGone,
    /// The agent went away and the job was still running `after` later: killed.
    Fenced,
}

/// The guard's body: `pid` is the job's leader (and its process group), `started` its start
/// time as the agent recorded it, `agent` the read end of the agent's pipe.
pub fn guard(pid: u32, started: u64, after: Duration, agent: &mut impl ReadFd) -> std::io::Result<GuardEnd> {
    let Some(leader) = Pid::from_raw(pid as i32) else { return Ok(GuardEnd::JobGone) };
    let job = match rustix::process::pidfd_open(leader, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(GuardEnd::JobGone),
        Err(e) => return Err(e.into()),
    };
    // The descriptor pins one process; the start time says it is the job's, not a later
    // process that reused the PID before the descriptor was opened.
    if crate::jobs::start_time(pid) != Some(started) {
        return Ok(GuardEnd::JobGone);
    }
    // Until the agent's pipe closes (bytes written to it mean nothing) or the job ends.
    loop {
        let mut fds = [PollFd::new(&job, PollFlags::IN), PollFd::from_borrowed_fd(agent.as_fd(), PollFlags::IN)];
        rustix::event::poll(&mut fds, None)?;
        if !fds[0].revents().is_empty() {
            return Ok(GuardEnd::JobGone);
        }
        if !fds[1].revents().is_empty() {
            let mut buf = [0u8; 64];
            if agent.read(&mut buf)? == 0 {
                break;
            }
        }
    }
    // The agent is gone: the job has `after` to end or for a restarted agent to end it.
    let timeout = Timespec { tv_sec: after.as_secs() as i64, tv_nsec: i64::from(after.subsec_nanos()) };
    let mut fds = [PollFd::new(&job, PollFlags::IN)];
    if rustix::event::poll(&mut fds, Some(&timeout))? > 0 {
        return Ok(GuardEnd::JobGone);
    }
    // The leader is alive (the pidfd has not fired), so its process group is the job's.
    let _ = rustix::process::kill_process_group(leader, Signal::KILL);
    Ok(GuardEnd::Fenced)
}

/// What the guard waits on for the agent: a readable descriptor (the pipe on its stdin).
pub trait ReadFd: Read + AsFd {}
impl<T: Read + AsFd> ReadFd for T {}

/// `suanli-agent fence-guard`: joins the lease's control groups, then guards.
pub fn main(pid: u32, started: u64, after: Duration, cgroup_procs: &[PathBuf]) -> std::io::Result<GuardEnd> {
    for procs in cgroup_procs {
        std::fs::write(procs, b"0")?;
    }
    let end = guard(pid, started, after, &mut std::io::stdin().lock())?;
    if end == GuardEnd::Fenced {
        tracing::warn!(pid, ?after, "the agent went away and the job attempt still ran: killed it (fence guard)");
    }
    Ok(end)
}

/// Starts the guard of the job whose leader is `pid` (started at `started`): the returned
/// child's stdin is the agent's end of the pipe; drop it (and reap the child) once the job
/// has ended.
pub fn spawn(pid: u32, started: u64, after: Duration, cgroup_procs: &[&Path]) -> std::io::Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.args(["fence-guard", "--pid", &pid.to_string(), "--started", &started.to_string(), "--after-ms", &after.as_millis().to_string()]);
    for procs in cgroup_procs {
        command.arg("--cgroup-procs").arg(procs);
    }
    // Its own process group: a signal meant for the agent's group leaves it be.
    command.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).process_group(0);
    command.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn sleeper() -> std::process::Child {
        let mut command = std::process::Command::new("sleep");
        command.arg("600").process_group(0);
        command.spawn().expect("sleep")
    }

    #[test]
    fn the_job_is_killed_once_the_agent_is_gone_for_the_fencing_time() {
        let mut job = sleeper();
        let started = crate::jobs::start_time(job.id()).expect("start time");
        let (mut read, write) = std::io::pipe().expect("pipe");
        drop(write); // the agent is gone
        let begun = std::time::Instant::now();
        let end = guard(job.id(), started, Duration::from_millis(300), &mut read).expect("guard");
        assert_eq!(end, GuardEnd::Fenced);
        assert!(begun.elapsed() >= Duration::from_millis(300), "not before the fencing time");
        assert!(!job.wait().expect("wait").success(), "killed");
    }

    #[test]
    fn a_job_that_ends_while_the_agent_is_gone_is_left_alone() {
        let mut job = sleeper();
        let started = crate::jobs::start_time(job.id()).expect("start time");
        let (mut read, write) = std::io::pipe().expect("pipe");
        drop(write);
        let id = job.id();
        let ender = std::thread::spawn(move || {
            job.kill().expect("kill");
            job.wait().expect("wait");
        });
        let end = guard(id, started, Duration::from_secs(60), &mut read).expect("guard");
        ender.join().expect("ender");
        assert_eq!(end, GuardEnd::JobGone);
    }

    #[test]
    fn a_reused_pid_is_never_killed() {
        let mut job = sleeper();
        let started = crate::jobs::start_time(job.id()).expect("start time");
        let (mut read, write) = std::io::pipe().expect("pipe");
        drop(write);
        // The recorded start time is not this process's: another process holds the PID now.
        let end = guard(job.id(), started + 1, Duration::ZERO, &mut read).expect("guard");
        assert_eq!(end, GuardEnd::JobGone);
        assert!(job.try_wait().expect("try_wait").is_none(), "still running");
        job.kill().expect("kill");
        job.wait().expect("wait");
    }

    #[test]
    fn bytes_from_the_agent_are_not_its_going_away() {
        use std::io::Write;
        // A job that ends by itself with status 3 once its stdin says so.
        let mut job =
            std::process::Command::new("sh").args(["-c", "read line; exit 3"]).stdin(std::process::Stdio::piped()).process_group(0).spawn().expect("sh");
        let started = crate::jobs::start_time(job.id()).expect("start time");
        let (mut read, mut write) = std::io::pipe().expect("pipe");
        let id = job.id();
        let guarded = std::thread::spawn(move || guard(id, started, Duration::ZERO, &mut read));
        write.write_all(b"alive\n").expect("write");
        job.stdin.take().expect("stdin").write_all(b"end\n").expect("tell the job");
        // Had the guard taken the bytes for the agent's end, it would have killed the job at once.
        assert_eq!(job.wait().expect("wait").code(), Some(3), "the job ended by itself");
        assert_eq!(guarded.join().expect("join").expect("guard"), GuardEnd::JobGone);
        drop(write);
    }
}
