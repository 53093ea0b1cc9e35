// herald-client/apollo: herald events and resyncs as Apollo Client cache
// evictions. Each event evicts the normalized objects it names (and `gc()`s)
// inside one `client.refetchQueries({ updateCache })`, so every watched query
// that read one of them refetches, once. Uses only the public subscription
// handlers of the main entry (`onEvent`, `onResync`).

import type { ApolloCache, ApolloClient } from "@apollo/client";

import type { AnyHeraldEvent, ResyncInfo } from "./index.js";

/**
 * Normalized objects to evict: `{ __typename, id }` is the one object
 * `cache.identify` names; `{ __typename }` alone every cached object of that
 * type; `{ id }` alone every cached object whose `id` field is that id.
 */
export type HeraldCacheTarget = { __typename: string; id?: string } | { __typename?: string; id: string };

/** The default typename of a herald kind: `campaign` → `Campaign`, `npc` → `Npc`. */
export function heraldTypename(kind: string): string {
  return kind.charAt(0).toUpperCase() + kind.slice(1);
}

export interface HeraldApolloOptions {
  /** The typename of a kind (`campaign`, `settlement`, `structure`, or an `entityType`); default `heraldTypename`. */
  typename?(kind: string): string;
  /**
   * Entity kinds (besides campaign, settlement and structure) whose objects a
   * campaign-wide invalidation or a campaign resync evicts too, e.g.
   * `["npc", "faction"]`: a cached object does not say its campaign, and
   * herald's entity kinds are open-ended. Default none.
   */
  entityTypes?: readonly string[];
  /** The objects an event evicts. `defaults` is the default mapping (see the README); return it, extend it or replace it. */
  eventTargets?(event: AnyHeraldEvent, defaults: HeraldCacheTarget[]): HeraldCacheTarget[];
  /** The objects a resync of a room evicts; `defaults` as for `eventTargets`. */
  resyncTargets?(info: ResyncInfo, defaults: HeraldCacheTarget[]): HeraldCacheTarget[];
}

/**
 * Subscription handlers that turn herald events and resyncs into evictions
 * and refetches: pass it as the handlers of one or more subscriptions
 * (`herald.subscribeCampaign(id, invalidator)`), or spread it with handlers of
 * your own. An event delivered to several of its subscriptions refetches
 * once: the second time, its objects are already evicted. The promises
 * resolve when the refetches have settled (they never reject: a failed
 * refetch shows in its query's result).
 */
export interface HeraldApolloInvalidator {
  onEvent(event: AnyHeraldEvent): Promise<void>;
  onResync(info: ResyncInfo): Promise<void>;
}

export function createApolloInvalidator(client: ApolloClient, options: HeraldApolloOptions = {}): HeraldApolloInvalidator {
  const typename = options.typename ?? heraldTypename;

  const one = (kind: string, id: string): HeraldCacheTarget => ({ __typename: typename(kind), id });
  const every = (kind: string): HeraldCacheTarget => ({ __typename: typename(kind) });

  /** The campaign, and every cached settlement, structure and `entityTypes` object. */
  function campaignWide(campaignId: string): HeraldCacheTarget[] {
    return [one("campaign", campaignId), ...["settlement", "structure", ...(options.entityTypes ?? [])].map(every)];
  }

  function defaultEventTargets(event: AnyHeraldEvent): HeraldCacheTarget[] {
    switch (event.type) {
      case "entity_updated":
        return [one(event.payload.entityType, event.payload.entityId)];
      case "state_invalidated": {
        const { campaignId, scope, entityIds } = event.payload;
        return scope === "entity" && entityIds?.length ? entityIds.map((id) => ({ id })) : campaignWide(campaignId);
      }
      case "world_time_changed":
        return [one("campaign", event.payload.campaignId)];
      case "settlement_updated":
        return [one("campaign", event.payload.campaignId), one("settlement", event.payload.settlementId)];
      case "structure_updated":
        return [
          one("campaign", event.payload.campaignId),
          one("settlement", event.payload.settlementId),
          one("structure", event.payload.structureId),
        ];
    }
  }

  function defaultResyncTargets(info: ResyncInfo): HeraldCacheTarget[] {
    switch (info.kind) {
      case "campaign":
        return campaignWide(info.id);
      case "settlement":
        // Its structures' events come to the settlement's room too.
        return [one("settlement", info.id), every("structure")];
      case "structure":
        return [one("structure", info.id)];
    }
  }

  /** The cache ids of the targets. */
  function resolve(cache: ApolloCache, targets: HeraldCacheTarget[]): Set<string> {
    const ids = new Set<string>();
    const partial: HeraldCacheTarget[] = [];
    for (const t of targets) {
      if (t.__typename !== undefined && t.id !== undefined) {
        const id = cache.identify({ __typename: t.__typename, id: t.id });
        if (id !== undefined) ids.add(id);
      } else {
        partial.push(t);
      }
    }
    if (partial.length > 0) {
      const store = cache.extract();
      for (const [id, object] of Object.entries(store && typeof store === "object" ? store : {})) {
        if (object === null || typeof object !== "object") continue;
        const { __typename, id: field } = object as { __typename?: unknown; id?: unknown };
        if (partial.some((t) => (t.__typename ?? __typename) === __typename && (t.id ?? field) === field)) ids.add(id);
      }
    }
    return ids;
  }

  /** Resolves when the refetches have settled; a failed one shows in its query's result, not here. */
  function evict(targets: HeraldCacheTarget[]): Promise<void> {
    const { results } = client.refetchQueries({
      updateCache(cache) {
        for (const id of resolve(cache, targets)) cache.evict({ id });
        cache.gc();
      },
    });
    return Promise.allSettled(results).then(() => undefined);
  }

  return {
    onEvent: (event) => {
      const defaults = defaultEventTargets(event);
      return evict(options.eventTargets?.(event, defaults) ?? defaults);
    },
    onResync: (info) => {
      const defaults = defaultResyncTargets(info);
      return evict(options.resyncTargets?.(info, defaults) ?? defaults);
    },
  };
}
