'use strict';
// The one place the JavaScript test suites (client-compat/, client/,
// examples/js/) start what they test against: the herald binary on a fixture
// database, a private redis-server, a TCP proxy that can cut, stall or
// refuse connections; and the small things every suite needs (a free port,
// polling until something holds, HS256 tokens, whether this is CI).
//
// CommonJS with no dependency of its own, so that the CommonJS suite
// (client-compat) and the ES module ones import the same file. The fixture
// database needs sql.js: each caller passes its own `initSqlJs`.

const { spawn, spawnSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');

const ROOT = path.resolve(__dirname, '..');
const HERALD_BIN = process.env.HERALD_BIN ? path.resolve(process.env.HERALD_BIN) : path.join(ROOT, 'target/debug/herald');
const REDIS_SERVER_BIN = process.env.REDIS_SERVER_BIN || 'redis-server';
const START_TIMEOUT_MS = 15_000;
const LISTENING_RE = /herald listening on http:\/\/([0-9.]+):(\d+)/;

/** Whether this is a CI run, where nothing skips: `CI` set to anything but empty, `false` or `0`. */
function inCI() {
  const ci = (process.env.CI ?? '').trim().toLowerCase();
  return ci !== '' && ci !== 'false' && ci !== '0';
}

/**
 * Child processes still running (herald, redis-server, nginx), with the
 * signal that stops each. If the test process exits or is interrupted
 * first, they are signalled rather than left behind.
 */
const living = new Map();
let reaperInstalled = false;
function trackChild(child, signal = 'SIGKILL') {
  if (!reaperInstalled) {
    reaperInstalled = true;
    const reap = () => {
      for (const [c, s] of living) {
        try {
          c.kill(s);
        } catch {}
      }
      living.clear();
    };
    process.once('exit', reap);
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
      process.once(sig, () => {
        reap();
        process.kill(process.pid, sig);
      });
    }
  }
  living.set(child, signal);
  child.once('exit', () => living.delete(child));
  return child;
}

/** A TCP port that was free a moment ago on `host`. */
function freePort(host = '127.0.0.1') {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, host, () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Polls `predicate` (sync or async) every 20 ms until it holds; fails with `describe()` after `timeoutMs`. */
async function waitUntil(predicate, timeoutMs, describe) {
  const deadline = Date.now() + timeoutMs;
  while (!(await predicate())) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${typeof describe === 'function' ? describe() : describe}`);
    }
    await sleep(20);
  }
}

/** An HS256 JWT of `claims` (`sub`, and `iat`/`exp` an hour long unless given). */
function signToken(secret, claims) {
  const now = Math.floor(Date.now() / 1000);
  const body = { iat: now, exp: now + 3600, ...claims };
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const input = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(body)}`;
  return `${input}.${crypto.createHmac('sha256', secret).update(input).digest('base64url')}`;
}

/** A fresh secret (32 random bytes, base64url). */
function randomSecret() {
  return crypto.randomBytes(32).toString('base64url');
}

/** The membership fixture every suite shares (`tests/fixture.sql`). */
const FIXTURE_SQL = fs.readFileSync(path.join(ROOT, 'tests/fixture.sql'), 'utf8');

/**
 * Writes a SQLite database at `file`: herald's own migrations (the schema),
 * then `sql` (the shared fixture by default). `initSqlJs` is the caller's sql.js.
 */
async function writeFixtureDb(file, initSqlJs, sql = FIXTURE_SQL) {
  const SQL = await initSqlJs();
  const db = new SQL.Database();
  const migrations = path.join(ROOT, 'migrations/sqlite');
  for (const f of fs.readdirSync(migrations).sort()) db.exec(fs.readFileSync(path.join(migrations, f), 'utf8'));
  db.exec(sql);
  fs.writeFileSync(file, Buffer.from(db.export()));
  db.close();
}

/** The environment a herald gets: the caller's, without any HERALD_* variable, plus `env`. */
function heraldEnv(env) {
  const out = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('HERALD_')) out[k] = v;
  return Object.assign(out, env);
}

/**
 * Starts the herald binary with exactly `env` (no HERALD_* from outside) in
 * `cwd`, and resolves once it prints its listening line. The handle has
 * `url`, `port`, `child`, `output` (stdout and stderr so far), `exited`,
 * `exitInfo` and `stop()` (SIGTERM, then SIGKILL after 5 s).
 */
function spawnHerald({ env = {}, cwd = os.tmpdir(), bin = HERALD_BIN } = {}) {
  if (!fs.existsSync(bin)) {
    throw new Error(`herald binary not found at ${bin}: run \`cargo build --bin herald\` in the repository root, or set HERALD_BIN`);
  }
  const child = trackChild(spawn(bin, [], { env: heraldEnv(env), cwd, stdio: ['ignore', 'pipe', 'pipe'] }));
  let output = '';
  let exitInfo = null;
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve((exitInfo = { code, signal }))));
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => fail(new Error(`herald did not print its listening line within ${START_TIMEOUT_MS} ms`)), START_TIMEOUT_MS);
    function fail(err) {
      clearTimeout(timer);
      child.kill('SIGKILL');
      err.message += `\n--- herald output ---\n${output.slice(-8000)}`;
      reject(err);
    }
    const onExit = (code, signal) => fail(new Error(`herald exited during start-up (code ${code}, signal ${signal})`));
    child.once('exit', onExit);
    child.once('error', (err) => fail(new Error(`could not start ${bin}: ${err.message}`)));
    const keep = (d) => {
      if (output.length < 32 * 1024 * 1024) output += d;
    };
    child.stderr.on('data', keep);
    child.stdout.on('data', (d) => {
      keep(d);
      buf += d;
      const m = LISTENING_RE.exec(buf);
      if (!m) return;
      buf = '';
      clearTimeout(timer);
      child.off('exit', onExit);
      resolve({
        url: `http://${m[1]}:${m[2]}`,
        port: Number(m[2]),
        child,
        exited,
        get output() {
          return output;
        },
        get exitInfo() {
          return exitInfo;
        },
        async stop() {
          if (!exitInfo) {
            child.kill('SIGTERM');
            const t = setTimeout(() => child.kill('SIGKILL'), 5000);
            await exited;
            clearTimeout(t);
          }
          return exitInfo;
        },
      });
    });
  });
}

