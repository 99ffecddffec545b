//! (in progress)

/// Arguments of `anneal-runtime serve`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `anneal-runtime serve`.
pub fn run(_args: Args) -> crate::error::Result<()> {
    Err(crate::error::RuntimeError::Internal("`serve` is not implemented yet".into()))
}
