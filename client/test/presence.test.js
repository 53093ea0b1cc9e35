// Presence with herald-client against the real herald: `presence: true`
// and `onPresence` (the ack's list, then each join and leave), a second
// subscription of a room asking for presence later, two tabs of one user,
// a dropped connection that comes back (not a leave), counts in a big room,
// and `useHeraldPresence` in React.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import React from 'react';
import TestRenderer from 'react-test-renderer';

import { createHeraldClient } from '../dist/index.js';
import { useHeraldPresence } from '../dist/react.js';
import { heraldSetup, waitUntil } from './helpers.js';

globalThis.IS_REACT_ACT_ENVIRONMENT = true;
const { act } = TestRenderer;

const names = (members) => members.map((m) => `${m.userId}:${m.connections}`);

describe('presence', () => {
  let setup;
  let herald;
  const clients = [];
  function client(user) {
    const c = createHeraldClient({ url: herald.url, token: setup.token(user), reconnection: false });
    clients.push(c);
    return c;
  }

  before(async () => {
    setup = await heraldSetup();
    herald = await setup.start({ env: { HERALD_PRESENCE_INTERVAL: '100ms', HERALD_PRESENCE_TIMEOUT: '300ms' } });
  });
  after(async () => {
    for (const c of clients) c.close();
    await setup.stopAll();
  });

  test('onPresence follows the members; a later subscription may ask for presence; tabs are one member', async () => {
    const alice = client('alice');
    const seen = [];
    // A subscription without presence first: the room joins without it.
    const plain = alice.subscribeCampaign('c1', {});
    await plain.ready;
    const withPresence = alice.subscribeCampaign('c1', {
      presence: true,
      onPresence: (members, change) => seen.push([change.type, names(members)]),
    });
    const ack = await withPresence.ready;
    assert.equal(ack.success, true);
    await waitUntil(() => seen.some(([, list]) => list.includes('alice:1')), 'alice sees herself');

    const bob = client('bob');
    const bobSeen = [];
    await bob.subscribeCampaign('c1', { presence: true, onPresence: (m) => bobSeen.push(names(m)) }).ready;
    assert.deepEqual(bobSeen[0], ['alice:1'], "bob's ack lists alice");
    await waitUntil(() => seen.at(-1)?.[1].join() === 'alice:1,bob:1', 'alice sees bob join');

    const bob2 = client('bob');
    await bob2.subscribeCampaign('c1', { presence: true }).ready;
    bob.close();
    bob2.close();
    await waitUntil(() => seen.at(-1)?.[1].join() === 'alice:1', 'alice sees bob leave, once his last tab is gone');
    const changes = seen.map(([type]) => type);
    assert.deepEqual(changes.filter((t) => t === 'left'), ['left'], `one leave: ${JSON.stringify(seen)}`);
    assert.deepEqual(plain.lastOffset, undefined);
  });

  test('useHeraldPresence renders the members', async () => {
    const carol = client('carol');
    const renders = [];
    function Who() {
      const { members, count, countsOnly } = useHeraldPresence('campaign', 'c2', { client: carol });
      renders.push(`${names(members).join()} ${count} ${countsOnly}`);
      return React.createElement('span', null, names(members).join());
    }
    let renderer;
    act(() => {
      renderer = TestRenderer.create(React.createElement(Who));
    });
    await waitUntil(() => renders.at(-1) === 'carol:1 1 false', `carol sees herself: ${JSON.stringify(renders)}`);
    act(() => renderer.unmount());
  });

  test('a room over HERALD_PRESENCE_MAX_MEMBERS is told counts only', async () => {
    const small = await setup.start({
      env: { HERALD_PRESENCE_INTERVAL: '100ms', HERALD_PRESENCE_TIMEOUT: '300ms', HERALD_PRESENCE_MAX_MEMBERS: '1' },
    });
    const on = (user) => {
      const c = createHeraldClient({ url: small.url, token: setup.token(user), reconnection: false });
      clients.push(c);
      return c;
    };
    const changes = [];
    await on('alice').subscribeSettlement('s1', { presence: true, onPresence: (m, change) => changes.push([change, names(m)]) }).ready;
    const bobChanges = [];
    await on('bob').subscribeSettlement('s1', { presence: true, onPresence: (m, change) => bobChanges.push([change, names(m)]) }).ready;
    await waitUntil(() => changes.some(([c]) => c.type === 'count' && c.count === 2), `a count of 2: ${JSON.stringify(changes)}`);
    assert.deepEqual(changes.at(-1), [{ type: 'count', count: 2 }, []]);
    await waitUntil(() => bobChanges.at(-1)?.[0].type === 'count', `bob switched to counts: ${JSON.stringify(bobChanges)}`);
  });

  test('a dropped connection that comes back within the timeout is not a leave', async () => {
    const watcher = client('bob');
    const seen = [];
    await watcher.subscribeStructure('st1', { presence: true, onPresence: (m, change) => seen.push([change.type, names(m)]) }).ready;
    // Away longer than a round (100 ms), so that a round sees alice missing,
    // and shorter than the timeout (300 ms).
    const away = { reconnectionDelay: 150, reconnectionDelayMax: 150, randomizationFactor: 0 };
    const alice = createHeraldClient({ url: herald.url, token: () => setup.token('alice'), ...away });
    clients.push(alice);
    const acks = [];
    await alice.subscribeStructure('st1', { presence: true, onPresence: (m, change) => acks.push(change.type) }).ready;
    await waitUntil(() => seen.at(-1)?.[1].join() === 'alice:1,bob:1', `bob sees alice: ${JSON.stringify(seen)}`);
    // The transport drops (as a network does); socket.io-client reconnects by
    // itself, and herald-client subscribes again, with presence.
    const before = acks.filter((t) => t === 'ack').length;
    alice.socket.io.engine.close();
    await waitUntil(() => acks.filter((t) => t === 'ack').length > before, 'alice re-subscribed');
    // Longer than the timeout (300 ms) and a few rounds: no leave, no join.
    await new Promise((r) => setTimeout(r, 800));
    const after = seen.slice(seen.findIndex(([, list]) => list.join() === 'alice:1,bob:1') + 1);
    assert.deepEqual(after.filter(([type]) => type === 'left' || type === 'joined'), [], JSON.stringify(seen));
  });
});
