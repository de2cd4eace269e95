//! A labelled data set (`{"text", "intent"}` per line) and its embeddings,
//! computed once with the local model and cached next to the stack.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clusterd::embedding::{Embed, LocalModel};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Line {
    text: String,
    intent: String,
}

/// Texts, their label indexes, and (once embedded) one unit vector each.
pub struct Dataset {
    pub name: String,
    pub texts: Vec<String>,
    pub labels: Vec<usize>,
    pub label_names: Vec<String>,
    pub vectors: Vec<Vec<f32>>,
}

impl Dataset {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let raw = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut index: HashMap<String, usize> = HashMap::new();
        let (mut texts, mut labels, mut label_names) = (Vec::new(), Vec::new(), Vec::new());
        for (n, line) in raw.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let line: Line = serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), n + 1))?;
            let next = index.len();
            let label = *index.entry(line.intent.clone()).or_insert_with(|| {
                label_names.push(line.intent.clone());
                next
            });
            texts.push(line.text);
            labels.push(label);
        }
        if texts.is_empty() {
            bail!("{} holds no examples", path.display());
        }
        // "clinc150-test" for loadtest/data/clinc150/test.jsonl.
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("data");
        let name = match path.parent().and_then(|p| p.file_name()).and_then(|s| s.to_str()) {
            Some(set) => format!("{set}-{stem}"),
            None => stem.to_owned(),
        };
        Ok(Self { name, texts, labels, label_names, vectors: Vec::new() })
    }

    /// The examples of the given intents only (embeddings kept).
    pub fn only(self, intents: &[String]) -> anyhow::Result<Self> {
        let keep: Vec<usize> = intents
            .iter()
            .map(|name| self.label_names.iter().position(|n| n == name).with_context(|| format!("no intent {name:?}")))
            .collect::<anyhow::Result<_>>()?;
        let mut out = Self {
            name: format!("{}-{}-intents", self.name, keep.len()),
            texts: Vec::new(),
            labels: Vec::new(),
            label_names: keep.iter().map(|&l| self.label_names[l].clone()).collect(),
            vectors: Vec::new(),
        };
        for i in 0..self.texts.len() {
            if let Some(label) = keep.iter().position(|&l| l == self.labels[i]) {
                out.texts.push(self.texts[i].clone());
                out.labels.push(label);
                if let Some(v) = self.vectors.get(i) {
                    out.vectors.push(v.clone());
                }
            }
        }
        Ok(out)
    }

    pub fn classes(&self) -> usize {
        self.label_names.len()
    }

    /// Embeds every text with the local model, or reads the vectors cached
    /// in `cache_dir` by an earlier run over the same texts.
    pub fn embed(&mut self, model_dir: &Path, cache_dir: &Path) -> anyhow::Result<()> {
        let key = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for t in &self.texts {
                h.update(t.as_bytes());
                h.update([0]);
            }
            h.update(model_dir.to_string_lossy().as_bytes());
            format!("{:x}", h.finalize())
        };
        let cache: PathBuf = cache_dir.join(format!("{}-{}.f32", self.name, &key[..16]));
        if let Ok(raw) = std::fs::read(&cache) {
            let floats: Vec<f32> =
                raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
            if !floats.is_empty() && floats.len().is_multiple_of(self.texts.len()) {
                let dim = floats.len() / self.texts.len();
                self.vectors = floats.chunks(dim).map(<[f32]>::to_vec).collect();
                return Ok(());
            }
        }
        eprintln!("eval: embedding {} texts of {} with the local model", self.texts.len(), self.name);
        let model = LocalModel::load(model_dir, 256).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut vectors = Vec::with_capacity(self.texts.len());
        for chunk in self.texts.chunks(64) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            vectors.extend(model.embed(&refs).map_err(|e| anyhow::anyhow!("{e}"))?.vectors);
        }
        std::fs::create_dir_all(cache_dir)?;
        let bytes: Vec<u8> = vectors.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(&cache, bytes)?;
        self.vectors = vectors;
        Ok(())
    }
}
