'use strict';
// Shared machinery for the client-compat suite: start the real herald binary
// on a fixture database, mint tokens, connect unmodified socket.io clients,
// wait for acks and events, and check that nothing else arrives.

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const net = require('node:net');
const { setTimeout: sleep } = require('node:timers/promises');

const jwt = require('jsonwebtoken');
const initSqlJs = require('sql.js');
const { io } = require('socket.io-client');

const support = require('../../test-support/index.cjs');

const { HERALD_BIN, inCI, freePort, waitUntil, redisPing, startRedis, startProxy, metric, trackChild, randomSecret } = support;

const START_TIMEOUT_MS = 15_000;
const ACK_TIMEOUT_MS = 3_000;
const EVENT_TIMEOUT_MS = 3_000;
/** How long "nothing arrives" waits: long enough for a local delivery, short enough to be cheap. */
const QUIET_MS = 300;

const OK = Object.freeze({ success: true });
const UNAUTHORIZED = Object.freeze({ success: false, error: 'Unauthorized' });
const INVALID = Object.freeze({ success: false, error: 'Invalid payload' });

/** The fixture database for `dir`: herald's migrations and the shared fixture (tests/fixture.sql). */
function writeFixtureDb(file) {
  return support.writeFixtureDb(file, initSqlJs);
}

let uniqueCounter = 0;
/** A fresh id, unique within the process, usable as a correlation id. */
function uniqueId(prefix = 'id') {
  uniqueCounter += 1;
  return `${prefix}-${process.pid}-${uniqueCounter}`;
}

/**
 * Starts herald with a fresh fixture database and fresh secrets.
 * Returns a handle; call `stop()` when done (it also closes the clients
 * opened through the handle).
 *
 * `env` adds `HERALD_*` variables (e.g. `HERALD_REDIS_URL`). `shared`
 * (`{ dir, dbPath, jwtSecret, publishToken }`, see `startFleet`) makes this
 * instance use an existing database and secrets instead of fresh ones; its
 * `stop()` then leaves `dir` in place.
 */
async function startHerald({ log = process.env.HERALD_LOG || 'info', env: extraEnv = {}, shared = null } = {}) {
  let dir, dbPath, jwtSecret, publishToken;
  if (shared) {
    ({ dir, dbPath, jwtSecret, publishToken } = shared);
  } else {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-compat-'));
    dbPath = path.join(dir, 'herald.db');
    await writeFixtureDb(dbPath);
    jwtSecret = randomSecret();
    publishToken = randomSecret();
  }
  const ownsDir = !shared;
  const spawned = await support.spawnHerald({
    cwd: dir,
    env: {
      HERALD_LISTEN: '127.0.0.1:0',
      HERALD_JWT_SECRET: jwtSecret,
      HERALD_PUBLISH_TOKEN: publishToken,
      HERALD_DATABASE_URL: `sqlite://${dbPath}`,
      HERALD_LOG: log,
      ...extraEnv,
    },
  });
  const { url, child, exited } = spawned;
  const clients = new Set();

  const herald = {
    url,
    port: spawned.port,
    jwtSecret,
    publishToken,
    dir,
    child,
    /** Everything herald wrote to stdout and stderr so far. */
    get output() {
      return spawned.output;
    },
    get exitInfo() {
      return spawned.exitInfo;
    },
    exited,

    /** Every token minted through `token()`, for the log-leak check. */
    minted: [],

    /**
     * A token for `sub` (HS256, valid for an hour, signed with herald's secret
     * unless told otherwise). A claim set to `undefined` in `claims` is left out.
     */
    token(sub = 'alice', { secret = jwtSecret, algorithm = 'HS256', expiresIn = 3600, claims = {} } = {}) {
      const now = Math.floor(Date.now() / 1000);
      const body = { sub, iat: now, exp: now + expiresIn, ...claims };
      for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
      const token = jwt.sign(body, secret, { algorithm, noTimestamp: true });
      herald.minted.push(token);
      return token;
    },

    /**
     * A v4 client (not yet connected) registered for closing.
     * Options go straight to `io()`; reconnection is off and every client gets its own Manager.
     */
    client(options = {}) {
      const socket = io(url, { forceNew: true, reconnection: false, timeout: 10_000, ...options });
      clients.add(socket);
      return socket;
    },

    /**
     * Connects as `user` (a token in `auth`) or with explicit options, and
     * resolves once connected; rejects with the connect_error.
     */
    connect(userOrOptions = 'alice', transports) {
      const options =
        typeof userOrOptions === 'string' ? { auth: { token: herald.token(userOrOptions) } } : { ...userOrOptions };
      if (transports && !options.transports) options.transports = transports;
      return waitForConnect(herald.client(options));
    },

    /** Resolves with the connect_error of a connection that must be refused. */
    async connectRejected(options) {
      const socket = herald.client(options);
      try {
        await waitForConnect(socket);
      } catch (err) {
        return err;
      }
      socket.close();
      throw new Error(`connection was accepted but should have been refused (options: ${describeOptions(options)})`);
    },

    /** Closes every client opened through this handle. */
    closeClients() {
      for (const socket of clients) socket.close();
      clients.clear();
    },

    /** Registers a socket created elsewhere (e.g. a v2 client) for closing. */
    track(socket) {
      clients.add(socket);
      return socket;
    },

    /** POST /v1/events; returns `{ status, body }` whatever the status. */
    async publishRaw(body, { token = publishToken, contentType = 'application/json' } = {}) {
      const headers = {};
      if (token !== null) headers.authorization = `Bearer ${token}`;
      if (contentType !== null) headers['content-type'] = contentType;
      const res = await fetch(`${url}/v1/events`, {
        method: 'POST',
        headers,
        body: typeof body === 'string' ? body : JSON.stringify(body),
      });
      const text = await res.text();
      let parsed;
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = text;
      }
      return { status: res.status, body: parsed };
    },

    /** Publishes one event or an array and insists on `202 {"accepted": n}`. */
    async publish(events) {
      const n = Array.isArray(events) ? events.length : 1;
      const res = await herald.publishRaw(events);
      if (res.status !== 202 || res.body?.accepted !== n) {
        throw new Error(
          `publish of ${JSON.stringify(events)} answered ${res.status} ${JSON.stringify(res.body)}; ` +
            `expected 202 {"accepted":${n}}`,
        );
      }
      return res.body;
    },

    /** SIGTERM, then SIGKILL after 5 s; removes the temp dir. Resolves with how it exited. */
    async stop() {
      herald.closeClients();
      const exitInfo = await spawned.stop();
      if (ownsDir) fs.rmSync(dir, { recursive: true, force: true });
      return exitInfo;
    },
  };
  return herald;
}

