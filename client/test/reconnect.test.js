// Reconnects: the token function is called again, every subscription is
// re-subscribed with `since`, onResync when herald cannot replay (a new
// process has an empty log), replay of what was missed when it can (a proxy
// cut), and never a duplicate handler or event.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createHeraldClient } from '../dist/index.js';
import { cid, ev, FAST_RECONNECT, heraldSetup, publishRaw, recorder, startProxy, waitUntil } from './helpers.js';

describe('reconnect', () => {
  let setup;
  const cleanup = [];
  before(async () => {
    setup = await heraldSetup();
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
    await setup.stopAll();
  });

  test('herald restarted on the same port: token function called again, re-subscribed, onResync, no duplicates', async () => {
    let herald = await setup.start();
    const port = herald.port;
    let tokenCalls = 0;
    const c = createHeraldClient({
      url: herald.url,
      token: async () => {
        tokenCalls += 1;
        return setup.token('alice');
      },
      ...FAST_RECONNECT,
    });
    cleanup.push(() => c.close());
    const statuses = [];
    c.onStatusChange((s) => statuses.push(s));
    const camp = recorder();
    const sett = recorder();
    const unseen = recorder(); // subscribed, but never gets an event before the drop
    const subC = c.subscribeCampaign('c1', camp.handlers);
    const subS = c.subscribeSettlement('s1', sett.handlers);
    const subU = c.subscribeStructure('st3', unseen.handlers);
    await Promise.all([subC.ready, subS.ready, subU.ready]);
    assert.equal(tokenCalls, 1);

    const first = cid('first');
    await publishRaw(herald, setup.publishToken, ev.settlement('c1', 's1', first));
    await camp.waitFor(first);
    await sett.waitFor(first);
    const lastBefore = subC.lastOffset;
    assert.ok(lastBefore);

    // Twice: a fresh process each time (its in-memory log knows nothing of `since`).
    for (let round = 1; round <= 2; round += 1) {
      const subscribes = [];
      const record = (event, ...args) => {
        if (event.startsWith('subscribe_')) subscribes.push([event, args[0]]);
      };
      c.socket.onAnyOutgoing(record);
      await herald.stop();
      await waitUntil(() => c.status === 'reconnecting', 'status reconnecting');
      herald = await setup.start({ port });
      await waitUntil(() => camp.resyncs.length === round && sett.resyncs.length === round, `onResync round ${round}`);
      await waitUntil(() => unseen.resyncs.length === round, `onResync (no offset) round ${round}`);
      c.socket.offAnyOutgoing(record);
      assert.equal(c.status, 'connected');
      assert.equal(tokenCalls, 1 + round, 'the token function is called on every reconnect');
      assert.deepEqual(camp.resyncs.at(-1), { kind: 'campaign', id: 'c1', reason: 'not-recovered' });
      assert.deepEqual(unseen.resyncs.at(-1), { kind: 'structure', id: 'st3', reason: 'no-offset' });
      // Every subscription re-subscribed once, with `since` when it had seen an event.
      const sorted = subscribes.map(([e, p]) => [e, Object.keys(p).sort().join(',')]).sort();
      assert.deepEqual(sorted, [
        ['subscribe_campaign', 'campaignId,since'],
        ['subscribe_settlement', 'settlementId,since'],
        ['subscribe_structure', 'structureId'],
      ]);
      assert.equal(subscribes.find(([e]) => e === 'subscribe_campaign')[1].since, subC.lastOffset);

      const live = cid(`live-${round}`);
      const fence = cid('fence');
      await publishRaw(herald, setup.publishToken, [
        ev.structure('c1', 's1', 'st1', live),
        ev.invalidated('c1', fence),
      ]);
      await camp.waitFor(fence);
      assert.equal(camp.count(live), 1, 'one delivery per subscription after reconnect');
      assert.equal(sett.count(live), 1);
      assert.equal(unseen.count(live), 0, 'not its structure');
      for (const t of ['settlement_updated', 'structure_updated', 'state_invalidated']) {
        assert.equal(c.socket.listeners(t).length, 1, `${t} listeners`);
      }
    }
    assert.ok(subC.lastOffset > lastBefore, 'a later process has later offsets');
    assert.equal(statuses[0], 'connected');
    assert.deepEqual(
      statuses.filter((s, i) => s !== statuses[i - 1]),
      ['connected', 'reconnecting', 'connected', 'reconnecting', 'connected'],
    );
    assert.deepEqual(camp.errors, []);
    c.close();
  });

  test('connection cut by a proxy: missed events replayed once, in order, no onResync', async () => {
    const herald = await setup.start();
    const proxy = await startProxy(herald.port);
    cleanup.push(() => proxy.close());
    const c = createHeraldClient({ url: proxy.url, token: () => setup.token('alice'), ...FAST_RECONNECT });
    cleanup.push(() => c.close());
    const camp = recorder();
    const sett = recorder();
    const subC = c.subscribeCampaign('c1', camp.handlers);
    const subS = c.subscribeSettlement('s1', sett.handlers);
    await Promise.all([subC.ready, subS.ready]);
    const publish = (events) => publishRaw(herald, setup.publishToken, events);

    const seen = cid('seen');
    await publish(ev.settlement('c1', 's1', seen));
    await sett.waitFor(seen);
    await camp.waitFor(seen);

    for (let round = 1; round <= 2; round += 1) {
      proxy.block();
      await waitUntil(() => c.status === 'reconnecting', 'status reconnecting');
      const missed = [cid('missed-s1'), cid('missed-c1'), cid('missed-st1')];
      await publish([
        ev.settlement('c1', 's1', missed[0]),
        ev.invalidated('c1', missed[1]),
        ev.structure('c1', 's1', 'st1', missed[2]),
      ]);
      proxy.unblock();
      await waitUntil(() => c.status === 'connected', 'reconnected');
      await camp.waitFor(missed[2], 'replayed events');
      await sett.waitFor(missed[2], 'replayed events');
      const live = cid('live');
      await publish(ev.settlement('c1', 's1', live));
      await camp.waitFor(live);
      await sett.waitFor(live);

      assert.deepEqual(camp.resyncs, [], 'recovered: no onResync');
      assert.deepEqual(sett.resyncs, []);
      for (const id of [...missed, live]) assert.equal(camp.count(id), 1, `campaign got ${id} once`);
      for (const id of [missed[0], missed[2], live]) assert.equal(sett.count(id), 1, `settlement got ${id} once`);
      assert.equal(sett.count(missed[1]), 0, 'a campaign-only event is not dispatched to the settlement subscription');
      const tail = camp.correlations().slice(-4);
      assert.deepEqual(tail, [...missed, live], 'in order');
      const offsets = camp.events.map((e) => e.offset);
      assert.deepEqual(offsets, [...offsets].sort(), 'offsets increase');
      assert.equal(new Set(offsets).size, offsets.length);
    }
    c.close();
  });
});
