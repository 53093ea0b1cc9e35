'use strict';
// Several herald instances over one Redis (a private redis-server on a free
// port): unmodified socket.io-client 4.x clients (the README's recipe, default
// reconnection) spread round-robin over three instances get every event
// published on any instance exactly once; while Redis is down a publish
// answers 503 {error, accepted} (504 {error, accepted, unknown} when it asked
// Redis as it died) and clients stay connected; once Redis is
// back (empty), the subscribers are cut, come back by themselves, and
// cross-instance delivery resumes.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { OK, startRedis, startFleet, quietPeriod, sleep, waitUntil: waitFor } = require('./helpers');

/** Waits until `predicate` holds, at most until `deadline` (a time). */
const waitUntil = (predicate, deadline, describe) => waitFor(predicate, Math.max(0, deadline - Date.now()), describe);
const { recipeClient } = require('./recipe');

const INSTANCES = 3;
const CLIENTS_PER_INSTANCE = 3;
const EVENTS = 20;
const DELIVERY_TIMEOUT_MS = 5_000;
/** After a Redis restart, how long until a publish on A must have reached B. */
const RECOVERY_MS = 5_000;

/** Event types that all reach campaign:c1, carrying `run` and `seq` in the payload. */
function eventFor(run, seq) {
  const common = { campaignId: 'c1', run, seq };
  switch (seq % 5) {
    case 0:
      return { type: 'state_invalidated', payload: { ...common, scope: 'campaign' } };
    case 1:
      return { type: 'settlement_updated', payload: { ...common, settlementId: 's1', operation: 'update' } };
    case 2:
      return { type: 'structure_updated', payload: { ...common, settlementId: 's1', structureId: 'st1', operation: 'create' } };
    case 3:
      return { type: 'entity_updated', payload: { ...common, entityType: 'campaign', entityId: 'c1' } };
    default:
      return {
        type: 'world_time_changed',
        payload: { ...common, previousTime: null, newTime: '2026-11-25T17:00:00.000Z' },
      };
  }
}

/** Counts, per seq, the events of `run` a recipe client received. */
function seqCounter(recorded) {
  return (run) => {
    const counts = new Map();
    for (const e of recorded.events) if (e.run === run) counts.set(e.seq, (counts.get(e.seq) || 0) + 1);
    return counts;
  };
}

/**
 * A 503 (`accepted` handed over, none after), or with `unknown` also a 504:
 * herald asked Redis as it died, so the outcome of the next `unknown` events
 * is unknown.
 */
function assert503(res, what, { unknown = false } = {}) {
  const statuses = unknown ? [503, 504] : [503];
  assert.ok(statuses.includes(res.status), `${what}: expected ${statuses}, got ${res.status} ${JSON.stringify(res.body)}`);
  assert.equal(typeof res.body, 'object', `${what}: ${res.status} body must be JSON, got ${JSON.stringify(res.body)}`);
  assert.equal(typeof res.body.error, 'string', `${what}: ${res.status} body needs "error": ${JSON.stringify(res.body)}`);
  assert.ok(res.body.error.length > 0, `${what}: empty "error"`);
  assert.ok(Number.isInteger(res.body.accepted), `${what}: ${res.status} body needs an integer "accepted": ${JSON.stringify(res.body)}`);
  if (res.status === 504) assert.ok(Number.isInteger(res.body.unknown), `${what}: 504 body needs an integer "unknown": ${JSON.stringify(res.body)}`);
}

/**
 * Publishes one event on `h`, retrying the same event on 503 (as a backend
 * would) until it is accepted; resolves with the number of attempts.
 */
async function publishUntilAccepted(h, event, deadline, what) {
  for (let attempts = 1; ; attempts += 1) {
    const res = await h.publishRaw(event);
    if (res.status === 202) {
      assert.deepEqual(res.body, { accepted: 1 }, `publish ${what}`);
      return attempts;
    }
    assert503(res, `publish attempt ${attempts} ${what}`, { unknown: true });
    if (Date.now() > deadline) throw new Error(`no publish ${what} accepted in time (${attempts} attempts, last: ${JSON.stringify(res.body)})`);
    await sleep(100);
  }
}

