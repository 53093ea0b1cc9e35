// herald-client: a thin, typed layer over the unmodified socket.io-client.
//
// One socket per client. Subscriptions are counted per room (`<kind>:<id>`):
// the server is asked to join a room once, however many subscriptions share
// it, and to leave it when the last one goes. One socket listener per event
// kind dispatches each event to every subscription whose room is among the
// event's target rooms (the README's delivery table), once per subscription.
// Each room keeps the last offset it saw; on reconnect every room is
// subscribed again with `since`, and a subscription whose ack does not say
// `recovered: true` gets `onResync`. With a token function, the token is
// refreshed in band (`refresh_token`) before it expires.

import { io, type ManagerOptions, type Socket, type SocketOptions } from "socket.io-client";

import { createErrorListeners, type HeraldSubscribeError } from "./errors.js";
import type {
  AnyHeraldEvent,
  EntityUpdatedEvent,
  EventType,
  HeraldEvent,
  SettlementUpdatedEvent,
  StateInvalidatedEvent,
  StructureUpdatedEvent,
  SubscribeAck,
  SubscriptionKind,
  WorldTimeChangedEvent,
} from "./events.js";
import { isAfter } from "./offsets.js";
import { createTokenRefresher } from "./refresh.js";
import { createRooms } from "./rooms.js";
import { createStatusTracker } from "./status.js";

export type * from "./events.js";
export { HeraldRefreshError, HeraldSubscribeError } from "./errors.js";
export { jwtExpiryMs } from "./refresh.js";

/** The five event names herald emits. */
export const EVENT_TYPES: readonly EventType[] = Object.freeze([
  "entity_updated",
  "state_invalidated",
  "world_time_changed",
  "settlement_updated",
  "structure_updated",
]);

/**
 * A JWT, or a function giving one; the function is called on every
 * (re)connect, and before the current token expires (in-band refresh).
 */
export type TokenSource = string | (() => string | Promise<string>);

export type ConnectionStatus = "connecting" | "connected" | "reconnecting" | "offline";

export interface HeraldClientOptions extends Partial<ManagerOptions & SocketOptions> {
  /** herald's base URL, e.g. `http://localhost:3000`. */
  url: string;
  /** Sent as `auth: { token }`; a function is called again on every (re)connect. */
  token: TokenSource;
  /** How long a subscribe (or a token refresh) waits for its ack while connected (default 10 s). */
  ackTimeoutMs?: number;
  /**
   * With a function `token`: send a fresh token (`refresh_token`) a margin
   * before the current one expires, so that herald does not cut the socket
   * at `exp` (default true). A string token is never refreshed.
   */
  refreshToken?: boolean;
}

/** Why `onResync` was called. */
export interface ResyncInfo {
  kind: SubscriptionKind;
  id: string;
  /**
   * `not-recovered`: herald answered `recovered: false` to `since`.
   * `no-offset`: no event had been seen, so there was no `since` to give, and
   * events published while disconnected may have been missed.
   */
  reason: "not-recovered" | "no-offset";
}

export interface SubscriptionHandlers {
  onEntityUpdated?(event: EntityUpdatedEvent): void;
  onStateInvalidated?(event: StateInvalidatedEvent): void;
  onWorldTimeChanged?(event: WorldTimeChangedEvent): void;
  onSettlementUpdated?(event: SettlementUpdatedEvent): void;
  onStructureUpdated?(event: StructureUpdatedEvent): void;
  /** Every event of this subscription, after its typed handler. */
  onEvent?(event: AnyHeraldEvent): void;
  /** After a reconnect that could not replay what was missed: refetch the state. */
  onResync?(info: ResyncInfo): void;
  /** A re-subscription (after a reconnect) was refused; the subscription is dropped. */
  onError?(error: HeraldSubscribeError): void;
}

export type SubscribeSuccess = Extract<SubscribeAck, { success: true }>;

export interface Subscription {
  readonly kind: SubscriptionKind;
  readonly id: string;
  /** The first ack: resolves on success, rejects with a `HeraldSubscribeError` carrying herald's `error`. */
  readonly ready: Promise<SubscribeSuccess>;
  /** The offset of the last event this subscription received. */
  readonly lastOffset: string | undefined;
  /** Stops the handlers at once; resolves when herald has left the room (or it is still used). */
  unsubscribe(): Promise<void>;
}

