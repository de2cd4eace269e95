//! Other online rules, for the comparison in BENCHMARKS.md ("Precision
//! first"): what the daemon's rule is measured against. Each places the
//! messages one by one, in arrival order, like the daemon (identical text,
//! then trigram matches at the daemon's threshold, then the rule's vector
//! step), on one creator's messages.

use std::collections::HashMap;

use clusterd::clustering::{Params, relative, trigram::Trigrams};

use crate::{data::Dataset, simulate::Placement};

/// A rule's vector step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    /// Join the nearest centroid at cosine >= t (the usual online rule).
    Centroid { t: f32 },
    /// Join the cluster of highest average similarity at >= t (absolute).
    Average { t: f32 },
    /// The daemon's rule, with a margin: a core join also needs the best
    /// relative average to beat the second best by `margin`, otherwise the
    /// message joins for review.
    Margin { margin: f32 },
    /// The daemon's rule, and after each core join the cluster merges with
    /// any other whose core members' average similarity to its own scores
    /// at least the core bar (online average linkage in both directions).
    Merge,
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Centroid { t } => write!(f, "centroid cosine >= {t:.2}"),
            Self::Average { t } => write!(f, "average similarity >= {t:.2}"),
            Self::Margin { margin } => write!(f, "relative bars + margin {margin:.2}"),
            Self::Merge => write!(f, "relative bars + merges"),
        }
    }
}

struct Cluster {
    sum: Vec<f32>,
    core: f32,
    trigrams: Vec<Trigrams>,
    /// Merged into another: its number.
    merged_into: Option<usize>,
}

/// Places every message of `data`, in `order`, by `variant`.
pub fn run(data: &Dataset, order: &[usize], params: &Params, variant: Variant) -> Placement {
    let dims = data.vectors[0].len();
    let mut clusters: Vec<Cluster> = Vec::new();
    let mut by_text: HashMap<String, usize> = HashMap::new();
    let mut background = (vec![0.0f32; dims], 0i64);
    let mut placement = Placement { clusters: vec![0; data.texts.len()], review: vec![false; data.texts.len()] };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for &i in order {
        let (text, x) = (&data.texts[i], &data.vectors[i]);
        let key = clusterd::domain::text::normalise(text);
        let trigrams = Trigrams::of(text);
        let mu = {
            let b = clusterd::clustering::Background { sum: background.0.clone(), count: background.1 };
            b.mean_similarity(params)
        };
        let live = |c: &Cluster| c.merged_into.is_none() && c.core > 0.0;
        let mut choice: Option<(usize, bool)> = by_text.get(&key).map(|&c| (c, false));
        if choice.is_none() && params.trigram_enabled() {
            let mut best: Option<(f32, usize)> = None;
            for (n, c) in clusters.iter().enumerate().filter(|(_, c)| live(c)) {
                for t in c.trigrams.iter().rev().take(params.trigram_members) {
                    let s = t.similarity(&trigrams);
                    if s >= params.trigram_threshold && best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, n));
                    }
                }
            }
            choice = best.map(|(_, n)| (n, false));
        }
        if choice.is_none() {
            let mut scored: Vec<(usize, f32, f32)> = clusters
                .iter()
                .enumerate()
                .filter(|(_, c)| live(c))
                .map(|(n, c)| {
                    let d = dot(x, &c.sum);
                    (n, d / c.core, d / dot(&c.sum, &c.sum).sqrt().max(1e-9))
                })
                .collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
            let best_cosine = scored.iter().copied().max_by(|a, b| a.2.total_cmp(&b.2));
            choice = match variant {
                Variant::Centroid { t } => best_cosine.filter(|b| b.2 >= t).map(|b| (b.0, false)),
                Variant::Average { t } => scored.first().filter(|b| b.1 >= t).map(|b| (b.0, false)),
                Variant::Margin { margin } => {
                    let second = scored.get(1).map_or(f32::NEG_INFINITY, |s| relative(s.1, mu));
                    match scored.first() {
                        Some(b) if relative(b.1, mu) >= params.core_threshold => {
                            Some((b.0, relative(b.1, mu) - second < margin))
                        }
                        _ => best_cosine.filter(|b| relative(b.2, mu) >= params.review_threshold).map(|b| (b.0, true)),
                    }
                }
                Variant::Merge => match scored.first() {
                    Some(b) if relative(b.1, mu) >= params.core_threshold => Some((b.0, false)),
                    _ => best_cosine.filter(|b| relative(b.2, mu) >= params.review_threshold).map(|b| (b.0, true)),
                },
            };
        }
        let (mut n, review) = match choice {
            Some(c) => c,
            None => {
                clusters.push(Cluster { sum: vec![0.0; dims], core: 0.0, trigrams: Vec::new(), merged_into: None });
                (clusters.len() - 1, false)
            }
        };
        if !review {
            let c = &mut clusters[n];
            c.sum.iter_mut().zip(x).for_each(|(s, v)| *s += v);
            c.core += 1.0;
            c.trigrams.push(trigrams);
            by_text.entry(key).or_insert(n);
        }
        background.0.iter_mut().zip(x).for_each(|(s, v)| *s += v);
        background.1 += 1;
        placement.clusters[i] = n;
        placement.review[i] = review;
        if variant == Variant::Merge && !review {
            loop {
                let own = &clusters[n];
                let best = clusters
                    .iter()
                    .enumerate()
                    .filter(|(m, c)| *m != n && live(c))
                    .map(|(m, c)| (m, dot(&own.sum, &c.sum) / (own.core * c.core)))
                    .max_by(|a, b| a.1.total_cmp(&b.1));
                let Some((m, _)) = best.filter(|b| relative(b.1, mu) >= params.core_threshold) else { break };
                let (keep, gone) = (n.min(m), n.max(m));
                let moved = std::mem::take(&mut clusters[gone].sum);
                let (core, trigrams) = (clusters[gone].core, std::mem::take(&mut clusters[gone].trigrams));
                clusters[gone].merged_into = Some(keep);
                let k = &mut clusters[keep];
                k.sum.iter_mut().zip(&moved).for_each(|(s, v)| *s += v);
                k.core += core;
                k.trigrams.extend(trigrams);
                by_text.values_mut().filter(|c| **c == gone).for_each(|c| *c = keep);
                n = keep;
            }
        }
    }
    // Follow merges to the surviving cluster.
    let root = |mut c: usize| {
        while let Some(next) = clusters[c].merged_into {
            c = next;
        }
        c
    };
    placement.clusters = placement.clusters.iter().map(|&c| root(c)).collect();
    placement
}
