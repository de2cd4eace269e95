//! Embedding providers: turn texts into L2-normalised vectors of the
//! configured dimension. The embedder actor owns batching and calls one
//! provider per batch.

mod hash;

pub use hash::HashEmbedder;

use crate::settings::{EmbedderProvider, EmbedderSettings};

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("the provider returned {got} vectors for {expected} texts")]
    Count { expected: usize, got: usize },
}

/// What every provider does: one call per batch, vectors in input order.
pub trait Embed: Send + Sync {
    /// A name for logs and metrics, also part of the cache key later.
    fn model(&self) -> &str;
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// Builds the provider the settings ask for.
pub fn provider(settings: &EmbedderSettings) -> Box<dyn Embed> {
    match settings.provider {
        EmbedderProvider::Hash => Box::new(HashEmbedder::new(settings.dimensions)),
    }
}
