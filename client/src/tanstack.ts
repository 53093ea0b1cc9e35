// herald-client/tanstack: herald events and resyncs as TanStack Query
// invalidations. Built on @tanstack/query-core, so it serves the React, Vue,
// Svelte, Solid and Angular adapters alike (each hands out a query-core
// QueryClient). Uses only the public subscription handlers of the main entry
// (`onEvent`, `onResync`).

import { matchQuery, type QueryClient, type QueryFilters, type QueryKey } from "@tanstack/query-core";

import type { AnyHeraldEvent, EntityUpdatedEvent, ResyncInfo } from "./index.js";

/**
 * The default query keys. Invalidation matches by prefix, so every query whose
 * key starts with one of these (`["campaign", id, "settlements"]`) refetches
 * along with it.
 */
export const heraldQueryKeys = {
  campaign: (campaignId: string): QueryKey => ["campaign", campaignId],
  settlement: (settlementId: string): QueryKey => ["settlement", settlementId],
  structure: (structureId: string): QueryKey => ["structure", structureId],
  /** `campaign`, `settlement` and `structure` entities use their own keys; any other kind `["entity", entityType, entityId]`. */
  entity(entityType: string, entityId: string): QueryKey {
    switch (entityType) {
      case "campaign":
        return heraldQueryKeys.campaign(entityId);
      case "settlement":
        return heraldQueryKeys.settlement(entityId);
      case "structure":
        return heraldQueryKeys.structure(entityId);
      default:
        return ["entity", entityType, entityId];
    }
  },
};

export interface HeraldQueryOptions {
  /**
   * The queries an event invalidates. `defaults` is the default mapping (see
   * the README); return it, extend it or replace it. A query matched by
   * several filters refetches once.
   */
  eventQueries?(event: AnyHeraldEvent, defaults: QueryFilters[]): QueryFilters[];
  /** The queries a resync of a room invalidates; `defaults` as for `eventQueries`. */
  resyncQueries?(info: ResyncInfo, defaults: QueryFilters[]): QueryFilters[];
  /**
   * For `entity_updated` events that carry `entityData`: write it into the
   * entity's cached query instead of refetching that query (`true`: a shallow
   * merge into the cached object; a function: the new data from the cached
   * data). Only a query already in the cache is written; when there is none,
   * or the function returns `undefined`, the query is invalidated as usual.
   * The event's other queries are invalidated either way. Default: off.
   */
  setQueryData?: boolean | ((previous: unknown, event: EntityUpdatedEvent) => unknown);
  /** Where `setQueryData` writes an entity (default `heraldQueryKeys.entity`). */
  entityQueryKey?(entityType: string, entityId: string): QueryKey;
}

/**
 * Subscription handlers that turn herald events and resyncs into
 * `invalidateQueries` calls: pass it as the handlers of one or more
 * subscriptions (`herald.subscribeCampaign(id, invalidator)`), or spread it
 * with handlers of your own. An event delivered to several of its
 * subscriptions is handled once. The promises resolve when the refetches
 * have settled (they never reject: a failed refetch shows in its query's
 * state).
 */
export interface HeraldQueryInvalidator {
  onEvent(event: AnyHeraldEvent): Promise<void>;
  onResync(info: ResyncInfo): Promise<void>;
}

/** Every herald query of a campaign, and every settlement, structure and entity query (their keys do not say their campaign). */
function campaignWide(campaignId: string): QueryFilters[] {
  return [
    { queryKey: heraldQueryKeys.campaign(campaignId) },
    { queryKey: ["settlement"] },
    { queryKey: ["structure"] },
    { queryKey: ["entity"] },
  ];
}

/** The queries whose key names one of `ids`: `["campaign" | "settlement" | "structure", id, ...]`, `["entity", type, id, ...]`. */
function namingAny(ids: readonly string[]): QueryFilters {
  const wanted = new Set(ids);
  return {
    predicate: ({ queryKey: [kind, a, b] }) => {
      const id = kind === "entity" ? b : kind === "campaign" || kind === "settlement" || kind === "structure" ? a : undefined;
      return typeof id === "string" && wanted.has(id);
    },
  };
}

function defaultEventQueries(event: AnyHeraldEvent): QueryFilters[] {
  switch (event.type) {
    case "entity_updated":
      return [{ queryKey: heraldQueryKeys.entity(event.payload.entityType, event.payload.entityId) }];
    case "state_invalidated": {
      const { campaignId, scope, entityIds } = event.payload;
      return scope === "entity" && entityIds?.length ? [namingAny(entityIds)] : campaignWide(campaignId);
    }
    case "world_time_changed":
      return [{ queryKey: heraldQueryKeys.campaign(event.payload.campaignId) }];
    case "settlement_updated":
      return [
        { queryKey: heraldQueryKeys.campaign(event.payload.campaignId) },
        { queryKey: heraldQueryKeys.settlement(event.payload.settlementId) },
      ];
    case "structure_updated":
      return [
        { queryKey: heraldQueryKeys.campaign(event.payload.campaignId) },
        { queryKey: heraldQueryKeys.settlement(event.payload.settlementId) },
        { queryKey: heraldQueryKeys.structure(event.payload.structureId) },
      ];
  }
}

function defaultResyncQueries(info: ResyncInfo): QueryFilters[] {
  switch (info.kind) {
    case "campaign":
      return campaignWide(info.id);
    case "settlement":
      // Its structures' events come to the settlement's room too.
      return [{ queryKey: heraldQueryKeys.settlement(info.id) }, { queryKey: ["structure"] }];
    case "structure":
      return [{ queryKey: heraldQueryKeys.structure(info.id) }];
  }
}

function shallowMerge(previous: unknown, event: EntityUpdatedEvent): unknown {
  if (previous === null || typeof previous !== "object" || Array.isArray(previous)) return undefined;
  return { ...previous, ...event.payload.entityData };
}

export function createQueryInvalidator(queryClient: QueryClient, options: HeraldQueryOptions = {}): HeraldQueryInvalidator {
  const handled = new WeakSet<object>();

  /** Invalidates (and refetches, when active) every query one of `filters` matches, except the one at `written`. */
  function invalidate(filters: QueryFilters[], written: QueryKey | undefined): Promise<void> {
    return queryClient.invalidateQueries({
      predicate: (query) =>
        filters.some((f) => matchQuery(f, query)) && !(written && matchQuery({ queryKey: written, exact: true }, query)),
    });
  }

  /** Writes the event's `entityData` into its entity's cached query; the key written, if any. */
  function write(event: EntityUpdatedEvent): QueryKey | undefined {
    const { setQueryData, entityQueryKey = heraldQueryKeys.entity } = options;
    if (!setQueryData || !event.payload.entityData) return undefined;
    const key = entityQueryKey(event.payload.entityType, event.payload.entityId);
    const previous = queryClient.getQueryData(key);
    if (previous === undefined) return undefined;
    const next = setQueryData === true ? shallowMerge(previous, event) : setQueryData(previous, event);
    if (next === undefined) return undefined;
    queryClient.setQueryData(key, next);
    return key;
  }

  return {
    onEvent: (event) => {
      if (handled.has(event)) return Promise.resolve();
      handled.add(event);
      const written = event.type === "entity_updated" ? write(event) : undefined;
      const defaults = defaultEventQueries(event);
      return invalidate(options.eventQueries?.(event, defaults) ?? defaults, written);
    },
    onResync: (info) => {
      const defaults = defaultResyncQueries(info);
      return invalidate(options.resyncQueries?.(info, defaults) ?? defaults, undefined);
    },
  };
}
