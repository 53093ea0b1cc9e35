'use strict';
// Churn with stock clients: two instances over one Redis, a population of
// unmodified socket.io-clients following the README's plain recipe (each in
// a campaign and one of its settlements, which overlap), and every second
// some leave (`socket.close()`), some arrive, and some have their transport
// dropped (`socket.io.engine.close()`: they come back by themselves and
// re-subscribe with `since`), while events are published. Afterwards: no
// client got an event twice, none missed one after an ack that said
// `recovered: true` (any other ack tells the recipe to refetch), and once
// everyone has left, every gauge of both instances is back to exactly 0 and
// no shard is followed any more.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { startRedis, startFleet, waitUntil, metric, sleep } = require('./helpers');
const { recipeClient } = require('./recipe');

const POPULATION = 150;
const PER_SECOND = 3;
const CHURN_SECONDS = 20;
const PUBLISH_EVERY_MS = 100;
const ROOMS = [['campaign', 'c1'], ['settlement', 's1']];

function numbered(seq) {
  return {
    type: 'structure_updated',
    payload: { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'update', seq },
  };
}

function pick(list) {
  return list.splice(Math.floor(Math.random() * list.length), 1)[0];
}

describe('churn: stock clients joining, leaving and dropping every second under two instances', { timeout: 180_000 }, () => {
  let redis;
  let fleet;
  const everyone = [];

  before(async () => {
    redis = await startRedis();
    fleet = await startFleet({ count: 2, redisUrl: redis.url, env: { HERALD_LOG_SHARD_LINGER: '1s' } });
  });

  after(async () => {
    for (const c of everyone) c.socket.close();
    await fleet?.stop();
    await redis?.stop();
  });

  it('no event twice, no silent gap, and every gauge back to 0', async () => {
    let n = 0;
    const join = () => {
      const h = fleet.instances[n % 2];
      // A third over long-polling first (then upgraded), as browsers without a forced transport.
      const transports = n % 3 === 0 ? ['polling', 'websocket'] : ['websocket'];
      n += 1;
      const auth = (cb) => cb({ token: fleet.token(n % 2 ? 'alice' : 'bob') });
      const c = recipeClient(h.url, { auth, rooms: ROOMS, transports });
      everyone.push(c);
      return c;
    };
    const population = Array.from({ length: POPULATION }, join);
    await waitUntil(() => population.every((c) => c.acks.length === ROOMS.length), 30_000, () => 'every client subscribed');

    // Published one at a time, so that seq order is log order; when each publish started.
    const startedAt = [];
    let seq = 0;
    let publishing = true;
    const publisher = (async () => {
      while (publishing) {
        seq += 1;
        startedAt[seq] = Date.now();
        const res = await fleet.instances[seq % 2].publishRaw(numbered(seq));
        assert.equal(res.status, 202, `publish ${seq}: ${res.status} ${JSON.stringify(res.body)}`);
        await sleep(PUBLISH_EVERY_MS);
      }
    })();

    const left = [];
    let dropped = 0;
    for (let s = 0; s < CHURN_SECONDS; s += 1) {
      for (let i = 0; i < PER_SECOND; i += 1) {
        const leaving = pick(population);
        leaving.socket.close();
        left.push(leaving);
        population.push(join());
        const dropping = population[Math.floor(Math.random() * (population.length - PER_SECOND))];
        if (dropping.socket.io.engine) {
          dropping.socket.io.engine.close();
          dropped += 1;
        }
      }
      await sleep(1_000);
    }
    // Everyone still here is back and subscribed, then one last event reaches them all.
    await waitUntil(
      () => population.every((c) => c.socket.connected && c.acks.length === ROOMS.length * c.connects),
      30_000,
      () => `every client back (${population.filter((c) => !c.socket.connected).length} not connected)`,
    );
    publishing = false;
    await publisher;
    const last = seq;
    await waitUntil(
      () => population.every((c) => c.events.some((e) => e.seq === last)),
      15_000,
      () => `the last event everywhere (${population.filter((c) => !c.events.some((e) => e.seq === last)).length} without it)`,
    );

    // The first event a client must have, after each of its campaign acks
    // that told it to refetch: one whose publish started after the ack
    // arrived was logged after the join.
    const firstAfter = (at) => {
      let k = 1;
      while (k <= last && startedAt[k] <= at) k += 1;
      return k;
    };
    let duplicates = 0;
    let silentGaps = 0;
    let declared = 0;
    let recovered = 0;
    for (const c of [...population, ...left]) {
      const counts = new Map();
      for (const e of c.events) counts.set(e.seq, (counts.get(e.seq) || 0) + 1);
      duplicates += [...counts.values()].filter((k) => k > 1).length;
      if (left.includes(c)) continue;
      const acks = c.acks.filter((a) => a.room === 'campaign:c1');
      assert.ok(acks.every((a) => a.ack?.success === true), `an ack failed: ${JSON.stringify(acks.map((a) => a.ack))}`);
      let from = firstAfter(acks[0].at);
      for (const a of acks.slice(1)) {
        if (a.ack.recovered !== true) {
          declared += 1;
          from = firstAfter(a.at);
        } else if (a.ack.recovered === true) {
          recovered += 1;
        }
      }
      const missing = [];
      for (let k = from; k <= last; k += 1) if (!counts.has(k)) missing.push(k);
      silentGaps += missing.length;
      if (missing.length && process.env.CHURN_DEBUG) {
        console.log(JSON.stringify({ missing, from, acks: c.acks.map((a) => [a.room, a.since, a.ack, a.at]), disc: c.disconnects, connects: c.connects, firstEvent: c.events[0], startedAt: missing.map((k) => startedAt[k]) }));
      }
    }
    console.log(
      `churn: ${everyone.length} clients (${left.length} left, ${dropped} transports dropped), ${last} events; ` +
        `re-subscribes recovered ${recovered}, to refetch ${declared}; duplicates ${duplicates}, silent gaps ${silentGaps}`,
    );
    assert.equal(duplicates, 0, 'no event twice');
    assert.equal(silentGaps, 0, 'no event missed after recovered: true');
    assert.ok(recovered > 0, 'dropped clients came back with recovered: true');

    // Everyone leaves: both instances are back to exactly 0.
    for (const c of population) c.socket.close();
    const gauges = async () => {
      const out = [];
      for (const h of fleet.instances) {
        const subs = ['campaign', 'settlement', 'structure'].map((k) => `herald_subscriptions{kind="${k}"}`);
        const values = await Promise.all(
          ['herald_connections', 'herald_pending_sessions', 'herald_fleet_shards_followed', ...subs].map((s) => metric(h.url, s)),
        );
        out.push(values.reduce((a, b) => a + b, 0));
      }
      return out;
    };
    let last_reading;
    await waitUntil(
      async () => {
        last_reading = await gauges();
        return last_reading.every((v) => v === 0);
      },
      15_000,
      () => `every gauge at 0 (connections + pending + shards followed + subscriptions per instance: ${last_reading})`,
    );
  });
});
