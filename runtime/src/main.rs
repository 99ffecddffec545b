//! `anneal-runtime`: the binary that TrainingJob, EvalGate and ModelServer pods run.
//! Errors end the process with the exit code of their category (`anneal_crds::contract`).

use anneal_runtime::{eval, serve, train};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "anneal-runtime",
    version,
    about = "Train, evaluate and serve language models with candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train or fine-tune a model, checkpointing and resuming exactly.
    Train(train::Args),
    /// Evaluate a model on a data set and print gate metrics as JSON.
    Eval(eval::Args),
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(serve::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Serve(args) => serve::run(args),
    };
    if let Err(err) = result {
        // One line naming the problem; the exit code tells the operator what to do.
        eprintln!("anneal-runtime: error: {err}");
        std::process::exit(err.exit_code());
    }
}
