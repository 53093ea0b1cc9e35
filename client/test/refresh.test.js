// In-band token refresh: with a token function the client sends a fresh token
// (`refresh_token`) before the current one expires, so herald (leeway 0 s
// here) never cuts the socket; with a string token herald cuts it at `exp`.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createHeraldClient, HeraldRefreshError, jwtExpiryMs } from '../dist/index.js';
import { cid, ev, FAST_RECONNECT, heraldSetup, publishRaw, recorder, signToken, sleep, waitUntil } from './helpers.js';

const TTL_S = 3;
describe('token refresh', () => {
  let setup;
  let herald;
  const clients = [];
  function client(opts) {
    const c = createHeraldClient({ url: herald.url, ...FAST_RECONNECT, ...opts });
    clients.push(c);
    return c;
  }
  /** Counts connects and disconnects (with their reasons) of a client's socket. */
  function watch(c) {
    const w = { connects: 0, disconnects: [] };
    c.socket.on('connect', () => (w.connects += 1));
    c.socket.on('disconnect', (reason) => w.disconnects.push(reason));
    return w;
  }

  before(async () => {
    setup = await heraldSetup();
    herald = await setup.start({ env: { HERALD_JWT_LEEWAY: '0s' } });
  });
  after(async () => {
    for (const c of clients) c.close();
    await setup.stopAll();
  });

  test('jwtExpiryMs reads exp without verifying, and tolerates garbage', () => {
    const t = signToken('whatever', 'alice', 60);
    const exp = JSON.parse(Buffer.from(t.split('.')[1], 'base64url').toString()).exp;
    assert.equal(jwtExpiryMs(t), exp * 1000);
    assert.equal(jwtExpiryMs(`Bearer ${t}`), exp * 1000);
    const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
    for (const garbage of [
      '',
      'not a jwt',
      'a.b',
      'a.b.c',
      'a.!!!.c',
      `x.${b64({ sub: 'alice' })}.y`,
      `x.${b64({ exp: 'soon' })}.y`,
      `x.${b64(null)}.y`,
      `x.${b64(42)}.y`,
      `x.${Buffer.from('{"exp":').toString('base64url')}.y`,
      `x.${b64({ exp: 1 })}.y.z`,
    ]) {
      assert.equal(jwtExpiryMs(garbage), undefined, JSON.stringify(garbage));
    }
  });

  test('a token function keeps the socket connected past several expiries, without a reconnect', async () => {
    const issued = [];
    const c = client({
      token: async () => {
        const t = signToken(setup.jwtSecret, 'alice', TTL_S);
        issued.push(t);
        return t;
      },
    });
    const w = watch(c);
    const errors = [];
    c.onError((e) => errors.push(e));
    const camp = recorder();
    await c.subscribeCampaign('c1', camp.handlers).ready;
    const firstExp = jwtExpiryMs(issued[0]);

    // Past the first token's exp (herald's leeway is 0 s): still the same socket.
    await sleep(Math.max(0, firstExp - Date.now()) + 500);
    const late = cid('after-first-exp');
    await publishRaw(herald, setup.publishToken, ev.invalidated('c1', late));
    await camp.waitFor(late, 'an event published after the first token expired');

    // Several more expiries.
    const until = firstExp + 2 * TTL_S * 1000 + 500;
    await sleep(Math.max(0, until - Date.now()));
    const later = cid('later');
    await publishRaw(herald, setup.publishToken, ev.invalidated('c1', later));
    await camp.waitFor(later);

    assert.equal(c.status, 'connected');
    assert.equal(w.connects, 1, 'no reconnect');
    assert.deepEqual(w.disconnects, []);
    assert.ok(issued.length >= 4, `the token function was called ${issued.length} times (once per refresh)`);
    assert.ok(jwtExpiryMs(issued.at(-1)) > Date.now(), 'the latest token is not expired');
    assert.deepEqual(errors, []);
    assert.deepEqual(camp.resyncs, []);
    assert.equal(camp.count(late), 1);
  });

  test('a refused refresh is reported and retried; herald cuts the socket at exp; the reconnect takes over', async () => {
    let mode = 'good';
    let calls = 0;
    const c = client({
      token: () => {
        calls += 1;
        // A token for another user: herald refuses it as a refresh.
        return signToken(setup.jwtSecret, mode === 'good' ? 'alice' : 'bob', TTL_S);
      },
    });
    const w = watch(c);
    const errors = [];
    c.onError((e) => errors.push(e));
    const camp = recorder();
    await c.subscribeCampaign('c1', camp.handlers).ready;
    mode = 'bad';
    c.socket.on('disconnect', () => (mode = 'good'));

    await waitUntil(() => w.disconnects.length === 1, 'herald cuts the connection at exp', (TTL_S + 2) * 1000);
    assert.deepEqual(w.disconnects, ['transport close']);
    assert.ok(errors.length >= 2, `refused refreshes reported (and retried): ${errors.length}`);
    for (const e of errors) {
      assert.ok(e instanceof HeraldRefreshError, String(e));
      assert.equal(e.message, 'refresh_token: Unauthorized');
    }
    assert.ok(calls >= 3);

    await waitUntil(() => w.connects === 2 && c.status === 'connected', 'reconnected with a token from the function');
    // No event was seen before the cut, so the re-subscribe has no `since`:
    // its ack is reported as a resync. Publishing before it would race it.
    await waitUntil(() => camp.resyncs.length === 1, 're-subscribed after the reconnect');
    assert.deepEqual(camp.resyncs, [{ kind: 'campaign', id: 'c1', reason: 'no-offset' }]);
    const after = cid('after-reconnect');
    await publishRaw(herald, setup.publishToken, ev.invalidated('c1', after));
    await camp.waitFor(after);
  });

  test('a string token is not refreshed: herald disconnects the socket at exp', async () => {
    const t = signToken(setup.jwtSecret, 'alice', 2);
    const c = client({ token: t });
    const w = watch(c);
    const errors = [];
    c.onError((e) => errors.push(e));
    const sent = [];
    c.socket.onAnyOutgoing((event) => sent.push(event));
    await c.subscribeCampaign('c1').ready;
    const exp = jwtExpiryMs(t);

    await waitUntil(() => w.disconnects.length === 1, 'herald cuts the connection at exp', 4000);
    assert.ok(Date.now() >= exp - 50, `disconnected ${exp - Date.now()} ms before exp`);
    assert.deepEqual(w.disconnects, ['transport close']);
    assert.ok(!sent.includes('refresh_token'));
    // The client tries again with the same, now expired, token: refused, offline.
    await waitUntil(() => c.status === 'offline', 'offline after the refused reconnect');
    assert.equal(errors.at(-1)?.message, 'Unauthorized');
  });
});
