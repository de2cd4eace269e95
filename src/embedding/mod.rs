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
pub use local::{LoadError, LocalModel};
pub use openai::{OpenAiEmbedder, ProviderError};
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
    Load(#[from] local::LoadError),
    #[error("tokenizer: {0}")]
    Tokenize(#[source] tokenizers::Error),
    /// A text the tokenizer turned into no tokens, or more than the model
    /// has positions for.
    #[error("tokenizer: {tokens} tokens for a text of {bytes} bytes")]
    TokenCount { tokens: usize, bytes: usize },
    #[error("model inference: {0}")]
    Inference(#[source] candle_core::Error),
    /// The provider answered with an error after every attempt, or one that
    /// retrying cannot fix (4xx other than 429, a malformed body), or its
    /// settings cannot work.
    #[error("embedding provider: {0}")]
    Provider(#[from] openai::ProviderError),
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
