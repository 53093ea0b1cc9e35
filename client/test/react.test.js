// useHeraldSubscription under React 18 strict mode (mount, unmount, mount),
// rendered with react-test-renderer in node, against the real herald.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import React from 'react';
import TestRenderer from 'react-test-renderer';

import { createHeraldClient } from '../dist/index.js';
import { HeraldProvider, useHeraldSubscription } from '../dist/react.js';
import { cid, ev, heraldSetup, publishRaw, recorder, waitUntil } from './helpers.js';

globalThis.IS_REACT_ACT_ENVIRONMENT = true;
const { act } = TestRenderer;
const h = React.createElement;

describe('useHeraldSubscription', () => {
  let setup;
  let herald;
  let client;
  before(async () => {
    setup = await heraldSetup();
    herald = await setup.start();
    client = createHeraldClient({ url: herald.url, token: setup.token('alice'), reconnection: false });
  });
  after(async () => {
    client?.close();
    await setup.stopAll();
  });

  test('mount, unmount, mount (strict mode): one server subscribe, one delivery per event, unsubscribed on unmount', async () => {
    let subscribeCalls = 0;
    const original = client.subscribe;
    client.subscribe = (...args) => {
      subscribeCalls += 1;
      return original(...args);
    };
    const outgoing = [];
    client.socket.onAnyOutgoing((event, payload) => outgoing.push([event, payload]));
    const received = [];
    const states = [];
    function Settlement({ id, tag }) {
      const state = useHeraldSubscription('settlement', id, {
        // A new closure every render: the latest one is used, no re-subscribe.
        onSettlementUpdated: (e) => received.push([tag, e.metadata?.correlationId]),
      });
      states.push(state.state);
      return h('span', null, state.state);
    }
    const tree = (tag) => h(React.StrictMode, null, h(HeraldProvider, { client }, h(Settlement, { id: 's1', tag })));

    // react-test-renderer 18 does not double-invoke effects under StrictMode
    // (its build has no strict effects), so do what strict mode does by hand:
    // mount, unmount and mount again, synchronously (no macrotask in between).
    let renderer;
    let firstMount;
    act(() => {
      firstMount = TestRenderer.create(tree('first'));
    });
    act(() => {
      firstMount.unmount();
      renderer = TestRenderer.create(tree('first'));
    });
    await waitUntil(() => states.at(-1) === 'ready', 'state ready');
    await act(async () => {
      renderer.update(tree('second'));
    });
    assert.deepEqual(renderer.toJSON().children, ['ready']);
    assert.equal(subscribeCalls, 2, 'mounted, unmounted and mounted again');
    const subscribes = outgoing.filter(([e]) => e === 'subscribe_settlement');
    assert.equal(subscribes.length, 1, `one subscribe_settlement despite strict mode: ${JSON.stringify(outgoing)}`);
    assert.equal(outgoing.filter(([e]) => e === 'unsubscribe_settlement').length, 0);

    // A sentinel on the same socket, in another room: events arrive in order.
    const sentinel = recorder();
    await client.subscribeCampaign('c1', sentinel.handlers).ready;
    const a = cid('a');
    await publishRaw(herald, setup.publishToken, ev.settlement('c1', 's1', a));
    await sentinel.waitFor(a);
    assert.deepEqual(received, [['second', a]], 'once, to the latest handler');

    await act(async () => {
      renderer.unmount();
    });
    await waitUntil(() => outgoing.some(([e]) => e === 'unsubscribe_settlement'), 'unsubscribe_settlement sent');
    const b = cid('b');
    await publishRaw(herald, setup.publishToken, ev.settlement('c1', 's1', b));
    await sentinel.waitFor(b);
    assert.deepEqual(received, [['second', a]], 'nothing after unmount');
  });

  test('a refused subscription shows as error', async () => {
    function Denied() {
      const state = useHeraldSubscription('campaign', 'c2', {}, { client });
      return h('span', null, state.state === 'error' ? `error: ${state.error.error}` : state.state);
    }
    let renderer;
    await act(async () => {
      renderer = TestRenderer.create(h(React.StrictMode, null, h(Denied)));
    });
    await waitUntil(() => renderer.toJSON().children[0] !== 'pending', 'an answer');
    assert.deepEqual(renderer.toJSON().children, ['error: Unauthorized']);
    await act(async () => renderer.unmount());
  });
});
