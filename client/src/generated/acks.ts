// Generated from herald's Rust ack and presence types (src/gateway/wire.rs, src/presence/mod.rs) by
// `HERALD_WRITE_TYPES=1 cargo test --lib typescript`. Do not edit: a test
// fails when this file differs from what the Rust types generate.

export type Ack = { success: true, recovered?: boolean, 
/**
 * The room's presence members, for a subscription with `presence: true`.
 */
presence?: Array<PresenceMember>, 
/**
 * Instead of `presence`, in a room told counts only: how many members.
 */
presenceCount?: number, } | { success: false, error: "Invalid payload" | "Unauthorized" | "Internal error" | "Unavailable" | "Unknown event" | "Rate limited" | "Too many subscriptions", };

export type PresenceMember = { userId: string, connections: number, };

export type PresenceJoined = { 
/**
 * The room, `<kind>:<id>`.
 */
room: string, userId: string, connections: number, };

export type PresenceLeft = { 
/**
 * The room, `<kind>:<id>`.
 */
room: string, userId: string, };

export type PresenceCount = { 
/**
 * The room, `<kind>:<id>`.
 */
room: string, count: number, };