function describeOptions(options) {
  return JSON.stringify(options, (k, v) => (typeof v === 'string' && v.length > 40 ? `${v.slice(0, 12)}…` : v));
}

/** Resolves with the socket on `connect`, rejects with the error of `connect_error`. */
function waitForConnect(socket) {
  if (socket.connected) return Promise.resolve(socket);
  return new Promise((resolve, reject) => {
    function onConnect() {
      socket.off('connect_error', onError);
      resolve(socket);
    }
    function onError(err) {
      socket.off('connect', onConnect);
      socket.close();
      reject(err);
    }
    socket.once('connect', onConnect);
    socket.once('connect_error', onError);
  });
}

/** Emits `event` with `args` and resolves with the ack's first argument. */
async function ack(socket, event, ...args) {
  try {
    return await socket.timeout(ACK_TIMEOUT_MS).emitWithAck(event, ...args);
  } catch (err) {
    throw new Error(`no ack for ${event}(${args.map((a) => JSON.stringify(a)).join(', ')}) within ${ACK_TIMEOUT_MS} ms (${err.message})`);
  }
}

/**
 * Records every `type` event a socket receives, through `socket.on(type, …)`.
 * Each entry is the full argument list, so `args.length` can be checked.
 */
/** Offsets are 13-13-10 digits, so they compare as strings. */
const OFFSET_RE = /^\d{13}-\d{13}-\d{10}$/;

/**
 * An event object without its `offset`, for comparing with what was
 * published. A missing or malformed offset is left in place (as `offset:
 * "<missing>"` or the bad value) so that the comparison fails and shows it.
 */
function withoutOffset(evt) {
  if (evt === null || typeof evt !== 'object') return evt;
  const { offset, ...rest } = evt;
  if (typeof offset === 'string' && OFFSET_RE.test(offset)) return rest;
  return { ...rest, offset: offset === undefined ? '<missing>' : offset };
}

class Inbox {
  constructor(socket, type) {
    this.socket = socket;
    this.type = type;
    this.calls = [];
    this.offsets = [];
    this.waiters = new Set();
    socket.on(type, (...args) => {
      if (typeof args[0]?.offset === 'string') this.offsets.push(args[0].offset);
      this.calls.push(args.map(withoutOffset));
      for (const w of this.waiters) w();
    });
  }

  /** Calls whose event object carries this correlation id (all calls when id is undefined). */
  matching(correlationId) {
    if (correlationId === undefined) return this.calls;
    return this.calls.filter((args) => args[0]?.metadata?.correlationId === correlationId);
  }

