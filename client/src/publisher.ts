// herald-client/publisher: typed publishing for Node backends, over
// `POST /v1/events` (global fetch and crypto: Node 20+, as the package
// requires). No socket.io-client needed.
// Every event gets an idempotency key (unless it has one, or keys are off),
// so that a retry after an unknown outcome (a 504, a network error) is
// stored and delivered once.

import type {
  AnyPublishedEvent,
  EntityUpdatedPayload,
  EventMetadata,
  EventType,
  PayloadMap,
  PublishedEvent,
  SettlementUpdatedPayload,
  StateInvalidatedPayload,
  StructureUpdatedPayload,
  WorldTimeChangedPayload,
} from "./events.js";

export type * from "./events.js";

export interface HeraldPublisherOptions {
  /** herald's base URL, e.g. `http://herald:3000`. */
  url: string;
  /** The publish token, or a function giving it (called for every request). */
  token: string | (() => string | Promise<string>);
  /**
   * Collect events published within this many ms and send them as one array
   * (one POST). 0 or unset: every call is its own POST.
   */
  batchWindowMs?: number;
  /** Largest batch; a full batch is sent at once (default 500). */
  maxBatch?: number;
  /**
   * Give every event without an `idempotencyKey` a random one (a UUID), kept
   * across its retries, so that herald stores and delivers it once (default
   * true). Without keys, a retry after a 504 or a network error may deliver
   * an event twice.
   */
  idempotencyKeys?: boolean;
  /** Retries after a 503, a 504 or a network error (default 5); never after a 4xx. */
  retries?: number;
  /** First retry delay, doubled each time, with jitter (default 100 ms). */
  retryDelayMs?: number;
  /** Longest retry delay (default 5 s). */
  maxRetryDelayMs?: number;
  /** Abort one request after this long (default 10 s); counts as a network error. */
  requestTimeoutMs?: number;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

export interface PublishResult {
  /** Events herald accepted in the request(s) that carried this event. */
  accepted: number;
  /** Of those, events herald had already stored under their key (a retry's). */
  duplicates: number;
}

/**
 * A publish that failed. `status` is the HTTP status (undefined for a network
 * error), `path` herald's error path (`payload.operation`, `events[1].payload.operation`,
 * `body`) when it gave one, `serverError` its whole `error` string.
 */
export class HeraldPublishError extends Error {
  readonly status: number | undefined;
  readonly path: string | undefined;
  readonly serverError: string | undefined;
  readonly body: unknown;
  /** Attempts made, retries included. */
  readonly attempts: number;
  constructor(
    message: string,
    fields: { status?: number; path?: string; serverError?: string; body?: unknown; attempts: number; cause?: unknown },
  ) {
    super(message, fields.cause === undefined ? undefined : { cause: fields.cause });
    this.name = "HeraldPublishError";
    this.status = fields.status;
    this.path = fields.path;
    this.serverError = fields.serverError;
    this.body = fields.body;
    this.attempts = fields.attempts;
  }
}

export interface HeraldPublisher {
  /** Publishes one event or an array (always one POST, never batched with others). */
  publish(events: AnyPublishedEvent | AnyPublishedEvent[]): Promise<PublishResult>;
  entityUpdated(payload: EntityUpdatedPayload, metadata?: EventMetadata, timestamp?: string): Promise<PublishResult>;
  stateInvalidated(payload: StateInvalidatedPayload, metadata?: EventMetadata, timestamp?: string): Promise<PublishResult>;
  worldTimeChanged(payload: WorldTimeChangedPayload, metadata?: EventMetadata, timestamp?: string): Promise<PublishResult>;
  settlementUpdated(payload: SettlementUpdatedPayload, metadata?: EventMetadata, timestamp?: string): Promise<PublishResult>;
  structureUpdated(payload: StructureUpdatedPayload, metadata?: EventMetadata, timestamp?: string): Promise<PublishResult>;
  /** Sends the pending batch now. */
  flush(): Promise<void>;
  /** Flushes, then refuses further publishes. */
  close(): Promise<void>;
}

/** `"payload.operation: expected …"` → `payload.operation`. */
export function errorPath(error: string): string | undefined {
  const i = error.indexOf(": ");
  if (i <= 0) return undefined;
  const path = error.slice(0, i);
  return /^[A-Za-z0-9_.[\]-]+$/.test(path) ? path : undefined;
}

interface Pending {
  event: AnyPublishedEvent;
  resolve(r: PublishResult): void;
  reject(e: Error): void;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export function createHeraldPublisher(options: HeraldPublisherOptions): HeraldPublisher {
  const {
    url,
    token,
    batchWindowMs = 0,
    maxBatch = 500,
    idempotencyKeys = true,
    retries = 5,
    retryDelayMs = 100,
    maxRetryDelayMs = 5000,
    requestTimeoutMs = 10_000,
  } = options;
  const doFetch = options.fetch ?? globalThis.fetch;
  const endpoint = `${url.replace(/\/+$/, "")}/v1/events`;
  let queue: Pending[] = [];
  let timer: ReturnType<typeof setTimeout> | undefined;
  let closed = false;
  const inFlight = new Set<Promise<void>>();

  /** The event with a key of its own, when keys are on and it has none. */
  function keyed(event: AnyPublishedEvent): AnyPublishedEvent {
    if (!idempotencyKeys || event.idempotencyKey !== undefined) return event;
    // A random UUID (v4), from the global Web Crypto (Node 19 and later).
    return { ...event, idempotencyKey: globalThis.crypto.randomUUID() };
  }

  async function post(events: AnyPublishedEvent | AnyPublishedEvent[]): Promise<PublishResult> {
    // Keyed once, before the first attempt: every retry carries the same keys.
    let body: AnyPublishedEvent | AnyPublishedEvent[] = Array.isArray(events) ? events.map(keyed) : keyed(events);
    let acceptedSoFar = 0;
    let duplicatesSoFar = 0;
    for (let attempt = 1; ; attempt += 1) {
      const retry = async (err: HeraldPublishError) => {
        if (attempt > retries) throw err;
        const base = Math.min(maxRetryDelayMs, retryDelayMs * 2 ** (attempt - 1));
        await sleep(base / 2 + Math.random() * (base / 2));
      };
      let res: Response;
      try {
        const t = typeof token === "function" ? await token() : token;
        res = await doFetch(endpoint, {
          method: "POST",
          headers: { authorization: `Bearer ${t}`, "content-type": "application/json" },
          body: JSON.stringify(body),
          signal: AbortSignal.timeout(requestTimeoutMs),
        });
      } catch (cause) {
        await retry(
          new HeraldPublishError(`herald publish failed: ${(cause as Error)?.message ?? String(cause)}`, {
            attempts: attempt,
            cause,
          }),
        );
        continue;
      }
      const text = await res.text().catch(() => "");
      let parsed: unknown = text;
      try {
        parsed = JSON.parse(text);
      } catch {
        // not JSON: keep the text
      }
      const obj = (parsed && typeof parsed === "object" ? parsed : {}) as {
        accepted?: unknown;
        duplicates?: unknown;
        error?: unknown;
      };
      const accepted = typeof obj.accepted === "number" ? obj.accepted : 0;
      if (res.ok) {
        const duplicates = typeof obj.duplicates === "number" ? obj.duplicates : 0;
        return { accepted: acceptedSoFar + accepted, duplicates: duplicatesSoFar + duplicates };
      }
      const serverError = typeof obj.error === "string" ? obj.error : undefined;
      const path = serverError === undefined ? undefined : errorPath(serverError);
      const err = new HeraldPublishError(`herald publish: ${res.status}${serverError ? ` ${serverError}` : ""}`, {
        status: res.status,
        path,
        serverError,
        body: parsed,
        attempts: attempt,
      });
      if (res.status !== 503 && res.status !== 504) throw err;
      // 503: the first `accepted` events were handed over, none after them.
      // 504: the first `accepted` were, the next `unknown` may have been (their
      // keys make resending them safe), none after. Resend from `accepted` on.
      if (accepted > 0 && Array.isArray(body)) {
        acceptedSoFar += accepted;
        body = body.slice(accepted);
        if (body.length === 0) return { accepted: acceptedSoFar, duplicates: duplicatesSoFar };
      } else if (accepted > 0) {
        return { accepted: acceptedSoFar + accepted, duplicates: duplicatesSoFar };
      }
      await retry(err);
    }
  }

  function track(p: Promise<unknown>): void {
    const q = p.then(
      () => undefined,
      () => undefined,
    );
    inFlight.add(q);
    void q.then(() => inFlight.delete(q));
  }

  function sendQueue(): void {
    clearTimeout(timer);
    timer = undefined;
    const batch = queue;
    queue = [];
    if (batch.length === 0) return;
    const events = batch.map((p) => p.event);
    const p = post(batch.length === 1 ? events[0]! : events);
    track(p);
    p.then(
      (r) => batch.forEach((x) => x.resolve(r)),
      (e: Error) => batch.forEach((x) => x.reject(e)),
    );
  }

  function enqueue(event: AnyPublishedEvent): Promise<PublishResult> {
    if (closed) return Promise.reject(new Error("herald publisher is closed"));
    if (batchWindowMs <= 0) {
      const p = post(event);
      track(p);
      return p;
    }
    return new Promise<PublishResult>((resolve, reject) => {
      queue.push({ event, resolve, reject });
      if (queue.length >= maxBatch) sendQueue();
      else if (timer === undefined) timer = setTimeout(sendQueue, batchWindowMs);
    });
  }

  function make<T extends EventType>(type: T) {
    return (payload: PayloadMap[T], metadata?: EventMetadata, timestamp?: string) => {
      const event: PublishedEvent<T> = { type, payload };
      if (metadata !== undefined) event.metadata = metadata;
      if (timestamp !== undefined) event.timestamp = timestamp;
      return enqueue(event as unknown as AnyPublishedEvent);
    };
  }

  async function flush(): Promise<void> {
    sendQueue();
    while (inFlight.size > 0) await Promise.all([...inFlight]);
  }

  return {
    publish(events) {
      if (closed) return Promise.reject(new Error("herald publisher is closed"));
      const p = post(events);
      track(p);
      return p;
    },
    entityUpdated: make("entity_updated"),
    stateInvalidated: make("state_invalidated"),
    worldTimeChanged: make("world_time_changed"),
    settlementUpdated: make("settlement_updated"),
    structureUpdated: make("structure_updated"),
    flush,
    async close() {
      closed = true;
      await flush();
    },
  };
}
