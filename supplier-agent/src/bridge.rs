//! `suanli-agent service-bridge` (hidden): runs as the lease's user, in its sandbox, for a
//! service whose program listens only on a Unix socket path of its own choosing (JupyterLab):
//! it starts the program, and carries each connection from the listening socket the agent handed
//! it (`fd:<n>`, in the agent's own directory) to the program's socket (in the lease's home).
//! So the agent never connects to a path the lease can change; the lease's user does. It ends
//! with the program, with its status.

use std::path::{Path, PathBuf};

/// Serves until the program ends; returns its exit code.
pub async fn run(listen: &str, socket: &Path, command: &[String]) -> std::io::Result<i32> {
    let fd: i32 = listen
        .strip_prefix("fd:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{listen}: not fd:<n>")))?;
    let listener = crate::access::sandbox::inherited_listener(fd)?;
    let (program, args) = command.split_first().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no program"))?;
    let _ = std::fs::remove_file(socket);
    let mut child = tokio::process::Command::new(program).args(args).kill_on_drop(true).spawn()?;
    let socket: PathBuf = socket.to_owned();
    loop {
        tokio::select! {
            status = child.wait() => {
                use std::os::unix::process::ExitStatusExt as _;
                let status = status?;
                return Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
            }
            accepted = listener.accept() => {
                let Ok((mut visitor, _)) = accepted else { continue };
                let socket = socket.clone();
                tokio::spawn(async move {
                    // Not listening yet (starting): the connection is closed, and the agent's
                    // health check tries again.
                    if let Ok(mut program) = tokio::net::UnixStream::connect(&socket).await {
                        let _ = tokio::io::copy_bidirectional(&mut visitor, &mut program).await;
                    }
                });
            }
        }
    }
}
