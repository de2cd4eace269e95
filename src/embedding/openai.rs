//! The `openai` provider (being written).

use super::{EmbedError, Embeddings};
use crate::settings::OpenAiSettings;

pub struct OpenAiEmbedder {
    model: String,
}

impl OpenAiEmbedder {
    pub fn new(settings: &OpenAiSettings, _dimensions: usize, _retries: prometheus::IntCounter) -> Result<Self, EmbedError> {
        Ok(Self { model: settings.model.clone() })
    }
    pub fn model(&self) -> &str {
        &self.model
    }
    pub async fn embed(&self, _texts: &[String]) -> Result<Embeddings, EmbedError> {
        Err(EmbedError::Provider("not written yet".into()))
    }
}
