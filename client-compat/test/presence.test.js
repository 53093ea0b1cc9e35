'use strict';
// Presence with the stock socket.io-client 4.x on two herald instances over
// one Redis (a private redis-server): `presence: true` on a subscribe lists
// the members (per user, with connection counts) in the ack; the others get
// `presence_joined` / `presence_left`; an instance killed with SIGKILL has
// its members dropped fleet-wide within the README's bound
// (2 x HERALD_PRESENCE_TIMEOUT + 2 x HERALD_PRESENCE_INTERVAL).

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { ack, startRedis, startFleet, waitUntil } = require('./helpers');

const INTERVAL_MS = 200;
const TIMEOUT_MS = 1_000;
const BOUND_MS = 2 * TIMEOUT_MS + 2 * INTERVAL_MS;

describe('presence on two instances', { timeout: 30_000 }, () => {
  let redis;
  let fleet;

  before(async () => {
    redis = await startRedis();
    fleet = await startFleet({
      count: 2,
      redisUrl: redis.url,
      prefix: 'herald-compat-presence',
      env: { HERALD_PRESENCE_INTERVAL: `${INTERVAL_MS}ms`, HERALD_PRESENCE_TIMEOUT: `${TIMEOUT_MS}ms` },
    });
  });

  after(async () => {
    await fleet?.stop();
    await redis?.stop();
  });

  it('lists members per user, tells joins and leaves, and drops a killed instance\'s members within the bound', async () => {
    const [a, b] = fleet.instances;
    const member = async (h, user) => {
      const socket = await h.connect({ auth: { token: fleet.token(user) }, transports: ['websocket'] });
      const events = [];
      socket.on('presence_joined', (e) => events.push(['joined', e.userId, e.room]));
      socket.on('presence_left', (e) => events.push(['left', e.userId, e.room]));
      const answer = await ack(socket, 'subscribe_campaign', { campaignId: 'c1', presence: true });
      assert.equal(answer.success, true, JSON.stringify(answer));
      return { socket, events, ack: answer };
    };
    const alice = await member(a, 'alice');
    await waitUntil(() => alice.events.length === 1, 5_000, () => 'alice told of herself');
    const bobTab1 = await member(b, 'bob');
    const bobTab2 = await member(b, 'bob');
    // The second tab has alice: in its ack, or (when it subscribed while the
    // room's first round on B was running, and its ack had what B's listeners
    // were told before it: nobody) in a presence_joined right after.
    await waitUntil(
      () => bobTab2.ack.presence.some((m) => m.userId === 'alice') || bobTab2.events.some(([, user]) => user === 'alice'),
      2_000,
      () => `bob's second tab has alice: ${JSON.stringify([bobTab2.ack, bobTab2.events])}`,
    );
    await waitUntil(() => alice.events.length === 2, 5_000, () => `alice told of bob: ${JSON.stringify(alice.events)}`);
    assert.deepEqual(alice.events, [['joined', 'alice', 'campaign:c1'], ['joined', 'bob', 'campaign:c1']]);
    const query = async () => {
      const res = await fetch(`${a.url}/v1/presence/campaign/c1`, { headers: { authorization: `Bearer ${fleet.publishToken}` } });
      assert.equal(res.status, 200);
      return res.json();
    };
    await waitUntil(async () => JSON.stringify((await query()).members) === JSON.stringify([
      { userId: 'alice', connections: 1 },
      { userId: 'bob', connections: 2 },
    ]), 5_000, () => 'bob counted with two connections');

    // B dies without a goodbye.
    const killed = Date.now();
    b.child.kill('SIGKILL');
    await waitUntil(() => alice.events.length === 3, BOUND_MS + 2_000, () => `bob dropped: ${JSON.stringify(alice.events)}`);
    const took = Date.now() - killed;
    assert.deepEqual(alice.events[2], ['left', 'bob', 'campaign:c1']);
    assert.ok(took <= BOUND_MS + 500, `bob dropped ${took} ms after the kill (bound ${BOUND_MS} ms)`);
    console.log(`# a SIGKILLed instance's member dropped after ${took} ms (bound ${BOUND_MS} ms)`);
    assert.deepEqual((await query()).members, [{ userId: 'alice', connections: 1 }]);
    for (const tab of [bobTab1, bobTab2]) tab.socket.close();
  });
});
