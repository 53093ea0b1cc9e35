// refresh: the in-band token refresh (only when `token` is a function).
// herald cuts a socket at its token's `exp` (plus its leeway) unless the
// socket sends a newer token with `refresh_token`. This module reads `exp`
// (and `iat`) from a JWT, plans each refresh from the token the connection
// holds, sends it, and retries a failed one; its timer lives from a connect
// to the next disconnect.

import { HeraldRefreshError, type ReportError } from "./errors.js";

/** A refresh is planned at most this long before the token's `exp`. */
const REFRESH_MARGIN_MAX_MS = 60_000;
/** After a refresh, the next one waits at least this long (a token that expires at once, or a skewed clock). */
const REFRESH_MIN_INTERVAL_MS = 1_000;
const REFRESH_RETRY_MIN_MS = 250;
const REFRESH_RETRY_MAX_MS = 10_000;
const REFRESH_RETRY_PAST_EXP_MS = 60_000;
const MAX_TIMER_MS = 2_147_483_647;

/** herald's answer to `refresh_token`. */
export type RefreshTokenAck = { success: true } | { success: false; error?: string };

/**
 * The `exp` of a JWT, in milliseconds since the epoch, read without any
 * verification (herald verifies); `undefined` for anything that is not a JWT
 * with a numeric `exp`.
 */
export function jwtExpiryMs(jwt: string): number | undefined {
  return readJwtTimes(jwt)?.expMs;
}

/** `exp`, and the lifetime `exp - iat` when `iat` is there, in milliseconds. */
function readJwtTimes(jwt: string): { expMs: number; lifetimeMs: number | undefined } | undefined {
  try {
    const parts = jwt.replace(/^Bearer /, "").split(".");
    const body = parts[1];
    if (parts.length !== 3 || !body || !/^[A-Za-z0-9_-]+={0,2}$/.test(body)) return undefined;
    const b64 = body.replace(/=+$/, "").replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims: unknown = JSON.parse(new TextDecoder().decode(bytes));
    if (claims === null || typeof claims !== "object") return undefined;
    const { exp, iat } = claims as { exp?: unknown; iat?: unknown };
    if (typeof exp !== "number" || !Number.isFinite(exp)) return undefined;
    const lifetimeMs = typeof iat === "number" && Number.isFinite(iat) && iat <= exp ? (exp - iat) * 1000 : undefined;
    return { expMs: exp * 1000, lifetimeMs };
  } catch {
    return undefined;
  }
}

/** What the refresher needs of the client. */
export interface RefreshDeps {
  /** Calls the token function. */
  getToken(): Promise<string>;
  /** Emits `refresh_token`; `ack` gets herald's answer, or an error when none came within `ackTimeoutMs`. */
  sendToken(token: string, ack: (err: Error | null, answer: RefreshTokenAck) => void): void;
  ackTimeoutMs: number;
  /** Whether connection `conn` is still the socket's live one, and the client open. */
  isCurrent(conn: number): boolean;
  reportError: ReportError;
}

export interface TokenRefresher {
  /** A handshake starts (`token` undefined), or sends `token`. */
  handshake(token: string | undefined): void;
  /** Connected (as connection `conn`) with the handshake's token: plans its refresh. */
  connected(conn: number): void;
  /** Disconnected or closed: no refresh until the next connect. */
  stop(): void;
}

/**
 * A margin before `exp` (at 75% of the remaining lifetime, at most 60 s
 * before it) the token function is called and its token sent; the next
 * refresh is scheduled from the new token's `exp`. A failure (the function
 * throws, herald refuses, no ack) is reported to the error listeners and
 * retried a little later, until herald disconnects the socket at exp +
 * leeway; then the reconnect, which calls the token function again, takes
 * over. A token whose `exp` cannot be read is never refreshed.
 */
export function createTokenRefresher(deps: RefreshDeps): TokenRefresher {
  const { getToken, sendToken, ackTimeoutMs, isCurrent, reportError } = deps;
  /** The token of the latest handshake (the one the current connection was accepted with), then of each refresh. */
  let connectionToken: string | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;

  function stop(): void {
    clearTimeout(timer);
    timer = undefined;
  }

  function schedule(conn: number, jwt: string, minDelayMs: number): void {
    stop();
    const times = readJwtTimes(jwt);
    if (times === undefined) return;
    // A clock behind herald's would plan too late: for a token just minted,
    // `exp - iat` is the remaining lifetime whatever this clock says.
    const now = Date.now();
    const remaining = Math.min(times.expMs - now, times.lifetimeMs ?? Infinity);
    const delay = Math.max(minDelayMs, remaining * 0.75, remaining - REFRESH_MARGIN_MAX_MS);
    arm(conn, now + remaining, delay);
  }

  function arm(conn: number, expMs: number, delayMs: number): void {
    clearTimeout(timer);
    // setTimeout fires at once past 2^31 - 1 ms: wait in steps, then look again.
    if (delayMs > MAX_TIMER_MS) {
      timer = setTimeout(() => arm(conn, expMs, delayMs - MAX_TIMER_MS), MAX_TIMER_MS);
      return;
    }
    timer = setTimeout(() => {
      timer = undefined;
      void refresh(conn, expMs);
    }, Math.max(0, delayMs));
  }

  /** `expMs`: the token's expiry as this client reckons it; retries stop a minute past it. */
  async function refresh(conn: number, expMs: number): Promise<void> {
    const current = () => isCurrent(conn);
    if (!current()) return;
    let fresh: string;
    try {
      fresh = await getToken();
      if (typeof fresh !== "string" || fresh === "") throw new Error("the token function gave no token");
      if (!current()) return;
      const ack = await new Promise<RefreshTokenAck>((resolve, reject) => {
        sendToken(fresh, (err, ack) => (err ? reject(new Error(`no ack within ${ackTimeoutMs} ms`)) : resolve(ack)));
      });
      if (!ack || ack.success !== true) {
        throw new Error(ack && typeof ack.error === "string" ? ack.error : "no answer");
      }
    } catch (err) {
      if (!current()) return;
      const reason = err instanceof Error ? err.message : String(err);
      reportError(new HeraldRefreshError(reason, err));
      // Until `exp`, and through herald's leeway past it (it disconnects the
      // socket at exp + leeway, which stops this); never longer than a minute past it.
      const left = expMs - Date.now();
      if (left > -REFRESH_RETRY_PAST_EXP_MS) {
        arm(conn, expMs, Math.min(REFRESH_RETRY_MAX_MS, Math.max(REFRESH_RETRY_MIN_MS, left / 4)));
      }
      return;
    }
    if (!current()) return;
    connectionToken = fresh;
    schedule(conn, fresh, REFRESH_MIN_INTERVAL_MS);
  }

  return {
    handshake(token) {
      connectionToken = token;
    },
    connected(conn) {
      if (connectionToken !== undefined) schedule(conn, connectionToken, 0);
    },
    stop,
  };
}
