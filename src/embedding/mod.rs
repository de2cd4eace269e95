//! Embedding providers: turn texts into L2-normalised vectors of the
//! configured dimension. The embedder actor owns batching, the cache and
//! de-duplication, and makes one provider call per batch.

pub mod cache;
mod hash;
pub mod local;
pub mod openai;
mod provider;

pub use cache::EmbedCache;
pub use hash::HashEmbedder;
pub use local::LocalModel;
pub use openai::OpenAiEmbedder;
pub use provider::{InferencePool, Provider};

/// What one provider call returns: vectors in input order, and the tokens
/// the provider counted (what a paid provider bills).
#[derive(Debug, Clone, Default)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("the provider returned {got} vectors for {expected} texts")]
    Count { expected: usize, got: usize },
    #[error("the provider returned vectors of {got} dimensions, configured: {expected}")]
    Dimensions { expected: usize, got: usize },
    #[error("cannot load the model: {0}")]
    Load(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("model inference: {0}")]
    Inference(String),
    /// The provider answered with an error after every attempt, or one that
    /// retrying cannot fix (4xx other than 429, a malformed body).
    #[error("embedding provider: {0}")]
    Provider(String),
    /// The inference pool is gone (the daemon is stopping).
    #[error("the inference pool has stopped")]
    Stopped,
}

/// What every synchronous (CPU) provider does: one call per batch, vectors in
/// input order.
pub trait Embed: Send + Sync {
    /// A name for logs and metrics, also part of the cache key.
    fn model(&self) -> &str;
    fn embed(&self, texts: &[&str]) -> Result<Embeddings, EmbedError>;
}
