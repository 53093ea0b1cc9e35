'use strict';
// SIGTERM: herald closes its sockets so that clients reconnect elsewhere, and
// exits within the grace period (default 10 s).

const { describe, it } = require('node:test');
const assert = require('node:assert/strict');

const { OK, startHerald, ack, once } = require('./helpers');

describe('SIGTERM', () => {
  it('closes connected sockets in a way that makes the client reconnect, and exits in time', { timeout: 30_000 }, async (t) => {
    const h = await startHerald();
    t.after(() => h.stop());
    const sockets = [];
    for (const transports of [['websocket'], ['polling']]) {
      // reconnection on, as in a real frontend, so that socket.active tells whether the client would retry
      const socket = await h.connect({
        auth: { token: h.token('alice') },
        transports,
        reconnection: true,
        reconnectionDelay: 60_000,
        reconnectionDelayMax: 60_000,
      });
      assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1' }), OK);
      sockets.push(socket);
    }
    const disconnects = sockets.map((socket) => once(socket, 'disconnect', 12_000));

    const started = Date.now();
    h.child.kill('SIGTERM');
    const reasons = (await Promise.all(disconnects)).map(([reason]) => reason);
    const active = sockets.map((socket) => socket.active);
    for (const socket of sockets) socket.close();
    const exit = await Promise.race([h.exited, new Promise((r) => setTimeout(() => r('still running'), 11_000))]);
    const tookMs = Date.now() - started;

    for (const reason of reasons) assert.notEqual(reason, 'io server disconnect', 'a server-side disconnect stops the client from reconnecting');
    assert.deepEqual(active, [true, true], 'the clients would reconnect');
    assert.notEqual(exit, 'still running', 'herald did not exit within the grace period');
    assert.deepEqual(exit, { code: 0, signal: null }, `herald exited with ${JSON.stringify(exit)} after ${tookMs} ms`);
  });
});
