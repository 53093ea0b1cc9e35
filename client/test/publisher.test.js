// herald-client/publisher against the real herald: typed publishes arrive at a
// client, batching sends one POST, a 400 carries the error path and is not
// retried, a 503 (herald's Redis down), a 504 (Redis paused: the outcome is
// unknown) and a network error are retried, each event with its own key, so
// that it is delivered once.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createHeraldClient } from '../dist/index.js';
import { createHeraldPublisher, errorPath, HeraldPublishError } from '../dist/publisher.js';
import { cid, heraldSetup, recorder, sleep, startProxy, startRedis, waitUntil } from './helpers.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** A fetch that records the status (or the network error) of every request. */
function countingFetch() {
  const calls = [];
  const f = async (url, init) => {
    try {
      const res = await fetch(url, init);
      calls.push({ status: res.status, body: JSON.parse(init.body) });
      return res;
    } catch (err) {
      calls.push({ status: 'network', body: JSON.parse(init.body) });
      throw err;
    }
  };
  f.calls = calls;
  return f;
}

describe('publisher', () => {
  let setup;
  const cleanup = [];
  before(async () => {
    setup = await heraldSetup();
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
    await setup.stopAll();
  });

  async function subscribedClient(herald, options = { reconnection: false }) {
    const c = createHeraldClient({ url: herald.url, token: setup.token('alice'), ...options });
    cleanup.push(() => c.close());
    const camp = recorder();
    await c.subscribeCampaign('c1', camp.handlers).ready;
    camp.client = c;
    return camp;
  }

  test('typed helpers, with metadata and batching, arrive at a client', async () => {
    const herald = await setup.start();
    const camp = await subscribedClient(herald);
    const f = countingFetch();
    const pub = createHeraldPublisher({ url: herald.url, token: setup.publishToken, batchWindowMs: 20, fetch: f });
    const ids = [cid('ent'), cid('inv'), cid('time'), cid('sett'), cid('struct')];
    const results = await Promise.all([
      pub.entityUpdated(
        { entityType: 'settlement', entityId: 's1', campaignId: 'c1', changedFields: ['name'] },
        { userId: 'u1', source: 'api', correlationId: ids[0] },
      ),
      pub.stateInvalidated({ campaignId: 'c1', scope: 'entity', entityIds: ['s1'] }, { correlationId: ids[1] }),
      pub.worldTimeChanged(
        { campaignId: 'c1', previousTime: null, newTime: '2026-11-25T17:00:00.000Z', elapsed: 3 },
        { correlationId: ids[2] },
        '2026-11-25T17:00:00.123+01:00',
      ),
      pub.settlementUpdated({ campaignId: 'c1', settlementId: 's1', operation: 'create' }, { correlationId: ids[3] }),
      pub.structureUpdated(
        { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'delete', changes: { hp: 0 } },
        { correlationId: ids[4] },
      ),
    ]);
    assert.deepEqual(results, Array(5).fill({ accepted: 5, duplicates: 0 }));
    assert.equal(f.calls.length, 1, 'one POST for the batch');
    assert.equal(f.calls[0].body.length, 5);
    const keys = f.calls[0].body.map((e) => e.idempotencyKey);
    assert.ok(keys.every((k) => UUID.test(k)) && new Set(keys).size === 5, `a key of its own per event: ${keys}`);
    await camp.waitFor(ids[4]);
    assert.deepEqual(camp.correlations(), ids);
    assert.deepEqual(
      camp.typed.map(([t]) => t),
      ['entity_updated', 'state_invalidated', 'world_time_changed', 'settlement_updated', 'structure_updated'],
    );
    const [first, , time, , last] = camp.events;
    assert.deepEqual(first.metadata, { userId: 'u1', source: 'api', correlationId: ids[0] });
    assert.deepEqual(first.payload, { entityType: 'settlement', entityId: 's1', campaignId: 'c1', changedFields: ['name'] });
    assert.equal(time.timestamp, '2026-11-25T17:00:00.123+01:00');
    assert.deepEqual(last.payload.changes, { hp: 0 });

    // Unbatched: one POST per call.
    const single = createHeraldPublisher({ url: herald.url, token: () => setup.publishToken });
    const one = cid('single');
    assert.deepEqual(
      await single.settlementUpdated({ campaignId: 'c1', settlementId: 's3', operation: 'update' }, { correlationId: one }),
      { accepted: 1, duplicates: 0 },
    );
    await camp.waitFor(one);

    // An event's own key is kept; sent again under it, it is not delivered again.
    const own = cid('own-key');
    const event = { type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign' }, metadata: { correlationId: own }, idempotencyKey: own };
    assert.deepEqual(await single.publish(event), { accepted: 1, duplicates: 0 });
    assert.deepEqual(await single.publish(event), { accepted: 1, duplicates: 1 });
    const after = cid('after-own-key');
    await single.stateInvalidated({ campaignId: 'c1', scope: 'campaign' }, { correlationId: after });
    await camp.waitFor(after);
    assert.equal(camp.count(own), 1, 'delivered once');
    // Without keys, nothing is added.
    const bare = createHeraldPublisher({ url: herald.url, token: setup.publishToken, idempotencyKeys: false, fetch: f });
    await bare.stateInvalidated({ campaignId: 'c1', scope: 'campaign' });
    assert.equal(f.calls.at(-1).body.idempotencyKey, undefined);
    await herald.stop();
  });

  test('a 400 carries the error path and is not retried; a 401 neither', async () => {
    const herald = await setup.start();
    const f = countingFetch();
    const pub = createHeraldPublisher({ url: herald.url, token: setup.publishToken, fetch: f, retryDelayMs: 1 });
    await assert.rejects(
      pub.settlementUpdated({ campaignId: 'c1', settlementId: 's1', operation: 'explode' }),
      (err) => {
        assert.ok(err instanceof HeraldPublishError);
        assert.equal(err.status, 400);
        assert.equal(err.path, 'payload.operation');
        assert.match(err.serverError, /^payload\.operation: /);
        assert.equal(err.attempts, 1);
        return true;
      },
    );
    assert.equal(f.calls.length, 1);

    await assert.rejects(
      pub.publish([
        { type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign' } },
        { type: 'settlement_updated', payload: { campaignId: 'c1', settlementId: 's1', operation: 'explode' } },
      ]),
      { status: 400, path: 'events[1].payload.operation' },
    );
    assert.equal(f.calls.length, 2);

    const batched = createHeraldPublisher({ url: herald.url, token: setup.publishToken, batchWindowMs: 10, fetch: f });
    const results = await Promise.allSettled([
      batched.stateInvalidated({ campaignId: 'c1', scope: 'campaign' }),
      batched.settlementUpdated({ campaignId: 'c1', settlementId: 's1', operation: 'explode' }),
    ]);
    assert.deepEqual(
      results.map((r) => [r.status, r.reason?.path]),
      [
        ['rejected', 'events[1].payload.operation'],
        ['rejected', 'events[1].payload.operation'],
      ],
      'a refused batch fails every event of it',
    );
    assert.equal(f.calls.length, 3);

    const wrong = createHeraldPublisher({ url: herald.url, token: 'wrong', fetch: f, retryDelayMs: 1 });
    await assert.rejects(wrong.stateInvalidated({ campaignId: 'c1', scope: 'campaign' }), { status: 401, attempts: 1 });
    assert.equal(f.calls.length, 4);

    assert.equal(errorPath('body: expected an object or an array'), 'body');
    assert.equal(errorPath('Idempotency-Key: given more than once'), 'Idempotency-Key');
    assert.equal(errorPath('Redis unavailable'), undefined);
    await herald.stop();
  });

  test('a 503 while Redis is down is retried until Redis is back', async () => {
    const redis = await startRedis();
    cleanup.push(() => redis.stop());
    const herald = await setup.start({ env: { HERALD_REDIS_URL: redis.url, HERALD_REDIS_TIMEOUT: '500ms' } });
    const camp = await subscribedClient(herald, { reconnectionDelay: 100, reconnectionDelayMax: 200 });
    const f = countingFetch();
    const pub = createHeraldPublisher({
      url: herald.url,
      token: setup.publishToken,
      fetch: f,
      retries: 30,
      retryDelayMs: 50,
      maxRetryDelayMs: 200,
    });
    const warm = cid('warm');
    await pub.stateInvalidated({ campaignId: 'c1', scope: 'campaign' }, { correlationId: warm });
    await camp.waitFor(warm);

    await redis.kill();
    const id = cid('retried');
    const published = pub.settlementUpdated({ campaignId: 'c1', settlementId: 's1', operation: 'update' }, { correlationId: id });
    await waitUntil(() => f.calls.filter((c) => c.status === 503).length >= 2, 'two 503 answers', 10_000);
    await redis.restart();
    assert.deepEqual(await published, { accepted: 1, duplicates: 0 });
    const statuses = f.calls.slice(1).map((c) => c.status);
    assert.equal(statuses.at(-1), 202);
    // A 504 when herald asked the dying Redis (the outcome unknown; Redis came back empty).
    assert.ok(statuses.slice(0, -1).every((s) => s === 503 || s === 504), `only 503s and 504s before the 202: ${statuses}`);
    // Redis came back empty, so herald cut the subscriber's connection
    // (it cannot know what the lost log held): the client came back by
    // itself, was told its offset is from the lost log (a resync), and gets
    // what is published from now on, once.
    await waitUntil(() => camp.resyncs.length === 1, 'the subscriber to come back and resync', 10_000);
    assert.deepEqual(camp.resyncs, [{ kind: 'campaign', id: 'c1', reason: 'not-recovered' }]);
    const next = cid('after-restart');
    assert.deepEqual(await pub.settlementUpdated({ campaignId: 'c1', settlementId: 's1', operation: 'update' }, { correlationId: next }), { accepted: 1, duplicates: 0 });
    await camp.waitFor(next, 'the event published after the restart', 10_000);
    assert.equal(camp.count(next), 1, 'delivered once');
    await herald.stop();
  });

  test('a publish whose outcome is unknown (504: Redis paused) is retried with its key and delivered once', async () => {
    const redis = await startRedis();
    cleanup.push(() => redis.stop());
    const herald = await setup.start({ env: { HERALD_REDIS_URL: redis.url, HERALD_REDIS_TIMEOUT: '500ms' } });
    const camp = await subscribedClient(herald, { reconnectionDelay: 100, reconnectionDelayMax: 200 });
    const f = countingFetch();
    const pub = createHeraldPublisher({ url: herald.url, token: setup.publishToken, fetch: f, retries: 60, retryDelayMs: 50, maxRetryDelayMs: 200 });
    const warm = cid('warm');
    await pub.stateInvalidated({ campaignId: 'c1', scope: 'campaign' }, { correlationId: warm });
    await camp.waitFor(warm);

    redis.pause();
    const id = cid('paused');
    const published = pub.settlementUpdated({ campaignId: 'c1', settlementId: 's1', operation: 'update' }, { correlationId: id });
    await waitUntil(() => f.calls.some((c) => c.status === 504), 'a 504', 10_000);
    await sleep(500);
    redis.resume();
    const result = await published;
    assert.equal(result.accepted, 1);
    const attempts = f.calls.slice(1);
    assert.equal(new Set(attempts.map((c) => c.body.idempotencyKey)).size, 1, 'every attempt carries the same key');
    const next = cid('after-pause');
    await pub.stateInvalidated({ campaignId: 'c1', scope: 'campaign' }, { correlationId: next });
    await camp.waitFor(next, 'the event published after the pause', 10_000);
    assert.equal(camp.count(id), 1, `delivered once (${attempts.map((c) => c.status)}; duplicates ${result.duplicates})`);
    // A pause loses nothing: the subscriber was not cut, and did not resync.
    assert.deepEqual(camp.resyncs, []);
    await herald.stop();
  });

  test('a network error is retried', async () => {
    const herald = await setup.start();
    const proxy = await startProxy(herald.port);
    cleanup.push(() => proxy.close());
    const f = countingFetch();
    const pub = createHeraldPublisher({ url: proxy.url, token: setup.publishToken, fetch: f, retries: 30, retryDelayMs: 20, maxRetryDelayMs: 100 });
    proxy.block();
    const published = pub.stateInvalidated({ campaignId: 'c1', scope: 'campaign' });
    await waitUntil(() => f.calls.length >= 2, 'two failed attempts');
    proxy.unblock();
    assert.deepEqual(await published, { accepted: 1, duplicates: 0 });
    assert.equal(f.calls.at(-1).status, 202);
    assert.ok(f.calls.slice(0, -1).every((c) => c.status === 'network'));
    const keys = new Set(f.calls.map((c) => c.body.idempotencyKey));
    assert.equal(keys.size, 1, 'every attempt carries the same key');
    assert.ok(UUID.test([...keys][0]));

    // Without retries left, the network error surfaces, with no status.
    proxy.block();
    const noRetry = createHeraldPublisher({ url: proxy.url, token: setup.publishToken, retries: 0 });
    await assert.rejects(noRetry.stateInvalidated({ campaignId: 'c1', scope: 'campaign' }), (err) => {
      assert.ok(err instanceof HeraldPublishError);
      assert.equal(err.status, undefined);
      return true;
    });
    proxy.unblock();
    await herald.stop();
  });
});
