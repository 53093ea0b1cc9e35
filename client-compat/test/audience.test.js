'use strict';
// Addressed events with the stock socket.io-client 4.x, on two herald
// instances over one Redis (a private redis-server): an event published with
// `audience: { users: [...] }` reaches the sockets of those users that are in
// its rooms (every tab, on either instance), live and in a replay (`since`),
// never anyone else, and never carries the audience.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { OK, ack, recordAll, startRedis, startFleet, waitUntil, quietPeriod } = require('./helpers');

const RECOVERED = { success: true, recovered: true };

function update(seq, users) {
  const event = { type: 'settlement_updated', payload: { campaignId: 'c1', settlementId: 's1', operation: 'update', seq } };
  if (users) event.audience = { users };
  return event;
}

const seqs = (seen) => seen.map((r) => r.args[0].payload.seq);

describe('addressed events on two instances', { timeout: 30_000 }, () => {
  let redis;
  let fleet;

  before(async () => {
    redis = await startRedis();
    fleet = await startFleet({ count: 2, redisUrl: redis.url, prefix: 'herald-compat-audience' });
  });

  after(async () => {
    await fleet?.stop();
    await redis?.stop();
  });

  it('reach exactly the audience, live on both instances and in a replay', async () => {
    const [a, b] = fleet.instances;
    const connect = async (h, user, kind, id) => {
      const socket = await h.connect({ auth: { token: fleet.token(user) }, transports: ['websocket'] });
      const seen = recordAll(socket);
      assert.deepEqual(await ack(socket, `subscribe_${kind}`, { [`${kind}Id`]: id }), OK);
      return { socket, seen };
    };
    const aliceOnA = await connect(a, 'alice', 'campaign', 'c1');
    const aliceOnB = await connect(b, 'alice', 'settlement', 's1');
    const bob = await connect(b, 'bob', 'campaign', 'c1');
    const carol = await connect(a, 'carol', 'campaign', 'c2');

    await a.publish(update(0));
    await waitUntil(() => [aliceOnA, aliceOnB, bob].every((c) => c.seen.length === 1), 5_000, () => 'event 0 everywhere');
    const since = aliceOnA.seen[0].offset;

    await a.publish(update(1, ['alice', 'carol']));
    await b.publish([update(2, ['bob']), update(3)]);
    await waitUntil(
      () => aliceOnA.seen.length === 3 && aliceOnB.seen.length === 3 && bob.seen.length === 3,
      5_000,
      () => `every event delivered: ${JSON.stringify([aliceOnA, aliceOnB, bob].map((c) => seqs(c.seen)))}`,
    );
    await quietPeriod();
    assert.deepEqual(seqs(aliceOnA.seen), [0, 1, 3], "alice's tab on A");
    assert.deepEqual(seqs(aliceOnB.seen), [0, 1, 3], "alice's tab on B");
    assert.deepEqual(seqs(bob.seen), [0, 2, 3], 'bob');
    assert.deepEqual(carol.seen, [], 'carol is addressed but not in the rooms');
    for (const c of [aliceOnA, aliceOnB, bob]) {
      for (const record of c.seen) assert.equal(record.args[0].audience, undefined, 'the audience is never delivered');
    }

    // A replay from event 0's offset, on the other instance, for each user.
    for (const [h, user, expected] of [[b, 'alice', [1, 3]], [a, 'bob', [2, 3]]]) {
      const socket = await h.connect({ auth: { token: fleet.token(user) }, transports: ['websocket'] });
      const seen = recordAll(socket);
      assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1', since }), RECOVERED);
      assert.deepEqual(seqs(seen), expected, `${user}'s replay, before the ack`);
    }

    const refused = await a.publishRaw(update(4, ['alice', 'alice']));
    assert.equal(refused.status, 400);
    assert.match(refused.body.error, /^audience\.users\[1\]: /);
  });
});
