//! The daemon's clustering rule (`clusterd::clustering::group`), run
//! in-process over a data set's embeddings in a given order: the same code
//! that the clustering actor runs, without the database, so that
//! parameters can be swept in seconds.

use std::collections::HashMap;

use clusterd::{
    clustering::{
        CreatorIndex, Params,
        group::{GroupMessage, decide_group},
    },
    protocol::Membership,
};
use uuid::Uuid;

use crate::data::Dataset;

/// Where each message ended, and whether as a review member.
pub struct Placement {
    pub clusters: Vec<usize>,
    pub review: Vec<bool>,
}

/// Sends every message, in `order`, to one creator's index: one group, as
/// the clustering actor decides it.
pub fn run(data: &Dataset, order: &[usize], params: &Params) -> Placement {
    const CREATOR: &str = "eval";
    let dims = data.vectors[0].len();
    let mut indexes = HashMap::from([(CREATOR.to_owned(), CreatorIndex::new(0, dims))]);
    let messages = order
        .iter()
        .map(|&i| GroupMessage {
            id: Uuid::from_u128(i as u128),
            creator_id: CREATOR.to_owned(),
            text: data.texts[i].clone(),
            norm_key: clusterd::domain::text::normalise(&data.texts[i]).into_bytes(),
            embedding: data.vectors[i].clone(),
            exact: None,
        })
        .collect();
    let outcome = decide_group(messages, &mut indexes, params).expect("the one creator has its index");
    let mut numbers: HashMap<Uuid, usize> = HashMap::new();
    let mut placement = Placement { clusters: vec![0; data.texts.len()], review: vec![false; data.texts.len()] };
    for (&i, placed) in order.iter().zip(&outcome.placements) {
        let next = numbers.len();
        placement.clusters[i] = *numbers.entry(placed.cluster_id).or_insert(next);
        placement.review[i] = placed.membership == Membership::Review;
    }
    placement
}
