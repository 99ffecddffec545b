//! (in progress)

/// Arguments of `anneal-runtime eval`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `anneal-runtime eval`.
pub fn run(_args: Args) -> crate::error::Result<()> {
    Err(crate::error::RuntimeError::Internal("`eval` is not implemented yet".into()))
}
