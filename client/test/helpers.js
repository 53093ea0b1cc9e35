// Test machinery for herald-client: the herald setups its tests share
// (a fixture database and secrets; start one herald or several on it), event
// recorders and builders. Starting herald, redis-server and the cutting proxy
// is test-support/'s, shared with client-compat and the examples.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import initSqlJs from 'sql.js';

import support from '../../test-support/index.cjs';

export const { HERALD_BIN, inCI, freePort, startProxy, startRedis } = support;
export { sleep };

/** socket.io-client reconnection options for tests: retry at once, without jitter. */
export const FAST_RECONNECT = { reconnectionDelay: 50, reconnectionDelayMax: 200, randomizationFactor: 0 };

/** An HS256 JWT for `sub` (with `iat`), valid for `ttlSeconds`. */
export function signToken(secret, sub = 'alice', ttlSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  return support.signToken(secret, { sub, iat: now, exp: now + ttlSeconds });
}

/**
 * The state one or more herald processes share: a fixture database and
 * secrets. `start({ port, env })` starts a herald on it (port 0 by default).
 */
export async function heraldSetup() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-client-'));
  const dbPath = path.join(dir, 'herald.db');
  await support.writeFixtureDb(dbPath, initSqlJs);
  const jwtSecret = crypto.randomBytes(32).toString('base64url');
  const publishToken = crypto.randomBytes(32).toString('base64url');
  const running = new Set();
  const setup = {
    dir,
    jwtSecret,
    publishToken,
    token: (sub = 'alice') => signToken(jwtSecret, sub),
    start: (opts = {}) => startHerald(setup, running, opts),
    async stopAll() {
      await Promise.all([...running].map((h) => h.stop()));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return setup;
}

async function startHerald(setup, running, { port = 0, env: extraEnv = {} } = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('HERALD_')) env[k] = v;
  Object.assign(env, {
    HERALD_LISTEN: `127.0.0.1:${port}`,
    HERALD_JWT_SECRET: setup.jwtSecret,
    HERALD_PUBLISH_TOKEN: setup.publishToken,
    HERALD_DATABASE_URL: `sqlite://${path.join(setup.dir, 'herald.db')}`,
    HERALD_LOG: process.env.HERALD_LOG || 'warn',
    HERALD_SHUTDOWN_GRACE: '2s',
    ...extraEnv,
  });
  // A port just released by a stopped herald can take a moment to be bindable.
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await spawnHerald(env, setup.dir, running);
    } catch (err) {
      if (port === 0 || attempt >= 20 || !/exited during start-up/.test(err.message)) throw err;
      await sleep(100);
    }
  }
}

/**
 * Starts the herald binary with `env` (no HERALD_* from outside), in `cwd`;
 * resolves once it listens. Its `stop()` takes it out of `running`.
 */
export async function spawnHerald(env, cwd, running = new Set()) {
  const spawned = await support.spawnHerald({ env, cwd });
  const herald = {
    url: spawned.url,
    port: spawned.port,
    child: spawned.child,
    get output() {
      return spawned.output;
    },
    /** SIGTERM (herald disconnects every socket), then SIGKILL after 5 s. */
    async stop() {
      running.delete(herald);
      await spawned.stop();
    },
  };
  running.add(herald);
  return herald;
}

/** POST /v1/events straight (not through the package), insisting on 202. */
export async function publishRaw(herald, publishToken, events) {
  const res = await fetch(`${herald.url}/v1/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${publishToken}`, 'content-type': 'application/json' },
    body: JSON.stringify(events),
  });
  const body = await res.text();
  if (res.status !== 202) throw new Error(`publish answered ${res.status} ${body}`);
  return JSON.parse(body);
}

/** Resolves when `predicate()` is truthy (polled), rejects after `timeoutMs` with `what`. */
export function waitUntil(predicate, what, timeoutMs = 5000) {
  return support.waitUntil(predicate, timeoutMs, what);
}

/** Records events per subscription handler: `rec.handlers` to pass, `rec.events`, `rec.byCorrelation(id)`. */
export function recorder() {
  const rec = {
    events: [],
    resyncs: [],
    errors: [],
    handlers: {
      onEntityUpdated: (e) => rec.typed.push(['entity_updated', e]),
      onStateInvalidated: (e) => rec.typed.push(['state_invalidated', e]),
      onWorldTimeChanged: (e) => rec.typed.push(['world_time_changed', e]),
      onSettlementUpdated: (e) => rec.typed.push(['settlement_updated', e]),
      onStructureUpdated: (e) => rec.typed.push(['structure_updated', e]),
      onEvent: (e) => rec.events.push(e),
      onResync: (info) => rec.resyncs.push(info),
      onError: (err) => rec.errors.push(err),
    },
    typed: [],
    correlations() {
      return rec.events.map((e) => e.metadata?.correlationId);
    },
    count(correlationId) {
      return rec.events.filter((e) => e.metadata?.correlationId === correlationId).length;
    },
    has(correlationId) {
      return rec.count(correlationId) > 0;
    },
    waitFor(correlationId, what = `event ${correlationId}`, timeoutMs = 5000) {
      return waitUntil(() => rec.has(correlationId), what, timeoutMs);
    },
  };
  return rec;
}

let seq = 0;
export function cid(prefix = 'e') {
  seq += 1;
  return `${prefix}-${process.pid}-${seq}`;
}

/** Event builders (publish shape) with a correlation id. */
export const ev = {
  settlement(campaignId, settlementId, correlationId, operation = 'update') {
    return { type: 'settlement_updated', payload: { campaignId, settlementId, operation }, metadata: { correlationId } };
  },
  structure(campaignId, settlementId, structureId, correlationId) {
    return {
      type: 'structure_updated',
      payload: { campaignId, settlementId, structureId, operation: 'update' },
      metadata: { correlationId },
    };
  },
  entity(campaignId, entityType, entityId, correlationId) {
    return { type: 'entity_updated', payload: { campaignId, entityType, entityId }, metadata: { correlationId } };
  },
  invalidated(campaignId, correlationId) {
    return { type: 'state_invalidated', payload: { campaignId, scope: 'campaign' }, metadata: { correlationId } };
  },
};
