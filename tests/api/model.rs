//! The `local` provider against reference outputs of sentence-transformers
//! all-MiniLM-L6-v2 (`tests/fixtures/minilm_reference.jsonl`, from an
//! independent implementation): same token ids, same vectors within float
//! tolerance, however the texts are batched.

use std::sync::OnceLock;

use clusterd::embedding::{Embed, EmbedError, LocalModel};
use serde::Deserialize;

use crate::helpers::model_dir;

/// sentence-transformers' `max_seq_length` for this model.
const MAX_TOKENS: usize = 256;
const MIN_COSINE: f64 = 0.9999;
const MAX_DIFF: f64 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    id: usize,
    text: String,
    token_count: usize,
    input_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn references() -> Vec<Reference> {
    let raw = include_str!("../fixtures/minilm_reference.jsonl");
    let refs: Vec<Reference> =
        raw.lines().map(|line| serde_json::from_str(line).expect("a reference line parses")).collect();
    assert_eq!(refs.len(), 41, "the fixture holds 41 reference texts");
    refs
}

fn model() -> &'static LocalModel {
    static MODEL: OnceLock<LocalModel> = OnceLock::new();
    MODEL.get_or_init(|| LocalModel::load(&model_dir(), MAX_TOKENS).expect("the model loads"))
}

/// Checks one vector against its reference: L2 norm 1, cosine and largest
/// component difference within tolerance.
fn assert_matches(got: &[f32], want: &Reference) {
    assert_eq!(got.len(), want.embedding.len(), "text {}: dimensions", want.id);
    let norm = got.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "text {}: norm {norm}", want.id);
    let want_norm = want.embedding.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let dot: f64 = got.iter().zip(&want.embedding).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
    let cosine = dot / (norm * want_norm);
    let max_diff = got.iter().zip(&want.embedding).map(|(&a, &b)| f64::from(a - b).abs()).fold(0.0, f64::max);
    assert!(
        cosine >= MIN_COSINE && max_diff <= MAX_DIFF,
        "text {} ({:?}): cosine {cosine}, max |diff| {max_diff}",
        want.id,
        want.text
    );
}

#[test]
fn model_token_ids_match_the_reference() {
    let model = model();
    for r in references() {
        assert_eq!(r.input_ids.len(), r.token_count);
        assert_eq!(model.token_ids(&r.text).expect("tokenises"), r.input_ids, "text {} ({:?})", r.id, r.text);
    }
}

#[test]
fn model_matches_the_reference_in_one_mixed_batch() {
    let refs = references();
    // The batch mixes short texts with the one truncated at 256 tokens.
    assert!(refs.iter().any(|r| r.token_count == MAX_TOKENS) && refs.iter().any(|r| r.token_count < 10));
    let texts: Vec<&str> = refs.iter().map(|r| r.text.as_str()).collect();
    let out = model().embed(&texts).expect("embeds");
    assert_eq!(out.vectors.len(), refs.len());
    assert_eq!(out.tokens, refs.iter().map(|r| r.token_count as u64).sum::<u64>(), "tokens count special tokens");
    for (got, want) in out.vectors.iter().zip(&refs) {
        assert_matches(got, want);
    }
}

#[test]
fn model_matches_the_reference_one_text_at_a_time() {
    let model = model();
    for r in references() {
        let out = model.embed(&[&r.text]).expect("embeds");
        assert_eq!(out.vectors.len(), 1);
        assert_eq!(out.tokens, r.token_count as u64);
        assert_matches(&out.vectors[0], &r);
    }
}

#[test]
fn model_keeps_input_order_with_duplicates() {
    let refs = references();
    // Reversed, with a repeat: the output follows the input, not the
    // length order inside `embed`.
    let picked: Vec<&Reference> = refs.iter().rev().chain(refs.iter().take(3)).collect();
    let texts: Vec<&str> = picked.iter().map(|r| r.text.as_str()).collect();
    let out = model().embed(&texts).expect("embeds");
    assert_eq!(out.vectors.len(), picked.len());
    for (got, want) in out.vectors.iter().zip(picked) {
        assert_matches(got, want);
    }
}

#[test]
fn model_basics_and_empty_input() {
    let model = model();
    assert_eq!(model.model(), "all-MiniLM-L6-v2");
    assert_eq!(model.dimensions(), 384);
    let out = model.embed(&[]).expect("an empty batch is fine");
    assert!(out.vectors.is_empty());
    assert_eq!(out.tokens, 0);
}

#[test]
fn model_load_errors_are_errors() {
    let missing = LocalModel::load(std::path::Path::new("/nonexistent/model"), MAX_TOKENS);
    assert!(
        matches!(missing, Err(EmbedError::Load(ref e)) if e.to_string().contains("config.json")),
        "{:?}",
        missing.err()
    );
    let too_long = LocalModel::load(&model_dir(), 513);
    assert!(
        matches!(too_long, Err(EmbedError::Load(ref e)) if e.to_string().contains("max_tokens")),
        "{:?}",
        too_long.err()
    );
}
