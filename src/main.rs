//! The `herald` binary: parses the configuration and runs the gateway.

use anyhow::Context;
use clap::Parser;
use herald::Application;
use herald::auth::Minter;
use herald::config::{Cli, Command, JwtAlgorithm};
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { command, mut config } = Cli::parse();
    config.drop_empty();
    config.load_secrets()?;
    herald::telemetry::init_tracing(&config.log_filter, config.log_format)
        .map_err(|e| anyhow::anyhow!("HERALD_LOG: {e}"))?;

    if let Some(Command::Token { sub, ttl, private_key_file }) = command {
        if config.auth.jwt_jwks_url.is_some() {
            anyhow::bail!(
                "herald token cannot mint tokens for a JWKS (HERALD_JWT_JWKS_URL): the identity provider signs them"
            );
        }
        let minter = match (config.auth.jwt_algorithm, private_key_file) {
            (JwtAlgorithm::Hs256, _) => {
                let secret = config
                    .auth
                    .jwt_secret
                    .as_ref()
                    .context("herald token needs HERALD_JWT_SECRET (or HERALD_JWT_SECRET_FILE)")?;
                Minter::hs256(secret, &config)
            }
            (_, Some(path)) => Minter::from_private_key(&path, &config)?,
            (_, None) => anyhow::bail!("RS256 and ES256 tokens need --private-key-file"),
        };
        println!("{}", minter.mint(&sub, ttl)?);
        return Ok(());
    }

    match herald::listener::raise_open_file_limit() {
        Ok((before, after)) if after > before => tracing::info!(before, after, "open file limit raised"),
        Ok((_, limit)) => tracing::info!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open file limit"),
    }
    let app = Application::build(config).await?;
    let addr = app.local_addr()?;
    if let Some(dev) = app.development_credentials() {
        println!("herald is running in development mode with throwaway secrets (HERALD_ENV=production refuses this).");
        if let Some(token) = &dev.client_token {
            println!("  client token (sub {}):  {token}", herald::store::DEMO_USER);
        }
        if let Some(token) = &dev.publish_token {
            println!("  publish token:  {}", token.expose_secret());
        }
        if dev.demo_seeded {
            use herald::store::{DEMO_CAMPAIGN, DEMO_SETTLEMENT, DEMO_STRUCTURE, DEMO_USER};
            println!(
                "  demo data: campaign {DEMO_CAMPAIGN}, settlement {DEMO_SETTLEMENT}, structure {DEMO_STRUCTURE}; {DEMO_USER} is a member"
            );
        }
    }
    if app.serves_demo() {
        println!("  demo page:  http://{addr}/");
    }
    println!("herald listening on http://{addr}");
    tracing::info!(%addr, "listening");
    app.run_until_stopped(herald::shutdown::signal()).await?;
    Ok(())
}
