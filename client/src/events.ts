// The wire types of herald's events, as in the README's contract ("Server →
// client events" and "Publish API").
//
// The payloads and their parts are generated from herald's Rust event types
// (./generated/events.ts), and the ack from herald's Rust ack type
// (./generated/acks.ts); a Rust test fails when either copy is stale. This
// file adds what the Rust types do not say: the envelope a client receives
// and the unknown fields that pass through unchanged. Everything else in the
// package imports these names from "./events.js".

import type { Ack, PresenceCount, PresenceJoined, PresenceLeft, PresenceMember } from "./generated/acks.js";

export type { PresenceCount, PresenceJoined, PresenceLeft, PresenceMember };
import type * as Wire from "./generated/events.js";

/** The five event kinds, each emitted under its own name. */
export type EventType = Wire.EventKind;

/** `create`, `update` or `delete`. */
export type Operation = Wire.Operation;

/** Fields herald does not know pass through unchanged. */
type Extra = { [extra: string]: unknown };

/** Optional, and so is each of its fields. */
export type EventMetadata = Wire.EventMetadata & Extra;

export type EntityUpdatedPayload = Wire.EntityUpdatedPayload & Extra;
export type StateInvalidatedPayload = Wire.StateInvalidatedPayload & Extra;
export type WorldTimeChangedPayload = Wire.WorldTimeChangedPayload & Extra;
export type SettlementUpdatedPayload = Wire.SettlementUpdatedPayload & Extra;
export type StructureUpdatedPayload = Wire.StructureUpdatedPayload & Extra;

/** The payload type of each event kind. */
export interface PayloadMap {
  entity_updated: EntityUpdatedPayload;
  state_invalidated: StateInvalidatedPayload;
  world_time_changed: WorldTimeChangedPayload;
  settlement_updated: SettlementUpdatedPayload;
  structure_updated: StructureUpdatedPayload;
}

/** An event as a backend publishes it (`POST /v1/events`). */
export interface PublishedEvent<T extends EventType = EventType> {
  type: T;
  /** RFC 3339; herald stamps it (UTC, milliseconds) when left out. */
  timestamp?: string;
  payload: PayloadMap[T];
  metadata?: EventMetadata;
  /**
   * Names this event for herald: published again with the same key (in its
   * campaign) within `HERALD_IDEMPOTENCY_WINDOW`, it is stored and delivered
   * once. 1 to 255 visible ASCII characters, no `"` or `\`. Never delivered.
   */
  idempotencyKey?: string;
  /**
   * Addresses this event to some users only: it reaches only their sockets
   * among those in its rooms (live and in a replay). 1 to 1,000 distinct
   * user ids (1 to 256 bytes, no whitespace or control character). Never
   * delivered.
   */
  audience?: { users: string[] };
}

/** An event as a client receives it: always a timestamp and an offset. */
export interface HeraldEvent<T extends EventType = EventType> {
  type: T;
  /** RFC 3339. */
  timestamp: string;
  payload: PayloadMap[T];
  metadata?: EventMetadata;
  /** Opaque, fixed width, increasing within a room; compare as strings. */
  offset: string;
}

export type EntityUpdatedEvent = HeraldEvent<"entity_updated">;
export type StateInvalidatedEvent = HeraldEvent<"state_invalidated">;
export type WorldTimeChangedEvent = HeraldEvent<"world_time_changed">;
export type SettlementUpdatedEvent = HeraldEvent<"settlement_updated">;
export type StructureUpdatedEvent = HeraldEvent<"structure_updated">;

/** Any received event, discriminated by `type`. */
export type AnyHeraldEvent = { [T in EventType]: HeraldEvent<T> }[EventType];

/** Any publishable event, discriminated by `type`. */
export type AnyPublishedEvent = { [T in EventType]: PublishedEvent<T> }[EventType];

/** Subscription kinds, and their rooms `<kind>:<id>`. */
export type SubscriptionKind = "campaign" | "settlement" | "structure";

/**
 * The acknowledgement of a subscribe or unsubscribe, exactly as herald sends
 * it (`error` is one of herald's messages).
 */
export type SubscribeAck = Ack;
