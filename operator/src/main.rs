//! `anneal-operator`: reconciles TrainingJob, EvalGate and ModelServer.

use anneal_operator::config::OperatorConfig;
use anneal_operator::leader::{LeaderElection, WriteGate};
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
    /// How long a node that failed under a TrainingJob stays out of that job's placement.
    #[arg(
        long,
        global = true,
        env = "ANNEAL_NODE_EXCLUSION_SECONDS",
        default_value_t = 600
    )]
    node_exclusion_seconds: u32,
    /// Node condition types that mean, when True, that a node's GPUs are unhealthy
    /// (comma-separated; node-problem-detector and NVSentinel report problems this way).
    #[arg(
        long,
        global = true,
        env = "ANNEAL_GPU_HEALTH_CONDITIONS",
        value_delimiter = ','
    )]
    gpu_health_conditions: Option<Vec<String>>,
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
            config.node_exclusion_seconds = i64::from(cli.node_exclusion_seconds);
            if let Some(conditions) = cli.gpu_health_conditions {
                config.gpu_health_conditions = conditions;
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
            tokio::select! {
                _ = anneal_operator::crds_established(&client) => {}
                _ = shutdown_signal() => return Ok(()),
            }
            // Ready means "can serve its role": a standby is ready too, so that a rolling
            // upgrade can start the new replica while the old one still leads.
            metrics.set_ready(true);
            if !cli.leader_elect {
                anneal_operator::run_controllers(
                    client,
                    config,
                    cli.namespace.as_deref(),
                    metrics,
                    WriteGate::always(),
                )
                .await;
                tracing::info!("anneal-operator stopped");
                return Ok(());
            }
            let identity = std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("anneal-operator-{}", std::process::id()));
            let election = LeaderElection::new(
                client.clone(),
                &cli.lease_namespace,
                "anneal-operator",
                &identity,
            );
            tracing::info!(%identity, "waiting to lead");
            tokio::select! {
                acquired = election.acquire() => acquired?,
                _ = shutdown_signal() => {
                    tracing::info!("anneal-operator stopped (standby)");
                    return Ok(());
                }
            }
            tracing::info!(%identity, "leading");
            let controllers = anneal_operator::run_controllers(
                client,
                config,
                cli.namespace.as_deref(),
                metrics,
                election.gate(),
            );
            tokio::select! {
                // The controllers end on SIGTERM or SIGINT, once in-flight reconciles finish.
                _ = controllers => {}
                lost = election.hold() => {
                    // The gate is closed already; stop at once: another replica may lead.
                    anyhow::bail!("lost leadership: {lost}");
                }
            }
            if let Err(err) = election.release().await {
                tracing::warn!(error = %err, "releasing the leader lease");
            } else {
                tracing::info!(%identity, "released the leader lease");
            }
            tracing::info!("anneal-operator stopped");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
