//! The `local` provider: all-MiniLM-L6-v2 in-process (being written).

use std::path::Path;

use super::{Embed, EmbedError, Embeddings};

pub struct LocalModel {}

impl LocalModel {
    pub fn load(_dir: &Path, _max_tokens: usize) -> Result<Self, EmbedError> {
        Err(EmbedError::Load("not written yet".into()))
    }

    pub fn dimensions(&self) -> usize {
        384
    }
}

impl Embed for LocalModel {
    fn model(&self) -> &str {
        "all-MiniLM-L6-v2"
    }
    fn embed(&self, _texts: &[&str]) -> Result<Embeddings, EmbedError> {
        Err(EmbedError::Load("not written yet".into()))
    }
}
