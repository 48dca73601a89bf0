//! A real SMTP server for tests: aiosmtpd (PyPI, in the project's tools venv) on a port it picks
//! itself, parsing each message with Python's `email` package and appending it as one JSON line.
//! What arrives here went through a real SMTP dialogue and a real MIME parser.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::Service;

const SERVER: &str = r#"
import asyncio, email, json, socket, sys
from email import policy
from aiosmtpd.smtp import SMTP

class Sink:
    def __init__(self, path):
        self.path = path
    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=policy.default)
        body = msg.get_body(preferencelist=("plain",))
        record = {"to": envelope.rcpt_tos, "mail_from": envelope.mail_from, "subject": str(msg["subject"]),
                  "message_id": str(msg["message-id"]), "text": body.get_content() if body else ""}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return "250 OK"

async def main():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Sink(sys.argv[1])), sock=sock)
    print("SUANLI_READY smtp=127.0.0.1:%d" % sock.getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"#;

/// The project's tools venv (ops/install-build-deps makes it).
pub fn tools_python() -> PathBuf {
    let tools = std::env::var("SUANLI_TOOLS").unwrap_or_else(|_| "/var/tmp/suanli-tools".into());
    Path::new(&tools).join("venv/bin/python")
}

#[derive(Clone, Debug, Deserialize)]
pub struct Mail {
    pub to: Vec<String>,
    pub mail_from: String,
    pub subject: String,
    pub message_id: String,
    pub text: String,
}

pub struct SmtpSink {
    _service: Service,
    /// `host:port`
    pub address: String,
    inbox: PathBuf,
}

impl SmtpSink {
    pub async fn start(dir: &Path) -> anyhow::Result<SmtpSink> {
        let script = dir.join("smtp_sink.py");
        std::fs::write(&script, SERVER)?;
        let inbox = dir.join("inbox.jsonl");
        let args = vec![script.display().to_string(), inbox.display().to_string()];
        let service = Service::start("smtp", &tools_python(), &args, &[], dir, Duration::from_secs(20))
            .await
            .context("starting aiosmtpd (run ops/install-build-deps)")?;
        let address = service.get("smtp")?.to_owned();
        Ok(SmtpSink { _service: service, address, inbox })
    }

    pub fn messages(&self) -> Vec<Mail> {
        std::fs::read_to_string(&self.inbox).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The first message to `to` (waiting for it to arrive: another process sends it).
    pub async fn wait_for(&self, to: &str, timeout: Duration) -> anyhow::Result<Mail> {
        crate::eventually(timeout, Duration::from_millis(50), || async { self.messages().into_iter().find(|m| m.to.iter().any(|t| t == to)) })
            .await
            .with_context(|| format!("no mail to {to}"))
    }
}