/** Sends PING to a Redis server; resolves with whether it answered +PONG within `timeoutMs`. */
function redisPing(port, { host = '127.0.0.1', timeoutMs = 500 } = {}) {
  return new Promise((resolve) => {
    const sock = net.connect({ port, host });
    let buf = '';
    const done = (ok) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.once('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d.toString('latin1');
      if (buf.includes('\r\n')) done(buf.startsWith('+PONG'));
    });
    sock.once('error', () => done(false));
  });
}

/** Whether a redis-server can be started here. */
function redisServerExists() {
  return spawnSync(REDIS_SERVER_BIN, ['--version']).status === 0;
}

/**
 * A private, throwaway redis-server on a free port (never the shared one on
 * 6379), loopback only: no persistence, or with `appendonly` an append-only
 * file (fsync every second) in its directory, as deploy/compose.yaml runs it.
 * `kill(signal)` (SIGKILL by default), `restart()` on the same port and
 * directory (empty without `appendonly`, with its data with it), `stop()` for
 * good, `command(...args)` (redis-cli).
 */
async function startRedis({ port, appendonly = false } = {}) {
  port = port ?? (await freePort());
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-redis-'));
  const output = { text: '' };
  let child = null;
  let exited = null;
  let exitInfo = null;
  async function launch() {
    exitInfo = null;
    let spawnError = null;
    const persistence = appendonly ? ['--appendonly', 'yes', '--appendfsync', 'everysec'] : ['--appendonly', 'no'];
    const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', ...persistence, '--dir', dir];
    child = trackChild(spawn(REDIS_SERVER_BIN, args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] }));
    child.stdout.on('data', (d) => (output.text += d));
    child.stderr.on('data', (d) => (output.text += d));
    child.once('error', (err) => (spawnError = err));
    exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve((exitInfo = { code, signal }))));
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (!(await redisPing(port))) {
      if (spawnError) throw new Error(`could not start ${REDIS_SERVER_BIN} (${spawnError.message}); install redis-server or set REDIS_SERVER_BIN`);
      if (exitInfo) throw new Error(`redis-server exited during start-up: ${JSON.stringify(exitInfo)}\n${output.text.slice(-4000)}`);
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`redis-server did not answer PING on port ${port} within ${START_TIMEOUT_MS} ms`);
      }
      await sleep(25);
    }
  }
  await launch();
  const redis = {
    port,
    url: `redis://127.0.0.1:${port}`,
    get output() {
      return output.text;
    },
    get running() {
      return child !== null && exitInfo === null;
    },
    async kill(signal = 'SIGKILL') {
      if (redis.running) {
        child.kill(signal);
        await exited;
      }
    },
    /** Stops it answering (SIGSTOP), keeping everything, until `resume()` (SIGCONT). */
    pause() {
      child.kill('SIGSTOP');
    },
    resume() {
      child.kill('SIGCONT');
    },
    async restart() {
      await redis.kill();
      await launch();
    },
    /** Starts it again after `kill()` (same port and directory). */
    async start() {
      if (!redis.running) await launch();
    },
    /** Runs one command with redis-cli; resolves with its output. */
    command(...args) {
      const r = spawnSync('redis-cli', ['-p', String(port), ...args], { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`redis-cli ${args.join(' ')}: ${r.stderr || r.error}`);
      return r.stdout.trim();
    },
    async stop() {
      await redis.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return redis;
}

/**
 * A TCP proxy on a free port in front of `targetPort`:
 * - `block()` cuts every connection and refuses new ones until `unblock()`;
 * - `stall()` stops reading what the server sends (on every connection, and
 *   on new ones), as a stuck network or a frozen client would, until `resume()`.
 */
async function startProxy(targetPort) {
  const pairs = new Set();
  let blocked = false;
  let stalled = false;
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
    if (stalled) upstream.pause();
    else upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  const cutAll = () => {
    for (const { client, upstream } of pairs) {
      client.destroy();
      upstream.destroy();
    }
    pairs.clear();
  };
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    get connections() {
      return pairs.size;
    },
    block() {
      blocked = true;
      cutAll();
    },
    unblock() {
      blocked = false;
    },
    stall() {
      stalled = true;
      for (const { client, upstream } of pairs) {
        upstream.unpipe(client);
        upstream.pause();
      }
    },
    resume() {
      stalled = false;
      for (const { client, upstream } of pairs) upstream.pipe(client);
    },
    close() {
      cutAll();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/** A series of herald's `/metrics` (`name{labels}`), or 0. */
async function metric(url, series) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line ? Number(line.slice(series.length + 1)) : 0;
}

module.exports = {
  ROOT,
  HERALD_BIN,
  REDIS_SERVER_BIN,
  FIXTURE_SQL,
  inCI,
  sleep,
  freePort,
  waitUntil,
  signToken,
  randomSecret,
  trackChild,
  writeFixtureDb,
  spawnHerald,
  redisPing,
  redisServerExists,
  startRedis,
  startProxy,
  metric,
};
