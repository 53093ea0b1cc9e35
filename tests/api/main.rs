//! Integration tests: a real gateway on port 0, real clients over real
//! sockets, a real database. One test binary; each test has its own app.

mod binary;
mod client;
mod helpers;
mod hook_server;

mod audience;
mod auth;
mod cuts;
mod drop;
mod exhaustion;
mod fleet;
mod hook;
mod idempotency;
mod jwks;
mod layers;
mod limits;
mod openapi;
mod operations;
mod presence;
mod process;
mod properties;
mod proxy;
mod publish;
mod recovery;
mod revocation;
mod revocation_flood;
mod shards;
mod store;
mod subscriptions;
