//! `anneal-operator`: reconciles TrainingJob (EvalGate and ModelServer follow in later issues).

use anneal_operator::config::OperatorConfig;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "anneal-operator",
    version,
    about = "Kubernetes operator that trains, evaluates and serves language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Runtime image for pods whose resource names none.
    #[arg(long, global = true, env = "ANNEAL_RUNTIME_IMAGE")]
    runtime_image: Option<String>,
    /// Reconcile only the resources of this namespace (default: all namespaces).
    #[arg(long, global = true, env = "ANNEAL_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(
        long,
        global = true,
        env = "ANNEAL_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: std::net::SocketAddr,
    /// Compete for the `anneal-operator` Lease and reconcile only while holding it (for running
    /// two replicas).
    #[arg(long, global = true, env = "ANNEAL_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease.
    #[arg(
        long,
        global = true,
        env = "POD_NAMESPACE",
        default_value = "anneal-system"
    )]
    lease_namespace: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (the default).
    Run,
    /// Print the CustomResourceDefinitions as YAML (the same that `manifests/crds/` holds).
    Crds,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Crds => {
            print!("{}", anneal_crds::all_crds_yaml()?);
            Ok(())
        }
        Command::Run => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .json()
                .init();
            let mut config = OperatorConfig::default();
            if let Some(image) = cli.runtime_image {
                config.runtime_image = image;
            }
            let client = kube::Client::try_default().await?;
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                "anneal-operator starting"
            );
            let metrics = std::sync::Arc::new(anneal_operator::metrics::Metrics::default());
            let server = anneal_operator::metrics::serve(cli.metrics_addr, metrics.clone());
            tokio::spawn(async move {
                if let Err(err) = server.await {
                    tracing::error!(error = %err, "metrics endpoint stopped");
                }
            });
            let controllers = anneal_operator::trainingjob::run(
                client.clone(),
                config,
                cli.namespace.as_deref(),
                metrics,
            );
            if cli.leader_elect {
                let identity = std::env::var("POD_NAME")
                    .unwrap_or_else(|_| format!("anneal-operator-{}", std::process::id()));
                let election = anneal_operator::leader::LeaderElection::new(
                    client,
                    &cli.lease_namespace,
                    "anneal-operator",
                    &identity,
                );
                tracing::info!(%identity, "waiting to lead");
                election.acquire().await?;
                tracing::info!(%identity, "leading");
                tokio::select! {
                    _ = controllers => {}
                    lost = election.hold() => {
                        // Stop at once: another replica may be writing already.
                        anyhow::bail!("lost leadership: {lost}");
                    }
                }
            } else {
                controllers.await;
            }
            tracing::info!("anneal-operator stopped");
            Ok(())
        }
    }
}
