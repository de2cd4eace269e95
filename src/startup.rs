//! Builds the application from typed settings: database, schema, pipeline
//! actors, and the HTTP server bound to its listener (port 0 in tests;
//! `server.port_file` tells another process the port it got).
//!
//! Shutdown is ours, not actix's (its signal handling is off): a
//! [`ShutdownHandle`], triggered by `main` on SIGTERM or SIGINT, stops the
//! listener, tells every WebSocket session to close with 1001, lets
//! in-flight requests finish (up to `server.shutdown_timeout_secs`), then
//! flushes the pipeline (up to that timeout again) so that what was
//! acknowledged is also decided, and only then stops it. What was
//! acknowledged is already stored; work the pipeline had not finished
//! (deferred to the recovery sweep, or beyond the timeout) resumes at the
//! next start.

use std::{
    net::TcpListener,
    path::Path,
    sync::Arc,
    sync::atomic::{AtomicU64, AtomicUsize},
    time::{Duration, Instant},
};

use actix::Arbiter;
use actix_web::{App, HttpServer, dev::Server, middleware, web};
use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use tokio::sync::watch;

use crate::{
    actors::{Pipeline, embedder::Resolver},
    api::{self, ApiState},
    embedding::{EmbedCache, Provider},
    metrics::Metrics,
    query_cache::QueryCache,
    repository::{self, Repository, schema},
    settings::Settings,
};

/// Makes ring the process's rustls crypto provider (sqlx and the OpenAI
/// client both use rustls; with two providers compiled in, rustls would not
/// pick one). Idempotent.
pub fn install_tls_provider() {
    // Err means a provider is already installed: nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Starts the graceful shutdown of an [`Application`]; cheap to clone.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// Flushes an [`Application`]'s pipeline from elsewhere (tests); cheap to
/// clone.
#[derive(Clone)]
pub struct FlushHandle(Pipeline);

impl FlushHandle {
    /// See [`Pipeline::flush`]. Err: the application has stopped.
    pub async fn flush(&self) -> Result<(), actix::MailboxError> {
        self.0.flush().await
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn stop_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = terminate.recv() => Ok(()),
            interrupted = tokio::signal::ctrl_c() => interrupted,
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}

/// Connects and migrates. A database that cannot be reached yet is waited
/// for, with back-off (250 ms, doubling, at most 5 s between attempts), up
/// to `database.start_wait_secs`; any other error stops the start at once.
async fn connect_when_ready(settings: &Settings) -> anyhow::Result<sea_orm::DatabaseConnection> {
    let deadline = Instant::now() + Duration::from_secs(settings.database.start_wait_secs);
    let backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(250))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(5))
        .without_max_times();
    let attempt = || async {
        let db = schema::connect(&settings.database, &settings.index).await?;
        schema::migrate(&db).await?;
        Ok::<_, sea_orm::DbErr>(db)
    };
    attempt
        .retry(backoff)
        .when(|e| repository::is_unavailable(e) && Instant::now() < deadline)
        .notify(|e, pause| {
            tracing::warn!(error = %e, retry_in_ms = pause.as_millis(), "the database is unavailable; waiting for it");
        })
        .await
        .context("cannot connect to PostgreSQL and migrate (database.url)")
}

/// Adds the likely cause to a start that failed on a lost or foreign named
/// prepared statement: a transaction pooler (PgBouncer in transaction mode
/// before 1.21) hands each transaction any server connection, and sqlx
/// names its statements whatever `database.statement_cache_capacity` is.
fn explain_pooler(error: anyhow::Error) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("prepared statement \"sqlx_s_") {
        error.context(
            "the database connection loses prepared statements between transactions: is it PgBouncer in \
             transaction mode? Before 1.21 that cannot work (sqlx names every statement); use session mode, or \
             PgBouncer >= 1.21 with max_prepared_statements",
        )
    } else {
        error
    }
}

