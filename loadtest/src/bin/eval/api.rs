//! The data set through a running daemon: batches of messages into one
//! fresh creator, in the given order, then every message read back until
//! all are clustered, with its cluster and membership.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use awc::Client;
use clusterd::protocol::{BatchItemResult, BatchResult, Membership, MessageStatus, MessageView};
use futures_util::{StreamExt, stream};
use serde_json::json;
use uuid::Uuid;

use crate::{
    data::Dataset,
    metrics::{Scores, score_with_review},
};

/// Messages per `POST /v1/messages/batch`.
const BATCH: usize = 100;
/// Longest wait for every message to be clustered.
const PATIENCE: Duration = Duration::from_secs(600);

pub async fn run(data: &Dataset, order: &[usize], url: &str, concurrency: usize) -> anyhow::Result<Scores> {
    let mut client = Client::builder().timeout(Duration::from_secs(60));
    if let Ok(token) = std::env::var("CLUSTERD_TOKEN") {
        client = client.bearer_auth(token);
    }
    let client = client.finish();
    let url = url.trim_end_matches('/');
    let creator = format!("eval-{}-{}", data.name, Uuid::now_v7().simple());
    eprintln!("eval: sending {} messages to creator {creator} at {url}", order.len());

    let mut ids: Vec<(usize, Uuid)> = Vec::with_capacity(order.len());
    for chunk in order.chunks(BATCH) {
        let messages: Vec<_> = chunk
            .iter()
            .map(|&i| json!({"creator_id": creator, "text": data.texts[i], "external_id": format!("eval-{i}")}))
            .collect();
        let mut response = client
            .post(format!("{url}/v1/messages/batch"))
            .send_json(&json!({ "messages": messages }))
            .await
            .map_err(|e| anyhow::anyhow!("POST /v1/messages/batch: {e}"))?;
        let body = response.body().limit(16 << 20).await.context("reading the batch answer")?;
        ensure!(
            response.status().is_success(),
            "batch answered {}: {}",
            response.status(),
            String::from_utf8_lossy(&body)
        );
        let result: BatchResult = serde_json::from_slice(&body).context("parsing the batch answer")?;
        for (&i, item) in chunk.iter().zip(result.results) {
            match item {
                BatchItemResult::Ok(r) => ids.push((i, r.message_id)),
                BatchItemResult::Err { error } => bail!("message {i} refused: {} {}", error.code, error.message),
            }
        }
    }

    let started = std::time::Instant::now();
    let mut clusters: Vec<Option<Uuid>> = vec![None; data.texts.len()];
    let mut review: Vec<bool> = vec![false; data.texts.len()];
    let mut waiting: Vec<(usize, Uuid)> = ids;
    while !waiting.is_empty() {
        ensure!(started.elapsed() < PATIENCE, "{} messages still not clustered after {PATIENCE:?}", waiting.len());
        let views: Vec<anyhow::Result<(usize, Uuid, MessageView)>> = stream::iter(waiting.iter().copied())
            .map(|(i, id)| {
                let client = &client;
                async move {
                    let mut response = client
                        .get(format!("{url}/v1/messages/{id}"))
                        .send()
                        .await
                        .map_err(|e| anyhow::anyhow!("GET message: {e}"))?;
                    let view: MessageView = response.json().limit(1 << 20).await.context("parsing a message")?;
                    Ok((i, id, view))
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        waiting.clear();
        for view in views {
            let (i, id, view) = view?;
            match view.status {
                MessageStatus::Clustered => {
                    clusters[i] = view.cluster_id;
                    review[i] = view.membership == Some(Membership::Review);
                }
                MessageStatus::Failed => bail!("message {id} failed: {:?}", view.error),
                _ => waiting.push((i, id)),
            }
        }
        if !waiting.is_empty() {
            eprintln!("eval: {} messages not clustered yet", waiting.len());
            actix_web::rt::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let predicted: Vec<Uuid> = clusters.into_iter().map(|c| c.unwrap_or_default()).collect();
    Ok(score_with_review(&data.labels, &predicted, &review))
}
