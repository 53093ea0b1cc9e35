//! Publishing events from a Rust backend with reqwest: one event, a batch,
//! the 400 that names the invalid field, and 503, 504 and network errors
//! retried with backoff, each event under its idempotency key.
//!
//! ```sh
//! HERALD_URL=http://localhost:3000 HERALD_PUBLISH_TOKEN=… cargo run --example publish
//! ```
//!
//! `POST /v1/events` answers `202 {"accepted": n}` when every event was valid
//! and handed over; `400 {"error": "<path>: <what>"}` when one is not, and then
//! nothing of the batch was published; `503 {"error", "accepted": k}` when a
//! fleet's Redis is unavailable: the first `k` events were handed over, the
//! rest may be sent again; `504 {"error", "accepted": k, "unknown": u}` when
//! Redis did not answer in time: the next `u` events may still be stored, so
//! they are sent again only under their idempotency key (herald stores an
//! event once per key). 401, 413 and 415 mean the request itself is wrong:
//! never retry a 4xx. The events go to `demo-campaign`, the campaign of a
//! zero-config herald. Exits non-zero when an answer is not the contract's.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

const ATTEMPTS: u32 = 6;

struct Publisher {
    http: reqwest::Client,
    endpoint: String,
    token: String,
}

impl Publisher {
    fn from_env() -> anyhow::Result<Self> {
        let url = std::env::var("HERALD_URL").unwrap_or_else(|_| "http://localhost:3000".into());
        let token = std::env::var("HERALD_PUBLISH_TOKEN").context("set HERALD_PUBLISH_TOKEN")?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(Publisher { http, endpoint: format!("{}/v1/events", url.trim_end_matches('/')), token })
    }

    /// One `POST /v1/events`: the status and the JSON answer.
    async fn post(&self, body: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self.http.post(&self.endpoint).bearer_auth(&self.token).json(body).send().await?;
        Ok((response.status().as_u16(), response.json().await.unwrap_or(Value::Null)))
    }

    /// Publishes one event or an array, each under an idempotency key (a
    /// random one, unless it has its own), retrying a 503, a 504 and a
    /// network error with exponential backoff and jitter, and resending only
    /// what herald did not accept: the keys make resending an event whose
    /// outcome was unknown safe. Returns how many events herald accepted.
    async fn publish(&self, mut body: Value) -> anyhow::Result<u64> {
        match &mut body {
            Value::Array(events) => events.iter_mut().for_each(with_key),
            event => with_key(event),
        }
        let (mut accepted, mut delay) = (0, Duration::from_millis(200));
        for attempt in 1..=ATTEMPTS {
            let (status, answer) = match self.post(&body).await {
                Ok(answered) => answered,
                // herald may have received it: the keys make the retry safe.
                Err(e) => (0, json!({ "error": e.to_string() })),
            };
            let handed_over = answer["accepted"].as_u64().unwrap_or(0);
            accepted += handed_over;
            match status {
                202 => return Ok(accepted),
                0 | 503 | 504 => {}
                _ => bail!("herald answered {status} {answer}"),
            }
            // The first `handed_over` events went through; keep the rest.
            match &mut body {
                Value::Array(events) => {
                    events.drain(..(handed_over as usize).min(events.len()));
                    if events.is_empty() {
                        return Ok(accepted);
                    }
                }
                _ if handed_over > 0 => return Ok(accepted),
                _ => {}
            }
            if attempt < ATTEMPTS {
                let wait = delay + Duration::from_millis(rand::random_range(0..=delay.as_millis() as u64 / 2));
                println!("{status} {}: retrying in {} ms", answer["error"], wait.as_millis());
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        bail!("herald was still unavailable after {ATTEMPTS} attempts")
    }
}

/// Gives `event` an idempotency key, unless it has one.
fn with_key(event: &mut Value) {
    if let Value::Object(fields) = event {
        fields.entry("idempotencyKey").or_insert_with(|| json!(format!("{:032x}", rand::random::<u128>())));
    }
}

fn settlement_updated(operation: &str) -> Value {
    json!({
        "type": "settlement_updated",
        "payload": { "campaignId": "demo-campaign", "settlementId": "demo-settlement", "operation": operation },
        "metadata": { "source": "examples/publish.rs", "correlationId": format!("publish-{operation}") }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let herald = Publisher::from_env()?;

    // One event: herald stamps the timestamp when it is left out.
    let accepted = herald.publish(settlement_updated("update")).await?;
    ensure!(accepted == 1, "one event: herald accepted {accepted}");
    println!("one event: accepted {accepted}");

    // A batch: one request, delivered in order, all or nothing.
    let structure = json!({
        "type": "structure_updated",
        "payload": { "campaignId": "demo-campaign", "settlementId": "demo-settlement",
                     "structureId": "demo-structure", "operation": "create" }
    });
    let accepted = herald.publish(json!([settlement_updated("create"), structure])).await?;
    ensure!(accepted == 2, "a batch of two: herald accepted {accepted}");
    println!("a batch: accepted {accepted}");

    // A batch with an invalid event: 400, nothing published, and the error
    // names the field (`events[1]…` in a batch, `payload…` for one event).
    let (status, answer) = herald.post(&json!([settlement_updated("update"), settlement_updated("rename")])).await?;
    let error = answer["error"].as_str().unwrap_or_default();
    let path = error.split_once(": ").map(|(path, _)| path);
    ensure!(status == 400, "an invalid batch: herald answered {status} {answer}");
    ensure!(path == Some("events[1].payload.operation"), "an invalid batch: unexpected error {error:?}");
    println!("an invalid batch: 400 at {}, nothing published", path.unwrap_or_default());
    Ok(())
}
