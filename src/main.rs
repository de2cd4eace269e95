//! The `clusterd` command line: `serve` and `migrate`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use clusterd::{repository::schema, settings::Settings, startup::Application, telemetry};

#[derive(Parser)]
#[command(name = "clusterd", version, about = "Clusters the messages visitors send to a creator, live.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Applies pending migrations, then serves the API.
    Serve,
    /// Applies pending migrations and exits.
    Migrate,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    clusterd::startup::install_tls_provider();
    let cli = Cli::parse();
    let settings = Settings::load().context("configuration")?;
    telemetry::init(&settings.log.filter);
    match cli.command {
        Command::Serve => {
            let app = Application::build(settings).await?;
            let shutdown = app.shutdown_handle();
            actix_web::rt::spawn(async move {
                match clusterd::startup::stop_signal().await {
                    Ok(()) => shutdown.trigger(),
                    // Without signal handling the process still stops by SIGKILL,
                    // and acknowledged messages survive that.
                    Err(e) => tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT"),
                }
            });
            app.run_until_stopped().await?;
        }
        Command::Migrate => {
            let db = schema::connect(&settings.database, &settings.index).await.context("database")?;
            schema::migrate(&db).await.context("migrations")?;
            schema::pin_dimension(&db, settings.embedder.dimensions).await?;
            tracing::info!("migrations applied");
        }
    }
    Ok(())
}
