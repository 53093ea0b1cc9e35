// Test machinery for herald-client: start the real herald binary (as
// client-compat/test/helpers.js does: fixture SQLite via sql.js, secrets in the
// environment, HERALD_LISTEN on port 0 or a given port), a private
// redis-server, and a TCP proxy that can cut and refuse connections.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

import initSqlJs from 'sql.js';

const here = path.dirname(fileURLToPath(import.meta.url));
export const HERALD_BIN = process.env.HERALD_BIN
  ? path.resolve(process.env.HERALD_BIN)
  : path.resolve(here, '../../target/debug/herald');
const REDIS_SERVER_BIN = process.env.REDIS_SERVER_BIN || 'redis-server';
const START_TIMEOUT_MS = 15_000;
const LISTENING_RE = /listening on http:\/\/([0-9.]+):(\d+)/;

export { sleep };

/** c1: alice, bob (s1 with st1, st3; s3)   c2: carol (s2 with st2) */
const FIXTURE = {
  campaignMembers: [['c1', 'alice'], ['c1', 'bob'], ['c2', 'carol']],
  settlements: [['s1', 'c1'], ['s3', 'c1'], ['s2', 'c2']],
  structures: [['st1', 's1'], ['st3', 's1'], ['st2', 's2']],
};

const living = new Set();
process.once('exit', () => {
  for (const child of living) {
    try {
      child.kill('SIGKILL');
    } catch {}
  }
});
function track(child) {
  living.add(child);
  child.once('exit', () => living.delete(child));
  return child;
}

async function writeFixtureDb(file) {
  const SQL = await initSqlJs();
  const db = new SQL.Database();
  db.run(`CREATE TABLE campaign_members (campaign_id TEXT NOT NULL, user_id TEXT NOT NULL,
          PRIMARY KEY (campaign_id, user_id))`);
  db.run('CREATE TABLE settlements (id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL)');
  db.run('CREATE TABLE structures (id TEXT PRIMARY KEY, settlement_id TEXT NOT NULL)');
  for (const row of FIXTURE.campaignMembers) db.run('INSERT INTO campaign_members VALUES (?, ?)', row);
  for (const row of FIXTURE.settlements) db.run('INSERT INTO settlements VALUES (?, ?)', row);
  for (const row of FIXTURE.structures) db.run('INSERT INTO structures VALUES (?, ?)', row);
  fs.writeFileSync(file, Buffer.from(db.export()));
  db.close();
}

/** An HS256 JWT for `sub`, valid for an hour. */
/** Whether this is a CI run, where nothing skips: `CI` set to anything but empty, `false` or `0`. */
export function inCI() {
  const ci = (process.env.CI ?? '').trim().toLowerCase();
  return ci !== '' && ci !== 'false' && ci !== '0';
}

export function signToken(secret, sub = 'alice', ttlSeconds = 3600) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const input = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, iat: now, exp: now + ttlSeconds })}`;
  return `${input}.${crypto.createHmac('sha256', secret).update(input).digest('base64url')}`;
}

/** A TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * The state one or more herald processes share: a fixture database and
 * secrets. `start({ port, env })` starts a herald on it (port 0 by default).
 */
export async function heraldSetup() {
  if (!fs.existsSync(HERALD_BIN)) {
    throw new Error(`herald binary not found at ${HERALD_BIN}: run \`cargo build --bin herald\` in the repository root, or set HERALD_BIN`);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-client-'));
  const dbPath = path.join(dir, 'herald.db');
  await writeFixtureDb(dbPath);
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

