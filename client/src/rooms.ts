// rooms: the subscriptions, counted per room (`<kind>:<id>`), and the
// server subscriptions behind them. herald is asked to join a room once,
// however many subscriptions share it, and to leave it one macrotask after
// the last one goes (kept when it is subscribed again meanwhile: React strict
// mode). This module sends the subscribes (the first one, and after a
// reconnect every room again, broadest kind first, with `since`) and handles
// their acks: `ready`, `onResync`, and a refusal that drops the room. A room
// that any of its subscriptions asks presence of is subscribed with
// `presence: true`, and keeps its members (`onPresence`).

import type { Socket } from "socket.io-client";

import { HeraldSubscribeError, type ReportError } from "./errors.js";
import type { PresenceMember, SubscribeAck, SubscriptionKind } from "./events.js";
import type { PresenceChange, SubscribeSuccess, Subscription, SubscriptionHandlers } from "./index.js";
import { RoomOffsets } from "./offsets.js";

export interface Sub {
  handlers: SubscriptionHandlers;
  /** The offset of the last event this subscription received. */
  lastOffset: string | undefined;
  settled: boolean;
  active: boolean;
  resolve(ack: SubscribeSuccess): void;
  reject(err: Error): void;
}

export interface Room {
  key: string;
  kind: SubscriptionKind;
  id: string;
  subs: Set<Sub>;
  /** What the room has been delivered; its next `since`. */
  offsets: RoomOffsets;
  /** Acked on the current connection. */
  joined: boolean;
  /** A subscribe is in flight on the current connection. */
  joining: boolean;
  /** Acked at least once: a later join is a re-subscription. */
  wasJoined: boolean;
  lastAck: SubscribeSuccess | undefined;
  /** Bumped on every join and on release, so that stale acks are ignored. */
  generation: number;
  releaseTimer: ReturnType<typeof setTimeout> | undefined;
  releaseWaiters: Array<() => void>;
  /** Subscribed (or to be) with `presence: true`. */
  presence: boolean;
  /** The members, per user id, as herald told them. */
  members: Map<string, number>;
  /** In a room told counts only: the count. */
  presenceCount: number | undefined;
}

/** What the rooms need of the client. */
export interface RoomsDeps {
  socket: Pick<Socket, "connected" | "timeout">;
  /** How long a subscribe waits for its ack while connected. */
  ackTimeoutMs: number;
  /** The current connection's number (bumped on every connect and disconnect): acks of an older one are ignored. */
  connection(): number;
  reportError: ReportError;
}

export interface Rooms {
  /** The room with this key, while it has subscriptions (or its leave is pending). */
  get(key: string): Room | undefined;
  subscribe(kind: SubscriptionKind, id: string, handlers: SubscriptionHandlers): Subscription;
  /** Connected as connection `conn`: subscribes every room again (see the function). */
  resubscribeAll(conn: number): Promise<void>;
  /** Disconnected: no room is joined any more. */
  disconnected(): void;
  /** The client closes: every subscription stops, and pending ones are rejected. */
  close(): void;
  /** A presence event for `roomKey`. */
  presence(roomKey: string, change: PresenceChange): void;
}

