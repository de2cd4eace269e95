//! The daemon's clustering rule (`clusterd::clustering`), run in-process
//! over a data set's embeddings in a given order: the same code that the
//! clustering actor runs, without the database, so that parameters can be
//! swept in seconds.

use std::collections::HashMap;

use clusterd::{
    clustering::{CreatorIndex, OpenCluster, Params, trigram::Trigrams, unit},
    protocol::Membership,
};
use uuid::Uuid;

use crate::data::Dataset;

/// Where each message ended, and whether as a review member.
pub struct Placement {
    pub clusters: Vec<usize>,
    pub review: Vec<bool>,
}

/// Sends every message, in `order`, to one creator's index.
pub fn run(data: &Dataset, order: &[usize], params: &Params) -> Placement {
    let dims = data.vectors[0].len();
    let mut index = CreatorIndex::new(0, dims);
    let mut by_text: HashMap<String, Uuid> = HashMap::new();
    let mut numbers: HashMap<Uuid, usize> = HashMap::new();
    let mut placement = Placement { clusters: vec![0; data.texts.len()], review: vec![false; data.texts.len()] };
    for &i in order {
        let (text, x) = (&data.texts[i], &data.vectors[i]);
        let key = clusterd::domain::text::normalise(text);
        let trigrams = if params.trigram_enabled() { Trigrams::of(text) } else { Trigrams::default() };
        let decision = index.decide(by_text.get(&key).copied(), &trigrams, x, params);
        index.background.observe(&unit(x));
        let id = match decision.cluster {
            Some(id) => {
                index.join(id, x, trigrams, decision.membership, params.trigram_members);
                id
            }
            None => {
                let mut cluster = OpenCluster::new(Uuid::now_v7(), x.clone(), 1, 1);
                cluster.remember(trigrams, params.trigram_members);
                let id = cluster.id;
                index.insert(cluster);
                id
            }
        };
        if decision.membership == Membership::Core {
            by_text.entry(key).or_insert(id);
        }
        let next = numbers.len();
        placement.clusters[i] = *numbers.entry(id).or_insert(next);
        placement.review[i] = decision.membership == Membership::Review;
    }
    placement
}
