//! Jobs: what a researcher asks the scheduler to run on leased cards, and the one table of
//! legal job transitions.
//!
//! A job spec arrives as YAML or JSON (the scheduler parses it; this crate only defines and
//! validates it). Unknown fields are refused, so a typo is an error rather than a default.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Validator};
use crate::ids::{CardId, NodeId};
use crate::money::BillingMode;
use crate::time::Timestamp;

/// The three kinds of CV work of SPEC §6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Annotation,
    Training,
    Inference,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Annotation => "annotation",
            JobKind::Training => "training",
            JobKind::Inference => "inference",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits that are part of the replicated rules.
pub mod limits {
    pub const MAX_CARDS: u32 = 256;
    pub const MAX_ARTIFACTS: usize = 64;
    pub const MAX_ARGS: usize = 256;
    pub const MAX_ENV: usize = 64;
    pub const MAX_ATTEMPTS: u32 = 20;
    /// Jobs that may share one card when they ask to (inference services).
    pub const MAX_JOBS_PER_SHARED_CARD: u32 = 4;
    pub const MAX_PRIORITY: i32 = 1_000;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cards: u32,
    /// Acceptable GPU models, matched case-insensitively as a substring of the card's model
    /// (`A100` matches `NVIDIA A100-SXM4-80GB`). Empty: any model.
    #[serde(default)]
    pub gpu_models: Vec<String>,
    #[serde(default)]
    pub min_vram_mib: u64,
    /// All cards on one node (the default for multi-card jobs that need NVLink or shared memory).
    #[serde(default)]
    pub single_node: bool,
    /// The job may share its card with other sharing jobs (inference services only, one card).
    #[serde(default)]
    pub shared: bool,
}

/// An input the job needs on its node: a content-addressed artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactInput {
    /// File name under the job's input directory.
    pub name: String,
    /// SHA-256 of the bytes, lower-case hex.
    pub sha256: String,
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JobRun {
    /// Any program, run as the lease's Unix account on the placed cards.
    Command {
        program: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
    },
    /// A built-in CV task of `suanli-job` (`train_classifier`, `infer`, `pre_annotate`, …).
    Builtin {
        task: String,
        #[serde(default)]
        params: BTreeMap<String, String>,
    },
}

/// Opt-in: when the owner's cards cannot run the job, lease the cheapest matching Class B
/// cards within the budget (Class A needs a supplier's approval, so never automatically).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoLease {
    #[serde(default)]
    pub region: Option<String>,
    pub billing_mode: BillingMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub kind: JobKind,
    pub resources: Resources,
    #[serde(default)]
    pub inputs: Vec<ArtifactInput>,
    /// Names of the files the job leaves in its output directory to keep.
    #[serde(default)]
    pub outputs: Vec<String>,
    pub run: JobRun,
    /// Higher runs first among equals; 0 by default.
    #[serde(default)]
    pub priority: i32,
    /// May be stopped to make room and requeued (it resumes from its last checkpoint).
    #[serde(default)]
    pub preemptible: bool,
    /// Milliseconds since the epoch; a job not started by then fails with `DeadlineMissed`.
    #[serde(default)]
    pub deadline: Option<Timestamp>,
    /// The most this job may cost in minor units of the lease currency (GPU-seconds × price).
    #[serde(default)]
    pub budget_minor: Option<i64>,
    /// Attempts before the job stops with its last failure; 3 by default.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// The researcher's estimate of how long one attempt runs, in seconds: backfill uses it.
    #[serde(default)]
    pub expected_seconds: Option<u64>,
    #[serde(default)]
    pub auto_lease: Option<AutoLease>,
}

fn default_attempts() -> u32 {
    3
}

