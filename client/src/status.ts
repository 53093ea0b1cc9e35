// status: the connection status the application sees (`connecting`,
// `connected`, `reconnecting`, `offline`), its listeners, and what each
// socket event means for it, above all a disconnect's reason. The backoff
// itself is socket.io-client's: it reconnects by itself after every cut,
// unless the Socket.IO session was ended on purpose (by `close()`, or by
// herald: `io server disconnect`) or a handshake was refused.

import type { ConnectionStatus } from "./index.js";
import type { ReportError } from "./errors.js";

export interface StatusTracker {
  readonly current: ConnectionStatus;
  /** Calls `cb` on every change; returns a function that removes it. */
  onChange(cb: (status: ConnectionStatus) => void): () => void;
  /** The socket connected. */
  connected(): void;
  /**
   * The socket disconnected. `closed`: the client was closed; `active`:
   * socket.io-client will reconnect by itself (`socket.active`).
   */
  disconnected(reason: string, closed: boolean, active: boolean): void;
  /** A connection attempt failed; `active` as for `disconnected`. */
  connectError(err: Error, active: boolean): void;
  /** socket.io-client starts another attempt. */
  reconnectAttempt(): void;
  /** socket.io-client gave up (its `reconnectionAttempts` are spent). */
  reconnectFailed(): void;
  /** The application asked to connect (`client.connect()`). */
  connectRequested(): void;
  /** The client was closed. */
  closed(): void;
}

/** `autoConnect`: the socket connects at once (socket.io-client's option, default true). */
export function createStatusTracker(autoConnect: boolean, reportError: ReportError): StatusTracker {
  const listeners = new Set<(s: ConnectionStatus) => void>();
  let status: ConnectionStatus = autoConnect ? "connecting" : "offline";
  let everConnected = false;

  function set(next: ConnectionStatus): void {
    if (next === status) return;
    status = next;
    for (const cb of [...listeners]) {
      try {
        cb(next);
      } catch (err) {
        reportError(err);
      }
    }
  }

  /** Before the first connect a new attempt is `connecting`, after it `reconnecting`. */
  const attempting = (): ConnectionStatus => (everConnected ? "reconnecting" : "connecting");

  return {
    get current() {
      return status;
    },
    onChange(cb) {
      listeners.add(cb);
      return () => listeners.delete(cb);
    },
    connected() {
      everConnected = true;
      set("connected");
    },
    disconnected(reason, closed, active) {
      if (closed || reason === "io client disconnect") {
        set("offline");
      } else if (active) {
        set("reconnecting");
      } else {
        // "io server disconnect": herald ended this Socket.IO session on purpose
        // (the user's access was revoked, or the socket ignored the rate
        // limit), so coming back would be wrong. Every cut herald makes for a
        // client to recover closes the transport instead, and socket.io-client
        // reconnects by itself. `client.connect()` tries again.
        set("offline");
        reportError(new Error(`herald disconnected this socket (${reason})`));
      }
    },
    connectError(err, active) {
      if (active) {
        set(attempting());
      } else {
        // Refused by herald (e.g. "Unauthorized"): socket.io-client gives up.
        set("offline");
        reportError(err);
      }
    },
    reconnectAttempt() {
      set("reconnecting");
    },
    reconnectFailed() {
      set("offline");
    },
    connectRequested() {
      set(attempting());
    },
    closed() {
      set("offline");
    },
  };
}
