// Generated from herald's Rust ack type (src/gateway/wire.rs) by
// `HERALD_WRITE_TYPES=1 cargo test --lib typescript`. Do not edit: a test
// fails when this file differs from what the Rust types generate.

export type Ack = { success: true, recovered?: boolean, } | { success: false, error: "Invalid payload" | "Unauthorized" | "Internal error" | "Unavailable" | "Unknown event" | "Rate limited" | "Too many subscriptions", };
