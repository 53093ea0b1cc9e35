'use strict';
// Every cut herald makes so that a client recovers closes the transport, not
// the Socket.IO session: the unmodified socket.io-client, with the README's
// plain recipe and default reconnection, comes back by itself, re-subscribes
// with `since`, and gets its missed events or `recovered: false`. Nothing
// here reconnects by hand.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { OK, startHerald, startRedis, startFleet, startProxy, waitUntil, metric, sleep } = require('./helpers');
const { recipeClient } = require('./recipe');

const NOT_RECOVERED = Object.freeze({ success: true, recovered: false });
/** A stock client's reasons for a transport that went away (it reconnects after these). */
const TRANSPORT_REASONS = ['transport close', 'transport error'];

function numbered(run, seq, extra = {}) {
  return { type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign', run, seq, ...extra } };
}

/** Publishes on `h`, retrying on 503 (Redis coming back) as a backend would, until `timeoutMs`. */
async function publishRetrying(h, body, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await h.publishRaw(body);
    if (res.status === 202) return;
    assert.equal(res.status, 503, `publish answered ${res.status} ${JSON.stringify(res.body)}`);
    if (Date.now() > deadline) throw new Error(`publish still refused after ${timeoutMs} ms: ${JSON.stringify(res.body)}`);
    await sleep(50);
  }
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))];
}

/** How many events of `run` each client got, by seq. */
function countsOf(client, run) {
  const counts = new Map();
  for (const e of client.events) if (e.run === run) counts.set(e.seq, (counts.get(e.seq) || 0) + 1);
  return counts;
}

/**
 * Two instances over one Redis, `perInstance` recipe clients on each. Redis
 * is killed and restarted empty: herald cuts every subscribed socket (the
 * log is lost), and every client must come back by itself within 10 s, be
 * told `recovered: false` for its old offset, and get the next event once.
 */
function redisRestartSuite(transports, perInstance) {
  describe(`Redis restarted empty under two instances: stock ${transports.join('+')} clients come back by themselves`, { timeout: 90_000 }, () => {
    let redis;
    let fleet;
    const clients = [];

    before(async () => {
      redis = await startRedis();
      fleet = await startFleet({ count: 2, redisUrl: redis.url });
      for (let i = 0; i < 2 * perInstance; i += 1) {
        const h = fleet.instances[i % 2];
        const auth = { token: fleet.token(i % 2 === 0 ? 'alice' : 'bob') };
        clients.push(recipeClient(h.url, { auth, rooms: [['campaign', 'c1']], transports }));
      }
      await waitUntil(() => clients.every((c) => c.acks.length === 1), 20_000, () => 'every client subscribed');
      for (const c of clients) assert.deepEqual(c.acks[0].ack, OK);
    });

    after(async () => {
      for (const c of clients) c.socket.close();
      await fleet?.stop();
      await redis?.stop();
    });

    it('every client is back within 10 s, is told recovered: false, and gets the next event exactly once', async (t) => {
      await fleet.instances[0].publish(numbered('before', 0));
      await waitUntil(() => clients.every((c) => c.last.size === 1), 10_000, () => 'every client holds an offset');

      await redis.kill('SIGKILL');
      await sleep(300);
      await redis.restart();
      const restarted = Date.now();

      const back = (c) => c.acks.some((a) => a.at > restarted && a.since !== undefined);
      await waitUntil(
        () => clients.every(back),
        10_000,
        () => {
          const missing = clients.filter((c) => !back(c));
          return `${missing.length} of ${clients.length} clients to re-subscribe; e.g. disconnects ${JSON.stringify(missing[0]?.disconnects)}`;
        },
      );
      const latencies = [];
      for (const [i, c] of clients.entries()) {
        const reasons = c.disconnects.map((d) => d.reason);
        assert.ok(reasons.length >= 1, `client ${i} was never cut`);
        for (const reason of reasons) assert.ok(TRANSPORT_REASONS.includes(reason), `client ${i}: ${reasons}`);
        assert.ok(c.socket.connected, `client ${i} is connected again`);
        const again = c.acks.find((a) => a.at > restarted);
        assert.deepEqual(again.ack, NOT_RECOVERED, `client ${i}: the re-subscribe with an offset of the lost log`);
        latencies.push(again.at - restarted);
      }
      latencies.sort((a, b) => a - b);
      t.diagnostic(
        `${clients.length} stock ${transports.join('+')} clients, Redis restart to recovered:false ack: ` +
          `p50 ${percentile(latencies, 50)} ms, p99 ${percentile(latencies, 99)} ms, max ${latencies.at(-1)} ms`,
      );

      await publishRetrying(fleet.instances[1], numbered('after', 1));
      await waitUntil(() => clients.every((c) => countsOf(c, 'after').get(1) >= 1), 10_000, () => 'the event after the restart reaches every client');
      await sleep(300);
      for (const [i, c] of clients.entries()) assert.deepEqual([...countsOf(c, 'after')], [[1, 1]], `client ${i}: once`);
      // Cut once, back once.
      for (const [i, c] of clients.entries()) assert.equal(c.connects, 2, `client ${i} connected ${c.connects} times`);
    });
  });
}

redisRestartSuite(['websocket'], 60);
redisRestartSuite(['polling'], 10);

/**
 * Token expiry: each client's first token expires 2 s after it connects
 * (no leeway), its `auth` function hands a fresh one on every reconnect.
 * herald cuts the transport at the expiry; the client comes back by itself,
 * re-subscribes with `since`, and gets what was published meanwhile, once.
 */
