//! anneal's operator: the controllers that reconcile TrainingJob (and, in later issues, EvalGate
//! and ModelServer), node-health judgement for GPU failover, and the builders of what they own.
//!
//! Each controller is a pipeline (style.md #1): read what exists -> decide (pure) -> build the
//! children (pure) -> apply them -> write status once, only when it changed.

pub mod config;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod node_health;
pub mod trainingjob;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "anneal-operator";
