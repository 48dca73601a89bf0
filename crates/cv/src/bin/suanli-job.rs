//! `suanli-job`: runs one CV task (SPEC §6) and prints JSON-lines progress on stdout, the
//! last line `{"event":"done","summary":…}` or `{"event":"error",…}`; logs go to stderr.
//!
//!   suanli-job run spec.json                 # a spec file (JSON or YAML), `task` inside
//!   suanli-job --task train_classifier --params-json '{"data":"digits","training.epochs":"5",…}'
//!   suanli-job validate spec.json            # check a spec without touching data
//!   suanli-job device                        # which device a job would get, and why
//!   suanli-job backbone DIR                  # an untrained ResNet-18 model directory (image search's embedder before a trained one exists)
//!
//! Exit codes: 0 done, 2 the spec is invalid (nothing was read or written), 1 it failed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use suanli_cv::torch::device;
use suanli_cv::torch::jobs::{parse_task, task_from_params, JobEnv, JobError, Task};

#[derive(Parser)]
#[command(name = "suanli-job", version, about = "Runs one CV pipeline task on this node's devices")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The agent's form: a task name with `--params-json`.
    #[arg(long)]
    task: Option<String>,
    /// A JSON object of string parameters (see the module docs for how values are read).
    #[arg(long, requires = "task")]
    params_json: Option<String>,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long, env = "SUANLI_JOB_THREADS")]
    threads: Option<i32>,
}

#[derive(Subcommand)]
enum Command {
    Run {
        spec: PathBuf,
    },
    Validate {
        spec: PathBuf,
    },
    Device,
    /// Writes a model directory with a seeded, untrained backbone (`embed::write_untrained_backbone`):
    /// enough for near-duplicate image search; search by meaning needs trained weights.
    Backbone {
        dir: PathBuf,
        #[arg(long, default_value_t = 32)]
        width: i64,
        /// Pictures are resized to SIDE×SIDE.
        #[arg(long, default_value_t = 128)]
        side: i64,
        #[arg(long, default_value_t = 7)]
        seed: i64,
    },
}

fn print(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn read_spec(path: &PathBuf) -> Result<Task, JobError> {
    let text = std::fs::read_to_string(path).map_err(|e| JobError::Invalid(vec![format!("{}: {e}", path.display())]))?;
    let value: Value = if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
        serde_yaml::from_str(&text).map_err(|e| JobError::Invalid(vec![format!("{}: {e}", path.display())]))?
    } else {
        serde_json::from_str(&text).map_err(|e| JobError::Invalid(vec![format!("{}: {e}", path.display())]))?
    };
    parse_task(value)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        tch::set_num_threads(n.max(1));
    }
    let task = match (&cli.command, &cli.task) {
        (Some(Command::Device), _) => {
            print(&json!({"cuda": format!("{:?}", device::cuda_backend()), "threads": tch::get_num_threads()}));
            return ExitCode::SUCCESS;
        }
        (Some(Command::Backbone { dir, width, side, seed }), _) => {
            let spec = suanli_cv::torch::models::ModelSpec::ResNet18 { width: *width };
            let written = spec.validate().map_err(|e| e.to_string()).and_then(|()| {
                if !(32..=1024).contains(side) {
                    return Err("--side: between 32 and 1024".to_owned());
                }
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                suanli_cv::torch::embed::write_untrained_backbone(dir, &spec, [3, *side, *side], *seed).map_err(|e| e.to_string())
            });
            return match written {
                Ok(()) => {
                    print(&json!({"event": "done", "summary": {"model": dir}}));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    print(&json!({"event": "error", "invalid_spec": true, "message": e}));
                    ExitCode::from(2)
                }
            };
        }
        (Some(Command::Run { spec }), _) => read_spec(spec),
        (Some(Command::Validate { spec }), _) => match read_spec(spec) {
            Ok(_) => {
                print(&json!({"event": "valid"}));
                return ExitCode::SUCCESS;
            }
            Err(e) => Err(e),
        },
        (None, Some(task)) => {
            let params: Result<BTreeMap<String, String>, _> = serde_json::from_str(cli.params_json.as_deref().unwrap_or("{}"));
            match params {
                Ok(p) => task_from_params(task, &p),
                Err(e) => Err(JobError::Invalid(vec![format!("--params-json: {e}")])),
            }
        }
        (None, None) => Err(JobError::Invalid(vec!["give a subcommand (run, validate, device) or --task".into()])),
    };
    // libtorch errors inside tch's infallible calls are panics; they still end in an error line.
    let result = task.and_then(|t| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.run(&JobEnv::from_env(), &mut |v| print(&v)))).unwrap_or_else(|panic| {
            let why = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            Err(JobError::Failed(format!("internal error: {why}")))
        })
    });
    match result {
        Ok(summary) => {
            print(&json!({"event": "done", "summary": summary}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let invalid = matches!(e, JobError::Invalid(_));
            print(&json!({"event": "error", "invalid_spec": invalid, "message": e.to_string()}));
            eprintln!("suanli-job: {e}");
            ExitCode::from(if invalid { 2 } else { 1 })
        }
    }
}
