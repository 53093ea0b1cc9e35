// herald-client/react: the React hook, in its own entry so that the main
// entry never imports React.

import { createContext, createElement, useContext, useEffect, useRef, useState, type ReactNode } from "react";

import type { HeraldClient, HeraldSubscribeError, SubscribeSuccess, SubscriptionHandlers } from "./index.js";
import type { PresenceMember, SubscriptionKind } from "./events.js";

const HeraldContext = createContext<HeraldClient | null>(null);

/** Makes `client` the one `useHeraldSubscription` uses below it. */
export function HeraldProvider(props: { client: HeraldClient; children?: ReactNode }) {
  return createElement(HeraldContext.Provider, { value: props.client }, props.children);
}

export function useHeraldClient(): HeraldClient | null {
  return useContext(HeraldContext);
}

export interface HeraldSubscriptionState {
  /** `pending` until the first ack, then `ready` or `error`. */
  state: "idle" | "pending" | "ready" | "error";
  ack?: SubscribeSuccess;
  error?: HeraldSubscribeError | Error;
}

/**
 * Subscribes to `<kind>:<id>` on mount and unsubscribes on unmount (or when
 * `kind`, `id`, `handlers.presence` or the client change). The latest `handlers` are always used,
 * without re-subscribing when their identity changes. React 18 strict mode's
 * mount, unmount, mount costs nothing: the client defers leaving a room by a
 * macrotask and keeps it when it is subscribed again meanwhile. `id` null or
 * undefined subscribes to nothing. The client comes from `options.client` or
 * from a `HeraldProvider`.
 */
export function useHeraldSubscription(
  kind: SubscriptionKind,
  id: string | null | undefined,
  handlers: SubscriptionHandlers,
  options: { client?: HeraldClient } = {},
): HeraldSubscriptionState {
  const contextClient = useContext(HeraldContext);
  const client = options.client ?? contextClient;
  const handlersRef = useRef(handlers);
  handlersRef.current = handlers;
  const presence = handlers.presence === true;
  const [state, setState] = useState<HeraldSubscriptionState>({ state: "idle" });

  useEffect(() => {
    if (!client || id === null || id === undefined) {
      setState({ state: "idle" });
      return undefined;
    }
    let live = true;
    const forward: SubscriptionHandlers = {
      onEntityUpdated: (e) => handlersRef.current.onEntityUpdated?.(e),
      onStateInvalidated: (e) => handlersRef.current.onStateInvalidated?.(e),
      onWorldTimeChanged: (e) => handlersRef.current.onWorldTimeChanged?.(e),
      onSettlementUpdated: (e) => handlersRef.current.onSettlementUpdated?.(e),
      onStructureUpdated: (e) => handlersRef.current.onStructureUpdated?.(e),
      onEvent: (e) => handlersRef.current.onEvent?.(e),
      onResync: (info) => handlersRef.current.onResync?.(info),
      presence,
      onPresence: (members, change) => handlersRef.current.onPresence?.(members, change),
      onError: (err) => {
        handlersRef.current.onError?.(err);
        if (live) setState({ state: "error", error: err });
      },
    };
    const subscription = client.subscribe(kind, id, forward);
    setState({ state: "pending" });
    subscription.ready.then(
      (ack) => live && setState({ state: "ready", ack }),
      (error: Error) => live && setState({ state: "error", error }),
    );
    return () => {
      live = false;
      void subscription.unsubscribe();
    };
  }, [client, kind, id, presence]);

  return state;
}

/** A room's presence, as `useHeraldPresence` gives it. */
export interface HeraldPresence {
  /** The members, sorted by `userId` (empty in a room herald tells counts only, and until the first ack). */
  members: PresenceMember[];
  /** How many members (in a room told counts only, herald's count). */
  count: number;
  /** The room is told counts only (over `HERALD_PRESENCE_MAX_MEMBERS`). */
  countsOnly: boolean;
}

/**
 * The presence of `<kind>:<id>` (subscribed with `presence: true` while
 * mounted), re-rendered on every change.
 */
export function useHeraldPresence(
  kind: SubscriptionKind,
  id: string | null | undefined,
  options: { client?: HeraldClient } = {},
): HeraldPresence {
  const [presence, setPresence] = useState<HeraldPresence>({ members: [], count: 0, countsOnly: false });
  useHeraldSubscription(
    kind,
    id,
    {
      presence: true,
      onPresence: (members, change) =>
        setPresence(
          change.type === "count"
            ? { members: [], count: change.count, countsOnly: true }
            : { members, count: members.length, countsOnly: false },
        ),
    },
    options,
  );
  return presence;
}
