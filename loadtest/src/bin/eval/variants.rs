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
    /// The daemon's rule with issue 11's placement directions (both off:
    /// the daemon's rule itself, reimplemented, as a check):
    /// - `review_by_average`: a review join goes to the cluster of highest
    ///   average similarity (when the nearest centroid clears the review
    ///   bar) rather than to the nearest centroid;
    /// - `refine_every`: after every that many placements, and once at the
    ///   end, a refinement pass re-scores, in arrival order, each review
    ///   member and each lone message (a cluster of one, no review members)
    ///   against the current cores with the core bar: one that clears it
    ///   now moves in as core (a review member whose own cluster clears it
    ///   is promoted where it is; a lone message's cluster disappears).
    ///   0: no refinement.
    Rule { review_by_average: bool, refine_every: usize },
}

impl std::str::FromStr for Variant {
    type Err = String;

    /// `rule`, `review-avg`, `refine:K`, `refine:K+review-avg`, `merge`,
    /// `margin:M`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut review_by_average, mut refine_every) = (false, 0usize);
        for part in s.split('+') {
            match part.split_once(':') {
                None if part == "rule" => {}
                None if part == "review-avg" => review_by_average = true,
                None if part == "merge" => return Ok(Self::Merge),
                Some(("refine", k)) => refine_every = k.parse().map_err(|e| format!("{k}: {e}"))?,
                Some(("margin", m)) => {
                    return Ok(Self::Margin { margin: m.parse().map_err(|e| format!("{m}: {e}"))? });
                }
                _ => return Err(format!("no variant {part:?}")),
            }
        }
        Ok(Self::Rule { review_by_average, refine_every })
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Centroid { t } => write!(f, "centroid cosine >= {t:.2}"),
            Self::Average { t } => write!(f, "average similarity >= {t:.2}"),
            Self::Margin { margin } => write!(f, "relative bars + margin {margin:.2}"),
            Self::Merge => write!(f, "relative bars + merges"),
            Self::Rule { review_by_average, refine_every } => {
                write!(f, "relative bars")?;
                if *review_by_average {
                    write!(f, " + review by average")?;
                }
                if *refine_every > 0 {
                    write!(f, " + refinement every {refine_every}")?;
                }
                Ok(())
            }
        }
    }
}

struct Cluster {
    sum: Vec<f32>,
    core: f32,
    /// Core and review members.
    size: usize,
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
    let mut placed: Vec<usize> = Vec::with_capacity(order.len());
    let mu_of =
        |b: &(Vec<f32>, i64)| clusterd::clustering::Background { sum: b.0.clone(), count: b.1 }.mean_similarity(params);
    for &i in order {
        let (text, x) = (&data.texts[i], &data.vectors[i]);
        let key = clusterd::domain::text::normalise(text);
        let trigrams = Trigrams::of(text);
        let mu = mu_of(&background);
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
                Variant::Rule { review_by_average, .. } => match scored.first() {
                    Some(b) if relative(b.1, mu) >= params.core_threshold => Some((b.0, false)),
                    Some(b) if review_by_average => {
                        best_cosine.filter(|c| relative(c.2, mu) >= params.review_threshold).map(|_| (b.0, true))
                    }
                    _ => best_cosine.filter(|b| relative(b.2, mu) >= params.review_threshold).map(|b| (b.0, true)),
                },
                Variant::Merge => match scored.first() {
                    Some(b) if relative(b.1, mu) >= params.core_threshold => Some((b.0, false)),
                    _ => best_cosine.filter(|b| relative(b.2, mu) >= params.review_threshold).map(|b| (b.0, true)),
                },
            };
        }
        let (mut n, review) = match choice {
            Some(c) => c,
            None => {
                clusters.push(Cluster {
                    sum: vec![0.0; dims],
                    core: 0.0,
                    size: 0,
                    trigrams: Vec::new(),
                    merged_into: None,
                });
                (clusters.len() - 1, false)
            }
        };
        clusters[n].size += 1;
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
                let size = std::mem::take(&mut clusters[gone].size);
                clusters[gone].merged_into = Some(keep);
                let k = &mut clusters[keep];
                k.sum.iter_mut().zip(&moved).for_each(|(s, v)| *s += v);
                k.core += core;
                k.size += size;
                k.trigrams.extend(trigrams);
                by_text.values_mut().filter(|c| **c == gone).for_each(|c| *c = keep);
                n = keep;
            }
        }
        placed.push(i);
        if let Variant::Rule { refine_every: k, .. } = variant
            && k > 0
            && placed.len().is_multiple_of(k)
        {
            refine(data, &placed, &mut clusters, &mut placement, &mut by_text, params, mu_of(&background));
        }
    }
    if let Variant::Rule { refine_every: k, .. } = variant
        && k > 0
    {
        refine(data, &placed, &mut clusters, &mut placement, &mut by_text, params, mu_of(&background));
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

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One refinement pass (see [`Variant::Rule`]) over the messages placed so
/// far, in arrival order.
fn refine(
    data: &Dataset,
    placed: &[usize],
    clusters: &mut [Cluster],
    placement: &mut Placement,
    by_text: &mut HashMap<String, usize>,
    params: &Params,
    mu: f32,
) {
    for &i in placed {
        let own = placement.clusters[i];
        let review = placement.review[i];
        let lone = !review && clusters[own].core == 1.0 && clusters[own].size == 1;
        if !(review || lone) {
            continue;
        }
        let x = &data.vectors[i];
        let best = clusters
            .iter()
            .enumerate()
            .filter(|(n, c)| c.merged_into.is_none() && c.core > 0.0 && !(lone && *n == own))
            .map(|(n, c)| (n, dot(x, &c.sum) / c.core))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let Some((to, _)) = best.filter(|b| relative(b.1, mu) >= params.core_threshold) else { continue };
        let trigrams = if lone {
            clusters[own].core = 0.0;
            clusters[own].size = 0;
            clusters[own].sum.iter_mut().for_each(|s| *s = 0.0);
            std::mem::take(&mut clusters[own].trigrams).pop().unwrap_or_default()
        } else {
            clusters[own].size -= 1;
            Trigrams::of(&data.texts[i])
        };
        let c = &mut clusters[to];
        c.sum.iter_mut().zip(x).for_each(|(s, v)| *s += v);
        c.core += 1.0;
        c.size += 1;
        c.trigrams.push(trigrams);
        let key = clusterd::domain::text::normalise(&data.texts[i]);
        match by_text.get(&key) {
            Some(&n) if n != own || !lone => {}
            _ => {
                by_text.insert(key, to);
            }
        }
        placement.clusters[i] = to;
        placement.review[i] = false;
    }
}
