// errors: the client's error classes, and where an error goes: to the
// `onError` listeners, or to the console when there is none. A listener that
// throws does not stop the others.

import type { SubscriptionKind } from "./events.js";

/** A subscribe refused by herald: `error` is its message (`Unauthorized`, `Invalid payload`, …). */
export class HeraldSubscribeError extends Error {
  readonly error: string;
  readonly kind: SubscriptionKind;
  readonly id: string;
  constructor(kind: SubscriptionKind, id: string, error: string) {
    super(`subscribe_${kind} ${id}: ${error}`);
    this.name = "HeraldSubscribeError";
    this.error = error;
    this.kind = kind;
    this.id = id;
  }
}

/** An in-band token refresh failed; it is retried until the token expires. */
export class HeraldRefreshError extends Error {
  constructor(reason: string, cause?: unknown) {
    super(`refresh_token: ${reason}`, cause === undefined ? undefined : { cause });
    this.name = "HeraldRefreshError";
  }
}

/** Reports an error (anything thrown) to the listeners. */
export type ReportError = (err: unknown) => void;

export interface ErrorListeners {
  report: ReportError;
  /** Adds a listener; returns a function that removes it. */
  add(cb: (error: Error) => void): () => void;
}

export function createErrorListeners(): ErrorListeners {
  const listeners = new Set<(e: Error) => void>();
  return {
    report(err) {
      const error = err instanceof Error ? err : new Error(String(err));
      if (listeners.size === 0) {
        console.error("herald-client:", error);
        return;
      }
      for (const cb of [...listeners]) {
        try {
          cb(error);
        } catch (e) {
          console.error("herald-client: error listener threw", e);
        }
      }
    },
    add(cb) {
      listeners.add(cb);
      return () => listeners.delete(cb);
    },
  };
}
