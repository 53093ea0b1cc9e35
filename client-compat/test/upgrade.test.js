'use strict';
// With default transports the client opens over HTTP long-polling and then
// upgrades to WebSocket; the session keeps working across the upgrade.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { OK, startHerald, ack, inbox, once, waitForConnect } = require('./helpers');
const { event } = require('./contract');

describe('default transports', () => {
  let h;
  before(async () => {
    h = await startHerald();
  });
  after(async () => {
    if (h) await h.stop();
  });

  it('opens over polling, upgrades to websocket, and keeps acking and delivering', async (t) => {
    const socket = h.client({ auth: { token: h.token('alice') } });
    t.after(() => socket.close());
    const [firstTransport] = await once(socket.io, 'open').then(() => [socket.io.engine.transport.name]);
    const upgraded = socket.io.engine.transport.name === 'websocket' ? Promise.resolve() : once(socket.io.engine, 'upgrade', 5000);
    await waitForConnect(socket);
    await upgraded;

    assert.equal(firstTransport, 'polling');
    assert.equal(socket.io.engine.transport.name, 'websocket');
    assert.deepEqual(await ack(socket, 'subscribe_settlement', { settlementId: 's1' }), OK);
    const updates = inbox(socket, 'settlement_updated');
    const evt = event('settlement_updated', { campaignId: 'c1', settlementId: 's1', operation: 'update' });
    await h.publish(evt);
    assert.deepEqual(await updates.next(evt.metadata.correlationId), evt);
  });

  it('keeps a subscription made over polling after the upgrade', async (t) => {
    const socket = h.client({ auth: { token: h.token('bob') } });
    t.after(() => socket.close());
    await once(socket.io, 'open');
    const upgraded = once(socket.io.engine, 'upgrade', 5000);
    await waitForConnect(socket);
    assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1' }), OK);
    if (socket.io.engine.transport.name !== 'websocket') await upgraded;
    const updates = inbox(socket, 'state_invalidated');
    const evt = event('state_invalidated', { campaignId: 'c1', scope: 'campaign' });
    await h.publish(evt);
    assert.deepEqual(await updates.next(evt.metadata.correlationId), evt);
  });
});
