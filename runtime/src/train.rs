//! (in progress)

/// Arguments of `anneal-runtime train`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `anneal-runtime train`.
pub fn run(_args: Args) -> crate::error::Result<()> {
    Err(crate::error::RuntimeError::Internal("`train` is not implemented yet".into()))
}
