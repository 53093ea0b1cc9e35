//! herald-bench: the load generator for herald and its two yardsticks (the Node socket.io
//! reference and the "floor" server). See bench/README.md for what each figure means.
//!
//! One process, one thread (tokio current-thread runtime), one task per simulated client. It
//! starts and stops the servers itself (pinned with `taskset`), connects the clients over raw
//! Engine.IO v4 / Socket.IO v5 WebSockets, publishes through `POST /v1/events` and measures
//! latency, loss, duplicates, setup rate, the servers' RSS and CPU time, and its own CPU time.
//!
//! - `cli`: the flags (`Cli`) and the settings they resolve to (`Cfg`).
//! - `run`: one run: the environment and fixtures, every scenario on every server, the output.
//! - `scenarios`: scenarios 1-5 and the checks on what they measured (`--smoke`).
//! - `fleet`: scenario 6, herald's fleet on a Redis Cluster, and what it measures.
//! - `soak`: scenario 7, the churn soak: clients arriving, leaving, cut and coming back while
//!   events flow; gaps, duplicates, RSS over time and the gauges against what it holds.
//! - `presence`: scenario 8, presence: fan-out with presence on against off, and a join/leave
//!   storm in a 10,000-member room (Redis commands, CPU, presence events per member).
//! - `results`: what they measured, as types, and the JSON document.
//! - `session`: the servers and clients of one scenario: start, connect, traffic, stop.
//! - `servers`: starting and stopping herald, the Node reference, the floor and Redis; fixtures.
//! - `proto`: one simulated client (Engine.IO / Socket.IO over a WebSocket).
//! - `load`: the publisher (`POST /v1/events` at a fixed rate).
//! - `stats`: shared counters, sequence sets, latency histograms, `/proc` readings.
//! - `report`: the human-readable tables.

mod cli;
mod fleet;
mod load;
mod presence;
mod proto;
mod report;
mod results;
mod run;
mod scenarios;
mod servers;
mod session;
mod soak;
mod stats;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

/// Exit code 0 when every check passed, 1 when one failed (listed on stderr), 2 when the run
/// could not be done.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-bench: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let r = rt.block_on(run::run(cli));
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
