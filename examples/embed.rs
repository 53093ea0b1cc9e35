//! Embedding herald in your own binary: build a `Config` in code, bind with
//! `Application::build`, serve with `run_until_stopped` and a shutdown future
//! of your own (here a oneshot channel, or ctrl-c), next to your own tasks.
//!
//! ```sh
//! cargo run --example embed
//! ```
//!
//! It serves on a free port with a fresh SQLite file, checks `/healthz` and
//! `/readyz`, publishes one event, then stops herald through its channel and
//! waits for it (sockets are disconnected, within `shutdown_grace`). Exits
//! non-zero when any of that fails.

use std::time::{Duration, Instant};

use anyhow::ensure;
use herald::config::Mode;
use herald::telemetry::LogFormat;
use herald::{Application, Config};
use serde_json::json;

fn random_secret() -> String {
    rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logging is process-wide: install it once, in main (herald's, or yours).
    herald::telemetry::init_tracing("info", LogFormat::Text).map_err(anyhow::Error::msg)?;

    // `Config::defaults()` is what `herald` with no flag runs with (HERALD_*
    // variables still apply); set what your application decides. Production
    // mode: no generated secrets, no demo page.
    let dir = tempfile::tempdir()?;
    let publish_token = random_secret();
    let mut config = Config::defaults();
    config.mode = Mode::Production;
    config.listen = "127.0.0.1:0".into();
    config.store.database_url = format!("sqlite://{}", dir.path().join("membership.db").display());
    config.auth.jwt_secret = Some(random_secret().into());
    config.publish.publish_token = Some(publish_token.clone().into());
    config.shutdown_grace = Duration::from_secs(5);

    let app = Application::build(config).await?;
    let base = format!("http://{}", app.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        tokio::select! {
            _ = stopped => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }));
    println!("herald embedded on {base}");

    // Your own work, side by side with herald.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    for probe in ["/healthz", "/readyz"] {
        let status = http.get(format!("{base}{probe}")).send().await?.status();
        ensure!(status.is_success(), "GET {probe}: {status}");
        println!("GET {probe}: {status}");
    }
    let event = json!({ "type": "world_time_changed", "payload": {
        "campaignId": "demo-campaign", "previousTime": null, "newTime": "2026-11-25T17:00:00Z" } });
    let response = http.post(format!("{base}/v1/events")).bearer_auth(&publish_token).json(&event).send().await?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await?;
    ensure!(status.as_u16() == 202 && answer["accepted"] == 1, "publish: {status} {answer}");
    println!("POST /v1/events: {status} {answer}");

    // Your shutdown: herald stops accepting, disconnects every socket, returns.
    let started = Instant::now();
    let _ = stop.send(());
    server.await??;
    println!("herald stopped in {} ms", started.elapsed().as_millis());
    let after = reqwest::Client::new().get(format!("{base}/healthz")).send().await;
    ensure!(after.is_err(), "herald still answers after stopping");
    Ok(())
}
