//! `anneal-runtime`: the binary that TrainingJob, EvalGate and ModelServer pods run.

use clap::Parser;

#[derive(Parser)]
#[command(name = "anneal-runtime", version, about = "Train, evaluate and serve language models with candle")]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
