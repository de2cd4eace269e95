//! The `clusterd` command line: `serve`, `migrate` and `token`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use clusterd::{
    domain::token::{self, Scope},
    repository::{Repository, schema},
    settings::Settings,
    startup::Application,
    telemetry,
};

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
    /// Creates, lists and revokes API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Creates a token and prints it as the last line (it is shown only
    /// once: the database keeps only its hash).
    Create {
        /// `ingest` (send messages for any creator), `admin` (everything) or
        /// `creator:ID` (the same as --creator ID).
        #[arg(long, conflicts_with = "creator", required_unless_present = "creator")]
        scope: Option<Scope>,
        /// A creator's token: read, subscribe to and act on that creator's clusters.
        #[arg(long)]
        creator: Option<String>,
        /// A note for `token list`, e.g. who holds the token.
        #[arg(long, default_value = "")]
        name: String,
        /// First revoke the active tokens with the same name (rotation).
        #[arg(long, requires = "name")]
        replace: bool,
    },
    /// Lists every token: id, scope, name, created, revoked.
    List,
    /// Revokes a token by its id (as `token list` shows it).
    Revoke { id: uuid::Uuid },
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    clusterd::startup::install_tls_provider();
    let cli = Cli::parse();
    let settings = Settings::load().context("configuration")?;
    // The token commands print for people: only warnings in between.
    let filter = if matches!(cli.command, Command::Token(_)) { "warn" } else { settings.log.filter.as_str() };
    telemetry::init(filter);
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
        Command::Token(command) => token_command(&settings, command).await?,
    }
    Ok(())
}

async fn token_command(settings: &Settings, command: TokenCommand) -> anyhow::Result<()> {
    let db = schema::connect(&settings.database, &settings.index).await.context("database")?;
    schema::migrate(&db).await.context("migrations")?;
    let repo = Repository::new(db);
    match command {
        TokenCommand::Create { scope, creator, name, replace } => {
            let scope = match (scope, creator) {
                (_, Some(creator)) => format!("creator:{creator}").parse::<Scope>()?,
                (Some(scope), None) => scope,
                (None, None) => anyhow::bail!("give --scope ingest|admin or --creator ID"),
            };
            if replace {
                let revoked = repo.revoke_tokens_named(&name).await?;
                eprintln!("revoked {revoked} earlier token(s) named {name:?}");
            }
            let (secret, hash) = token::generate();
            let id = repo.create_token(&hash, &scope, &name).await?;
            eprintln!("created token {id} with scope {scope}; store it now, it is not shown again:");
            println!("{secret}");
        }
        TokenCommand::List => {
            println!("{:<36}  {:<24}  {:<20}  {:<20}  name", "id", "scope", "created", "revoked");
            let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
            for t in repo.tokens().await? {
                let revoked = t.revoked_at.map_or_else(|| "-".to_owned(), time);
                println!("{:<36}  {:<24}  {:<20}  {:<20}  {}", t.id, t.scope, time(t.created_at), revoked, t.name);
            }
        }
        TokenCommand::Revoke { id } => {
            repo.revoke_token(id).await.with_context(|| format!("no active token has id {id}"))?;
            eprintln!("revoked token {id}; instances stop accepting it within auth.cache_ttl_ms");
        }
    }
    Ok(())
}
