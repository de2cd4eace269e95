//! HTTP transport: each connection is a task doing `POST /v1/messages`
//! one after the other, over a client limited to `--connections` sockets.
//! A request that fails (an error status, a refused or broken connection)
//! is counted by its error code and the task goes on with the next one.

use std::{rc::Rc, time::Duration};

use awc::{Client, Connector, http::StatusCode};
use clusterd::protocol::{ErrorEnvelope, IngestResult, MessageInput};
use tokio::time::Instant;

use crate::{pacer::Pacer, run::Run};

/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One client for every connection task: its pool holds at most
/// `connections` keep-alive sockets; every request carries `token`.
pub fn client(connections: usize, token: Option<&str>) -> Client {
    let builder = Client::builder().connector(Connector::new().limit(connections)).timeout(REQUEST_TIMEOUT);
    match token {
        Some(token) => builder.bearer_auth(token),
        None => builder,
    }
    .finish()
}

/// Posts messages one at a time until the plan is exhausted.
pub async fn drive(run: Rc<Run>, client: Client, url: Rc<str>, index: usize, rate: f64) {
    let mut rng = run.rng(index);
    let mut pacer = Pacer::new(rate);
    loop {
        pacer.ready().await;
        let Some(seq) = run.plan.claim() else { break };
        let message = run.message(seq, &mut rng);
        run.stats.borrow_mut().on_sent();
        let sent = Instant::now();
        let outcome = post(&client, &url, &message).await;
        let mut stats = run.stats.borrow_mut();
        match outcome {
            Ok(result) => {
                stats.on_ack(sent, result.message_id, result.duplicate);
                run.log_ack(result.message_id, &message);
            }
            Err(code) => stats.on_error(&code),
        }
    }
}

/// The ingest result, or the error code to count.
async fn post(client: &Client, url: &str, message: &MessageInput) -> Result<IngestResult, String> {
    let mut response = client.post(url).send_json(message).await.map_err(|e| transport_code(&e))?;
    let body = response.body().await.map_err(|_| "transport".to_owned())?;
    match response.status() {
        StatusCode::OK | StatusCode::ACCEPTED => serde_json::from_slice(&body).map_err(|_| "bad_response".to_owned()),
        status => Err(serde_json::from_slice::<ErrorEnvelope>(&body)
            .map(|e| e.error.code)
            .unwrap_or_else(|_| format!("http_{}", status.as_u16()))),
    }
}

fn transport_code(error: &awc::error::SendRequestError) -> String {
    match error {
        awc::error::SendRequestError::Timeout => "timeout",
        awc::error::SendRequestError::Connect(_) => "connect",
        _ => "transport",
    }
    .to_owned()
}