function tokenExpirySuite(transports, count) {
  describe(`token expiry: stock ${transports.join('+')} clients whose auth hands a fresh token come back by themselves`, { timeout: 60_000 }, () => {
    let h;
    const clients = [];

    before(async () => {
      h = await startHerald({ env: { HERALD_JWT_LEEWAY: '0s' } });
      for (let i = 0; i < count; i += 1) {
        let first = true;
        const auth = (cb) => {
          cb({ token: h.token('alice', { expiresIn: first ? 2 : 3600 }) });
          first = false;
        };
        clients.push(recipeClient(h.url, { auth, rooms: [['campaign', 'c1']], transports }));
      }
      await waitUntil(() => clients.every((c) => c.acks.length === 1), 10_000, () => 'every client subscribed');
    });

    after(async () => {
      for (const c of clients) c.socket.close();
      await h?.stop();
    });

    it('every client is cut at its expiry, is back with recovered: true, and misses nothing', async (t) => {
      // Published all along, across the cuts.
      let seq = 0;
      const until = Date.now() + 5_000;
      while (Date.now() < until) {
        await h.publish(numbered('expiry', seq));
        seq += 1;
        await sleep(50);
      }
      const back = (c) => c.acks.some((a) => a.since !== undefined);
      await waitUntil(() => clients.every(back), 10_000, () => `${clients.filter((c) => !back(c)).length} clients to come back`);
      await waitUntil(() => clients.every((c) => countsOf(c, 'expiry').size === seq), 5_000, () => 'every event everywhere');
      const latencies = [];
      for (const [i, c] of clients.entries()) {
        assert.deepEqual(c.disconnects.map((d) => d.reason).filter((r) => !TRANSPORT_REASONS.includes(r)), [], `client ${i}`);
        assert.equal(c.disconnects.length, 1, `client ${i}: cut once`);
        const again = c.acks.find((a) => a.since !== undefined);
        assert.deepEqual(again.ack, { success: true, recovered: true }, `client ${i}`);
        for (const [s, n] of countsOf(c, 'expiry')) assert.equal(n, 1, `client ${i}: event ${s} once`);
        latencies.push(again.at - c.disconnects[0].at);
      }
      latencies.sort((a, b) => a - b);
      t.diagnostic(
        `${clients.length} stock ${transports.join('+')} clients, token-expiry cut to recovered:true ack: ` +
          `p50 ${percentile(latencies, 50)} ms, p99 ${percentile(latencies, 99)} ms, max ${latencies.at(-1)} ms`,
      );
    });
  });
}

tokenExpirySuite(['websocket'], 100);
tokenExpirySuite(['polling'], 10);

describe('a stock client behind a proxy that stops reading', { timeout: 60_000 }, () => {
  let h;
  let proxy;
  before(async () => {
    h = await startHerald();
    proxy = await startProxy(h.port);
  });
  after(async () => {
    await proxy?.close();
    await h?.stop();
  });

  it('is cut within the bound, comes back by itself when the proxy reads again, and misses nothing silently', async (t) => {
    const client = recipeClient(proxy.url, {
      auth: { token: h.token('alice') },
      rooms: [['campaign', 'c1']],
      transports: ['websocket'],
    });
    t.after(() => client.socket.close());
    await waitUntil(() => client.acks.length === 1, 5_000, () => 'the first subscribe');
    assert.deepEqual(client.acks[0].ack, OK);
    await h.publish(numbered('run', 0));
    await waitUntil(() => client.events.length === 1, 5_000, () => 'the first event');

    // The proxy stops reading; events of 8 KB pile up until herald finds the
    // socket's buffer full.
    proxy.stall();
    const blob = 'z'.repeat(8 * 1024);
    let seq = 1;
    while ((await metric(h.url, 'herald_limits_hit_total{limit="slow_consumer"}')) === 0) {
      assert.ok(seq < 20_000, 'the socket buffer never filled');
      const batch = [];
      for (let i = 0; i < 100; i += 1, seq += 1) batch.push(numbered('run', seq, { blob }));
      await h.publish(batch);
    }
    const found = Date.now();
    await waitUntil(async () => (await metric(h.url, 'herald_connections')) === 0, 3_000, () => 'herald to close the stalled connection (cut grace 2 s)');
    const closedAfter = Date.now() - found;
    assert.equal(await metric(h.url, 'herald_subscriptions{kind="campaign"}'), 0);

    // The proxy reads again: the client sees its transport close, comes back
    // through the proxy and re-subscribes with its last offset.
    const resumed = Date.now();
    proxy.resume();
    await waitUntil(() => client.acks.length === 2, 10_000, () => `the re-subscribe (disconnects ${JSON.stringify(client.disconnects)})`);
    const again = client.acks[1];
    assert.ok(again.ack.success === true && typeof again.ack.recovered === 'boolean', JSON.stringify(again.ack));
    assert.deepEqual(client.disconnects.map((d) => d.reason).filter((r) => !TRANSPORT_REASONS.includes(r)), []);
    const published = seq;
    await h.publish(numbered('run', published));
    await waitUntil(() => client.events.some((e) => e.seq === published), 5_000, () => 'the event after the return');

    const counts = countsOf(client, 'run');
    for (const [s, n] of counts) assert.equal(n, 1, `seq ${s} arrived ${n} times`);
    const missing = [];
    for (let s = 0; s <= published; s += 1) if (!counts.has(s)) missing.push(s);
    if (again.ack.recovered) {
      assert.deepEqual(missing, [], 'recovered: every event arrived');
    } else {
      // Covered by recovered: false: only events published before that ack are missing.
      assert.ok(!missing.includes(published), 'the event published after the return arrived');
    }
    t.diagnostic(
      `slow consumer found after ${published - 1} events of 8 KB; its connection closed ${closedAfter} ms later; ` +
        `back ${again.at - resumed} ms after the proxy read again, recovered: ${again.ack.recovered}, ${missing.length} events covered by it`,
    );
  });
});