fn safe_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl JobSpec {
    /// Every problem, field by field.
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Validator::new();
        v.text("name", &self.name, true, 128);
        let r = &self.resources;
        v.check(r.cards >= 1, "resources.cards", "at least one card");
        v.check(r.cards <= limits::MAX_CARDS, "resources.cards", format!("at most {}", limits::MAX_CARDS));
        v.check(r.gpu_models.len() <= 16, "resources.gpu_models", "at most 16 models");
        for (i, m) in r.gpu_models.iter().enumerate() {
            v.text(&format!("resources.gpu_models[{i}]"), m, true, 64);
        }
        if r.shared {
            v.check(self.kind == JobKind::Inference, "resources.shared", "only inference jobs share cards");
            v.check(r.cards == 1, "resources.shared", "a sharing job takes exactly one card");
        }
        v.check(self.inputs.len() <= limits::MAX_ARTIFACTS, "inputs", format!("at most {}", limits::MAX_ARTIFACTS));
        for (i, input) in self.inputs.iter().enumerate() {
            v.check(safe_name(&input.name), &format!("inputs[{i}].name"), "letters, digits, '.', '_' and '-' only");
            v.check(
                input.sha256.len() == 64 && input.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                &format!("inputs[{i}].sha256"),
                "64 lower-case hex digits",
            );
        }
        v.check(self.outputs.len() <= limits::MAX_ARTIFACTS, "outputs", format!("at most {}", limits::MAX_ARTIFACTS));
        for (i, name) in self.outputs.iter().enumerate() {
            v.check(safe_name(name), &format!("outputs[{i}]"), "letters, digits, '.', '_' and '-' only");
        }
        match &self.run {
            JobRun::Command { program, args, env } => {
                v.text("run.command.program", program, true, 4096);
                v.check(args.len() <= limits::MAX_ARGS, "run.command.args", format!("at most {}", limits::MAX_ARGS));
                for (i, a) in args.iter().enumerate() {
                    v.text(&format!("run.command.args[{i}]"), a, false, 4096);
                }
                v.check(env.len() <= limits::MAX_ENV, "run.command.env", format!("at most {}", limits::MAX_ENV));
                for (k, val) in env {
                    let field = format!("run.command.env.{k}");
                    v.check(
                        !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !k.as_bytes()[0].is_ascii_digit(),
                        &field,
                        "variable names are letters, digits and '_'",
                    );
                    v.check(!k.starts_with("SUANLI_") && k != "CUDA_VISIBLE_DEVICES", &field, "set by the platform");
                    v.text(&field, val, false, 4096);
                }
            }
            JobRun::Builtin { task, params } => {
                v.check(safe_name(task), "run.builtin.task", "letters, digits, '.', '_' and '-' only");
                v.check(params.len() <= limits::MAX_ENV, "run.builtin.params", format!("at most {}", limits::MAX_ENV));
                for (k, val) in params {
                    v.text(&format!("run.builtin.params.{k}"), val, false, 4096);
                }
            }
        }
        v.check(self.priority.abs() <= limits::MAX_PRIORITY, "priority", format!("between -{0} and {0}", limits::MAX_PRIORITY));
        if let Some(budget) = self.budget_minor {
            v.check(budget > 0, "budget_minor", "must be positive");
        }
        v.check((1..=limits::MAX_ATTEMPTS).contains(&self.max_attempts), "max_attempts", format!("between 1 and {}", limits::MAX_ATTEMPTS));
        if let Some(s) = self.expected_seconds {
            v.check((1..=365 * 86_400).contains(&s), "expected_seconds", "between 1 second and a year");
        }
        if let Some(auto) = &self.auto_lease {
            if let Some(region) = &auto.region {
                v.text("auto_lease.region", region, true, 64);
            }
            v.check(self.budget_minor.is_some(), "auto_lease", "leasing on the job's behalf needs a budget_minor");
        }
        v.finish()
    }

    /// Whether a card of `model` with `vram_mib` satisfies the job's model and memory wishes.
    pub fn accepts_card(&self, model: &str, vram_mib: u64) -> bool {
        let r = &self.resources;
        vram_mib >= r.min_vram_mib
            && (r.gpu_models.is_empty() || {
                let model = model.to_ascii_lowercase();
                r.gpu_models.iter().any(|m| model.contains(&m.to_ascii_lowercase()))
            })
    }
}