export interface HeraldClient {
  /** The underlying socket.io-client socket. */
  readonly socket: Socket;
  readonly status: ConnectionStatus;
  subscribe(kind: SubscriptionKind, id: string, handlers?: SubscriptionHandlers): Subscription;
  subscribeCampaign(campaignId: string, handlers?: SubscriptionHandlers): Subscription;
  subscribeSettlement(settlementId: string, handlers?: SubscriptionHandlers): Subscription;
  subscribeStructure(structureId: string, handlers?: SubscriptionHandlers): Subscription;
  /** Calls `cb` on every status change; returns a function that removes it. */
  onStatusChange(cb: (status: ConnectionStatus) => void): () => void;
  /** Connection errors (e.g. a refused handshake), failed token refreshes (`HeraldRefreshError`) and errors thrown by handlers. */
  onError(cb: (error: Error) => void): () => void;
  /** Connects again after `offline` (e.g. a refused token). */
  connect(): void;
  /** Closes the socket for good; subscriptions stop. */
  close(): void;
}

const HANDLER_OF: { [T in EventType]: keyof SubscriptionHandlers } = {
  entity_updated: "onEntityUpdated",
  state_invalidated: "onStateInvalidated",
  world_time_changed: "onWorldTimeChanged",
  settlement_updated: "onSettlementUpdated",
  structure_updated: "onStructureUpdated",
};

/** The rooms (`<kind>:<id>`) an event is delivered to, as in the README's table. */
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

export function createHeraldClient(options: HeraldClientOptions): HeraldClient {
  const { url, token, ackTimeoutMs = 10_000, refreshToken = true, ...socketOptions } = options;

  const errors = createErrorListeners();
  const reportError = errors.report;
  const status = createStatusTracker(socketOptions.autoConnect !== false, reportError);
  let closed = false;
  /** Bumped on every connect and disconnect: acks of an older connection are ignored. */
  let connection = 0;

  async function resolveToken(): Promise<string> {
    return typeof token === "function" ? await token() : token;
  }

  // Made before the socket, whose `auth` tells it each handshake's token;
  // it reaches the socket only once connected.
  const refresher =
    refreshToken && typeof token === "function"
      ? createTokenRefresher({
          getToken: resolveToken,
          sendToken: (fresh, ack) => {
            socket.timeout(ackTimeoutMs).emit("refresh_token", { token: fresh }, ack);
          },
          ackTimeoutMs,
          isCurrent: (conn) => conn === connection && socket.connected && !closed,
          reportError,
        })
      : undefined;

  const socket: Socket = io(url, {
    forceNew: true,
    ...socketOptions,
    auth: (cb: (data: object) => void) => {
      refresher?.handshake(undefined);
      resolveToken().then(
        (t) => {
          refresher?.handshake(t);
          cb({ token: t });
        },
        (err: unknown) => {
          reportError(err instanceof Error ? err : new Error(String(err)));
          cb({});
        },
      );
    },
  });

  const rooms = createRooms({ socket, ackTimeoutMs, connection: () => connection, reportError });

  socket.on("connect", () => {
    status.connected();
    const conn = ++connection;
    refresher?.connected(conn);
    void rooms.resubscribeAll(conn);
  });

  socket.on("disconnect", (reason: string) => {
    connection += 1;
    refresher?.stop();
    rooms.disconnected();
    status.disconnected(reason, closed, socket.active);
  });

  socket.on("connect_error", (err: Error) => status.connectError(err, socket.active));
  socket.io.on("reconnect_attempt", () => status.reconnectAttempt());
  socket.io.on("reconnect_failed", () => status.reconnectFailed());

  for (const type of EVENT_TYPES) {
    socket.on(type, (event: HeraldEvent) => dispatch(event as AnyHeraldEvent));
  }

  function dispatch(event: AnyHeraldEvent): void {
    if (event === null || typeof event !== "object" || typeof event.payload !== "object") return;
    const offset = typeof event.offset === "string" ? event.offset : undefined;
    for (const key of targetRooms(event)) {
      const room = rooms.get(key);
      if (!room) continue;
      if (offset !== undefined && !room.offsets.accept(offset, room.joined)) continue;
      for (const sub of [...room.subs]) {
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

  function subscribe(kind: SubscriptionKind, id: string, handlers: SubscriptionHandlers = {}): Subscription {
    if (closed) throw new Error("herald-client: subscribe on a closed client");
    return rooms.subscribe(kind, id, handlers);
  }

  return {
    socket,
    get status() {
      return status.current;
    },
    subscribe,
    subscribeCampaign: (id, handlers) => subscribe("campaign", id, handlers),
    subscribeSettlement: (id, handlers) => subscribe("settlement", id, handlers),
    subscribeStructure: (id, handlers) => subscribe("structure", id, handlers),
    onStatusChange: (cb) => status.onChange(cb),
    onError: (cb) => errors.add(cb),
    connect() {
      if (closed || socket.connected) return;
      status.connectRequested();
      socket.connect();
    },
    close() {
      closed = true;
      refresher?.stop();
      rooms.close();
      socket.close();
      status.closed();
    },
  };
}
