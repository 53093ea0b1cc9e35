// The wire types of herald's events, as in the README's contract ("Server →
// client events" and "Publish API").
//
// Types only, no runtime code, in this one file: it is meant to be replaced
// wholesale by a copy generated from the Rust event types. Everything else in
// the package imports the names below from "./events.js" and nothing else
// from here, so a generated file only has to export the same names.

/** The five event kinds, each emitted under its own name. */
export type EventType =
  | "entity_updated"
  | "state_invalidated"
  | "world_time_changed"
  | "settlement_updated"
  | "structure_updated";

/** `create`, `update` or `delete`. */
export type Operation = "create" | "update" | "delete";

/** Optional, and so is each of its fields. */
export interface EventMetadata {
  userId?: string;
  source?: string;
  correlationId?: string;
  /** Unknown fields pass through unchanged. */
  [extra: string]: unknown;
}

export interface EntityUpdatedPayload {
  /** `campaign`, `settlement`, `structure`, or any other non-empty kind. */
  entityType: "campaign" | "settlement" | "structure" | (string & {});
  entityId: string;
  campaignId: string;
  changedFields?: string[];
  entityData?: Record<string, unknown>;
  [extra: string]: unknown;
}

export interface StateInvalidatedPayload {
  campaignId: string;
  scope: "campaign" | "entity";
  entityIds?: string[];
  reason?: string;
  [extra: string]: unknown;
}

export interface WorldTimeChangedPayload {
  campaignId: string;
  /** RFC 3339, or `null`; required. */
  previousTime: string | null;
  /** RFC 3339. */
  newTime: string;
  elapsed?: number;
  [extra: string]: unknown;
}

export interface SettlementUpdatedPayload {
  campaignId: string;
  settlementId: string;
  operation: Operation;
  changes?: Record<string, unknown>;
  [extra: string]: unknown;
}

export interface StructureUpdatedPayload {
  campaignId: string;
  settlementId: string;
  structureId: string;
  operation: Operation;
  changes?: Record<string, unknown>;
  [extra: string]: unknown;
}

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

/** The acknowledgement of a subscribe or unsubscribe. */
export type SubscribeAck =
  | { success: true; recovered?: boolean }
  | { success: false; error: string };