/// ```text
///   Queued ──place──▶ Placed ──start──▶ Running ──▶ Succeeded / Failed
///     ▲                 │                  │
///     └──── requeue ────┴──────────────────┘   (preempted, card lost, attempt failed)
///   any live state ──cancel──▶ Cancelled
/// ```
/// A requeued job keeps its attempt count; a job out of attempts goes to Failed instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Placed,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [JobState::Queued, JobState::Placed, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    pub fn is_live(self) -> bool {
        matches!(self, JobState::Queued | JobState::Placed | JobState::Running)
    }

    /// Placed or running: holding cards.
    pub fn holds_cards(self) -> bool {
        matches!(self, JobState::Placed | JobState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Placed => "placed",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an attempt ended or a job left the queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobEndReason {
    /// The program exited with status 0.
    Completed,
    /// The program exited with this status (or was killed by a signal, as 128 + signal).
    ExitStatus(i32),
    /// The agent could not start it (missing program, input checksum mismatch, …).
    StartFailed(String),
    /// The scheduler stopped it to make room for a more deserving job.
    Preempted,
    /// A placed card faulted or fell off the bus.
    CardLost(CardId),
    /// The node's agent went silent.
    NodeLost(NodeId),
    /// The lease holding its cards ended.
    LeaseEnded,
    /// Cancelled by its owner (or an operator).
    CancelledByUser,
    /// Not started before its deadline.
    DeadlineMissed,
    /// Its cost reached the budget.
    BudgetExhausted,
    /// No card it accepts exists among the owner's leases and auto-lease could not help.
    Unplaceable(String),
}

impl JobEndReason {
    /// Whether the attempt failed because of the job itself (counts against `max_attempts`),
    /// rather than because the platform took its cards away.
    pub fn is_job_failure(&self) -> bool {
        matches!(self, JobEndReason::ExitStatus(_) | JobEndReason::StartFailed(_))
    }
}

impl fmt::Display for JobEndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobEndReason::Completed => f.write_str("completed"),
            JobEndReason::ExitStatus(s) => write!(f, "exited with status {s}"),
            JobEndReason::StartFailed(why) => write!(f, "could not start: {why}"),
            JobEndReason::Preempted => f.write_str("preempted"),
            JobEndReason::CardLost(c) => write!(f, "card {c} was lost"),
            JobEndReason::NodeLost(n) => write!(f, "node {n} went silent"),
            JobEndReason::LeaseEnded => f.write_str("the lease ended"),
            JobEndReason::CancelledByUser => f.write_str("cancelled"),
            JobEndReason::DeadlineMissed => f.write_str("missed its deadline"),
            JobEndReason::BudgetExhausted => f.write_str("budget exhausted"),
            JobEndReason::Unplaceable(why) => write!(f, "cannot be placed: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            name: "resnet".into(),
            kind: JobKind::Training,
            resources: Resources { cards: 2, gpu_models: vec!["A100".into()], min_vram_mib: 40_000, single_node: true, shared: false },
            inputs: vec![],
            outputs: vec!["model.safetensors".into()],
            run: JobRun::Command { program: "/usr/bin/python3".into(), args: vec!["train.py".into()], env: BTreeMap::new() },
            priority: 0,
            preemptible: true,
            deadline: None,
            budget_minor: None,
            max_attempts: 3,
            expected_seconds: Some(600),
            auto_lease: None,
        }
    }

    #[test]
    fn a_good_spec_passes() {
        spec().validate().unwrap();
    }

    #[test]
    fn every_problem_is_listed_by_field() {
        let mut s = spec();
        s.name = String::new();
        s.resources.cards = 0;
        s.resources.shared = true;
        s.inputs.push(ArtifactInput { name: "../etc/passwd".into(), sha256: "xyz".into() });
        s.max_attempts = 0;
        s.auto_lease = Some(AutoLease { region: None, billing_mode: BillingMode::Hourly });
        let err = s.validate().unwrap_err();
        let fields: Vec<&str> = err.field_errors().iter().map(|e| e.field.as_str()).collect();
        for f in ["name", "resources.cards", "resources.shared", "inputs[0].name", "inputs[0].sha256", "max_attempts", "auto_lease"] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn platform_variables_cannot_be_overridden() {
        let mut s = spec();
        s.run = JobRun::Command {
            program: "x".into(),
            args: vec![],
            env: BTreeMap::from([("CUDA_VISIBLE_DEVICES".into(), "0".into()), ("SUANLI_JOB".into(), "1".into())]),
        };
        assert_eq!(s.validate().unwrap_err().field_errors().len(), 2);
    }

    #[test]
    fn card_matching_is_by_model_substring_and_memory() {
        let s = spec();
        assert!(s.accepts_card("NVIDIA A100-SXM4-80GB", 81_920));
        assert!(!s.accepts_card("NVIDIA A100-PCIE-40GB", 39_000));
        assert!(!s.accepts_card("NVIDIA H100", 81_920));
    }
}
