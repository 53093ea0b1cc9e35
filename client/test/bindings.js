// What the binding tests (tanstack.test.js, apollo.test.js) share: a herald
// client bound to a cache through an invalidator, publishing with a fence,
// and counting which queries refetched.

import assert from 'node:assert/strict';

import { createHeraldClient } from '../dist/index.js';
import { cid, ev, FAST_RECONNECT, publishRaw, recorder, waitUntil } from './helpers.js';

/** The refetches between two `fetches()`: `{ name: count }` for every count that changed. */
export function refetched(before, after) {
  return Object.fromEntries(Object.keys(after).filter((k) => after[k] !== before[k]).map((k) => [k, after[k] - before[k]]));
}

/** `{ name: 1 }` for each name: each refetched once. */
export const once = (...names) => Object.fromEntries(names.map((n) => [n, 1]));

/**
 * A herald client (alice) with `invalidator` on campaign c1 and settlement
 * s1, and a recorder on c1, over `cache` (`{ fetches(), settled(), … }`).
 * `publish(events)` publishes, then a fence event (an entity no query
 * shows), and resolves once the fence has arrived and the refetches have
 * settled.
 */
export async function bindToHerald({ setup, herald, cleanup }, cache, invalidator) {
  const c = createHeraldClient({ url: herald.url, token: setup.token('alice'), reconnection: false });
  cleanup.push(() => c.close());
  const rec = recorder();
  const subs = [c.subscribeCampaign('c1', invalidator), c.subscribeSettlement('s1', invalidator), c.subscribeCampaign('c1', rec.handlers)];
  await Promise.all(subs.map((s) => s.ready));
  async function publish(events) {
    const fence = cid('fence');
    await publishRaw(herald, setup.publishToken, events);
    await publishRaw(herald, setup.publishToken, ev.entity('c1', 'fence', fence, fence));
    await rec.waitFor(fence);
    await cache.settled();
  }
  return { ...cache, publish, rec };
}

/** Event builders the cases use besides `ev`. */
export const more = {
  time: (id) => ({
    type: 'world_time_changed',
    payload: { campaignId: 'c1', previousTime: null, newTime: '2026-01-01T00:00:00Z' },
    metadata: { correlationId: id },
  }),
  entityScope: (id) => ({
    type: 'state_invalidated',
    payload: { campaignId: 'c1', scope: 'entity', entityIds: ['s3', 'n1', 'unknown'] },
    metadata: { correlationId: id },
  }),
};

/** Publishes each case's event and checks exactly which queries refetched: `[name, event(id), expected]`. */
export async function expectRefetches(bound, cases) {
  for (const [name, event, expected] of cases) {
    const before = bound.fetches();
    await bound.publish(event(cid(name.replace(/\W+/g, '-'))));
    assert.deepEqual(refetched(before, bound.fetches()), expected, name);
  }
}

/**
 * herald restarts under a client whose campaign c1 is bound to `cache` by
 * `invalidator(onResync)` (an invalidator whose resync option calls
 * `onResync(info)` and keeps the defaults): the re-subscribe is answered
 * `recovered: false`, the room resyncs once, and exactly `expected`
 * refetches, once.
 */
export async function expectResyncAfterRestart({ setup, cleanup }, cache, invalidator, expected) {
  let restarting = await setup.start();
  const port = restarting.port;
  cleanup.push(() => restarting.stop());
  const c = createHeraldClient({ url: restarting.url, token: () => setup.token('alice'), ...FAST_RECONNECT });
  cleanup.push(() => c.close());
  const resyncs = [];
  const rec = recorder();
  const sub = c.subscribeCampaign('c1', invalidator((info) => resyncs.push(info)));
  await Promise.all([sub.ready, c.subscribeCampaign('c1', rec.handlers).ready]);

  // An event first, so that the re-subscribe has a `since` (an offset of the old process).
  const first = cid('first');
  await publishRaw(restarting, setup.publishToken, ev.entity('c1', 'fence', first, first));
  await rec.waitFor(first);
  assert.ok(sub.lastOffset);
  await cache.settled();

  const before = cache.fetches();
  await restarting.stop();
  await waitUntil(() => c.status === 'reconnecting', 'status reconnecting');
  restarting = await setup.start({ port });
  await waitUntil(() => rec.resyncs.length === 1, 'onResync');
  assert.deepEqual(rec.resyncs, [{ kind: 'campaign', id: 'c1', reason: 'not-recovered' }]);
  assert.deepEqual(resyncs, rec.resyncs);
  const fence = cid('fence');
  await publishRaw(restarting, setup.publishToken, ev.entity('c1', 'fence', fence, fence));
  await rec.waitFor(fence);
  await cache.settled();
  assert.deepEqual(refetched(before, cache.fetches()), expected);
  assert.equal(rec.resyncs.length, 1);
}