export function createRooms(deps: RoomsDeps): Rooms {
  const { socket, ackTimeoutMs, connection, reportError } = deps;
  const rooms = new Map<string, Room>();

  /**
   * Re-subscribes every room, broadest kind first (campaigns, then
   * settlements, then structures), each kind's rooms in parallel. A
   * campaign's replay carries its settlements' and structures' events too, so
   * by the time a narrower room replays, its subscriptions have had those
   * events in order, and its own replay only brings duplicates (dropped).
   */
  async function resubscribeAll(conn: number): Promise<void> {
    for (const kind of ["campaign", "settlement", "structure"] as const) {
      if (conn !== connection() || !socket.connected) return;
      const batch = [...rooms.values()].filter((r) => r.kind === kind && r.subs.size > 0 && !r.joined && !r.joining);
      await Promise.all(batch.map((r) => join(r)));
    }
  }

  /** Sends the room's subscribe; resolves once its ack (or its failure) has been handled. */
  function join(room: Room): Promise<void> {
    let done!: () => void;
    const handled = new Promise<void>((r) => (done = r));
    const generation = ++room.generation;
    const conn = connection();
    room.joining = true;
    const resubscribe = room.wasJoined;
    // Joined already (presence asked for later): nothing was missed.
    const rejoin = room.joined;
    const payload: Record<string, string | boolean> = { [`${room.kind}Id`]: room.id };
    const since = room.offsets.last;
    if (resubscribe && !rejoin && since !== undefined) payload.since = since;
    if (room.presence) payload.presence = true;
    socket.timeout(ackTimeoutMs).emit(`subscribe_${room.kind}`, payload, (err: Error | null, ack: SubscribeAck) => {
      try {
        onAck(err, ack);
      } finally {
        done();
      }
    });
    return handled;

    function onAck(err: Error | null, ack: SubscribeAck): void {
      if (generation !== room.generation || conn !== connection() || rooms.get(room.key) !== room) return;
      room.joining = false;
      if (err) {
        // No ack: if the connection is gone, the next `connect` joins again.
        if (!socket.connected) return;
        const error = new HeraldSubscribeError(room.kind, room.id, `no ack within ${ackTimeoutMs} ms`);
        for (const sub of room.subs) if (!sub.settled) sub.reject(error);
        return;
      }
      if (!ack || ack.success !== true) {
        const error = new HeraldSubscribeError(room.kind, room.id, ack && "error" in ack ? String(ack.error) : "no answer");
        rooms.delete(room.key);
        room.generation += 1;
        for (const sub of room.subs) {
          sub.active = false;
          if (!sub.settled) sub.reject(error);
          else
            try {
              sub.handlers.onError?.(error);
            } catch (e) {
              reportError(e);
            }
        }
        room.subs.clear();
        return;
      }
      room.joined = true;
      room.wasJoined = true;
      room.offsets.advance();
      room.lastAck = ack;
      if (ack.presence) {
        room.members = new Map(ack.presence.map((m) => [m.userId, m.connections]));
        room.presenceCount = undefined;
        tellPresence(room, { type: "ack" });
      } else if (ack.presenceCount !== undefined) {
        room.members = new Map();
        room.presenceCount = ack.presenceCount;
        tellPresence(room, { type: "count", count: ack.presenceCount });
      }
      for (const sub of [...room.subs]) {
        if (!sub.active) continue;
        if (!sub.settled) {
          sub.resolve(ack);
        } else if (resubscribe && !rejoin && ack.recovered !== true) {
          try {
            sub.handlers.onResync?.({
              kind: room.kind,
              id: room.id,
              reason: ack.recovered === false ? "not-recovered" : "no-offset",
            });
          } catch (e) {
            reportError(e);
          }
        }
      }
    }
  }

  /** Calls `onPresence` of the room's subscriptions that asked for it. */
  function tellPresence(room: Room, change: PresenceChange): void {
    const members: PresenceMember[] = [...room.members.entries()]
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([userId, connections]) => ({ userId, connections }));
    for (const sub of room.subs) {
      if (!sub.active || !sub.handlers.presence) continue;
      try {
        sub.handlers.onPresence?.(members, change);
      } catch (e) {
        reportError(e);
      }
    }
  }

  function presence(roomKey: string, change: PresenceChange): void {
    const room = rooms.get(roomKey);
    if (!room || !room.presence || !room.joined) return;
    if (change.type === "joined") room.members.set(change.userId, change.connections);
    else if (change.type === "left") room.members.delete(change.userId);
    else if (change.type === "count") {
      room.members = new Map();
      room.presenceCount = change.count;
    }
    tellPresence(room, change);
  }

  function release(room: Room): void {
    room.releaseTimer = undefined;
    rooms.delete(room.key);
    room.generation += 1;
    const waiters = room.releaseWaiters.splice(0);
    const done = () => waiters.forEach((w) => w());
    if (!socket.connected) return done();
    socket
      .timeout(ackTimeoutMs)
      .emit(`unsubscribe_${room.kind}`, { [`${room.kind}Id`]: room.id }, () => done());
  }

  function subscribe(kind: SubscriptionKind, id: string, handlers: SubscriptionHandlers): Subscription {
    const key = `${kind}:${id}`;
    let room = rooms.get(key);
    if (room?.releaseTimer !== undefined) {
      // Re-subscribed before the deferred leave (e.g. React strict mode): keep the room.
      clearTimeout(room.releaseTimer);
      room.releaseTimer = undefined;
      room.releaseWaiters.splice(0).forEach((w) => w());
    }
    const isNew = !room;
    if (!room) {
      room = {
        key,
        kind,
        id,
        subs: new Set(),
        offsets: new RoomOffsets(),
        joined: false,
        joining: false,
        wasJoined: false,
        lastAck: undefined,
        generation: 0,
        releaseTimer: undefined,
        releaseWaiters: [],
        presence: false,
        members: new Map(),
        presenceCount: undefined,
      };
      rooms.set(key, room);
    }
    // Presence asked for a room joined (or joining) without it: subscribe again, with it.
    const addsPresence = handlers.presence === true && !room.presence;
    if (addsPresence) room.presence = true;
    const theRoom = room;
    let resolve!: (ack: SubscribeSuccess) => void;
    let reject!: (err: Error) => void;
    const ready = new Promise<SubscribeSuccess>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    ready.catch(() => {}); // a caller that ignores `ready` gets no unhandled rejection
    const sub: Sub = {
      handlers,
      lastOffset: undefined,
      settled: false,
      active: true,
      resolve: (ack) => {
        sub.settled = true;
        resolve(ack);
      },
      reject: (err) => {
        sub.settled = true;
        reject(err);
      },
    };
    theRoom.subs.add(sub);
    if (addsPresence && !isNew && (theRoom.joined || theRoom.joining) && socket.connected) void join(theRoom);
    else if (theRoom.joined && theRoom.lastAck) {
      sub.resolve({ success: true });
      if (handlers.presence && theRoom.presence) tellPresenceTo(sub, theRoom);
    } else if (isNew && socket.connected) void join(theRoom);

    let unsubscribed: Promise<void> | undefined;
    return {
      kind,
      id,
      ready,
      get lastOffset() {
        return sub.lastOffset;
      },
      unsubscribe() {
        if (unsubscribed) return unsubscribed;
        sub.active = false;
        if (!sub.settled) sub.reject(new HeraldSubscribeError(kind, id, "unsubscribed before the ack"));
        if (!theRoom.subs.delete(sub) || rooms.get(key) !== theRoom) return (unsubscribed = Promise.resolve());
        if (theRoom.subs.size > 0) return (unsubscribed = Promise.resolve());
        unsubscribed = new Promise<void>((res) => theRoom.releaseWaiters.push(res));
        // Deferred by one macrotask, so that an unmount + mount (React strict
        // mode) keeps the room instead of leaving and joining it again.
        if (theRoom.releaseTimer === undefined) theRoom.releaseTimer = setTimeout(() => release(theRoom), 0);
        return unsubscribed;
      },
    };
  }

  /** A subscription added to a room that knows its members already. */
  function tellPresenceTo(sub: Sub, room: Room): void {
    const members: PresenceMember[] = [...room.members.entries()]
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([userId, connections]) => ({ userId, connections }));
    const change: PresenceChange =
      room.presenceCount === undefined ? { type: "ack" } : { type: "count", count: room.presenceCount };
    try {
      sub.handlers.onPresence?.(members, change);
    } catch (e) {
      reportError(e);
    }
  }

  return {
    get: (key) => rooms.get(key),
    presence,
    subscribe,
    resubscribeAll,
    disconnected() {
      for (const room of rooms.values()) {
        room.joined = false;
        room.joining = false;
      }
    },
    close() {
      for (const room of rooms.values()) {
        clearTimeout(room.releaseTimer);
        room.releaseWaiters.splice(0).forEach((w) => w());
        for (const sub of room.subs) {
          sub.active = false;
          if (!sub.settled) sub.reject(new HeraldSubscribeError(room.kind, room.id, "client closed"));
        }
      }
      rooms.clear();
    },
  };
}
