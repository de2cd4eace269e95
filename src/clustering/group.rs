//! The decision over a group of embedded messages, in memory: each message
//! in arrival order against its creator's [`CreatorIndex`], which grows as
//! the group is decided, so that a message can join a cluster an earlier
//! message of the same group created. Pure: the clustering actor loads the
//! group and the indexes, calls [`decide_group`], and has the repository
//! write the [`GroupOutcome`].

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use super::{Background, CreatorIndex, OpenCluster, Params, Reason, trigram::Trigrams, unit};
use crate::protocol::Membership;

/// A message of the group, as loaded under its creator's lock.
#[derive(Debug, Clone)]
pub struct GroupMessage {
    pub id: Uuid,
    pub creator_id: String,
    pub text: String,
    /// The digest of the normalised text: equal keys, identical texts.
    pub norm_key: Vec<u8>,
    pub embedding: Vec<f32>,
    /// The open cluster of the creator whose core already holds this exact
    /// normalised text, if any.
    pub exact: Option<Uuid>,
}

/// Where one message went, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub message_id: Uuid,
    pub cluster_id: Uuid,
    pub membership: Membership,
    pub similarity: f32,
    /// The step that placed it (`Reason::New`: it created its cluster).
    pub reason: Reason,
    /// The seconds the in-memory decision took.
    pub seconds: f64,
}

impl Placement {
    /// Whether this message created its cluster.
    pub fn created(&self) -> bool {
        self.reason == Reason::New
    }
}

/// A cluster the group creates.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCluster {
    pub id: Uuid,
    pub creator_id: String,
    /// The text of the message that created it.
    pub label: String,
    /// Its members from this group.
    pub growth: Growth,
}

/// Members a group adds to one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Growth {
    pub size: i32,
    pub core_size: i32,
    /// Sum of the added core members' embeddings.
    pub core_sum: Vec<f32>,
}

impl Growth {
    fn empty(dimensions: usize) -> Self {
        Self { size: 0, core_size: 0, core_sum: vec![0.0; dimensions] }
    }

    fn add(&mut self, embedding: &[f32], membership: Membership) {
        self.size += 1;
        if membership == Membership::Core {
            self.core_size += 1;
            self.core_sum.iter_mut().zip(embedding).for_each(|(s, x)| *s += x);
        }
    }
}

/// What a group's decision changes.
#[derive(Debug, Default)]
pub struct GroupOutcome {
    /// One per message, in arrival order.
    pub placements: Vec<Placement>,
    /// In creation order.
    pub created: Vec<NewCluster>,
    /// What the group adds to clusters that existed before it.
    pub joined: BTreeMap<Uuid, Growth>,
    /// What the group adds to each creator's background.
    pub backgrounds: BTreeMap<String, Background>,
}

impl GroupOutcome {
    /// The clusters the group created or joined.
    pub fn touched(&self) -> Vec<Uuid> {
        self.created.iter().map(|c| c.id).chain(self.joined.keys().copied()).collect()
    }
}

/// A message whose creator has no index in the map handed to
/// [`decide_group`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no index for creator {0}")]
pub struct MissingIndex(pub String);

