// herald-client/apollo with the real @apollo/client (InMemoryCache, a link
// that answers locally and counts the operations it is sent) against the
// real herald: each event evicts exactly the objects of the default mapping
// and the queries that read them refetch once (an event that reaches two
// subscriptions too), nothing else; overrides; a restart of herald
// (recovered: false) refetches the campaign's queries.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { ApolloClient, ApolloLink, InMemoryCache, gql } from '@apollo/client';
import { Observable } from 'rxjs';

import { bindToHerald, expectRefetches, expectResyncAfterRestart, more, once, refetched } from './bindings.js';
import { createApolloInvalidator, heraldTypename } from '../dist/apollo.js';
import { ev, heraldSetup, recorder, sleep, waitUntil } from './helpers.js';

/** One query per object of the fixture (c1: s1 with st1, s3; c2), each watched, so active. */
const QUERIES = {
  c1: ['campaign', 'Campaign', 'c1'],
  c2: ['campaign', 'Campaign', 'c2'],
  s1: ['settlement', 'Settlement', 's1'],
  s3: ['settlement', 'Settlement', 's3'],
  st1: ['structure', 'Structure', 'st1'],
  n1: ['npc', 'Npc', 'n1'],
  me: ['user', 'User', 'alice'],
};

/** An ApolloClient with every QUERIES query watched; `fetches()` counts the operations the link answered, by name. */
function apolloCache() {
  const counts = new Map(Object.keys(QUERIES).map((name) => [name, 0]));
  let inFlight = 0;
  const link = new ApolloLink(
    (operation) =>
      new Observable((observer) => {
        const { name } = operation.variables;
        const [field, __typename, id] = QUERIES[name];
        counts.set(name, counts.get(name) + 1);
        inFlight += 1;
        const timer = setTimeout(() => {
          inFlight -= 1;
          observer.next({ data: { [field]: { __typename, id, name: `${name} #${counts.get(name)}` } } });
          observer.complete();
        }, 1);
        return () => clearTimeout(timer);
      }),
  );
  // No deduplication of identical operations in flight: it would hide a query refetched twice.
  const client = new ApolloClient({ cache: new InMemoryCache(), link, queryDeduplication: false });
  const subscriptions = Object.entries(QUERIES).map(([name, [field]]) =>
    client
      .watchQuery({
        // `name` only tells the link which fixture object to answer with.
        query: gql`query ${field}($id: ID!, $name: String!) { ${field}(id: $id) { id name } }`,
        variables: { id: QUERIES[name][2], name },
      })
      .subscribe({ error: (err) => assert.fail(err) }),
  );
  return {
    client,
    fetches: () => Object.fromEntries(counts),
    /** Resolves once the link has nothing in flight, and still nothing 50 ms later. */
    async settled() {
      await waitUntil(() => inFlight === 0, 'no operation in flight');
      await sleep(50);
      assert.equal(inFlight, 0, 'a late refetch');
    },
    close() {
      subscriptions.forEach((s) => s.unsubscribe());
      client.stop();
    },
  };
}

describe('herald-client/apollo', () => {
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

  /** The fixture's Apollo cache, fetched, bound to herald with `invalidatorOptions` (see `bindToHerald`). */
  async function bound(invalidatorOptions) {
    const cache = apolloCache();
    cleanup.push(() => cache.close());
    await waitUntil(() => Object.values(cache.fetches()).every((n) => n === 1), 'the first fetches');
    await cache.settled();
    return bindToHerald({ setup, herald, cleanup }, cache, createApolloInvalidator(cache.client, invalidatorOptions));
  }

  test('typenames: the kind, capitalised', () => {
    assert.equal(heraldTypename('campaign'), 'Campaign');
    assert.equal(heraldTypename('settlement'), 'Settlement');
    assert.equal(heraldTypename('npc'), 'Npc');
  });

  test('each event refetches exactly the queries of its evicted objects, once, though it reaches two subscriptions', async () => {
    const cache = await bound();
    const cases = [
      // settlement s1's events come to both subscriptions (campaign c1 and settlement s1).
      ['settlement_updated', (id) => ev.settlement('c1', 's1', id), once('c1', 's1')],
      ['structure_updated', (id) => ev.structure('c1', 's1', 'st1', id), once('c1', 's1', 'st1')],
      ['settlement_updated of another settlement', (id) => ev.settlement('c1', 's3', id), once('c1', 's3')],
      ['entity_updated npc', (id) => ev.entity('c1', 'npc', 'n1', id), once('n1')],
      ['entity_updated settlement', (id) => ev.entity('c1', 'settlement', 's1', id), once('s1')],
      ['entity_updated campaign', (id) => ev.entity('c1', 'campaign', 'c1', id), once('c1')],
      ['world_time_changed', more.time, once('c1')],
      ['state_invalidated scope entity', more.entityScope, once('s3', 'n1')],
      // Npc objects only with `entityTypes: ["npc"]` (next test).
      ['state_invalidated scope campaign', (id) => ev.invalidated('c1', id), once('c1', 's1', 's3', 'st1')],
    ];
    await expectRefetches(cache, cases);
    assert.deepEqual(cache.rec.resyncs, []);
  });

  test('overrides: entityTypes, typename, eventTargets with the defaults', async () => {
    const seen = [];
    const cache = await bound({
      entityTypes: ['npc'],
      typename: (kind) => (kind === 'person' ? 'Npc' : heraldTypename(kind)),
      eventTargets(event, defaults) {
        seen.push([event.type, defaults]);
        // world time: the user too (say, its local calendar); everything else as by default.
        return event.type === 'world_time_changed' ? [...defaults, { __typename: 'User', id: 'alice' }] : defaults;
      },
    });
    const cases = [
      ['state_invalidated scope campaign', (id) => ev.invalidated('c1', id), once('c1', 's1', 's3', 'st1', 'n1')],
      ['entity_updated person (typename Npc)', (id) => ev.entity('c1', 'person', 'n1', id), once('n1')],
      [
        'world_time_changed',
        (id) => ({
          type: 'world_time_changed',
          payload: { campaignId: 'c1', previousTime: null, newTime: '2026-01-01T00:00:00Z' },
          metadata: { correlationId: id },
        }),
        once('c1', 'me'),
      ],
    ];
    await expectRefetches(cache, cases);
    assert.deepEqual(seen.find(([t]) => t === 'world_time_changed')[1], [{ __typename: 'Campaign', id: 'c1' }]);
  });

  test('herald restarted (recovered: false): the campaign room resyncs and its queries refetch once', async () => {
    const cache = apolloCache();
    cleanup.push(() => cache.close());
    await waitUntil(() => Object.values(cache.fetches()).every((n) => n === 1), 'the first fetches');
    await cache.settled();
    await expectResyncAfterRestart({ setup, cleanup }, cache, (onResync) =>
      createApolloInvalidator(cache.client, {
        resyncTargets: (info, defaults) => {
          onResync(info);
          return defaults;
        },
      }), once('c1', 's1', 's3', 'st1'));
  });
});
