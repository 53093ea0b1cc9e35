'use strict';
// herald with its membership from an authorization hook (HERALD_ACCESS_URL),
// driven by the unmodified socket.io-client over WebSocket and long-polling.
// The hook is a plain node:http server in this process that checks each
// request's signature and timestamp as an application would, and answers
// from the shared fixture (tests/fixture.sql) copied below.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const http = require('node:http');

const { OK, UNAUTHORIZED, startHerald, ack, once, sleep } = require('./helpers');

const UNAVAILABLE = Object.freeze({ success: false, error: 'Unavailable' });

/** tests/fixture.sql, as the application's data. */
const MEMBERS = { c1: ['alice', 'bob'], c2: ['carol'] };
const SETTLEMENTS = { s1: 'c1', s3: 'c1', s2: 'c2' };
const STRUCTURES = { st1: 's1', st3: 's1', st2: 's2' };

function campaignOf(kind, id) {
  if (kind === 'campaign') return id;
  if (kind === 'settlement') return SETTLEMENTS[id] ?? null;
  if (kind === 'structure') return SETTLEMENTS[STRUCTURES[id]] ?? null;
  return null;
}

/** The hook: `mode` is `ok`, `failing` (503) or `slow` (answers after 2 s). */
function startHook(secret) {
  const hook = { calls: 0, refused: 0, mode: 'ok', url: null };
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', async () => {
      const body = Buffer.concat(chunks);
      const timestamp = String(req.headers['x-herald-timestamp'] ?? '');
      const expected = 'v1=' + crypto.createHmac('sha256', secret).update(`${timestamp}.`).update(body).digest('hex');
      const given = Buffer.from(String(req.headers['x-herald-signature'] ?? ''));
      const fresh = /^\d+$/.test(timestamp) && Math.abs(Date.now() / 1000 - Number(timestamp)) <= 30;
      if (!fresh || given.length !== expected.length || !crypto.timingSafeEqual(given, Buffer.from(expected))) {
        hook.refused += 1;
        res.writeHead(401).end();
        return;
      }
      hook.calls += 1;
      if (hook.mode === 'failing') return res.writeHead(503).end();
      if (hook.mode === 'slow') await sleep(2_000);
      const { version, userId, room } = JSON.parse(body);
      assert.equal(version, 1);
      const campaignId = campaignOf(room.kind, room.id);
      const allow = campaignId !== null && (MEMBERS[campaignId] ?? []).includes(userId);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(allow ? { allow: true, campaignId } : { allow: false }));
    });
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      hook.url = `http://127.0.0.1:${server.address().port}/herald/access`;
      hook.close = () => new Promise((done) => server.close(done));
      resolve(hook);
    });
  });
}

for (const transport of ['websocket', 'polling']) {
  describe(`membership from an authorization hook over ${transport}`, () => {
    const secret = crypto.randomBytes(32).toString('hex');
    let hook;
    let h;

    before(async () => {
      hook = await startHook(secret);
      h = await startHerald({
        env: {
          HERALD_ACCESS_URL: hook.url,
          HERALD_ACCESS_SECRET: secret,
          HERALD_ACCESS_TIMEOUT: '300ms',
          HERALD_ACCESS_CIRCUIT_FAILURES: '2',
          HERALD_ACCESS_CIRCUIT_BACKOFF: '1500ms',
        },
      });
    });
    after(async () => {
      if (h) {
        await h.stop();
        assert.ok(!h.output.includes(secret), 'the hook secret never reaches the logs');
      }
      if (hook) await hook.close();
    });

    async function connect(t, user) {
      const socket = await h.connect({ transports: [transport], auth: { token: h.token(user) } });
      t.after(() => socket.close());
      return socket;
    }

    it('the hook decides: members join every room of their campaign, others are refused', async (t) => {
      const alice = await connect(t, 'alice');
      for (const [event, payload] of [
        ['subscribe_campaign', { campaignId: 'c1' }],
        ['subscribe_settlement', { settlementId: 's1' }],
        ['subscribe_structure', { structureId: 'st1' }],
      ]) {
        assert.deepEqual(await ack(alice, event, payload), OK, `${event} ${JSON.stringify(payload)}`);
      }
      const carol = await connect(t, 'carol');
      assert.deepEqual(await ack(carol, 'subscribe_settlement', { settlementId: 's1' }), UNAUTHORIZED);
      assert.deepEqual(await ack(carol, 'subscribe_structure', { structureId: 'nope' }), UNAUTHORIZED);
      assert.equal(hook.refused, 0, "every call of herald's passes the signature check");
      assert.equal(hook.calls, 5);

      const event = once(alice, 'settlement_updated');
      await h.publish({
        type: 'settlement_updated',
        timestamp: '2026-11-25T17:00:00.000Z',
        payload: { campaignId: 'c1', settlementId: 's1', operation: 'update' },
        metadata: { userId: 'u1', source: 'api', correlationId: `hook-${transport}` },
      });
      const [got] = await event;
      assert.equal(got.payload.settlementId, 's1');
    });

    it('a slow or failing hook is "Unavailable", never "Unauthorized"; herald backs off, then recovers', async (t) => {
      const bob = await connect(t, 'bob');
      hook.mode = 'slow';
      const started = Date.now();
      assert.deepEqual(await ack(bob, 'subscribe_campaign', { campaignId: 'c1' }), UNAVAILABLE);
      assert.ok(Date.now() - started < 1_500, `answered after ${Date.now() - started} ms`);
      hook.mode = 'failing';
      const before = hook.calls;
      for (let i = 0; i < 10; i += 1) {
        assert.deepEqual(await ack(bob, 'subscribe_settlement', { settlementId: 's3' }), UNAVAILABLE);
      }
      assert.equal(hook.calls - before, 1, 'the second failure in a row opens the circuit: no more calls');
      hook.mode = 'ok';
      await sleep(1_700);
      assert.deepEqual(await ack(bob, 'subscribe_settlement', { settlementId: 's3' }), OK);
      const metrics = await (await fetch(`${h.url}/metrics`)).text();
      assert.match(metrics, /^herald_access_hook_circuit 0$/m);
      const ready = await (await fetch(`${h.url}/readyz`)).json();
      assert.deepEqual(ready, { status: 'ready', accessHook: { circuit: 'closed' } });
    });
  });
}
