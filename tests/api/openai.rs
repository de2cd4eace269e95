//! The `openai` provider against the fake OpenAI server: batching, order,
//! and which faults are retried, how often, and how they are reported.
//! No database, no daemon: the embedder alone.

use std::time::Duration;

use clusterd::{
    embedding::{EmbedError, OpenAiEmbedder},
    settings::OpenAiSettings,
};
use prometheus::IntCounter;

use crate::fake_openai::{DEFAULT_DIMENSIONS, FAKE_MODEL, FakeOpenAi, Fault};

/// An embedder on `settings` and its retry counter.
fn embedder(settings: &OpenAiSettings, dimensions: usize) -> (OpenAiEmbedder, IntCounter) {
    let retries = IntCounter::new("openai_retries_total", "retried attempts").expect("a valid counter");
    let embedder = OpenAiEmbedder::new(settings, dimensions, retries.clone()).expect("valid settings");
    (embedder, retries)
}

fn texts(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| (*t).to_owned()).collect()
}

fn assert_vectors(got: &[Vec<f32>], texts: &[String], dimensions: usize) {
    assert_eq!(got.len(), texts.len());
    for (vector, text) in got.iter().zip(texts) {
        let want = FakeOpenAi::vector(text, dimensions);
        assert_eq!(vector.len(), dimensions);
        assert!(vector.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "the vector of {text:?} is out of place");
    }
}

fn provider_message(result: Result<clusterd::embedding::Embeddings, EmbedError>) -> String {
    match result {
        Err(EmbedError::Provider(error)) => error.to_string(),
        other => panic!("expected a provider error, got {other:?}"),
    }
}

#[actix_web::test]
async fn openai_embeds_a_batch_in_one_request_in_input_order() {
    let fake = FakeOpenAi::start().await;
    let (embedder, retries) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);
    let batch = texts(&["How much?", "what's the price??", "cost?", "I love your videos", "how much is it"]);

    let embeddings = embedder.embed(&batch).await.expect("the fake answers");

    assert_vectors(&embeddings.vectors, &batch, DEFAULT_DIMENSIONS);
    assert_eq!(embeddings.tokens, batch.iter().map(|t| FakeOpenAi::tokens(t)).sum::<u64>());
    assert_eq!(embedder.model(), FAKE_MODEL);
    let requests = fake.requests();
    assert_eq!(requests.len(), 1, "one request for the batch");
    assert_eq!(requests[0].inputs, batch);
    assert_eq!(requests[0].model.as_deref(), Some(FAKE_MODEL));
    assert_eq!(requests[0].dimensions, None, "request_dimensions = 0 sends no dimensions");
    assert_eq!(requests[0].authorization.as_deref(), Some(format!("Bearer {}", fake.api_key).as_str()));
    assert_eq!(retries.get(), 0);
}

#[actix_web::test]
async fn openai_splits_a_batch_at_max_inputs() {
    let fake = FakeOpenAi::start().await;
    let settings = OpenAiSettings { max_inputs: 2, ..fake.settings() };
    let (embedder, _) = embedder(&settings, DEFAULT_DIMENSIONS);
    let batch = texts(&["one", "two words", "three little words", "four", "five"]);

    let embeddings = embedder.embed(&batch).await.expect("the fake answers");

    assert_vectors(&embeddings.vectors, &batch, DEFAULT_DIMENSIONS);
    assert_eq!(embeddings.tokens, batch.iter().map(|t| FakeOpenAi::tokens(t)).sum::<u64>(), "tokens of every chunk");
    let chunks: Vec<Vec<String>> = fake.requests().into_iter().map(|r| r.inputs).collect();
    assert_eq!(chunks, [batch[0..2].to_vec(), batch[2..4].to_vec(), batch[4..5].to_vec()]);
}

#[actix_web::test]
async fn openai_sends_dimensions_when_configured() {
    let fake = FakeOpenAi::start_with_dimensions(DEFAULT_DIMENSIONS).await;
    let settings = OpenAiSettings { request_dimensions: 64, ..fake.settings() };
    let (embedder, _) = embedder(&settings, 64);
    let batch = texts(&["short vectors please"]);

    let embeddings = embedder.embed(&batch).await.expect("the fake answers");

    assert_vectors(&embeddings.vectors, &batch, 64);
    assert_eq!(fake.requests()[0].dimensions, Some(64));
}

