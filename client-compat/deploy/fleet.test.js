'use strict';
// deploy/compose.yaml as shipped (Redis with its append-only file, two herald
// instances from the image, nginx with deploy/nginx.conf), brought up by
// scripts/deploy-test, checked through nginx only, as a frontend and a
// backend would reach it:
// - every route nginx serves: /socket.io/ (WebSocket and long-polling),
//   /v1/events, /v1/access/revoke, /healthz; /readyz and /metrics refused
//   from outside; body limits (413) that match herald's, with no instance
//   taken out of rotation;
// - the stock socket.io-client (the README's recipe: default reconnection,
//   re-subscribe with `since`) over WebSocket and polling: an event published
//   through nginx reaches every client once, a revocation through nginx
//   reaches them;
// - Redis restarted under them (`podman restart`, its append-only file on
//   its volume): no client is cut, every accepted event arrives once;
// - the instance serving them stopped (SIGTERM): they come back through
//   nginx on the other one, recovered: true from the shared log;
// - every gauge back to 0 at the end, and no secret in any container's log.
//
// Environment (set by scripts/deploy-test): FLEET_URL (nginx), COMPOSE_PROJECT,
// HERALD_JWT_SECRET, HERALD_PUBLISH_TOKEN, REDIS_PASSWORD.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { OK, waitUntil, sleep, quietPeriod } = require('../test/helpers');
const { recipeClient } = require('../test/recipe');
const { signToken } = require('../../test-support/index.cjs');
const { podman, inspect, healthcheck, getInside, metricInside } = require('./podman');

const URL_ = process.env.FLEET_URL;
const PROJECT = process.env.COMPOSE_PROJECT;
const JWT_SECRET = process.env.HERALD_JWT_SECRET;
const PUBLISH_TOKEN = process.env.HERALD_PUBLISH_TOKEN;
const REDIS_PASSWORD = process.env.REDIS_PASSWORD;
const DELIVERY_MS = 10_000;

/** The container of a compose service. */
async function container(service) {
  const { stdout } = await podman([
    'ps', '-a', '--format', '{{.Names}}',
    '--filter', `label=io.podman.compose.project=${PROJECT}`,
    '--filter', `label=io.podman.compose.service=${service}`,
  ]);
  const names = stdout.split('\n').filter(Boolean);
  assert.equal(names.length, 1, `one container for service ${service} of ${PROJECT}: ${stdout}`);
  return names[0];
}

/** Runs the health check of `name` (as Docker's engine would) until it reports healthy. */
async function waitHealthy(name, timeoutMs = 60_000) {
  await waitUntil(async () => (await healthcheck(name)) === 'healthy', timeoutMs, `${name} to be healthy`);
}

