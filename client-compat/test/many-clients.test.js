'use strict';
// 2,000 WebSocket clients that each emit subscribe_campaign from inside their
// connect callback must all get their ack (a handler registered too late on
// the server loses these first packets), and all receive the next event.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { OK, startHerald } = require('./helpers');
const { event } = require('./contract');

const CLIENTS = 2000;
const BATCH = 200;
const BATCH_TIMEOUT_MS = 20_000;

describe('many clients', () => {
  let h;
  before(async () => {
    h = await startHerald();
  });
  after(async () => {
    if (h) await h.stop();
  });

  it(`acks subscribe_campaign emitted in the connect callback of ${CLIENTS} websocket clients`, { timeout: 90_000 }, async (t) => {
    const sockets = [];
    t.after(() => {
      for (const socket of sockets) socket.close();
    });
    const tokens = { alice: h.token('alice'), bob: h.token('bob') };
    const acks = [];
    const connectErrors = [];

    for (let start = 0; start < CLIENTS; start += BATCH) {
      const batch = [];
      for (let i = start; i < Math.min(start + BATCH, CLIENTS); i += 1) {
        const socket = h.client({ auth: { token: i % 2 ? tokens.bob : tokens.alice }, transports: ['websocket'] });
        sockets.push(socket);
        batch.push(
          new Promise((resolve) => {
            socket.on('connect', () => {
              socket.emit('subscribe_campaign', { campaignId: 'c1' }, (answer) => resolve(answer));
            });
            socket.on('connect_error', (err) => {
              connectErrors.push(err.message);
              resolve({ connectError: err.message });
            });
          }),
        );
      }
      let timer;
      const timeout = new Promise((resolve) => {
        timer = setTimeout(() => resolve('timeout'), BATCH_TIMEOUT_MS);
      });
      const settled = await Promise.race([Promise.all(batch), timeout]);
      clearTimeout(timer);
      if (settled === 'timeout') {
        const connected = sockets.filter((s) => s.connected).length;
        assert.fail(
          `batch starting at client ${start}: not every ack arrived within ${BATCH_TIMEOUT_MS} ms ` +
            `(${connected} of ${sockets.length} sockets connected, ${acks.length} acks before this batch)`,
        );
      }
      acks.push(...settled);
    }

    assert.deepEqual(connectErrors, []);
    const failures = acks.filter((answer) => !(answer && answer.success === true && Object.keys(answer).length === 1));
    assert.deepEqual(failures.slice(0, 5), [], `${failures.length} of ${CLIENTS} acks were not ${JSON.stringify(OK)}`);
    assert.equal(acks.length, CLIENTS);

    // and every one of them is in campaign:c1
    const evt = event('state_invalidated', { campaignId: 'c1', scope: 'campaign' });
    let delivered = 0;
    const allDelivered = new Promise((resolve) => {
      for (const socket of sockets) {
        socket.once('state_invalidated', (got) => {
          if (got?.metadata?.correlationId === evt.metadata.correlationId) delivered += 1;
          if (delivered === CLIENTS) resolve();
        });
      }
    });
    await h.publish(evt);
    let timer;
    await Promise.race([allDelivered, new Promise((resolve) => (timer = setTimeout(resolve, 15_000)))]);
    clearTimeout(timer);
    assert.equal(delivered, CLIENTS, 'clients that received the event published to campaign:c1');
  });
});
