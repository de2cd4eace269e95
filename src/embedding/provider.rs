//! The configured provider behind one async interface, and the dedicated
//! inference threads that keep the CPU-bound model off the server's and the
//! actors' threads.

use std::{
    sync::{Arc, Mutex, mpsc},
    thread,
};

use secrecy::ExposeSecret;
use tokio::sync::oneshot;

use super::{Embed, EmbedError, Embeddings, HashEmbedder, LocalModel, OpenAiEmbedder};
use crate::settings::{EmbedderProvider, EmbedderSettings};

/// One of the providers, ready to embed batches.
pub enum Provider {
    Hash(HashEmbedder),
    Local(InferencePool),
    OpenAi(Box<OpenAiEmbedder>),
}

impl Provider {
    /// Builds the provider the settings ask for. The local model is loaded
    /// here, so that a missing or broken model stops the daemon at start
    /// with a clear error instead of failing every message later.
    pub fn build(settings: &EmbedderSettings, retries: prometheus::IntCounter) -> Result<Self, EmbedError> {
        let provider = match settings.provider {
            EmbedderProvider::Hash => Self::Hash(HashEmbedder::new(settings.dimensions)),
            EmbedderProvider::Local => {
                let local = &settings.local;
                let model = LocalModel::load(&local.model_dir, local.max_tokens)?;
                if model.dimensions() != settings.dimensions {
                    return Err(EmbedError::Dimensions { expected: settings.dimensions, got: model.dimensions() });
                }
                Self::Local(InferencePool::start(Arc::new(model), local.threads))
            }
            EmbedderProvider::OpenAi => {
                let mut openai = settings.openai.clone();
                // The conventional variable, when the key is not configured.
                if openai.api_key.expose_secret().is_empty()
                    && let Ok(key) = std::env::var("OPENAI_API_KEY")
                {
                    openai.api_key = key.into();
                }
                Self::OpenAi(Box::new(OpenAiEmbedder::new(&openai, settings.dimensions, retries)?))
            }
        };
        Ok(provider)
    }

    /// The provider's name, a label on the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hash(_) => "hash",
            Self::Local(_) => "local",
            Self::OpenAi(_) => "openai",
        }
    }

    /// The model's name, part of every cache key.
    pub fn model(&self) -> &str {
        match self {
            Self::Hash(hash) => hash.model(),
            Self::Local(pool) => &pool.model,
            Self::OpenAi(openai) => openai.model(),
        }
    }

    /// Embeds one batch: one provider call (or one request per
    /// `max_inputs` for OpenAI), vectors in input order.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Embeddings, EmbedError> {
        let expected = texts.len();
        let embeddings = match self {
            Self::Hash(hash) => {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                hash.embed(&refs)?
            }
            Self::Local(pool) => pool.embed(texts).await?,
            Self::OpenAi(openai) => openai.embed(&texts).await?,
        };
        if embeddings.vectors.len() != expected {
            return Err(EmbedError::Count { expected, got: embeddings.vectors.len() });
        }
        Ok(embeddings)
    }
}

/// A batch for the inference threads, with where to send its result.
struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Embeddings, EmbedError>>,
}

/// Dedicated OS threads that run a CPU-bound model, one batch each at a
/// time. Dropping the pool ends the threads once their batch is done.
pub struct InferencePool {
    jobs: mpsc::Sender<Job>,
    model: String,
}

impl InferencePool {
    pub fn start(model: Arc<dyn Embed>, threads: usize) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads.max(1) {
            let (model, queue) = (model.clone(), queue.clone());
            thread::Builder::new()
                .name(format!("clusterd-embed-{n}"))
                .spawn(move || Self::work(model.as_ref(), &queue))
                .expect("the OS can start a thread at start-up");
        }
        Self { jobs, model: model.model().to_owned() }
    }

    fn work(model: &dyn Embed, queue: &Mutex<mpsc::Receiver<Job>>) {
        loop {
            // The lock is held only while waiting for the next job.
            let job = match queue.lock() {
                Ok(queue) => queue.recv(),
                Err(_) => return,
            };
            let Ok(Job { texts, reply }) = job else { return };
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            // The receiver may have gone (the actor restarted): nothing to do.
            let _ = reply.send(model.embed(&refs));
        }
    }

    pub async fn embed(&self, texts: Vec<String>) -> Result<Embeddings, EmbedError> {
        let (reply, result) = oneshot::channel();
        self.jobs.send(Job { texts, reply }).map_err(|_| EmbedError::Stopped)?;
        result.await.map_err(|_| EmbedError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_web::test]
    async fn inference_pool_runs_batches_off_the_caller_thread() {
        struct ThreadName;
        impl Embed for ThreadName {
            fn model(&self) -> &str {
                "thread-name"
            }
            fn embed(&self, texts: &[&str]) -> Result<Embeddings, EmbedError> {
                let on_pool = thread::current().name().is_some_and(|n| n.starts_with("clusterd-embed-"));
                Ok(Embeddings {
                    vectors: texts.iter().map(|_| vec![f32::from(u8::from(on_pool))]).collect(),
                    tokens: 0,
                })
            }
        }
        let pool = InferencePool::start(Arc::new(ThreadName), 2);
        let batches =
            futures_util::future::join_all((0..8).map(|i| pool.embed((0..=i).map(|j| format!("text {j}")).collect())))
                .await;
        for (i, batch) in batches.into_iter().enumerate() {
            let batch = batch.expect("the pool answers");
            assert_eq!(batch.vectors.len(), i + 1);
            assert!(batch.vectors.iter().all(|v| v == &[1.0]), "ran on a pool thread");
        }
        assert_eq!(pool.model, "thread-name");
    }
}