describe(`${INSTANCES} herald instances over one Redis`, { timeout: 45_000 }, () => {
  let redis;
  let fleet;
  let PORTS;
  /** { socket, instance, counts(run), recorded } per client, round-robin over the instances. */
  const clients = [];

  before(async () => {
    redis = await startRedis();
    fleet = await startFleet({ count: INSTANCES, redisUrl: redis.url });
    PORTS = fleet.ports;
    const users = ['alice', 'bob'];
    for (let i = 0; i < INSTANCES * CLIENTS_PER_INSTANCE; i += 1) {
      const instance = i % INSTANCES;
      const h = fleet.instances[instance];
      const auth = { token: fleet.token(users[i % 2]) };
      const recorded = recipeClient(h.url, { auth, rooms: [['campaign', 'c1']], transports: ['websocket'] });
      clients.push({ socket: recorded.socket, instance, port: PORTS[instance], counts: seqCounter(recorded), recorded });
    }
    await waitUntil(() => clients.every((c) => c.recorded.acks.length === 1), Date.now() + 10_000, () => 'every client subscribed');
    for (const c of clients) assert.deepEqual(c.recorded.acks[0].ack, OK);
  });

  after(async () => {
    for (const c of clients) c.socket.close();
    await fleet?.stop();
    await redis?.stop();
  });

  const disconnects = (c) => c.recorded.disconnects.map((d) => d.reason);

  /** Waits until every client has every seq of `run`, then checks each got each exactly once and nothing else. */
  async function assertEveryClientGotEachOnce(run, seqs, deadline = Date.now() + DELIVERY_TIMEOUT_MS) {
    await waitUntil(
      () => clients.every((c) => seqs.every((s) => c.counts(run).has(s))),
      deadline,
      () =>
        `every client to get seqs ${JSON.stringify(seqs)} of ${run}; missing: ` +
        JSON.stringify(clients.map((c) => ({ port: c.port, missing: seqs.filter((s) => !c.counts(run).has(s)) })).filter((m) => m.missing.length)),
    );
    await quietPeriod(300);
    for (const c of clients) {
      assert.deepEqual(
        [...c.counts(run).entries()].sort((a, b) => a[0] - b[0]),
        seqs.map((s) => [s, 1]),
        `client on port ${c.port}: each event exactly once ([seq, count])`,
      );
    }
  }

  it(`every client gets each of ${EVENTS} events published across the instances exactly once`, async () => {
    assert.equal(new Set(PORTS).size, INSTANCES);
    const run = 'spread';
    const seqs = [...Array(EVENTS).keys()];
    // Published concurrently, event `seq` on instance `seq % INSTANCES`.
    const answers = await Promise.all(seqs.map((seq) => fleet.instances[seq % INSTANCES].publishRaw(eventFor(run, seq))));
    for (const [seq, res] of answers.entries()) {
      assert.deepEqual(res, { status: 202, body: { accepted: 1 } }, `publish of seq ${seq} on port ${PORTS[seq % INSTANCES]}`);
    }
    await assertEveryClientGotEachOnce(run, seqs);
  });

  it('with Redis killed, publishes answer 503 {error, accepted} and clients stay connected; when it comes back empty, subscribers are cut, come back by themselves and delivery resumes within 5 s, exactly once', async (t) => {
    const [A, B] = fleet.instances;
    const onB = clients.filter((c) => c.instance === 1);
    assert.ok(onB.length > 0);

    await redis.kill('SIGKILL');

    // Right after the kill, and once every instance knows (readyz 503).
    const down = 'outage';
    const first = await A.publishRaw(eventFor(down, 0));
    assert503(first, 'publish on A right after SIGKILL', { unknown: true });
    const downDeadline = Date.now() + 5_000;
    for (const h of fleet.instances) {
      for (;;) {
        const res = await fetch(`${h.url}/readyz`);
        await res.arrayBuffer();
        if (res.status === 503) break;
        if (Date.now() > downDeadline) throw new Error(`/readyz on ${h.url} still ${res.status} with Redis down`);
        await sleep(50);
      }
    }
    const single = await B.publishRaw(eventFor(down, 1));
    assert503(single, 'publish on B with Redis known down');
    assert.equal(single.body.accepted, 0, 'Redis known down: nothing was handed over');
    const batch = await fleet.instances[2].publishRaw([eventFor(down, 2), eventFor(down, 3)]);
    assert503(batch, 'batch publish on C with Redis known down');
    assert.equal(batch.body.accepted, 0, 'Redis known down: nothing of the batch was handed over');

    // Clients stay connected through the outage.
    await sleep(500);
    for (const c of clients) {
      assert.ok(c.socket.connected, `client on port ${c.port} disconnected during the outage (${disconnects(c)})`);
      assert.deepEqual(disconnects(c), [], `client on port ${c.port} saw a disconnect`);
    }

    // Redis comes back empty on the same port. Events accepted just before it
    // died may never have been read, so every instance cuts its subscribed
    // sockets' connections: they come back by themselves and re-subscribe
    // with the offset of their last event, from the lost log: recovered: false.
    await redis.restart();
    const deadline = Date.now() + RECOVERY_MS;
    await waitUntil(
      () => clients.every((c) => c.recorded.acks.length === 2),
      deadline,
      () => `every subscriber to be cut and to re-subscribe by itself once Redis came back empty; not yet on ports ${JSON.stringify(clients.filter((c) => c.recorded.acks.length < 2).map((c) => c.port))}`,
    );
    for (const c of clients) {
      assert.equal(disconnects(c).length, 1, `client on port ${c.port}: ${disconnects(c)}`);
      assert.ok(['transport close', 'transport error'].includes(disconnects(c)[0]), `client on port ${c.port}: ${disconnects(c)}`);
      assert.deepEqual(c.recorded.acks[1].ack, { success: true, recovered: false });
    }
    // The backend retries the same event on A until accepted.
    const back = 'recovered';
    const attempts = await publishUntilAccepted(A, eventFor(back, 0), deadline, 'on A after the Redis restart');
    await waitUntil(
      () => onB.every((c) => c.counts(back).has(0)),
      deadline,
      () => `the event accepted on A (after ${attempts} attempts) to reach the clients on B within ${RECOVERY_MS} ms of the restart`,
    );
    t.diagnostic(`after the Redis restart: accepted on A at attempt ${attempts}, on B ${RECOVERY_MS - (deadline - Date.now())} ms after the restart`);
    await assertEveryClientGotEachOnce(back, [0], Date.now() + DELIVERY_TIMEOUT_MS);

    // Every instance publishes to every client again, and reports ready again by itself.
    const again = 'after-recovery';
    for (const [i, h] of fleet.instances.entries()) {
      await publishUntilAccepted(h, eventFor(again, i), Date.now() + RECOVERY_MS, `on port ${PORTS[i]} after recovery`);
    }
    await assertEveryClientGotEachOnce(again, [...Array(INSTANCES).keys()]);
    for (const h of fleet.instances) {
      const res = await fetch(`${h.url}/readyz`);
      assert.equal(res.status, 200, `/readyz on ${h.url} after recovery: ${await res.text()}`);
    }

    // Nothing refused with 503 was delivered anywhere, and nobody was disconnected again.
    for (const c of clients) {
      assert.deepEqual([...c.counts(down).keys()], [], `client on port ${c.port} got events that were refused with 503`);
      assert.ok(c.socket.connected, `client on port ${c.port} is no longer connected`);
      assert.equal(disconnects(c).length, 1, `client on port ${c.port}: its disconnects ${disconnects(c)}`);
    }
  });
});