/** Starts the herald binary with exactly `env`, in `cwd`; resolves once it listens. */
export function spawnHerald(env, cwd, running = new Set()) {
  const child = track(spawn(HERALD_BIN, [], { env, cwd, stdio: ['ignore', 'pipe', 'pipe'] }));
  let output = '';
  let exitInfo = null;
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  exited.then((i) => {
    exitInfo = i;
  });
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => fail(new Error('herald did not print its listening line in time')), START_TIMEOUT_MS);
    function fail(err) {
      clearTimeout(timer);
      child.kill('SIGKILL');
      err.message += `\n--- herald output ---\n${output.slice(-4000)}`;
      reject(err);
    }
    const onExit = (code, signal) => fail(new Error(`herald exited during start-up (code ${code}, signal ${signal})`));
    child.once('exit', onExit);
    child.once('error', (err) => fail(new Error(`could not start ${HERALD_BIN}: ${err.message}`)));
    child.stderr.on('data', (d) => {
      if (output.length < 1e6) output += d;
    });
    child.stdout.on('data', (d) => {
      if (output.length < 1e6) output += d;
      buf += d;
      const m = LISTENING_RE.exec(buf);
      if (!m) return;
      buf = '';
      clearTimeout(timer);
      child.off('exit', onExit);
      const url = `http://${m[1]}:${m[2]}`;
      const herald = {
        url,
        port: Number(m[2]),
        child,
        get output() {
          return output;
        },
        /** SIGTERM (herald disconnects every socket), then SIGKILL after 5 s. */
        async stop() {
          running.delete(herald);
          if (!exitInfo) {
            child.kill('SIGTERM');
            const t = setTimeout(() => child.kill('SIGKILL'), 5000);
            await exited;
            clearTimeout(t);
          }
        },
      };
      running.add(herald);
      resolve(herald);
    });
  });
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

/** A TCP proxy to 127.0.0.1:targetPort that can cut every connection and refuse new ones. */
export async function startProxy(targetPort) {
  const pairs = new Set();
  let blocked = false;
  const server = net.createServer((client) => {
    if (blocked) return client.destroy();
    const upstream = net.connect({ port: targetPort, host: '127.0.0.1' });
    const pair = { client, upstream };
    pairs.add(pair);
    const end = () => {
      client.destroy();
      upstream.destroy();
      pairs.delete(pair);
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = server.address().port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    get connections() {
      return pairs.size;
    },
    /** Cuts every open connection and refuses new ones until `unblock()`. */
    block() {
      blocked = true;
      for (const { client, upstream } of pairs) {
        client.destroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    unblock() {
      blocked = false;
    },
    close() {
      this.block();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

function redisPing(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ port, host: '127.0.0.1' });
    let buf = '';
    const done = (ok) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), 500);
    sock.once('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d.toString('latin1');
      if (buf.includes('\r\n')) done(buf.startsWith('+PONG'));
    });
    sock.once('error', () => done(false));
  });
}

/** A private redis-server on a free port (no persistence); `kill()` and `restart()` on the same port. */
export async function startRedis() {
  const port = await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-client-redis-'));
  let child = null;
  let exited = null;
  let output = '';
  async function launch() {
    let spawnError = null;
    let exitInfo = null;
    child = track(
      spawn(
        REDIS_SERVER_BIN,
        ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
        { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] },
      ),
    );
    child.stdout.on('data', (d) => (output += d));
    child.stderr.on('data', (d) => (output += d));
    child.once('error', (e) => (spawnError = e));
    exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve((exitInfo = { code, signal }))));
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (!(await redisPing(port))) {
      if (spawnError) throw new Error(`could not start ${REDIS_SERVER_BIN}: ${spawnError.message}`);
      if (exitInfo) throw new Error(`redis-server exited: ${JSON.stringify(exitInfo)}\n${output.slice(-2000)}`);
      if (Date.now() > deadline) throw new Error(`redis-server did not answer on port ${port}`);
      await sleep(25);
    }
  }
  await launch();
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    async kill() {
      if (child && child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await exited;
      }
    },
    async restart() {
      await this.kill();
      await launch();
    },
    async stop() {
      await this.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Resolves when `predicate()` is truthy (polled), rejects after `timeoutMs` with `what`. */
export async function waitUntil(predicate, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(10);
  }
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
