//! A lease's terminal in the browser (a `terminal` service, `services.rs`): the agent itself
//! serves it on the service's socket, and every WebSocket at `/pty` is a login shell of the
//! lease's user, on a terminal, in the lease's sandbox, as an SSH session through the gateway
//! is. The browser's page (xterm.js) comes from the portal, on the service's origin.
//!
//! Messages: binary frames are keystrokes (browser → shell) and output (shell → browser); a
//! text frame `{"cols": C, "rows": R}` resizes the terminal. The shell and what it started on
//! the terminal get `SIGHUP` when the browser goes, as a closed SSH session's do.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use axum::Router;
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::access::sandbox::Sandbox;
use crate::access::LiveLease;

/// Where the browser's terminal connects.
pub const PTY_PATH: &str = "/pty";
/// The largest terminal a browser may ask for.
const MAX_SIDE: u16 = 1000;

#[derive(Clone)]
struct Terminal {
    lease: Arc<LiveLease>,
    sandbox: Sandbox,
    shell: PathBuf,
    /// Whether the lease is still live here (a shell starts only then).
    live: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Set when the terminal service stops: its open shells hang up.
    stop: tokio::sync::watch::Receiver<bool>,
}

#[derive(serde::Deserialize)]
struct Resize {
    cols: u16,
    rows: u16,
}

/// The terminal service's routes: `/pty` and `/v1/health`.
/// `live` says whether the lease is still live here; `stop` hangs up every open shell.
pub fn router(
    lease: Arc<LiveLease>,
    sandbox: Sandbox,
    shell: PathBuf,
    live: Arc<dyn Fn() -> bool + Send + Sync>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Router {
    Router::new().route(PTY_PATH, get(upgrade)).route("/v1/health", get(|| async { "ok" })).with_state(Terminal { lease, sandbox, shell, live, stop })
}

async fn upgrade(State(terminal): State<Terminal>, ws: WebSocketUpgrade) -> Response {
    if !(terminal.live)() {
        return (axum::http::StatusCode::GONE, "the lease is over").into_response();
    }
    ws.max_message_size(1 << 20).on_upgrade(move |socket| async move {
        if let Err(e) = session(socket, &terminal).await {
            tracing::info!(lease = terminal.lease.id, error = %e, "a browser terminal could not start");
        }
    })
}

async fn session(socket: WebSocket, terminal: &Terminal) -> std::io::Result<()> {
    let lease = &terminal.lease;
    let (pty, pts) = pty_process::open().map_err(std::io::Error::other)?;
    pty.resize(pty_process::Size::new(24, 80)).map_err(std::io::Error::other)?;
    let shell = terminal.shell.display().to_string();
    let env = crate::access::gateway::session_env(lease, &[("TERM".to_owned(), "xterm-256color".to_owned()), ("SHELL".to_owned(), shell)]);
    let command = pty_process::Command::new(&terminal.shell).arg("-l").env_clear().envs(env).current_dir(&lease.account.home);
    let mut child = terminal.sandbox.apply_pty(command).spawn(pts).map_err(std::io::Error::other)?;
    tracing::info!(lease = lease.id, pid = child.id().unwrap_or(0), "a browser terminal started");
    let (mut from_shell, mut to_shell) = pty.into_split();
    let (mut to_browser, mut from_browser) = socket.split();
    let output = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_shell.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_browser.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_browser.send(Message::Close(None)).await;
    });
    let mut stop = terminal.stop.clone();
    loop {
        let message = tokio::select! {
            message = from_browser.next() => message,
            _ = stop.wait_for(|s| *s) => None,
        };
        let written = match message {
            Some(Ok(Message::Binary(keys))) => to_shell.write_all(&keys).await,
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<Resize>(&text) {
                Ok(r) => {
                    let size = pty_process::Size::new(r.rows.clamp(1, MAX_SIDE), r.cols.clamp(1, MAX_SIDE));
                    let _ = to_shell.resize(size);
                    Ok(())
                }
                Err(_) => to_shell.write_all(text.as_bytes()).await,
            },
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => Ok(()),
        };
        if written.is_err() {
            break;
        }
    }
    // The browser has gone (or the service stopped): the shell's session hangs up, as a closed
    // SSH session's does.
    if let Some(group) = child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32)) {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::HUP);
    }
    if tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    output.abort();
    Ok(())
}
