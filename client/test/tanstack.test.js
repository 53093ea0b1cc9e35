// herald-client/tanstack with the real @tanstack/query-core against the real
// herald: each event refetches exactly the queries of the default mapping,
// once (an event that reaches two subscriptions too), and nothing else;
// setQueryData writes entityData without a refetch; overrides; a restart of
// herald (recovered: false) refetches the campaign's queries.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { QueryClient, QueryObserver, hashKey } from '@tanstack/query-core';

import { bindToHerald, expectRefetches, expectResyncAfterRestart, more, once, refetched } from './bindings.js';
import { createQueryInvalidator, heraldQueryKeys } from '../dist/tanstack.js';
import { cid, ev, heraldSetup, recorder, sleep, waitUntil } from './helpers.js';

/** The fixture's queries (c1: s1 with st1, s3; c2), each observed, so active. */
const KEYS = {
  c1: ['campaign', 'c1'],
  c1Summary: ['campaign', 'c1', 'summary'],
  c2: ['campaign', 'c2'],
  s1: ['settlement', 's1'],
  s3: ['settlement', 's3'],
  st1: ['structure', 'st1'],
  n1: ['entity', 'npc', 'n1'],
  me: ['user', 'me'],
};

/** A QueryClient with every KEYS query active; `fetches()` counts queryFn calls by name. */
function queryCache() {
  const queryClient = new QueryClient({
    defaultOptions: { queries: { staleTime: Infinity, gcTime: Infinity, retry: false } },
  });
  const counts = new Map(Object.keys(KEYS).map((name) => [name, 0]));
  const unsubscribes = Object.entries(KEYS).map(([name, queryKey]) =>
    new QueryObserver(queryClient, {
      queryKey,
      queryFn: () => {
        counts.set(name, counts.get(name) + 1);
        return { name: `${name} #${counts.get(name)}`, fetched: counts.get(name) };
      },
    }).subscribe(() => {}),
  );
  return {
    queryClient,
    fetches: () => Object.fromEntries(counts),
    /** Resolves once nothing is fetching, and still nothing 50 ms later. */
    async settled() {
      await waitUntil(() => queryClient.isFetching() === 0, 'no query fetching');
      await sleep(50);
      assert.equal(queryClient.isFetching(), 0, 'a late refetch');
    },
    close() {
      unsubscribes.forEach((u) => u());
      queryClient.clear();
    },
  };
}

