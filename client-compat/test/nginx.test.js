'use strict';
// deploy/nginx.conf for real: Debian's nginx, run with that file (only the
// upstream servers and the listen address rewritten, temp paths added; the pid
// file and `daemon off` given with -g), in front of two herald instances
// sharing a private redis-server. Unmodified
// socket.io-client over long-polling (sticky sessions), WebSocket and the
// default upgrade, plus the publish API and operations endpoints.
//
// Needs nginx (NGINX_BIN, default /usr/sbin/nginx; `apt-get install nginx`).
// Without it the suite is skipped loudly, and fails when CI=true.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

const { io } = require('socket.io-client');

const { OK, startRedis, startFleet, freePort, trackChild, waitForPort, waitForConnect, ack, quietPeriod, sleep, inCI, waitUntil } = require('./helpers');

const NGINX_BIN = process.env.NGINX_BIN || '/usr/sbin/nginx';
const NGINX_CONF = path.resolve(__dirname, '../../deploy/nginx.conf');
const EVENT_TIMEOUT_MS = 5_000;

function nginxMissing() {
  try {
    fs.accessSync(NGINX_BIN, fs.constants.X_OK);
    return null;
  } catch (err) {
    return `nginx not found at ${NGINX_BIN} (${err.code}): install it (apt-get install nginx) or set NGINX_BIN`;
  }
}

/** Replaces exactly one match of `re` in `text`, or throws naming `what`. */
function replaceOnce(text, re, replacement, what) {
  const matches = text.match(new RegExp(re.source, `${re.flags.replace('g', '')}g`)) || [];
  if (matches.length !== 1) {
    throw new Error(`deploy/nginx.conf: expected exactly one ${what}, found ${matches.length}; keep the markers the test relies on`);
  }
  return text.replace(re, replacement);
}

/**
 * deploy/nginx.conf with the upstream servers and the listen address of this
 * test, and temp paths under `prefix` (Debian's compiled-in ones are in
 * /var/lib/nginx, not writable without root). Nothing else changes.
 */
