//! Progress reporting: one JSON object per line on stdout (what the operator and log
//! collectors read), a progress bar on stderr when it is a terminal.

use serde::Serialize;
use std::io::{IsTerminal, Write};

/// One progress line.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Always `"step"`.
    pub event: &'static str,
    /// Optimizer steps done.
    pub step: u64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// Mean loss per counted token of this step.
    pub loss: f64,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens per second over the steps since the previous line.
    pub tokens_per_sec: f64,
    /// Completed passes over the training data.
    pub epoch: u64,
    /// DPO's metrics (stage dpo): TRL's `rewards/*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preference: Option<crate::train::dpo::Stats>,
}

/// Prints progress.
#[derive(Debug)]
pub struct Reporter {
    bar: bool,
}

impl Default for Reporter {
    fn default() -> Self {
        Self {
            bar: std::io::stderr().is_terminal(),
        }
    }
}

impl Reporter {
    /// Prints any serialisable event as one JSON line on stdout.
    pub fn event(&self, value: &impl Serialize) {
        if let Ok(line) = serde_json::to_string(value) {
            let mut out = std::io::stdout().lock();
            // A closed stdout must not kill training; the checkpoints still matter.
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    /// Prints a step report, and redraws the bar on a terminal.
    pub fn step(&self, r: &StepReport) {
        self.event(r);
        if self.bar {
            let width = 30;
            let done = (r.step as usize * width) / r.total_steps.max(1) as usize;
            eprint!(
                "\r[{}{}] {}/{} loss {:.4} {:.0} tok/s ",
                "#".repeat(done),
                " ".repeat(width - done.min(width)),
                r.step,
                r.total_steps,
                r.loss,
                r.tokens_per_sec
            );
            if r.step == r.total_steps {
                eprintln!();
            }
        }
    }

    /// A warning: on stderr for people, and as a JSON event for machines.
    pub fn warn(&self, msg: &str) {
        eprintln!("anneal-runtime: warning: {msg}");
        self.event(&serde_json::json!({ "event": "warning", "message": msg }));
    }
}