#[actix_web::test]
async fn openai_orders_vectors_by_index() {
    let fake = FakeOpenAi::start().await;
    fake.push(Fault::Reversed);
    let (embedder, _) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);
    let batch = texts(&["first", "second", "third"]);

    let embeddings = embedder.embed(&batch).await.expect("the fake answers");

    assert_vectors(&embeddings.vectors, &batch, DEFAULT_DIMENSIONS);
    assert_eq!(fake.requests()[0].fault, Some(Fault::Reversed), "the response really came reversed");
}

#[actix_web::test]
async fn openai_makes_no_request_for_no_texts() {
    let fake = FakeOpenAi::start().await;
    let (embedder, _) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);

    let embeddings = embedder.embed(&[]).await.expect("nothing to do");

    assert!(embeddings.vectors.is_empty());
    assert_eq!(fake.request_count(), 0);
}

#[actix_web::test]
async fn openai_retries_a_rate_limit_after_retry_after() {
    let fake = FakeOpenAi::start().await;
    fake.push(Fault::Status { code: 429, retry_after: Some(1) });
    let (embedder, retries) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);
    let batch = texts(&["rate limited"]);

    let embeddings = embedder.embed(&batch).await.expect("the second attempt succeeds");

    assert_vectors(&embeddings.vectors, &batch, DEFAULT_DIMENSIONS);
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(retries.get(), 1);
    // The backoff alone is at most 50 ms: a gap of a second is the header's.
    let gap = requests[1].at.duration_since(requests[0].at);
    assert!(gap >= Duration::from_secs(1), "retried {gap:?} after a Retry-After of 1 s");
}

#[actix_web::test]
async fn openai_retries_a_rate_limit_without_retry_after() {
    let fake = FakeOpenAi::start().await;
    fake.push(Fault::Status { code: 429, retry_after: None });
    let (embedder, retries) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);

    embedder.embed(&texts(&["rate limited"])).await.expect("the second attempt succeeds");

    assert_eq!(fake.request_count(), 2);
    assert_eq!(retries.get(), 1);
}

#[actix_web::test]
async fn openai_retries_server_errors() {
    let fake = FakeOpenAi::start().await;
    fake.push(Fault::Status { code: 500, retry_after: None });
    fake.push(Fault::Status { code: 503, retry_after: None });
    let (embedder, retries) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);
    let batch = texts(&["flaky upstream"]);

    let embeddings = embedder.embed(&batch).await.expect("the third attempt succeeds");

    assert_vectors(&embeddings.vectors, &batch, DEFAULT_DIMENSIONS);
    assert_eq!(fake.request_count(), 3);
    assert_eq!(retries.get(), 2);
}

#[actix_web::test]
async fn openai_retries_a_timeout() {
    let fake = FakeOpenAi::start().await;
    // Ten times the client's 300 ms timeout.
    fake.push(Fault::Delay(Duration::from_secs(3)));
    let (embedder, retries) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);
    let batch = texts(&["slow upstream"]);

    let embeddings = embedder.embed(&batch).await.expect("the second attempt succeeds");

    assert_vectors(&embeddings.vectors, &batch, DEFAULT_DIMENSIONS);
    assert_eq!(fake.request_count(), 2);
    assert_eq!(retries.get(), 1);
}

#[actix_web::test]
async fn openai_does_not_retry_a_malformed_body() {
    for fault in [Fault::Malformed, Fault::WrongShape] {
        let fake = FakeOpenAi::start().await;
        fake.push(fault.clone());
        let (embedder, retries) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);

        let message = provider_message(embedder.embed(&texts(&["garbled"])).await);

        assert!(message.contains("malformed"), "{fault:?}: {message}");
        assert_eq!(fake.request_count(), 1, "{fault:?} is not retried");
        assert_eq!(retries.get(), 0);
    }
}

#[actix_web::test]
async fn openai_refuses_a_wrong_number_of_vectors() {
    let fake = FakeOpenAi::start().await;
    fake.push(Fault::WrongCount);
    let (embedder, retries) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);

    let result = embedder.embed(&texts(&["one", "two", "three"])).await;

    assert!(matches!(result, Err(EmbedError::Count { expected: 3, got: 2 })), "{result:?}");
    assert_eq!(fake.request_count(), 1);
    assert_eq!(retries.get(), 0);
}