/// Decides every message, in order, updating the creators' indexes as it
/// goes (so that they end as the database will be once the outcome is
/// written). On error the indexes may hold part of the group's decisions.
pub fn decide_group(
    messages: Vec<GroupMessage>,
    indexes: &mut HashMap<String, CreatorIndex>,
    params: &Params,
) -> Result<GroupOutcome, MissingIndex> {
    let mut outcome = GroupOutcome { placements: Vec::with_capacity(messages.len()), ..Default::default() };
    // Exact texts decided in this group (the database knows the rest).
    let mut group_texts: HashMap<(String, Vec<u8>), Uuid> = HashMap::new();
    for message in messages {
        let GroupMessage { id: message_id, creator_id: creator, text, norm_key, embedding, exact } = message;
        let index = indexes.get_mut(&creator).ok_or_else(|| MissingIndex(creator.clone()))?;
        let trigrams = if params.trigram_enabled() { Trigrams::of(&text) } else { Trigrams::default() };
        let text_key = (creator.clone(), norm_key);
        let exact = group_texts.get(&text_key).copied().or(exact);
        let started = std::time::Instant::now();
        let decision = index.decide(exact, &trigrams, &embedding, params);
        let seconds = started.elapsed().as_secs_f64();
        let unit = unit(&embedding);
        index.background.observe(&unit);
        outcome.backgrounds.entry(creator.clone()).or_default().observe(&unit);
        let membership = decision.membership;
        let cluster_id = match decision.cluster {
            Some(id) => {
                index.join(id, &embedding, trigrams, membership, params.trigram_members);
                match outcome.created.iter_mut().find(|c| c.id == id) {
                    Some(new) => new.growth.add(&embedding, membership),
                    None => outcome
                        .joined
                        .entry(id)
                        .or_insert_with(|| Growth::empty(embedding.len()))
                        .add(&embedding, membership),
                }
                id
            }
            None => {
                let mut cluster = OpenCluster::new(Uuid::now_v7(), embedding.clone(), 1, 1);
                cluster.remember(trigrams, params.trigram_members);
                let id = cluster.id;
                index.insert(cluster);
                let mut growth = Growth::empty(embedding.len());
                growth.add(&embedding, Membership::Core);
                outcome.created.push(NewCluster { id, creator_id: creator, label: text, growth });
                id
            }
        };
        tracing::trace!(%message_id, %cluster_id, reason = ?decision.reason, "decided");
        // Only a core member's text is an exact match for later messages.
        if membership == Membership::Core {
            group_texts.entry(text_key).or_insert(cluster_id);
        }
        outcome.placements.push(Placement {
            message_id,
            cluster_id,
            membership,
            similarity: decision.similarity,
            reason: decision.reason,
            seconds,
        });
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clustering::geometry::{at, axis, params};

    fn message(creator: &str, text: &str, embedding: Vec<f32>) -> GroupMessage {
        GroupMessage {
            id: Uuid::now_v7(),
            creator_id: creator.into(),
            text: text.into(),
            norm_key: text.as_bytes().to_vec(),
            embedding,
            exact: None,
        }
    }

    #[test]
    fn a_group_joins_what_it_created_and_what_existed() {
        let dims = 4;
        let existing = Uuid::now_v7();
        let mut index = CreatorIndex::new(7, dims);
        index.insert(OpenCluster::new(existing, axis(0, dims), 1, 1));
        let mut indexes = HashMap::from([("c".to_owned(), index)]);
        let review = at(0.55, 0, 2, dims);
        let messages = vec![
            message("c", "alpha", axis(1, dims)),
            // The same text again: an exact match with the cluster the
            // first message created in this group.
            message("c", "alpha", axis(3, dims)),
            message("c", "near the old one", axis(0, dims)),
            message("c", "something else entirely", review),
        ];
        let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
        let outcome = decide_group(messages, &mut indexes, &params()).expect("every creator has an index");

        let placed: Vec<(Uuid, Membership, Reason)> =
            outcome.placements.iter().map(|p| (p.message_id, p.membership, p.reason)).collect();
        let new = outcome.created[0].id;
        assert_eq!(outcome.created.len(), 1);
        assert_eq!(outcome.placements.iter().map(|p| p.cluster_id).collect::<Vec<_>>(), [new, new, existing, existing]);
        assert_eq!(placed[0], (ids[0], Membership::Core, Reason::New));
        assert_eq!(placed[1], (ids[1], Membership::Core, Reason::Exact));
        assert!(matches!(placed[2], (id, Membership::Core, Reason::Core { .. }) if id == ids[2]));
        assert!(matches!(placed[3], (id, Membership::Review, Reason::Review { .. }) if id == ids[3]));
        assert!(outcome.placements[0].created() && !outcome.placements[1].created());

        // The new cluster holds both core members; the old one gained a
        // core and a review member, and only the core one in its sum.
        let mut both = axis(1, dims);
        both[3] = 1.0;
        assert_eq!(
            outcome.created[0],
            NewCluster {
                id: new,
                creator_id: "c".into(),
                label: "alpha".into(),
                growth: Growth { size: 2, core_size: 2, core_sum: both }
            }
        );
        assert_eq!(outcome.joined[&existing], Growth { size: 2, core_size: 1, core_sum: axis(0, dims) });
        assert_eq!(outcome.touched(), [new, existing]);
        assert_eq!(outcome.backgrounds["c"].count, 4);

        // The index ends as the database will: two clusters, the old one
        // of size 3 (core 2), the background counting the group.
        let index = &indexes["c"];
        assert_eq!((index.len(), index.version, index.background.count), (2, 7, 4));
        let old = index.clusters().iter().find(|c| c.id == existing).expect("the old cluster");
        assert_eq!((old.size, old.core_size), (3, 2));
    }

    #[test]
    fn an_exact_text_the_database_knows_wins() {
        let dims = 4;
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut index = CreatorIndex::new(0, dims);
        index.insert(OpenCluster::new(a, axis(0, dims), 1, 1));
        index.insert(OpenCluster::new(b, axis(1, dims), 1, 1));
        let mut indexes = HashMap::from([("c".to_owned(), index)]);
        let mut m = message("c", "price?", axis(0, dims));
        m.exact = Some(b);
        let outcome = decide_group(vec![m], &mut indexes, &params()).expect("an index");
        assert_eq!((outcome.placements[0].cluster_id, outcome.placements[0].reason), (b, Reason::Exact));
        assert_eq!(outcome.joined[&b].core_sum, axis(0, dims));
    }

    #[test]
    fn creators_are_decided_apart() {
        let dims = 4;
        let mut indexes = HashMap::from([
            ("one".to_owned(), CreatorIndex::new(0, dims)),
            ("two".to_owned(), CreatorIndex::new(0, dims)),
        ]);
        let outcome = decide_group(
            vec![message("one", "same", axis(0, dims)), message("two", "same", axis(0, dims))],
            &mut indexes,
            &params(),
        )
        .expect("indexes");
        assert_eq!(outcome.created.len(), 2, "the same text from two creators makes two clusters");
        assert_eq!(outcome.backgrounds.keys().collect::<Vec<_>>(), ["one", "two"]);
        assert!(outcome.joined.is_empty());
    }

    #[test]
    fn a_creator_without_an_index_is_an_error() {
        let mut indexes = HashMap::new();
        let error = decide_group(vec![message("ghost", "boo", axis(0, 4))], &mut indexes, &params())
            .expect_err("no index for the creator");
        assert_eq!(error, MissingIndex("ghost".into()));
    }
}
