//! The daemon's clustering rule (`clusterd::clustering`), run in-process
//! over a data set's embeddings in a given order: the same code that the
//! clustering actor runs, without the database, so that thresholds can be
//! swept in seconds.

use std::collections::HashMap;

use clusterd::clustering::{CreatorIndex, OpenCluster, Params, trigram::Trigrams};
use uuid::Uuid;

use crate::{
    data::Dataset,
    metrics::{Scores, score},
};

/// Sends every message, in `order`, to one creator's index; returns the
/// scores of the resulting clusters.
pub fn run(data: &Dataset, order: &[usize], params: &Params) -> Scores {
    let dims = data.vectors[0].len();
    let mut index = CreatorIndex::new(0, dims);
    let mut by_text: HashMap<String, Uuid> = HashMap::new();
    let mut assigned: Vec<Uuid> = vec![Uuid::nil(); data.texts.len()];
    for &i in order {
        let (text, x) = (&data.texts[i], &data.vectors[i]);
        let key = clusterd::domain::text::normalise(text);
        let trigrams = if params.trigram_enabled() { Trigrams::of(text) } else { Trigrams::default() };
        let decision = index.decide(by_text.get(&key).copied(), &trigrams, x, params);
        let id = match decision.cluster {
            Some(id) => {
                index.join(id, x, trigrams, params.trigram_members);
                id
            }
            None => {
                let mut cluster = OpenCluster::new(Uuid::now_v7(), x.clone(), 1);
                cluster.remember(trigrams, params.trigram_members);
                let id = cluster.id;
                index.insert(cluster);
                id
            }
        };
        by_text.entry(key).or_insert(id);
        assigned[i] = id;
    }
    score(&data.labels, &assigned)
}