#[actix_web::test]
async fn openai_refuses_vectors_of_the_wrong_dimension() {
    let fake = FakeOpenAi::start().await;
    fake.push(Fault::WrongDimensions);
    let (embedder, _) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);

    let result = embedder.embed(&texts(&["one"])).await;

    let want = EmbedError::Dimensions { expected: DEFAULT_DIMENSIONS, got: DEFAULT_DIMENSIONS + 1 };
    assert_eq!(format!("{result:?}"), format!("Err({want:?})"));
    assert_eq!(fake.request_count(), 1);
}

#[actix_web::test]
async fn openai_does_not_retry_a_bad_request() {
    let fake = FakeOpenAi::start().await;
    fake.push(Fault::Status { code: 400, retry_after: None });
    let (embedder, retries) = embedder(&fake.settings(), DEFAULT_DIMENSIONS);

    let message = provider_message(embedder.embed(&texts(&["refused"])).await);

    assert!(message.contains("HTTP 400"), "{message}");
    assert!(message.contains("not retried"), "{message}");
    assert_eq!(fake.request_count(), 1);
    assert_eq!(retries.get(), 0);
}

#[actix_web::test]
async fn openai_gives_up_after_max_attempts_with_the_last_status() {
    let fake = FakeOpenAi::start().await;
    for _ in 0..4 {
        fake.push(Fault::Status { code: 503, retry_after: None });
    }
    let settings = fake.settings();
    let (embedder, retries) = embedder(&settings, DEFAULT_DIMENSIONS);

    let message = provider_message(embedder.embed(&texts(&["never answered"])).await);

    assert!(message.contains("HTTP 503"), "{message}");
    assert!(message.contains(&format!("after {} attempts", settings.max_attempts)), "{message}");
    assert_eq!(fake.request_count(), settings.max_attempts as usize, "exactly max_attempts requests");
    assert_eq!(fake.pending_faults(), 4 - settings.max_attempts as usize);
    assert_eq!(retries.get(), u64::from(settings.max_attempts - 1));
}

#[actix_web::test]
async fn openai_gives_up_on_an_unreachable_server() {
    // Bound, never listening, and kept: nothing listens on `port`.
    let reserved = crate::helpers::ReservedPort::new();
    let port = reserved.port();
    let fake = FakeOpenAi::start().await;
    let settings = OpenAiSettings { base_url: format!("http://127.0.0.1:{port}/v1"), ..fake.settings() };
    let (embedder, retries) = embedder(&settings, DEFAULT_DIMENSIONS);

    let message = provider_message(embedder.embed(&texts(&["hello?"])).await);

    assert!(message.contains(&format!("after {} attempts", settings.max_attempts)), "{message}");
    assert_eq!(retries.get(), u64::from(settings.max_attempts - 1), "connection errors are retried");
}

#[actix_web::test]
async fn openai_does_not_retry_a_wrong_key_nor_repeat_it() {
    let fake = FakeOpenAi::start().await;
    let wrong_key = "sk-wrong-7d1e0c55aa9b";
    let settings = OpenAiSettings { api_key: wrong_key.to_owned().into(), ..fake.settings() };
    let (embedder, retries) = embedder(&settings, DEFAULT_DIMENSIONS);

    let message = provider_message(embedder.embed(&texts(&["let me in"])).await);

    assert!(message.contains("HTTP 401"), "{message}");
    assert!(!message.contains(wrong_key), "the fake echoes the key; the error must not: {message}");
    assert_eq!(fake.request_count(), 1);
    assert_eq!(retries.get(), 0);
}

#[actix_web::test]
async fn openai_key_never_prints() {
    let fake = FakeOpenAi::start().await;
    let settings = fake.settings();
    let (embedder, _) = embedder(&settings, DEFAULT_DIMENSIONS);

    for printed in [format!("{embedder:?}"), format!("{settings:?}"), format!("{embedder:#?}")] {
        assert!(!printed.contains(&fake.api_key), "{printed}");
    }
}
