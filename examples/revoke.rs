//! Revoking access from a backend: `POST /v1/access/revoke`, with the
//! publish token, after your application removed a member from a campaign
//! (campaign-level) or banned or logged out a user (user-level).
//!
//! ```sh
//! HERALD_URL=http://localhost:3000 HERALD_PUBLISH_TOKEN=… cargo run --example revoke -- demo-user demo-campaign
//! ```
//!
//! - `{"userId", "campaignId"}`: on every instance, the user's sockets leave
//!   `campaign:<id>` and the settlement and structure rooms under it, and get
//!   `access_revoked` with `{"campaignId"}`. They stay connected.
//! - `{"userId"}`: every socket of the user is disconnected, with a Socket.IO
//!   DISCONNECT (`"io server disconnect"`), which socket.io-client does not
//!   retry, and every token of the user issued before the revocation (its
//!   `iat`) is refused from then on, on every instance, for
//!   `HERALD_REVOCATION_TTL`. Tokens you issue afterwards are let in.
//!
//! Both answer `202 {"revoked": true}`, and no event published after the 202
//! reaches the user in those rooms. Update your membership table first: herald
//! forgets its cached answer, so a re-subscribe reads the table again.
//! Errors are the publish API's (400, 401, 413, 415, 503: retry a 503).
//! Exits non-zero unless both are accepted.

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};

async fn revoke(http: &reqwest::Client, url: &str, token: &str, body: Value) -> anyhow::Result<()> {
    let response = http.post(format!("{url}/v1/access/revoke")).bearer_auth(token).json(&body).send().await?;
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(status == 202 && answer["revoked"] == true, "revoke {body}: herald answered {status} {answer}");
    println!("revoked {body}: {status} {answer}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("HERALD_URL").unwrap_or_else(|_| "http://localhost:3000".into());
    let url = url.trim_end_matches('/');
    let token = std::env::var("HERALD_PUBLISH_TOKEN").context("set HERALD_PUBLISH_TOKEN")?;
    let mut args = std::env::args().skip(1);
    let user = args.next().unwrap_or_else(|| "demo-user".into());
    let campaign = args.next().unwrap_or_else(|| "demo-campaign".into());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;

    // The user was removed from one campaign: out of its rooms, still connected.
    revoke(&http, url, &token, json!({ "userId": user, "campaignId": campaign })).await?;

    // The user is banned: every socket of theirs is disconnected, for good.
    revoke(&http, url, &token, json!({ "userId": user })).await?;
    Ok(())
}
