//! `anneal-operator`: reconciles TrainingJob, EvalGate and ModelServer.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "anneal-operator", version, about = "Kubernetes operator that trains, evaluates and serves language models")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (the same that `manifests/crds/` holds).
    Crds,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crds) => {
            print!("{}", anneal_crds::all_crds_yaml()?);
            Ok(())
        }
        None => anyhow::bail!("the controllers are not implemented yet; see `anneal-operator --help`"),
    }
}