function post(route, body, { token = PUBLISH_TOKEN, raw = false } = {}) {
  return fetch(`${URL_}${route}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: raw ? body : JSON.stringify(body),
  });
}

function event(run, seq) {
  return { type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign', run, seq } };
}

/**
 * Publishes through nginx until accepted, as the README tells a backend:
 * with an idempotency key, retrying on 503 (nothing handed over) and 504 (the
 * outcome unknown: the key makes the retry safe). Resolves with the refusals.
 */
async function publishUntilAccepted(run, seq, deadline) {
  let refused = 0;
  for (;;) {
    const res = await post('/v1/events', { ...event(run, seq), idempotencyKey: `${run}-${seq}` });
    const body = await res.json().catch(() => null);
    if (res.status === 202) {
      // A retry after a 504 whose first attempt went in is a duplicate: delivered once either way.
      assert.ok(body?.accepted + (body?.duplicates ?? 0) === 1, JSON.stringify(body));
      return refused;
    }
    assert.ok([503, 504].includes(res.status), `publish ${run}/${seq}: ${res.status} ${JSON.stringify(body)}`);
    assert.equal(body?.accepted, 0, `a refused publish of one event hands nothing over for sure: ${JSON.stringify(body)}`);
    refused += 1;
    if (Date.now() > deadline) throw new Error(`publish ${run}/${seq} still refused after ${refused} attempts`);
    await sleep(100);
  }
}

if (!URL_ || !PROJECT || !JWT_SECRET || !PUBLISH_TOKEN || !REDIS_PASSWORD) {
  throw new Error('run by scripts/deploy-test: FLEET_URL, COMPOSE_PROJECT and the secrets must be set');
}

describe('the compose fleet (deploy/compose.yaml) through nginx', { timeout: 300_000 }, () => {
  const clients = [];
  let heralds;

  before(async () => {
    heralds = [await container('herald-1'), await container('herald-2')];
  });

  after(() => {
    for (const c of clients) c.socket.close();
  });

  /** Counts of `run`'s seqs one recipe client received. */
  const counts = (c, run) => {
    const m = new Map();
    for (const e of c.events) if (e.run === run) m.set(e.seq, (m.get(e.seq) || 0) + 1);
    return m;
  };

  async function assertEachOnce(run, seqs, who = clients) {
    await waitUntil(
      () => who.every((c) => seqs.every((s) => counts(c, run).has(s))),
      DELIVERY_MS,
      () => `every client to get ${run} ${JSON.stringify(seqs)}; missing ${JSON.stringify(who.map((c) => seqs.filter((s) => !counts(c, run).has(s))))}`,
    );
    await quietPeriod(500);
    for (const [i, c] of who.entries()) {
      assert.deepEqual([...counts(c, run).entries()].sort((a, b) => a[0] - b[0]), seqs.map((s) => [s, 1]), `client ${i} (${c.label}): each event once`);
    }
  }

  it('routes every API: /v1/events, /v1/access/revoke and /healthz reach herald; /readyz, /metrics and the rest do not leave nginx', async () => {
    const health = await fetch(`${URL_}/healthz`);
    assert.equal(health.status, 200);
    assert.deepEqual(await health.json(), { status: 'ok' });
    for (const route of ['/v1/events', '/v1/access/revoke']) {
      // herald answers (its 401 JSON), not nginx's 404.
      const res = await post(route, {}, { token: 'not-the-token' });
      assert.equal(res.status, 401, `${route} through nginx`);
      await res.arrayBuffer();
      const bad = await post(route, { nonsense: true });
      assert.equal(bad.status, 400, `${route} with the token`);
      assert.equal(typeof (await bad.json()).error, 'string');
    }
    for (const route of ['/readyz', '/metrics']) {
      const res = await fetch(`${URL_}${route}`);
      assert.equal(res.status, 403, `${route} must not be public`);
      assert.ok(!(await res.text()).includes('herald_'), `${route} leaked`);
    }
    for (const route of ['/', '/dev/bootstrap', '/v2/events', '/socket.iox']) {
      const res = await fetch(`${URL_}${route}`);
      assert.equal(res.status, 404, route);
      await res.arrayBuffer();
    }
    // The operations endpoints per instance, inside the compose network.
    for (const h of heralds) assert.match(await getInside(h, '/readyz'), /^HTTP\/1\.[01] 200/);
  });

  it('bodies over herald\'s limits are refused by nginx (413), and no instance leaves the rotation for it', async () => {
    for (const route of ['/v1/events', '/v1/access/revoke']) {
      const big = await post(route, JSON.stringify({ pad: 'x'.repeat(1.2 * 1024 * 1024) }), { raw: true });
      assert.equal(big.status, 413, route);
      assert.deepEqual(await big.json(), { error: 'body over 1048576 bytes' });
    }
    // A polling POST over HERALD_MAX_MESSAGE_BYTES (64 KiB), on a real session.
    const open = await (await fetch(`${URL_}/socket.io/?EIO=4&transport=polling`)).text();
    const { sid } = JSON.parse(open.slice(1));
    const huge = await fetch(`${URL_}/socket.io/?EIO=4&transport=polling&sid=${sid}`, {
      method: 'POST',
      headers: { 'content-type': 'text/plain;charset=UTF-8' },
      body: `4${'x'.repeat(100 * 1024)}`,
    });
    assert.equal(huge.status, 413);
    await huge.arrayBuffer();
    // Both instances still serve: no "upstream failed" in nginx's log.
    const logs = await podman(['logs', await container('nginx')]);
    assert.doesNotMatch(`${logs.stdout}\n${logs.stderr}`, /upstream server temporarily disabled|no live upstreams/);
  });

  it('stock clients over WebSocket and polling subscribe through nginx; an event published through nginx reaches each once', async (t) => {
    const token = (sub) => signToken(JWT_SECRET, { sub });
    const spec = [
      ['alice', 'websocket'], ['alice', 'websocket'], ['alice', 'polling'], ['alice', 'polling'], ['alice', 'upgrade'],
      ['bob', 'websocket'], ['bob', 'polling'],
    ];
    for (const [user, transport] of spec) {
      const options = transport === 'upgrade' ? {} : { transports: [transport] };
      const c = recipeClient(URL_, { auth: { token: token(user) }, rooms: [['campaign', 'c1']], ...options });
      c.label = `${user}/${transport}`;
      c.user = user;
      c.revoked = [];
      c.socket.on('access_revoked', (e) => c.revoked.push(e));
      clients.push(c);
    }
    await waitUntil(() => clients.every((c) => c.acks.length === 1), 15_000, 'every client subscribed');
    for (const c of clients) assert.deepEqual(c.acks[0].ack, OK, c.label);
    const perInstance = await Promise.all(heralds.map((h) => metricInside(h, 'herald_connections')));
    t.diagnostic(`connections per instance (all clients come from one address): ${perInstance.join(' / ')}`);
    assert.equal(perInstance[0] + perInstance[1], clients.length);

    const accepted = await Promise.all([0, 1, 2, 3, 4].map(async (seq) => (await post('/v1/events', event('live', seq))).status));
    assert.deepEqual(accepted, [202, 202, 202, 202, 202]);
    await assertEachOnce('live', [0, 1, 2, 3, 4]);
  });

  it('a revocation through nginx reaches the user\'s sockets on the fleet, and only them', async () => {
    const res = await post('/v1/access/revoke', { userId: 'bob', campaignId: 'c1' });
    assert.equal(res.status, 202);
    assert.deepEqual(await res.json(), { revoked: true });
    const bobs = clients.filter((c) => c.user === 'bob');
    await waitUntil(() => bobs.every((c) => c.revoked.length === 1), DELIVERY_MS, 'access_revoked on every socket of bob');
    for (const c of bobs) assert.deepEqual(c.revoked, [{ campaignId: 'c1' }]);
    assert.ok(clients.filter((c) => c.user === 'alice').every((c) => c.revoked.length === 0));
    assert.equal((await post('/v1/events', event('after-revoke', 0))).status, 202);
    await assertEachOnce('after-revoke', [0], clients.filter((c) => c.user === 'alice'));
    await quietPeriod(300);
    for (const c of bobs) assert.equal(counts(c, 'after-revoke').size, 0, `${c.label} still got events of c1`);
    // The rest of the test keeps alice's clients.
    for (const c of bobs) c.socket.close();
    clients.splice(0, clients.length, ...clients.filter((c) => c.user === 'alice'));
  });

  it('Redis restarted under the fleet (append-only file on its volume): no client is cut, every accepted event arrives once', async (t) => {
    const redis = await container('redis');
    const run = 'redis-restart';
    const seqs = [...Array(30).keys()];
    let refused = 0;
    const disconnectsBefore = clients.map((c) => c.disconnects.length);
    const restarting = (async () => {
      await sleep(300);
      const started = Date.now();
      await podman(['restart', '-t', '30', redis]);
      return Date.now() - started;
    })();
    const deadline = Date.now() + 30_000;
    for (const seq of seqs) {
      refused += await publishUntilAccepted(run, seq, deadline);
      await sleep(50);
    }
    const restartMs = await restarting;
    t.diagnostic(`podman restart of Redis took ${restartMs} ms; publishes refused with 503 or 504 meanwhile: ${refused}`);
    await assertEachOnce(run, seqs);
    for (const [i, c] of clients.entries()) {
      assert.equal(c.disconnects.length, disconnectsBefore[i], `${c.label} was cut: ${JSON.stringify(c.disconnects)}`);
      assert.ok(c.socket.connected, c.label);
    }
    await waitHealthy(redis);
    for (const h of heralds) assert.match(await getInside(h, '/readyz'), /^HTTP\/1\.[01] 200/);
  });

  it('the instance serving the clients stopped (SIGTERM): they come back through nginx on the other one, recovered: true', async (t) => {
    const perInstance = await Promise.all(heralds.map((h) => metricInside(h, 'herald_connections')));
    const serving = heralds[perInstance[0] >= perInstance[1] ? 0 : 1];
    const ipBefore = await inspect(serving, '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}');
    const acksBefore = clients.map((c) => c.acks.length);
    await podman(['stop', '-t', '20', serving]);
    assert.equal(Number(await inspect(serving, '{{.State.ExitCode}}')), 0, `${serving} exit code after SIGTERM`);
    // The missed events are published while they are away or coming back.
    assert.equal((await post('/v1/events', event('failover', 0))).status, 202);
    await waitUntil(() => clients.every((c, i) => c.acks.length > acksBefore[i]), 30_000, 'every client re-subscribed through nginx');
    for (const [i, c] of clients.entries()) {
      const last = c.acks[c.acks.length - 1];
      assert.ok(last.since, `${c.label} re-subscribed without since`);
      assert.deepEqual(last.ack, { success: true, recovered: true }, `${c.label}: ${JSON.stringify(c.acks.slice(acksBefore[i]))}`);
    }
    assert.equal((await post('/v1/events', event('failover', 1))).status, 202);
    await assertEachOnce('failover', [0, 1]);

    // Started again, it keeps its address, and nginx sends it clients again
    // (once the 10 s for which nginx takes a failed server out are over).
    await podman(['start', serving]);
    await waitHealthy(serving);
    const ipAfter = await inspect(serving, '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}');
    t.diagnostic(`${serving}: address ${ipBefore} before the stop, ${ipAfter} after the start`);
    assert.equal(ipAfter, ipBefore, `${serving} came back at another address: nginx would not find it`);
    const started = Date.now();
    const probes = [];
    try {
      await waitUntil(
        async () => {
          const probe = recipeClient(URL_, { auth: { token: signToken(JWT_SECRET, { sub: 'alice' }) }, rooms: [], transports: ['polling'] });
          probes.push(probe);
          await waitUntil(() => probe.connects === 1, 10_000, 'a probe client to connect');
          if ((await metricInside(serving, 'herald_connections')) > 0) return true;
          await sleep(1_000);
          return false;
        },
        30_000,
        `nginx to send a new client to ${serving} again`,
      );
    } finally {
      for (const p of probes) p.socket.close();
    }
    t.diagnostic(`nginx sent new clients to ${serving} again ${Date.now() - started} ms after it was healthy`);
  });

  it('the shared SQLite file takes the user revocations both instances write: 200, 20 at a time, all accepted', async (t) => {
    // Each instance writes each user revocation it applies into the one store file.
    const started = Date.now();
    const statuses = [];
    for (let batch = 0; batch < 10; batch += 1) {
      const answers = await Promise.all(
        [...Array(20).keys()].map(async (i) => {
          const res = await post('/v1/access/revoke', { userId: `revoked-${batch}-${i}` });
          await res.arrayBuffer();
          return res.status;
        }),
      );
      statuses.push(...answers);
    }
    const ms = Date.now() - started;
    t.diagnostic(`200 user revocations, 20 at a time, through nginx: ${ms} ms`);
    assert.deepEqual([...new Set(statuses)], [202]);
    for (const h of heralds) {
      const logs = await podman(['logs', h]);
      assert.doesNotMatch(`${logs.stdout}\n${logs.stderr}`, /database is locked|SQLITE_BUSY/i, `${h}'s log`);
    }
  });

  it('every gauge is back to 0 once the clients leave, and no container logged a secret', async () => {
    for (const c of clients) c.socket.close();
    // A polling session opened on herald-2 while herald-1 was away sends its
    // requests to herald-1 again once nginx has it back (the hash of the
    // address): its close is refused there (400, unknown sid), so herald-2
    // ends it when its heartbeat times out (25 + 20 s).
    for (const h of heralds) {
      let now = null;
      await waitUntil(
        async () => (now = await metricInside(h, 'herald_connections')) === 0,
        60_000,
        () => `herald_connections on ${h} back to 0 (now ${now})`,
      );
      const metrics = await getInside(h, '/metrics');
      for (const line of metrics.split('\n').filter((l) => l.startsWith('herald_subscriptions'))) {
        assert.match(line, / 0$/, `${h}: ${line}`);
      }
    }
    for (const service of ['redis', 'herald-1', 'herald-2', 'nginx']) {
      const logs = await podman(['logs', await container(service)]);
      const text = `${logs.stdout}\n${logs.stderr}`;
      for (const [name, secret] of Object.entries({ JWT_SECRET, PUBLISH_TOKEN, REDIS_PASSWORD })) {
        assert.ok(!text.includes(secret.slice(0, 16)), `${service}'s log holds ${name}`);
      }
    }
  });
});