/// Writes `port` to `path` atomically (a temporary file renamed over it):
/// whoever reads the file sees the whole number or no file.
/// This machine's host name (Linux), part of an instance's name; `None`
/// elsewhere: predecessors are then left to expire.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}

fn write_port_file(path: &Path, port: u16) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, format!("{port}\n"))?;
    std::fs::rename(&partial, path)
}

pub struct Application {
    port: u16,
    server: Server,
    shutdown: ShutdownHandle,
    /// Flushed at shutdown and by [`FlushHandle`]s.
    pipeline: Pipeline,
    /// Runs the pipeline's actors; stopped with the application.
    arbiter: Arbiter,
    /// How long shutdown waits for the pipeline's flush.
    drain_timeout: Duration,
    /// Releases this instance's claims once its pipeline is flushed.
    repo: Repository,
}

impl Application {
    /// Connects, migrates, pins the schema to the configured dimension,
    /// starts the pipeline and binds the listener. Must run inside an
    /// actix system.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        install_tls_provider();
        let db = async {
            let db = connect_when_ready(&settings).await?;
            schema::pin_dimension(&db, settings.embedder.dimensions).await.context("embedding dimension")?;
            schema::sync_hnsw(&db, &settings.index).await.context("HNSW index")?;
            anyhow::Ok(db)
        }
        .await
        .map_err(explain_pooler)?;
        let database = &settings.database;
        let local = (!database.startup_options).then_some(repository::LocalSettings {
            statement_timeout_ms: database.statement_timeout_ms,
            hnsw_ef_search: settings.index.hnsw_ef_search,
        });
        // This process's identity for the claims on unfinished work shared
        // with other instances (see `actors::recovery`): registered before
        // anything is ingested, so that nobody takes what it stores.
        let instance = uuid::Uuid::now_v7();
        let repo = Repository::new(db)
            .with_label_exact_max(settings.clustering.label_exact_max)
            .with_params((&settings.clustering).into())
            .with_local_settings(local)
            .with_instance(instance);
        repo.renew_instance(settings.recovery.instance_ttl()).await.context("register this instance")?;
        tracing::info!(%instance, "instance registered");
        // Bound before the pipeline starts, so that its first sweep takes a
        // crashed predecessor's work on this address at once.
        let listener = TcpListener::bind(settings.server.bind)
            .with_context(|| format!("cannot listen on {}", settings.server.bind))?;
        let address = listener.local_addr()?;
        let port = address.port();
        if let Some(host) = host_name() {
            let retired = repo.retire_predecessors(&format!("{host} {address}")).await.context("name this instance")?;
            if retired > 0 {
                tracing::info!(retired, "took over the unfinished work of a previous process on this address");
            }
        }

        let metrics = Arc::new(Metrics::new());
        let provider = Provider::build(&settings.embedder, metrics.embed_provider_retries.clone())
            .with_context(|| format!("cannot start the {:?} embedding provider", settings.embedder.provider))?;
        let cache = EmbedCache::new(&settings.embedder.cache, &settings.redis).context("embedding cache")?;
        tracing::info!(
            provider = provider.kind(),
            model = provider.model(),
            redis = cache.has_redis(),
            "embedder ready"
        );
        let resolver =
            Arc::new(Resolver::new(Arc::new(provider), Arc::new(cache), metrics.clone(), &settings.embedder));
        let shared_rate =
            api::shared_rate::SharedRate::new(&settings.auth, &settings.redis).context("shared rate limit")?;
        tracing::info!(shared = shared_rate.is_some(), "rate limits ready");
        let arbiter = Arbiter::new();
        let pipeline = Pipeline::start(&arbiter, &settings, repo.clone(), resolver, metrics.clone())
            .context("live events across instances (redis.url)")?;

