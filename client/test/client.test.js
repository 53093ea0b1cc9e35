// createHeraldClient against the real herald: subscribe, receive (once per
// subscription, whatever the number of target rooms), unsubscribe, refused
// subscriptions, status.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createHeraldClient, HeraldSubscribeError } from '../dist/index.js';
import { cid, ev, heraldSetup, publishRaw, recorder, waitUntil } from './helpers.js';

describe('herald-client', () => {
  let setup;
  let herald;
  const clients = [];
  const publish = (events) => publishRaw(herald, setup.publishToken, events);
  function client(opts = {}) {
    const c = createHeraldClient({ url: herald.url, token: setup.token('alice'), reconnection: false, ...opts });
    clients.push(c);
    return c;
  }

  before(async () => {
    setup = await heraldSetup();
    herald = await setup.start();
  });
  after(async () => {
    for (const c of clients) c.close();
    await setup.stopAll();
  });

  test('subscribe, receive once per subscription, unsubscribe', async () => {
    const c = client();
    const statuses = [c.status];
    c.onStatusChange((s) => statuses.push(s));
    const camp = recorder();
    const sett = recorder();
    const struct = recorder();
    const subC = c.subscribeCampaign('c1', camp.handlers);
    const subS = c.subscribeSettlement('s1', sett.handlers);
    const subT = c.subscribeStructure('st1', struct.handlers);
    assert.deepEqual(await subC.ready, { success: true });
    assert.deepEqual(await subS.ready, { success: true });
    assert.deepEqual(await subT.ready, { success: true });
    assert.deepEqual(statuses, ['connecting', 'connected']);

    const a = cid('struct');
    const b = cid('entity-settlement');
    const d = cid('other-settlement');
    const e = cid('entity-structure');
    const fence = cid('fence');
    await publish([
      ev.structure('c1', 's1', 'st1', a),
      ev.entity('c1', 'settlement', 's1', b),
      ev.settlement('c1', 's3', d),
      ev.entity('c1', 'structure', 'st1', e),
    ]);
    await publish({
      type: 'world_time_changed',
      payload: { campaignId: 'c1', previousTime: null, newTime: '2026-01-01T00:00:00Z' },
      metadata: { correlationId: fence },
    });
    // Events of one socket arrive in order: once the fence is in, all are.
    await camp.waitFor(fence);

    assert.deepEqual(camp.correlations(), [a, b, d, e, fence]);
    assert.deepEqual(sett.correlations(), [a, b]);
    assert.deepEqual(struct.correlations(), [a, e]);
    assert.deepEqual(
      camp.typed.map(([t]) => t),
      ['structure_updated', 'entity_updated', 'settlement_updated', 'entity_updated', 'world_time_changed'],
    );
    const [, fenceEvent] = camp.typed.at(-1);
    assert.equal(fenceEvent.payload.previousTime, null);
    assert.match(fenceEvent.offset, /^\d{13}-\d{13}-\d{10}$/);
    assert.match(fenceEvent.timestamp, /Z$/);
    assert.equal(subC.lastOffset, fenceEvent.offset);
    assert.equal(subS.lastOffset, sett.events.at(-1).offset);
    // One socket listener per event kind, however many subscriptions.
    for (const t of ['entity_updated', 'settlement_updated', 'structure_updated']) {
      assert.equal(c.socket.listeners(t).length, 1, t);
    }

    await subS.unsubscribe();
    const f = cid('after-unsub');
    const fence2 = cid('fence');
    await publish([ev.settlement('c1', 's1', f), ev.invalidated('c1', fence2)]);
    await camp.waitFor(fence2);
    assert.equal(camp.count(f), 1);
    assert.equal(sett.count(f), 0, 'no event after unsubscribe');
    assert.equal(sett.resyncs.length + camp.resyncs.length, 0);

    c.close();
    assert.equal(c.status, 'offline');
  });

  test('two subscriptions to one room each get every event; unsubscribing one keeps the other', async () => {
    const c = client();
    const one = recorder();
    const two = recorder();
    const s1 = c.subscribeSettlement('s1', one.handlers);
    const s2 = c.subscribeSettlement('s1', two.handlers);
    await Promise.all([s1.ready, s2.ready]);
    const a = cid('a');
    await publish(ev.settlement('c1', 's1', a));
    await one.waitFor(a);
    await two.waitFor(a);
    await s1.unsubscribe();
    const b = cid('b');
    await publish(ev.settlement('c1', 's1', b));
    await two.waitFor(b);
    assert.deepEqual(one.correlations(), [a]);
    assert.deepEqual(two.correlations(), [a, b]);
  });

  test('ready rejects with the server error: Unauthorized, Invalid payload', async () => {
    const c = client();
    const notMember = c.subscribeCampaign('c2');
    await assert.rejects(notMember.ready, (err) => {
      assert.ok(err instanceof HeraldSubscribeError);
      assert.equal(err.error, 'Unauthorized');
      return true;
    });
    await assert.rejects(c.subscribeStructure('does-not-exist').ready, { error: 'Unauthorized' });
    await assert.rejects(c.subscribeSettlement('bad id!').ready, { error: 'Invalid payload' });
    // A refused subscription does not break the client.
    assert.deepEqual(await c.subscribeCampaign('c1').ready, { success: true });
  });

  test('a refused handshake ends offline with the error reported', async () => {
    const c = client({ token: 'not-a-jwt' });
    const errors = [];
    c.onError((e) => errors.push(e));
    await waitUntil(() => c.status === 'offline', 'status offline');
    assert.equal(errors[0]?.message, 'Unauthorized');
  });

  test('a subscribe made when the status turns connected is acked and gets events', { timeout: 10_000 }, async () => {
    const c = client({ autoConnect: false });
    const rec = recorder();
    let sub;
    c.onStatusChange((s) => {
      if (s === 'connected' && !sub) sub = c.subscribeCampaign('c1', rec.handlers);
    });
    c.connect();
    await waitUntil(() => sub !== undefined, 'the status turned connected');
    assert.deepEqual(await sub.ready, { success: true });
    const id = cid('on-connected');
    await publish(ev.invalidated('c1', id));
    await rec.waitFor(id);
  });
});
