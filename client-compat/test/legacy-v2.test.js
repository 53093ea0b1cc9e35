'use strict';
// The legacy socket.io-client 2.5.0 (Engine.IO v3 / Socket.IO v4 protocol),
// which has no `auth` option: the token goes in the query.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const ioV2 = require('socket.io-client-v2');

const { OK, UNAUTHORIZED, INVALID, startHerald, once, withoutOffset } = require('./helpers');
const { event } = require('./contract');

/** v2 acks: `socket.emit(ev, payload, ackFn)`. */
function ackV2(socket, name, payload, timeoutMs = 3000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ack for ${name} within ${timeoutMs} ms`)), timeoutMs);
    socket.emit(name, payload, (answer) => {
      clearTimeout(timer);
      resolve(answer);
    });
  });
}

/** Resolves with the first of connect / error / connect_error, and what came with it. */
function firstOutcome(socket, timeoutMs = 5000) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve({ outcome: 'timeout' }), timeoutMs);
    const done = (outcome) => (arg) => {
      clearTimeout(timer);
      resolve({ outcome, arg });
    };
    socket.once('connect', done('connect'));
    socket.once('error', done('error'));
    socket.once('connect_error', done('connect_error'));
  });
}

for (const transport of ['websocket', 'polling']) {
  describe(`socket.io-client 2.5.0 over ${transport}`, () => {
    let h;
    before(async () => {
      h = await startHerald();
    });
    after(async () => {
      if (h) await h.stop();
    });

    function v2(t, query) {
      const socket = ioV2(h.url, { forceNew: true, reconnection: false, transports: [transport], query });
      h.track(socket);
      t.after(() => socket.close());
      return socket;
    }

    it('connects with the token in the query, subscribes and receives an event', async (t) => {
      const socket = v2(t, { token: h.token('alice') });
      const { outcome, arg } = await firstOutcome(socket);
      assert.equal(outcome, 'connect', `expected connect, got ${outcome} ${JSON.stringify(arg)}`);
      assert.deepEqual(await ackV2(socket, 'subscribe_settlement', { settlementId: 's1' }), OK);
      assert.deepEqual(await ackV2(socket, 'subscribe_campaign', { campaignId: 'c2' }), UNAUTHORIZED);
      assert.deepEqual(await ackV2(socket, 'subscribe_campaign', { campaignId: '../x' }), INVALID);

      const received = [];
      socket.on('structure_updated', (...args) => received.push(args.map(withoutOffset)));
      const evt = event('structure_updated', { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'update' });
      await h.publish(evt);
      const deadline = Date.now() + 3000;
      while (received.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(received, [[evt]]);

      assert.deepEqual(await ackV2(socket, 'unsubscribe_settlement', { settlementId: 's1' }), OK);
    });

    it('accepts the Bearer prefix in the query', async (t) => {
      const socket = v2(t, { token: `Bearer ${h.token('carol')}` });
      const { outcome } = await firstOutcome(socket);
      assert.equal(outcome, 'connect');
      assert.deepEqual(await ackV2(socket, 'subscribe_structure', { structureId: 'st2' }), OK);
    });

    for (const [name, query] of [
      ['a bad token', () => ({ token: 'garbage-token-for-v2' })],
      ['an expired token', () => ({ token: h.token('alice', { expiresIn: -3600 }) })],
      ['no token', () => ({})],
    ]) {
      it(`reports ${name} through the "error" event with "Unauthorized"`, async (t) => {
        const socket = v2(t, query());
        const { outcome, arg } = await firstOutcome(socket);
        assert.equal(outcome, 'error', `expected error, got ${outcome} ${JSON.stringify(arg)}`);
        // Observed with herald (socketioxide): the CONNECT_ERROR data is the
        // v5-style object for every protocol, so v2 sees { message }. (The stock
        // socket.io server sends v2 clients the bare string "Unauthorized".)
        assert.deepEqual(arg, { message: 'Unauthorized' });
        assert.equal(socket.connected, false);
      });
    }
  });
}
