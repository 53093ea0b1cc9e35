// Generated from herald's Rust event types (src/events.rs, src/rooms.rs) by
// `HERALD_WRITE_TYPES=1 cargo test --lib typescript`. Do not edit: a test
// fails when this file differs from what the Rust types generate.

export type EventKind = "entity_updated" | "state_invalidated" | "world_time_changed" | "settlement_updated" | "structure_updated";

export type Operation = "create" | "update" | "delete";

export type Scope = "campaign" | "entity";

export type Timestamp = string;

export type NonEmpty = string;

export type CampaignId = string;

export type SettlementId = string;

export type StructureId = string;

export type EntityId = string;

export type EntityUpdatedPayload = { 
/**
 * `campaign`, `settlement`, `structure`, or any other entity kind.
 */
entityType: NonEmpty, entityId: EntityId, campaignId: CampaignId, changedFields?: Array<string>, entityData?: Record<string, unknown>, };

export type StateInvalidatedPayload = { campaignId: CampaignId, scope: Scope, entityIds?: Array<string>, reason?: string, };

export type WorldTimeChangedPayload = { campaignId: CampaignId, 
/**
 * Required, and `null` for the first time set.
 */
previousTime: Timestamp | null, newTime: Timestamp, elapsed?: number, };

export type SettlementUpdatedPayload = { campaignId: CampaignId, settlementId: SettlementId, operation: Operation, changes?: Record<string, unknown>, };

export type StructureUpdatedPayload = { campaignId: CampaignId, settlementId: SettlementId, structureId: StructureId, operation: Operation, changes?: Record<string, unknown>, };

export type EventMetadata = { userId?: string, source?: string, correlationId?: string, };
