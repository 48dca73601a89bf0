//! A TCP link between two nodes that the test controls: pass traffic, delay it, or drop it.
//!
//! Broker nodes are told (via `[broker.peers]`) to reach each peer through its own link, one
//! link per ordered pair, so a test can cut A→B while B→A still works (a one-way partition:
//! connections A opens to B fail; connections B opens to A carry both directions).
//!
//! A link also keeps the first [`CAPTURE_BYTES`] it carried, both ways, for tests that look at
//! what crossed the wire (a packet capture of the loopback traffic between nodes).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Refuse new connections and cut open ones.
    Drop,
    /// Hold every chunk of bytes this long before passing it on.
    Delay(Duration),
}

/// How much of what a link carries it keeps.
pub const CAPTURE_BYTES: usize = 64 << 20;

type Capture = Arc<Mutex<Vec<u8>>>;

pub struct Link {
    pub listen: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    fault: watch::Sender<Fault>,
    accept: JoinHandle<()>,
    captured: Capture,
}

impl Link {
    pub async fn bind() -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let target = Arc::new(Mutex::new(None));
        let (fault, _) = watch::channel(Fault::None);
        let captured = Capture::default();
        let accept = tokio::spawn(accept_loop(listener, target.clone(), fault.subscribe(), captured.clone()));
        Ok(Link { listen, target, fault, accept, captured })
    }

    /// What the link has carried so far (both directions, interleaved by chunk).
    pub fn captured(&self) -> Vec<u8> {
        self.captured.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(target);
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: Arc<Mutex<Option<SocketAddr>>>, fault: watch::Receiver<Fault>, captured: Capture) {
    while let Ok((inbound, _)) = listener.accept().await {
        let Some(to) = *target.lock().unwrap_or_else(|p| p.into_inner()) else { continue };
        if *fault.borrow() == Fault::Drop {
            continue; // dropping `inbound` closes it
        }
        let fault = fault.clone();
        let captured = captured.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(to).await else { return };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::select! {
                _ = pump(in_read, out_write, fault.clone(), captured.clone()) => {}
                _ = pump(out_read, in_write, fault, captured) => {}
            }
        });
    }
}

/// Copies bytes one way until either side closes or the link is dropped.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut fault: watch::Receiver<Fault>, captured: Capture) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow() == Fault::Drop {
                    return;
                }
                continue;
            }
        };
        let current = *fault.borrow();
        match current {
            Fault::Drop => return,
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::None => {}
        }
        {
            let mut kept = captured.lock().unwrap_or_else(|p| p.into_inner());
            let room = CAPTURE_BYTES.saturating_sub(kept.len()).min(n);
            kept.extend_from_slice(&buf[..room]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