  /** Waits until `count` matching calls have arrived, and resolves with them. */
  async waitFor(correlationId, count = 1, timeoutMs = EVENT_TIMEOUT_MS) {
    if (this.matching(correlationId).length >= count) return this.matching(correlationId);
    await new Promise((resolve, reject) => {
      const check = () => {
        if (this.matching(correlationId).length >= count) {
          clearTimeout(timer);
          this.waiters.delete(check);
          resolve();
        }
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(
          new Error(
            `expected ${count} "${this.type}" event(s)` +
              (correlationId ? ` with correlationId ${correlationId}` : '') +
              `, got ${this.matching(correlationId).length} within ${timeoutMs} ms`,
          ),
        );
      }, timeoutMs);
      this.waiters.add(check);
    });
    return this.matching(correlationId);
  }

  /** Resolves with the first matching event object. */
  async next(correlationId, timeoutMs) {
    const calls = await this.waitFor(correlationId, 1, timeoutMs);
    return calls[0][0];
  }
}

function inbox(socket, type) {
  return new Inbox(socket, type);
}

/** Records every event whatever its name (socket.onAny). */
function recordAll(socket) {
  const seen = [];
  socket.onAny((name, ...args) => {
    const record = { name, args: args.map(withoutOffset) };
    // Kept aside (not enumerable), so records still compare with what was published.
    Object.defineProperty(record, 'offset', { value: args[0]?.offset, enumerable: false });
    seen.push(record);
  });
  return seen;
}

/** Waits QUIET_MS (or `ms`): used before asserting that nothing (more) arrived. */
function quietPeriod(ms = QUIET_MS) {
  return sleep(ms);
}

/** Asserts that `seen` (an array filled by a listener) stays empty for `ms`. */
async function assertNothingArrives(seen, ms = QUIET_MS, what = 'event') {
  await sleep(ms);
  if (seen.length !== 0) {
    throw new Error(`expected no ${what} within ${ms} ms, got ${seen.length}: ${JSON.stringify(seen).slice(0, 500)}`);
  }
}

/** Waits for one emission of `event` on an EventEmitter-like object. */
function once(emitter, event, timeoutMs = EVENT_TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, handler);
      reject(new Error(`no "${event}" within ${timeoutMs} ms`));
    }, timeoutMs);
    function handler(...args) {
      clearTimeout(timer);
      resolve(args);
    }
    emitter.once(event, handler);
  });
}

/** An unsigned token (`alg: none`) for `sub`. */
function unsignedToken(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'none', typ: 'JWT' })}.${b64(claims)}.`;
}

/** Resolves once something accepts TCP connections on host:port, rejects after `timeoutMs`. */
async function waitForPort(port, { host = '127.0.0.1', timeoutMs = START_TIMEOUT_MS, what = `port ${port}`, isDead = () => null } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const dead = isDead();
    if (dead) throw new Error(`${what} exited before accepting connections: ${dead}`);
    const ok = await new Promise((resolve) => {
      const sock = net.connect({ port, host });
      sock.once('connect', () => {
        sock.destroy();
        resolve(true);
      });
      sock.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${what} did not accept connections on ${host}:${port} within ${timeoutMs} ms`);
    await sleep(25);
  }
}

/**
 * Starts `count` herald instances sharing one Redis (`redisUrl`), one SQLite
 * fixture database (written before the first instance starts) and one set of
 * secrets, as a fleet behind a load balancer would. Instances start one after
 * the other. `stop()` stops them all and removes the shared directory.
 */
async function startFleet({ count, redisUrl, prefix, log, env = {} }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-fleet-'));
  const dbPath = path.join(dir, 'herald.db');
  await writeFixtureDb(dbPath);
  const shared = { dir, dbPath, jwtSecret: randomSecret(), publishToken: randomSecret() };
  const fleetEnv = { HERALD_REDIS_URL: redisUrl, ...env };
  if (prefix !== undefined) fleetEnv.HERALD_REDIS_PREFIX = prefix;
  const instances = [];
  const fleet = {
    instances,
    dir,
    jwtSecret: shared.jwtSecret,
    publishToken: shared.publishToken,
    get ports() {
      return instances.map((h) => h.port);
    },
    get urls() {
      return instances.map((h) => h.url);
    },
    /** A client token for `sub`, valid on every instance. */
    token(sub = 'alice', options) {
      return instances[0].token(sub, options);
    },
    async stop() {
      await Promise.all(instances.map((h) => h.stop()));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  try {
    for (let i = 0; i < count; i += 1) instances.push(await startHerald({ log, shared, env: fleetEnv }));
  } catch (err) {
    await fleet.stop();
    throw err;
  }
  return fleet;
}

module.exports = {
  HERALD_BIN,
  OK,
  UNAUTHORIZED,
  INVALID,
  QUIET_MS,
  ACK_TIMEOUT_MS,
  startHerald,
  writeFixtureDb,
  waitForConnect,
  ack,
  inbox,
  withoutOffset,
  recordAll,
  quietPeriod,
  assertNothingArrives,
  once,
  unsignedToken,
  uniqueId,
  sleep,
  freePort,
  waitForPort,
  redisPing,
  startRedis,
  startFleet,
  trackChild,
  startProxy,
  waitUntil,
  metric,
  inCI,
};
