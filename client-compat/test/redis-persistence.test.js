'use strict';
// A Redis that keeps the log, under two herald instances and unmodified
// socket.io-client 4.x clients (the README's recipe, default reconnection):
// - Redis (an append-only file, as deploy/compose.yaml runs it) killed and
//   started again while events are published: no socket is cut, every
//   client gets every accepted event exactly once, and a client whose
//   connection drops during the outage comes back while Redis is still down
//   and is replayed what it missed with recovered: true.
// - A shard's stream deleted under herald (by hand, or evicted by a Redis
//   with an allkeys-* policy): never a silent gap. Clients in its rooms are
//   cut and told recovered: false, and so is a client that was away.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { OK, startRedis, startFleet, startProxy, sleep, waitUntil, quietPeriod } = require('./helpers');
const { recipeClient } = require('./recipe');

/** The shard of campaign c1 among herald's default 64, and its keys under the default prefix. */
const C1_LOG = '{herald:11}:log';
const C1_EPOCH = '{herald:11}:epoch';

function event(run, seq) {
  return { type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign', run, seq } };
}

/** Recipe clients: over WebSocket and polling, on each instance, plus extra ones given as [label, url, options]. */
function connectClients(fleet, extra = []) {
  const out = [];
  const specs = [];
  for (const [i, h] of fleet.instances.entries()) {
    for (const transport of ['websocket', 'websocket', 'polling']) specs.push([`${transport}@${i}`, h.url, { transports: [transport] }]);
  }
  for (const [label, url, options] of [...specs, ...extra]) {
    const c = recipeClient(url, { auth: { token: fleet.token(out.length % 2 ? 'bob' : 'alice') }, rooms: [['campaign', 'c1']], ...options });
    c.label = label;
    out.push(c);
  }
  return out;
}

const counts = (c, run) => {
  const m = new Map();
  for (const e of c.events) if (e.run === run) m.set(e.seq, (m.get(e.seq) || 0) + 1);
  return m;
};

describe('Redis with an append-only file, restarted under two instances', { timeout: 60_000 }, () => {
  let redis;
  let fleet;
  let proxy;
  let clients;
  let roamer;

  before(async () => {
    redis = await startRedis({ appendonly: true });
    fleet = await startFleet({ count: 2, redisUrl: redis.url });
    proxy = await startProxy(fleet.instances[1].port);
    clients = connectClients(fleet, [['roamer (through a proxy that cuts it)', proxy.url, { transports: ['websocket'] }]]);
    roamer = clients[clients.length - 1];
    await waitUntil(() => clients.every((c) => c.acks.length === 1), 10_000, 'every client subscribed');
    for (const c of clients) assert.deepEqual(c.acks[0].ack, OK, c.label);
  });

  after(async () => {
    for (const c of clients ?? []) c.socket.close();
    await proxy?.close();
    await fleet?.stop();
    await redis?.stop();
  });

  it('no socket is cut, every event once, and a client back during the outage is replayed (recovered: true)', async (t) => {
    const run = 'persist';
    const accepted = [];
    const refused = [];
    let publishing = true;
    let seq = 0;
    // A backend publishing every 20 ms, on both instances in turn. A refused
    // event is not retried: each attempt has its own seq.
    const publisher = (async () => {
      while (publishing) {
        const s = seq++;
        const res = await fleet.instances[s % 2].publishRaw(event(run, s));
        if (res.status === 202) accepted.push({ seq: s, at: Date.now() });
        else {
          // 503: nothing was handed over; 504: the one in flight as Redis died, its outcome unknown.
          assert.ok([503, 504].includes(res.status), `${res.status} ${JSON.stringify(res.body)}`);
          refused.push({ seq: s, status: res.status, at: Date.now(), accepted: res.body.accepted });
        }
        await sleep(20);
      }
    })();

    await sleep(1_000);
    const killedAt = Date.now();
    await redis.kill('SIGKILL');
    // The roamer's connection drops during the outage; it comes back by itself
    // while Redis is still down, and re-subscribes with its last offset.
    await sleep(300);
    proxy.block();
    await sleep(200);
    proxy.unblock();
    await waitUntil(() => roamer.connects === 2, 5_000, 'the roamer to reconnect during the outage');
    await sleep(300);
    assert.ok(!redis.running, 'Redis came back before the roamer reconnected');
    await redis.start();
    const backAt = Date.now();
    await sleep(1_500);
    publishing = false;
    await publisher;

    const seqs = accepted.map((a) => a.seq);
    await waitUntil(
      () => clients.every((c) => seqs.every((s) => counts(c, run).has(s))),
      10_000,
      () => `every client to get every accepted event; missing ${JSON.stringify(clients.map((c) => [c.label, seqs.filter((s) => !counts(c, run).has(s)).length]))}`,
    );
    await quietPeriod(300);

    const firstDelivery = Math.min(...clients.flatMap((c) => c.events.filter((e) => e.run === run && e.at > backAt).map((e) => e.at)));
    const replayed = roamer.acks[1];
    const figures = {
      outageMs: backAt - killedAt,
      accepted: accepted.length,
      refused503: refused.filter((r) => r.status === 503).length,
      unknown504: refused.filter((r) => r.status === 504).length,
      firstDeliveryAfterMs: firstDelivery - backAt,
      roamerAckAfterRedisMs: replayed ? replayed.at - backAt : null,
      // Answered 504 (in flight as Redis died), yet appended: delivered once to every client.
      refusedYetDelivered: refused.filter((r) => counts(clients[0], run).has(r.seq)).length,
    };
    t.diagnostic(`figures ${JSON.stringify(figures)}`);

    for (const c of clients) {
      const got = counts(c, run);
      for (const s of seqs) assert.equal(got.get(s), 1, `${c.label}: accepted event ${s} ${got.get(s) ?? 0} times`);
      // A 503 handed nothing over; a 504 (in flight when Redis died) may
      // have been appended (the backend cannot know): then every client has
      // it, once.
      for (const r of refused) {
        const n = got.get(r.seq) ?? 0;
        assert.ok(n <= (r.status === 504 ? 1 : 0), `${c.label}: event ${r.seq}, answered ${r.status}, arrived ${n} times`);
        assert.equal(n, counts(clients[0], run).get(r.seq) ?? 0, `${c.label}: refused event ${r.seq} reached some clients only`);
      }
    }
    assert.ok(refused.length > 0, 'no publish was refused: the outage did not happen');
    for (const c of clients.filter((x) => x !== roamer)) {
      assert.deepEqual(c.disconnects, [], `${c.label} was cut`);
      assert.equal(c.acks.length, 1, `${c.label} re-subscribed`);
    }
    assert.equal(roamer.disconnects.length, 1);
    assert.ok(replayed.since, 'the roamer re-subscribed without since');
    assert.deepEqual(replayed.ack, { success: true, recovered: true }, 'the roamer back during the outage was not replayed');
  });
});

describe('a shard stream lost under herald: never a silent gap', { timeout: 60_000 }, () => {
  let redis;
  let fleet;
  let proxy;
  let clients;
  let away;

  before(async () => {
    redis = await startRedis();
    fleet = await startFleet({ count: 2, redisUrl: redis.url });
    proxy = await startProxy(fleet.instances[0].port);
    clients = connectClients(fleet, [['away (through a proxy)', proxy.url, { transports: ['websocket'] }]]);
    away = clients[clients.length - 1];
    await waitUntil(() => clients.every((c) => c.acks.length === 1), 10_000, 'every client subscribed');
  });

  after(async () => {
    for (const c of clients ?? []) c.socket.close();
    await proxy?.close();
    await fleet?.stop();
    await redis?.stop();
  });

  for (const [lost, keys] of [
    ['the stream deleted', [C1_LOG]],
    ['the epoch deleted', [C1_EPOCH]],
    ['both deleted (evicted)', [C1_LOG, C1_EPOCH]],
  ]) {
    it(`${lost}: every client gets every event, or recovered: false`, async (t) => {
      const run = `lost-${keys.length}-${keys[0]}`;
      const publish = (seq) => fleet.instances[seq % 2].publish(event(run, seq));
      const acksBefore = clients.map((c) => c.acks.length);
      await publish(0);
      await waitUntil(() => clients.every((c) => counts(c, run).has(0)), 5_000, 'event 0 everywhere');
      // One client is away (its connection cut, new ones refused) while
      // event 1 is published and the log loses it.
      proxy.block();
      await waitUntil(() => away.disconnects.length > 0 && !away.socket.connected, 5_000, 'the away client to be cut');
      await publish(1);
      await waitUntil(() => clients.filter((c) => c !== away).every((c) => counts(c, run).has(1)), 5_000, 'event 1 to the others');
      for (const key of keys) assert.equal(redis.command('EXISTS', key), '1', key);
      assert.equal(redis.command('DEL', ...keys), String(keys.length));
      await publish(2);
      proxy.unblock();
      // Everyone settles: cut and back, or untouched.
      await waitUntil(() => away.socket.connected && away.acks.length > acksBefore[clients.indexOf(away)], 10_000, 'the away client back');
      await sleep(1_500);
      await waitUntil(() => clients.every((c) => c.socket.connected && c.acks.length === c.connects), 10_000, 'every client subscribed again');
      await publish(3);
      await waitUntil(() => clients.every((c) => counts(c, run).has(3)), 5_000, 'event 3 everywhere');
      await quietPeriod(300);

      const outcome = [];
      for (const [i, c] of clients.entries()) {
        const got = counts(c, run);
        for (const [s, n] of got) assert.equal(n, 1, `${c.label}: event ${s} ${n} times`);
        const missing = [0, 1, 2, 3].filter((s) => !got.has(s));
        const acks = c.acks.slice(acksBefore[i]).map((a) => a.ack);
        outcome.push(`${c.label}: missed ${JSON.stringify(missing)}, acks ${JSON.stringify(acks)}`);
        if (missing.length > 0) {
          assert.ok(
            acks.some((a) => a.success === true && a.recovered === false),
            `${c.label} missed events ${missing} and was never told (acks ${JSON.stringify(acks)}): a silent gap`,
          );
        }
      }
      t.diagnostic(outcome.join('; '));
      // The away client's `since` is in the lost log: it cannot have been replayed.
      assert.deepEqual(away.acks[away.acks.length - 1].ack, { success: true, recovered: false });
    });
  }
});