describe('herald-client/tanstack', () => {
  let setup;
  let herald;
  const cleanup = [];
  before(async () => {
    setup = await heraldSetup();
    herald = await setup.start();
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
    await setup.stopAll();
  });

  /** The fixture's query cache, fetched, bound to herald with `invalidatorOptions` (see `bindToHerald`). */
  async function bound(invalidatorOptions) {
    const cache = queryCache();
    cleanup.push(() => cache.close());
    await cache.settled();
    return bindToHerald({ setup, herald, cleanup }, cache, createQueryInvalidator(cache.queryClient, invalidatorOptions));
  }

  test('query keys: prefix keys, and campaign, settlement and structure entities under their own kind', () => {
    assert.deepEqual(heraldQueryKeys.campaign('c1'), ['campaign', 'c1']);
    assert.deepEqual(heraldQueryKeys.entity('settlement', 's1'), ['settlement', 's1']);
    assert.deepEqual(heraldQueryKeys.entity('structure', 'st1'), ['structure', 'st1']);
    assert.deepEqual(heraldQueryKeys.entity('campaign', 'c1'), ['campaign', 'c1']);
    assert.deepEqual(heraldQueryKeys.entity('npc', 'n1'), ['entity', 'npc', 'n1']);
  });

  test('each event refetches exactly its mapped queries, once, though it reaches two subscriptions', async () => {
    const cache = await bound();
    const cases = [
      // settlement s1's events come to both subscriptions (campaign c1 and settlement s1).
      ['settlement_updated', (id) => ev.settlement('c1', 's1', id), once('c1', 'c1Summary', 's1')],
      ['structure_updated', (id) => ev.structure('c1', 's1', 'st1', id), once('c1', 'c1Summary', 's1', 'st1')],
      ['settlement_updated of another settlement', (id) => ev.settlement('c1', 's3', id), once('c1', 'c1Summary', 's3')],
      ['entity_updated npc', (id) => ev.entity('c1', 'npc', 'n1', id), once('n1')],
      ['entity_updated settlement', (id) => ev.entity('c1', 'settlement', 's1', id), once('s1')],
      ['entity_updated campaign', (id) => ev.entity('c1', 'campaign', 'c1', id), once('c1', 'c1Summary')],
      ['world_time_changed', more.time, once('c1', 'c1Summary')],
      ['state_invalidated scope entity', more.entityScope, once('s3', 'n1')],
      ['state_invalidated scope campaign', (id) => ev.invalidated('c1', id), once('c1', 'c1Summary', 's1', 's3', 'st1', 'n1')],
    ];
    await expectRefetches(cache, cases);
    assert.deepEqual(cache.rec.resyncs, []);
  });

  test('setQueryData: entity_updated with entityData writes the cached entity without a refetch', async () => {
    const cache = await bound({ setQueryData: true });
    const withData = (entityType, entityId, entityData, correlationId) => {
      const e = ev.entity('c1', entityType, entityId, correlationId);
      e.payload.entityData = entityData;
      return e;
    };
    const before = cache.fetches();
    const previous = cache.queryClient.getQueryData(KEYS.n1);
    await cache.publish(withData('npc', 'n1', { name: 'Aldric', level: 3 }, cid('n1-data')));
    assert.deepEqual(refetched(before, cache.fetches()), {}, 'nothing refetched');
    assert.deepEqual(cache.queryClient.getQueryData(KEYS.n1), { ...previous, name: 'Aldric', level: 3 });

    // The campaign entity: its own query is written, the rest of its prefix refetches.
    const c1 = cache.queryClient.getQueryData(KEYS.c1);
    const beforeCampaign = cache.fetches();
    await cache.publish(withData('campaign', 'c1', { name: 'Renamed' }, cid('c1-data')));
    assert.deepEqual(refetched(beforeCampaign, cache.fetches()), once('c1Summary'));
    assert.deepEqual(cache.queryClient.getQueryData(KEYS.c1), { ...c1, name: 'Renamed' });

    // An entity no query shows is not added to the cache; without entityData it refetches.
    const beforeOthers = cache.fetches();
    await cache.publish([withData('npc', 'n2', { name: 'Nobody' }, cid('n2-data')), ev.entity('c1', 'npc', 'n1', cid('n1-plain'))]);
    assert.equal(cache.queryClient.getQueryCache().find({ queryKey: ['entity', 'npc', 'n2'] }), undefined);
    assert.deepEqual(refetched(beforeOthers, cache.fetches()), once('n1'));
  });

  test('overrides: eventQueries gets the defaults and replaces them; setQueryData as a function', async () => {
    const seen = [];
    const cache = await bound({
      eventQueries(event, defaults) {
        seen.push([event.type, defaults.map((f) => f.queryKey && hashKey(f.queryKey))]);
        // world time: only the campaign summary; everything else as by default.
        return event.type === 'world_time_changed' ? [{ queryKey: KEYS.c1Summary, exact: true }] : defaults;
      },
      setQueryData: (previous, event) => ({ ...previous, writes: (previous.writes ?? 0) + 1, ...event.payload.entityData }),
    });
    let before = cache.fetches();
    await cache.publish({
      type: 'world_time_changed',
      payload: { campaignId: 'c1', previousTime: null, newTime: '2026-01-01T00:00:00Z' },
      metadata: { correlationId: cid('time') },
    });
    assert.deepEqual(refetched(before, cache.fetches()), once('c1Summary'));
    assert.deepEqual(seen[0], ['world_time_changed', [hashKey(['campaign', 'c1'])]]);

    before = cache.fetches();
    const e = ev.entity('c1', 'npc', 'n1', cid('n1'));
    e.payload.entityData = { mood: 'grim' };
    await cache.publish(e);
    assert.deepEqual(refetched(before, cache.fetches()), {});
    assert.equal(cache.queryClient.getQueryData(KEYS.n1).writes, 1);
    assert.equal(cache.queryClient.getQueryData(KEYS.n1).mood, 'grim');
  });

  test('herald restarted (recovered: false): the campaign room resyncs and its queries refetch once', async () => {
    const cache = queryCache();
    cleanup.push(() => cache.close());
    await cache.settled();
    await expectResyncAfterRestart({ setup, cleanup }, cache, (onResync) =>
      createQueryInvalidator(cache.queryClient, {
        resyncQueries: (info, defaults) => {
          onResync(info);
          return defaults;
        },
      }), once('c1', 'c1Summary', 's1', 's3', 'st1', 'n1'));
  });
});
