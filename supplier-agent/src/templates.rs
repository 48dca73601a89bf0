//! The environments services run in, installed once per node and shared by every lease
//! read-only (root's, under `templates_dir`): JupyterLab from PyPI, in a virtualenv made with an
//! interpreter every lease can run (`jupyter_python`), with the node's PyTorch environment's
//! packages (`jupyter_packages`) importable from its notebooks too.
//!
//! An environment is ready once its marker is written, after everything else; one half made (the
//! agent stopped during the install) is made again from nothing. One install at a time.

use std::path::{Path, PathBuf};

/// JupyterLab's pinned release; its dependencies are what pip resolves for it.
pub const JUPYTERLAB: &str = "jupyterlab==4.6.6";
const JUPYTERLAB_DIR: &str = "jupyterlab-4.6.6";
const READY: &str = ".suanli-ready";

pub struct Templates {
    dir: PathBuf,
    python: PathBuf,
    packages: Option<PathBuf>,
    installing: tokio::sync::Mutex<()>,
}

impl Templates {
    pub fn new(dir: PathBuf, python: PathBuf, packages: Option<PathBuf>) -> Templates {
        Templates { dir, python, packages, installing: tokio::sync::Mutex::new(()) }
    }

    /// JupyterLab's environment, installed first if it is not (minutes, once per node); `note`
    /// hears what happens.
    pub async fn jupyterlab(&self, note: impl Fn(&str)) -> Result<PathBuf, String> {
        let venv = self.dir.join(JUPYTERLAB_DIR);
        if venv.join(READY).exists() {
            return Ok(venv);
        }
        let _one_at_a_time = self.installing.lock().await;
        if venv.join(READY).exists() {
            return Ok(venv);
        }
        note(&format!("installing {JUPYTERLAB} into {} (once per node)", venv.display()));
        if venv.exists() {
            std::fs::remove_dir_all(&venv).map_err(|e| format!("{}: {e}", venv.display()))?;
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        // Root runs what is in there: it must be root's, and nobody else's to change.
        let meta = std::fs::metadata(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        if std::os::unix::fs::MetadataExt::uid(&meta) != rustix::process::geteuid().as_raw() || std::os::unix::fs::MetadataExt::mode(&meta) & 0o022 != 0 {
            return Err(format!("{} must be the agent's own and writable by no one else", self.dir.display()));
        }
        run(&self.python, &["-m", "venv", &venv.display().to_string()]).await?;
        let pip = venv.join("bin/pip");
        // Wheels only: nothing from PyPI is built (run) as root here.
        run(&pip, &["install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", JUPYTERLAB]).await?;
        // The node's PyTorch is importable from the notebooks: its packages go on the
        // environment's path, after the environment's own.
        if let Some(packages) = &self.packages {
            let ours = output(&venv.join("bin/python"), &["-c", "import site; print(site.getsitepackages()[0])"]).await?;
            std::fs::write(Path::new(&ours).join("suanli-node-packages.pth"), format!("{}\n", packages.display())).map_err(|e| e.to_string())?;
        }
        std::fs::write(venv.join(READY), JUPYTERLAB).map_err(|e| e.to_string())?;
        note(&format!("{JUPYTERLAB} installed"));
        Ok(venv)
    }
}

async fn run(program: &Path, args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("{}: {e}", program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let tail: String = String::from_utf8_lossy(&out.stderr).chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
        Err(format!("{} {}: {}: {tail}", program.display(), args.join(" "), out.status))
    }
}

async fn output(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(program).args(args).output().await.map_err(|e| format!("{}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!("{}: {}", program.display(), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
