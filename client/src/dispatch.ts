// dispatch: which subscriptions an event reaches, and calling their
// handlers. An event goes to each of its target rooms (the README's delivery
// table, `targetRooms`) that the client has, and there to every active
// subscription once, even when the socket is in several of those rooms; a
// room drops an event it was delivered already (its offsets).

import type { ReportError } from "./errors.js";
import type { AnyHeraldEvent, EventType } from "./events.js";
import type { SubscriptionHandlers } from "./index.js";
import { isAfter } from "./offsets.js";
import type { Room } from "./rooms.js";

const HANDLER_OF: { [T in EventType]: keyof SubscriptionHandlers } = {
  entity_updated: "onEntityUpdated",
  state_invalidated: "onStateInvalidated",
  world_time_changed: "onWorldTimeChanged",
  settlement_updated: "onSettlementUpdated",
  structure_updated: "onStructureUpdated",
};

/**
 * The rooms (`<kind>:<id>`) an event is delivered to, as in the README's
 * table. Tested against tests/fixtures/targeting.json, the table herald's own
 * targeting is tested against.
 */
export function targetRooms(event: Pick<AnyHeraldEvent, "type" | "payload">): string[] {
  const p = event.payload as unknown as Record<string, unknown>;
  const rooms = [`campaign:${String(p.campaignId)}`];
  switch (event.type) {
    case "entity_updated":
      if (p.entityType === "settlement") rooms.push(`settlement:${String(p.entityId)}`);
      else if (p.entityType === "structure") rooms.push(`structure:${String(p.entityId)}`);
      break;
    case "settlement_updated":
      rooms.push(`settlement:${String(p.settlementId)}`);
      break;
    case "structure_updated":
      rooms.push(`settlement:${String(p.settlementId)}`, `structure:${String(p.structureId)}`);
      break;
    default:
      break;
  }
  return rooms;
}

/**
 * Delivers `event` (as received from the socket, not validated) to the
 * subscriptions of its target rooms; `room` looks a room up by key. An error
 * thrown by a handler is reported and does not stop the others.
 */
export function dispatch(
  event: AnyHeraldEvent,
  room: (key: string) => Pick<Room, "offsets" | "joined" | "subs"> | undefined,
  reportError: ReportError,
): void {
  if (event === null || typeof event !== "object" || typeof event.payload !== "object") return;
  const offset = typeof event.offset === "string" ? event.offset : undefined;
  for (const key of targetRooms(event)) {
    const r = room(key);
    if (!r) continue;
    if (offset !== undefined && !r.offsets.accept(offset, r.joined)) continue;
    for (const sub of [...r.subs]) {
      if (!sub.active) continue;
      if (offset !== undefined && isAfter(offset, sub.lastOffset)) sub.lastOffset = offset;
      const typed = sub.handlers[HANDLER_OF[event.type]] as ((e: AnyHeraldEvent) => void) | undefined;
      try {
        typed?.call(sub.handlers, event);
        sub.handlers.onEvent?.(event);
      } catch (err) {
        reportError(err);
      }
    }
  }
}