        // Without a name for the database, entries could be shared with
        // another database on the same Redis: no cache then.
        let mut cache_settings = settings.cache.clone();
        let namespace = repo.cache_namespace().await.unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot name the database for the query cache; the query cache is off");
            cache_settings.enabled = false;
            String::new()
        });
        let query_cache = Arc::new(
            QueryCache::new(&cache_settings, &settings.redis, namespace, metrics.clone()).context("query cache")?,
        );
        tracing::info!(enabled = query_cache.enabled(), redis = query_cache.has_redis(), "query cache ready");

        if let Some(path) = &settings.server.port_file {
            write_port_file(path, port).with_context(|| format!("cannot write server.port_file {}", path.display()))?;
        }
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let server_settings = settings.server.clone();
        let drain_timeout = Duration::from_secs(server_settings.shutdown_timeout_secs);
        let (shutdown, stopping) = watch::channel(false);
        let state = web::Data::new(ApiState {
            repo: repo.clone(),
            pipeline: pipeline.clone(),
            operations: crate::operations::Operations::new(repo.clone(), &pipeline, settings.limits.clone())
                .with_query_cache(query_cache),
            auth: api::auth::Authenticator::new(&settings.auth, repo.clone(), shared_rate),
            settings,
            metrics,
            next_session: AtomicU64::new(1),
            ws_sessions: AtomicUsize::new(0),
            shutdown: stopping,
        });
        let server = HttpServer::new(move || {
            App::new()
                .wrap(middleware::from_fn(api::auth::authenticate))
                .wrap(middleware::from_fn(api::time_limit))
                .wrap(middleware::from_fn(api::track))
                .configure(|cfg| api::configure(cfg, state.clone()))
        })
        .workers(workers)
        .max_connections(server_settings.max_connections)
        .client_request_timeout(server_settings.client_request_timeout())
        .client_disconnect_timeout(server_settings.client_disconnect_timeout())
        .shutdown_timeout(server_settings.shutdown_timeout_secs)
        .disable_signals()
        .listen(listener)?
        .run();
        tracing::info!(port, workers, "clusterd is serving");
        Ok(Self { port, server, shutdown: ShutdownHandle(Arc::new(shutdown)), pipeline, arbiter, drain_timeout, repo })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to flush the pipeline from elsewhere.
    pub fn flush_handle(&self) -> FlushHandle {
        FlushHandle(self.pipeline.clone())
    }

    /// A handle to shut the application down gracefully from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until the shutdown handle is triggered, then stops
    /// gracefully (see the module's documentation) and stops the pipeline.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self { server, shutdown, arbiter, pipeline, drain_timeout, repo, .. } = self;
        let handle = server.handle();
        let mut stopping = shutdown.0.subscribe();
        let mut server = std::pin::pin!(server);
        let result = tokio::select! {
            result = &mut server => result,
            // Err cannot happen: `shutdown` holds the sender.
            _ = stopping.wait_for(|&stop| stop) => {
                tracing::info!("shutting down: refusing new connections, closing WebSockets, finishing requests");
                // The server stops accepting at once, then resolves when
                // every connection closed (WebSocket sessions close on the
                // same signal) or the shutdown timeout dropped the rest. It
                // handles the command only while polled, hence this order.
                let stopped = handle.stop(true);
                let result = server.await;
                stopped.await;
                result
            }
        };
        tracing::info!("finishing the pipeline's queued work");
        match tokio::time::timeout(drain_timeout, pipeline.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "the pipeline could not be flushed"),
            Err(_) => tracing::warn!(
                timeout_secs = drain_timeout.as_secs(),
                "the pipeline was not flushed in time; the next start resumes its work"
            ),
        }
        // What is left unfinished (deferred work, a flush that timed out)
        // goes to the other instances' next sweep, or to the next start.
        // Bounded: with the database away, the claims expire by themselves.
        match tokio::time::timeout(Duration::from_secs(2), repo.leave_instance()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not release this instance's claims; they expire with recovery.instance_ttl_ms")
            }
            Err(_) => {
                tracing::warn!("releasing this instance's claims timed out; they expire with recovery.instance_ttl_ms")
            }
        }
        arbiter.stop();
        tracing::info!("stopped");
        result
    }
}
