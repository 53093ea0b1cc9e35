// herald-client: a thin, typed layer over the unmodified socket.io-client.
//
// One socket per client. This file holds the public API (`createHeraldClient`
// and the types) and wires the socket's events to the modules that own each
// concern:
//
// - rooms.ts: subscriptions counted per room (`<kind>:<id>`): herald is asked
//   to join a room once, however many subscriptions share it, and to leave
//   it when the last one goes; on reconnect every room is subscribed again
//   with `since`, and a subscription whose ack does not say
//   `recovered: true` gets `onResync`.
// - offsets.ts: per room, the last offset delivered and the ones seen above
//   it: a duplicate is dropped, and the last offset is the next `since`.
// - dispatch.ts: each event (one socket listener per event kind) goes to
//   every subscription whose room is among the event's target rooms (the
//   README's delivery table), once per subscription.
// - refresh.ts: with a token function, the token is refreshed in band
//   (`refresh_token`) before it expires.
// - status.ts: the connection status, and what a disconnect means for it.
// - errors.ts: the error classes, and the `onError` listeners.
// - presence: a room subscribed with `presence: true` keeps its members (the
//   ack's list, then `presence_joined` / `presence_left`) in rooms.ts, and
//   calls `onPresence` with the whole list after each change.

import { io, type ManagerOptions, type Socket, type SocketOptions } from "socket.io-client";

import { dispatch } from "./dispatch.js";
import { createErrorListeners, type HeraldSubscribeError } from "./errors.js";
import type {
  AnyHeraldEvent,
  PresenceCount,
  PresenceJoined,
  PresenceLeft,
  PresenceMember,
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
import { createTokenRefresher } from "./refresh.js";
import { createRooms } from "./rooms.js";
import { createStatusTracker } from "./status.js";

export type * from "./events.js";
export { HeraldRefreshError, HeraldSubscribeError } from "./errors.js";
export { targetRooms } from "./dispatch.js";
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
  /**
   * Subscribe with `presence: true`: this socket's user counts as a member of
   * the room, and `onPresence` is called with the room's members (each user
   * once, with its number of connections) after every ack and every change.
   */
  presence?: boolean;
  /**
   * The room's members, sorted by `userId`, after each change (with
   * `presence: true`). In a room herald tells counts only (over
   * `HERALD_PRESENCE_MAX_MEMBERS`), `members` is empty and `change` is
   * `{ type: "count", count }`.
   */
  onPresence?(members: PresenceMember[], change: PresenceChange): void;
}

/** What changed a room's presence list. */
export type PresenceChange =
  | { type: "ack" }
  | { type: "joined"; userId: string; connections: number }
  | { type: "left"; userId: string }
  | { type: "count"; count: number };

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
    // First the new connection's number: a listener that subscribes when the
    // status turns `connected` joins on this connection, not the last one.
    const conn = ++connection;
    status.connected();
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
    socket.on(type, (event: HeraldEvent) => dispatch(event as AnyHeraldEvent, rooms.get, reportError));
  }
  socket.on("presence_joined", (event: PresenceJoined) =>
    rooms.presence(event.room, { type: "joined", userId: event.userId, connections: event.connections }),
  );
  socket.on("presence_left", (event: PresenceLeft) => rooms.presence(event.room, { type: "left", userId: event.userId }));
  socket.on("presence_count", (event: PresenceCount) => rooms.presence(event.room, { type: "count", count: event.count }));

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