function renderNginxConf(template, { upstreams, listen, prefix }) {
  let conf = template;
  conf = replaceOnce(
    conf,
    /^([ \t]*)# BEGIN herald instances\n[\s\S]*?^[ \t]*# END herald instances[ \t]*$/m,
    (_, indent) => `${indent}# herald instances of nginx.test.js\n${upstreams.map((u) => `${indent}server ${u};`).join('\n')}`,
    '"# BEGIN herald instances" … "# END herald instances" block',
  );
  conf = replaceOnce(conf, /^([ \t]*)listen 80;[ \t]*$/m, (_, indent) => `${indent}listen ${listen};`, '`listen 80;` line');
  const temp = ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']
    .map((kind) => `    ${kind}_temp_path ${path.join(prefix, `${kind}_temp`)};`)
    .join('\n');
  conf = replaceOnce(conf, /^http \{[ \t]*$/m, `http {\n${temp}`, '`http {` line');
  return conf;
}

/** Runs nginx in the foreground with `conf`; resolves once it listens on `port`. */
async function startNginx(conf, port) {
  const prefix = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-nginx-'));
  // When the test runs as root, nginx's workers run as nobody: let them in.
  fs.chmodSync(prefix, 0o755);
  const confPath = path.join(prefix, 'nginx.conf');
  fs.writeFileSync(confPath, conf.replace(/__PREFIX__/g, prefix));
  const output = { text: '' };
  // The config logs access to /dev/stdout, which nginx opens by name: that
  // works on a file or a pipe (as in a container) but not on the socket Node
  // would give it, so stdout goes to a file.
  const accessLog = path.join(prefix, 'stdout.log');
  const stdoutFd = fs.openSync(accessLog, 'a');
  const child = spawn(
    NGINX_BIN,
    ['-e', 'stderr', '-p', `${prefix}/`, '-c', confPath, '-g', `daemon off; pid ${path.join(prefix, 'nginx.pid')};`],
    { cwd: prefix, stdio: ['ignore', stdoutFd, 'pipe'] },
  );
  fs.closeSync(stdoutFd);
  trackChild(child, 'SIGTERM');
  child.stderr.on('data', (d) => {
    if (output.text.length < 4 * 1024 * 1024) output.text += d.toString('utf8');
  });
  let exitInfo = null;
  let spawnError = null;
  child.once('error', (err) => {
    spawnError = err;
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  exited.then((info) => {
    exitInfo = info;
  });
  const nginx = {
    url: `http://127.0.0.1:${port}`,
    prefix,
    /** nginx's error log (stderr) and access log (stdout). */
    get output() {
      let access = '';
      try {
        access = fs.readFileSync(accessLog, 'utf8');
      } catch {}
      return `${output.text}${access}`;
    },
    async stop() {
      if (!exitInfo && !spawnError) {
        child.kill('SIGTERM'); // fast shutdown: the master stops its workers
        const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(timer);
      }
      fs.rmSync(prefix, { recursive: true, force: true });
    },
  };
  try {
    await waitForPort(port, {
      what: 'nginx',
      isDead: () => (spawnError ? spawnError.message : exitInfo && JSON.stringify(exitInfo)),
    });
  } catch (err) {
    await nginx.stop();
    err.message += `\n--- nginx output ---\n${nginx.output.slice(-4000)}\n--- config ---\n${conf}`;
    throw err;
  }
  return nginx;
}

/** The value of an unlabelled gauge in a Prometheus text exposition. */
async function gauge(baseUrl, name) {
  const text = await (await fetch(`${baseUrl}/metrics`)).text();
  const m = new RegExp(`^${name}(?:\\{\\})? ([0-9.e+-]+)$`, 'm').exec(text);
  if (!m) throw new Error(`${name} not found in ${baseUrl}/metrics`);
  return Number(m[1]);
}

/**
 * Counts, per client, the events carrying `payload.run === run` by
 * `payload.seq`, whatever their name.
 */
function seqCounter(socket, run) {
  const counts = new Map();
  socket.onAny((_name, event) => {
    if (event?.payload?.run !== run) return;
    const seq = event.payload.seq;
    counts.set(seq, (counts.get(seq) || 0) + 1);
  });
  return counts;
}

const missing = nginxMissing();
if (missing && inCI()) {
  describe('deploy/nginx.conf in front of two herald instances', () => {
    it('needs nginx (CI=true: not skipped)', () => {
      throw new Error(`${missing}. CI=true, so this is a failure, not a skip.`);
    });
  });
} else if (missing) {
  console.error(`\n*** SKIPPED deploy/nginx.conf tests: ${missing} (with CI=true this fails) ***\n`);
  describe('deploy/nginx.conf in front of two herald instances', () => {
    it(`SKIPPED: ${missing}`, { skip: missing }, () => {});
  });
} else {
  describe('deploy/nginx.conf in front of two herald instances', { timeout: 40_000 }, () => {
    let redis;
    let fleet;
    let nginx;
    const sockets = new Set();
    let runCounter = 0;

    before(async () => {
      redis = await startRedis();
      fleet = await startFleet({ count: 2, redisUrl: redis.url });
      const port = await freePort();
      const conf = renderNginxConf(fs.readFileSync(NGINX_CONF, 'utf8'), {
        upstreams: fleet.ports.map((p) => `127.0.0.1:${p}`),
        listen: `127.0.0.1:${port}`,
        prefix: '__PREFIX__',
      });
      nginx = await startNginx(conf, port);
    });

    after(async () => {
      for (const s of sockets) s.close();
      await nginx?.stop();
      await fleet?.stop();
      await redis?.stop();
    });

    /** An unmodified v4 client through nginx, connected as `user`. */
    function connectViaNginx(user, options = {}) {
      const socket = io(nginx.url, {
        forceNew: true,
        reconnection: false,
        timeout: 10_000,
        auth: { token: fleet.token(user) },
        ...options,
      });
      sockets.add(socket);
      return waitForConnect(socket);
    }

    function closeAll() {
      for (const s of sockets) s.close();
      sockets.clear();
    }

    /** Publishes one event per instance, directly (not through nginx); returns their seqs. */
    async function publishOnEveryInstance(run) {
      await Promise.all(
        fleet.instances.map((h, seq) =>
          h.publish({ type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign', run, seq } }),
        ),
      );
      return fleet.instances.map((_, seq) => seq);
    }

    /** Waits until every counter saw every seq, then a quiet period, then checks "exactly once". */
    async function assertExactlyOnce(counters, seqs, label) {
      await waitUntil(
        () => counters.every((c) => seqs.every((s) => c.has(s))),
        EVENT_TIMEOUT_MS,
        () => `${label}: every client to get seqs ${seqs}; got ${JSON.stringify(counters.map((c) => [...c.keys()]))}`,
      );
      await quietPeriod(300);
      for (const [i, c] of counters.entries()) {
        assert.deepEqual(
          [...c.entries()].sort((a, b) => a[0] - b[0]),
          seqs.map((s) => [s, 1]),
          `${label}: client ${i} must get each event exactly once ([seq, count])`,
        );
      }
    }

    it('a polling-only client gets events published on either instance, exactly once', async () => {
      const run = `poll-${++runCounter}`;
      const socket = await connectViaNginx('alice', { transports: ['polling'] });
      const counter = seqCounter(socket, run);
      assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1' }), OK);
      const seqs = await publishOnEveryInstance(run);
      await assertExactlyOnce([counter], seqs, 'polling via nginx');
      // Several more round trips on the same session (each a new polling request).
      for (let i = 0; i < 3; i += 1) {
        assert.deepEqual(await ack(socket, 'subscribe_settlement', { settlementId: 's1' }), OK);
      }
      assert.equal(socket.io.engine.transport.name, 'polling');
      assert.ok(socket.connected);
      closeAll();
    });

    it('polling clients from many addresses spread over both instances, each session sticky', async (t) => {
      // Distinct loopback source addresses stand for distinct client IPs: the
      // hash spreads them, and every request of a session must stay on the
      // instance holding its sid (else the connect or an ack would fail with 400).
      const run = `spread-${++runCounter}`;
      const n = 16;
      const agents = [];
      const counters = [];
      const connected = [];
      for (let i = 0; i < n; i += 1) {
        const agent = new http.Agent({ keepAlive: true, localAddress: `127.0.0.${10 + i}` });
        agents.push(agent);
        connected.push(connectViaNginx(i % 2 ? 'alice' : 'bob', { transports: ['polling'], agent }));
      }
      try {
        const socketsN = await Promise.all(connected);
        for (const s of socketsN) counters.push(seqCounter(s, run));
        for (const s of socketsN) assert.deepEqual(await ack(s, 'subscribe_campaign', { campaignId: 'c1' }), OK);
        const perInstance = await Promise.all(fleet.urls.map((u) => gauge(u, 'herald_connections')));
        t.diagnostic(`${n} polling clients per instance (herald_connections): ${perInstance.join(' / ')}`);
        assert.equal(perInstance[0] + perInstance[1], n, `herald_connections per instance: ${perInstance}`);
        assert.ok(
          perInstance.every((c) => c > 0),
          `the hash on $remote_addr should spread ${n} client addresses over both instances, got ${perInstance}`,
        );
        const seqs = await publishOnEveryInstance(run);
        await assertExactlyOnce(counters, seqs, 'polling clients on both instances');
      } finally {
        closeAll();
        for (const a of agents) a.destroy();
      }
    });

    it('WebSocket, and the default polling → WebSocket upgrade, work through nginx', async () => {
      const run = `ws-${++runCounter}`;
      const ws = await connectViaNginx('alice', { transports: ['websocket'] });
      assert.equal(ws.io.engine.transport.name, 'websocket');
      const upgrading = io(nginx.url, { forceNew: true, reconnection: false, auth: { token: fleet.token('bob') } });
      sockets.add(upgrading);
      await waitForConnect(upgrading);
      await waitUntil(
        () => upgrading.io.engine.transport.name === 'websocket',
        5_000,
        () => `the upgrade to websocket (transport: ${upgrading.io.engine.transport.name})`,
      );

      const counters = [seqCounter(ws, run), seqCounter(upgrading, run)];
      for (const s of [ws, upgrading]) assert.deepEqual(await ack(s, 'subscribe_campaign', { campaignId: 'c1' }), OK);
      const seqs = await publishOnEveryInstance(run);
      await assertExactlyOnce(counters, seqs, 'websocket via nginx');
      closeAll();
    });

    it('proxies /v1/events and /v1/access/revoke (herald answers; nginx answers an oversized body with 413 JSON), /healthz; /readyz and /metrics from loopback only; 404 elsewhere', async () => {
      const run = `api-${++runCounter}`;
      const socket = await connectViaNginx('alice', { transports: ['websocket'] });
      const counter = seqCounter(socket, run);
      assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1' }), OK);

      const post = (body, token = fleet.publishToken) =>
        fetch(`${nginx.url}/v1/events`, {
          method: 'POST',
          headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
          body,
        });
      const ok = await post(JSON.stringify({ type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign', run, seq: 0 } }));
      assert.equal(ok.status, 202);
      assert.deepEqual(await ok.json(), { accepted: 1 });
      await assertExactlyOnce([counter], [0], 'publish via nginx');

      const unauthorized = await post('{}', 'wrong-token');
      assert.equal(unauthorized.status, 401);
      await unauthorized.arrayBuffer();
      // Just under 1 MiB reaches herald (its 400 for the unknown top-level field) ...
      const underLimit = await post(JSON.stringify({ type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign' }, pad: 'x'.repeat(1024 * 1024 - 200) }));
      assert.equal(underLimit.status, 400);
      assert.equal(typeof (await underLimit.json()).error, 'string');
      // ... over it, nginx answers 413 itself, with herald's JSON body, every time
      // (herald's own 413 reached nginx as a broken pipe, then 502, about half the time).
      for (let i = 0; i < 5; i += 1) {
        const big = await post(JSON.stringify({ type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign', pad: 'x'.repeat(1.5 * 1024 * 1024) } }));
        assert.equal(big.status, 413);
        assert.match(big.headers.get('content-type') || '', /^application\/json/);
        assert.deepEqual(await big.json(), { error: 'body over 1048576 bytes' });
      }

      // The revocation API is routed too (herald's 401 and 400, not nginx's 404), with the same body limit.
      const revoke = (body, token = fleet.publishToken) =>
        fetch(`${nginx.url}/v1/access/revoke`, {
          method: 'POST',
          headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
          body,
        });
      const revokeUnauthorized = await revoke('{}', 'wrong-token');
      assert.equal(revokeUnauthorized.status, 401);
      await revokeUnauthorized.arrayBuffer();
      const revokeInvalid = await revoke('{}');
      assert.equal(revokeInvalid.status, 400);
      assert.equal(typeof (await revokeInvalid.json()).error, 'string');
      const revokeBig = await revoke(JSON.stringify({ userId: 'x'.repeat(1.5 * 1024 * 1024) }));
      assert.equal(revokeBig.status, 413);
      assert.deepEqual(await revokeBig.json(), { error: 'body over 1048576 bytes' });

      // A polling POST over HERALD_MAX_MESSAGE_BYTES (64 KiB) is refused by nginx, not cut by herald.
      const open = await (await fetch(`${nginx.url}/socket.io/?EIO=4&transport=polling`)).text();
      const { sid } = JSON.parse(open.slice(1));
      const hugePoll = await fetch(`${nginx.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`, { method: 'POST', body: `4${'x'.repeat(100 * 1024)}` });
      assert.equal(hugePoll.status, 413);
      await hugePoll.arrayBuffer();
      assert.doesNotMatch(nginx.output, /upstream prematurely closed|Broken pipe|temporarily disabled/);

      const health = await fetch(`${nginx.url}/healthz`);
      assert.equal(health.status, 200, '/healthz through nginx');
      await health.arrayBuffer();
      // /readyz (it names the failing dependency) and /metrics only from nginx's own loopback (127.0.0.1), not
      // from any other address, private ones included (behind a userland proxy every client has one).
      const elsewhere = new http.Agent({ localAddress: '127.0.0.10' });
      const getFrom = (p, agent) =>
        new Promise((resolve, reject) => {
          http.get(`${nginx.url}${p}`, { agent }, (res) => {
            let body = '';
            res.on('data', (d) => (body += d)).on('end', () => resolve({ status: res.statusCode, body }));
          }).on('error', reject);
        });
      for (const p of ['/readyz', '/metrics']) {
        assert.equal((await getFrom(p, elsewhere)).status, 403, `${p} from another address`);
      }
      elsewhere.destroy();
      assert.equal((await getFrom('/readyz')).status, 200, '/readyz from 127.0.0.1');
      const metrics = await getFrom('/metrics');
      assert.equal(metrics.status, 200);
      assert.match(metrics.body, /^herald_connections /m);
      const other = await fetch(`${nginx.url}/`);
      assert.equal(other.status, 404);
      await other.arrayBuffer();
      closeAll();
    });
  });
}
