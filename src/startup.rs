//! Builds the application from typed settings: database, schema, pipeline
//! actors, and the HTTP server bound to its listener (port 0 in tests).

use std::{
    net::TcpListener,
    sync::Arc,
    sync::atomic::{AtomicU64, AtomicUsize},
};

use actix::Arbiter;
use actix_web::{App, HttpServer, dev::Server, middleware, web};
use anyhow::Context;

use crate::{
    actors::{Pipeline, embedder::Resolver},
    api::{self, ApiState},
    embedding::{EmbedCache, Provider},
    metrics::Metrics,
    repository::{Repository, schema},
    settings::Settings,
};

/// Makes ring the process's rustls crypto provider (sqlx and the OpenAI
/// client both use rustls; with two providers compiled in, rustls would not
/// pick one). Idempotent.
pub fn install_tls_provider() {
    // Err means a provider is already installed: nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct Application {
    port: u16,
    server: Server,
    pipeline: Pipeline,
    repo: Repository,
    /// Runs the pipeline's actors; stopped with the application.
    arbiter: Arbiter,
}

impl Application {
    /// Connects, migrates, pins the schema to the configured dimension,
    /// starts the pipeline and binds the listener. Must run inside an
    /// actix system.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        install_tls_provider();
        let db = schema::connect(&settings.database, &settings.index)
            .await
            .context("cannot connect to PostgreSQL (database.url)")?;
        schema::migrate(&db).await.context("migrations failed")?;
        schema::pin_dimension(&db, settings.embedder.dimensions).await.context("embedding dimension")?;
        schema::sync_hnsw(&db, &settings.index).await.context("HNSW index")?;
        let repo = Repository::new(db).with_label_exact_max(settings.clustering.label_exact_max);

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
        let arbiter = Arbiter::new();
        let pipeline = Pipeline::start(&arbiter, &settings, repo.clone(), resolver, metrics.clone());

        let listener = TcpListener::bind(settings.server.bind)
            .with_context(|| format!("cannot listen on {}", settings.server.bind))?;
        let port = listener.local_addr()?.port();
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let server_settings = settings.server.clone();
        let state = web::Data::new(ApiState {
            repo: repo.clone(),
            pipeline: pipeline.clone(),
            settings,
            metrics,
            next_session: AtomicU64::new(1),
            ws_sessions: AtomicUsize::new(0),
        });
        let server = HttpServer::new(move || {
            App::new()
                .wrap(middleware::from_fn(api::time_limit))
                .wrap(middleware::from_fn(api::track))
                .configure(|cfg| api::configure(cfg, state.clone()))
        })
        .workers(workers)
        .max_connections(server_settings.max_connections)
        .client_request_timeout(server_settings.client_request_timeout())
        .client_disconnect_timeout(server_settings.client_disconnect_timeout())
        .shutdown_timeout(server_settings.shutdown_timeout_secs)
        .listen(listener)?
        .run();
        tracing::info!(port, workers, "clusterd is serving");
        Ok(Self { port, server, pipeline, repo, arbiter })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// A handle to stop the server (gracefully or not) from elsewhere.
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until the server stops (SIGINT/SIGTERM, or its handle), then
    /// stops the pipeline. Acknowledged work left unfinished is in the
    /// database and resumes at the next start.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.arbiter.stop();
        result
    }
}
