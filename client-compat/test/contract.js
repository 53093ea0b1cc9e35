'use strict';
// The contract suite (shared/contract.md §1), run once per transport by
// websocket.test.js and polling.test.js. Each run starts its own herald.
// (Over 500 lines: the contract's 51 cases stay in one list, so that both
// transports run exactly the same ones.)

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const jwt = require('jsonwebtoken');

const {
  OK,
  UNAUTHORIZED,
  INVALID,
  startHerald,
  ack,
  inbox,
  withoutOffset,
  recordAll,
  quietPeriod,
  assertNothingArrives,
  unsignedToken,
  uniqueId,
  sleep,
} = require('./helpers');

const EVENT_TYPES = ['entity_updated', 'state_invalidated', 'world_time_changed', 'settlement_updated', 'structure_updated'];

/** The six client events and the field each one carries. */
const SUBSCRIPTION_EVENTS = [
  ['subscribe_campaign', 'campaignId'],
  ['subscribe_settlement', 'settlementId'],
  ['subscribe_structure', 'structureId'],
  ['unsubscribe_campaign', 'campaignId'],
  ['unsubscribe_settlement', 'settlementId'],
  ['unsubscribe_structure', 'structureId'],
];

const FIXED_TIMESTAMP = '2026-11-25T17:00:00.000Z';

/** A complete event object, tagged with a fresh correlation id. */
function event(type, payload, { timestamp = FIXED_TIMESTAMP, correlationId = uniqueId('corr') } = {}) {
  return { type, timestamp, payload, metadata: { userId: 'u1', source: 'api', correlationId } };
}

function defineContractSuite(transport) {
  describe(`herald contract over ${transport}`, () => {
    let h;

    before(async () => {
      h = await startHerald({ log: 'debug' });
    });
    after(async () => {
      if (h) await h.stop();
    });

    /** Connects `user` with its token in `auth` (or with `options`), closed when test `t` ends. */
    async function connect(t, userOrOptions = 'alice') {
      const options =
        typeof userOrOptions === 'string' ? { auth: { token: h.token(userOrOptions) } } : { ...userOrOptions };
      const socket = await h.connect({ transports: [transport], ...options });
      t.after(() => socket.close());
      return socket;
    }

    /** Connects `user` and subscribes it, asserting every ack is a success. */
    async function subscribed(t, user, subscriptions) {
      const socket = await connect(t, user);
      for (const [kind, id] of subscriptions) {
        const field = `${kind}Id`;
        assert.deepEqual(await ack(socket, `subscribe_${kind}`, { [field]: id }), OK, `${user} subscribe_${kind} ${id}`);
      }
      return socket;
    }

    function rejected(options) {
      for (const token of [options.auth?.token, options.query?.token]) if (typeof token === 'string') h.minted.push(token);
      return h.connectRejected({ transports: [transport], ...options });
    }

    describe('authentication', () => {
      it('accepts a token in auth', async (t) => {
        const socket = await connect(t, { auth: { token: h.token('alice') } });
        assert.equal(socket.connected, true);
      });

      it('accepts a token in the query (fallback for old clients)', async (t) => {
        const socket = await connect(t, { query: { token: h.token('alice') } });
        assert.equal(socket.connected, true);
      });

      it('accepts and strips a "Bearer " prefix in auth', async (t) => {
        const socket = await connect(t, { auth: { token: `Bearer ${h.token('alice')}` } });
        assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1' }), OK);
      });

      it('accepts and strips a "Bearer " prefix in the query', async (t) => {
        const socket = await connect(t, { query: { token: `Bearer ${h.token('alice')}` } });
        assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1' }), OK);
      });

      it('takes the user id from the sub claim', async (t) => {
        const alice = await connect(t, 'alice');
        const carol = await connect(t, 'carol');
        assert.deepEqual(await ack(alice, 'subscribe_campaign', { campaignId: 'c1' }), OK);
        assert.deepEqual(await ack(carol, 'subscribe_campaign', { campaignId: 'c1' }), UNAUTHORIZED);
        assert.deepEqual(await ack(carol, 'subscribe_campaign', { campaignId: 'c2' }), OK);
      });

      it('prefers the token in auth over the one in the query', async (t) => {
        const socket = await connect(t, { auth: { token: h.token('alice') }, query: { token: h.token('carol') } });
        assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1' }), OK);
        assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c2' }), UNAUTHORIZED);
      });

      describe('refuses the handshake with connect_error "Unauthorized"', () => {
        const now = () => Math.floor(Date.now() / 1000);
        const cases = [
          ['when no token is given', () => ({})],
          ['when the token in auth is empty', () => ({ auth: { token: '' } })],
          ['when the token is not a string', () => ({ auth: { token: 12345 } })],
          ['when the token is garbage', () => ({ auth: { token: `garbage${crypto.randomBytes(12).toString('hex')}` } })],
          ['when the token is three garbage segments', () => ({ auth: { token: 'eyJhbGciOiJIUzI1NiJ9.bm90anNvbg.c2ln' } })],
          ['when the token is only "Bearer "', () => ({ auth: { token: 'Bearer ' } })],
          ['when the token has expired', () => ({ auth: { token: h.token('alice', { expiresIn: -3600 }) } })],
          ['when the expired token is in the query', () => ({ query: { token: h.token('alice', { expiresIn: -3600 }) } })],
          ['when the garbage token is in the query', () => ({ query: { token: 'garbage-in-the-query' } })],
          [
            'when the signature was made with another secret',
            () => ({ auth: { token: h.token('alice', { secret: crypto.randomBytes(32).toString('hex') }) } }),
          ],
          ['when the token uses alg none', () => ({ auth: { token: unsignedToken({ sub: 'alice', exp: now() + 3600 }) } })],
          [
            'when the token uses alg none with a signature attached',
            () => {
              const good = h.token('alice').split('.');
              return { auth: { token: `${unsignedToken({ sub: 'alice', exp: now() + 3600 })}${good[2]}` } };
            },
          ],
          ['when the token is HS384 with the same secret', () => ({ auth: { token: h.token('alice', { algorithm: 'HS384' }) } })],
          ['when the token is HS512 with the same secret', () => ({ auth: { token: h.token('alice', { algorithm: 'HS512' }) } })],
          [
            'when the token is RS256',
            () => {
              const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
              const token = jwt.sign({ sub: 'alice', exp: now() + 3600 }, privateKey, { algorithm: 'RS256' });
              h.minted.push(token);
              return { auth: { token } };
            },
          ],
          ['when the token has no exp', () => ({ auth: { token: h.token('alice', { claims: { exp: undefined } }) } })],
          ['when the token has no sub', () => ({ auth: { token: h.token('alice', { claims: { sub: undefined } }) } })],
          ['when sub is an empty string', () => ({ auth: { token: h.token('') } })],
          ['when sub is not a string', () => ({ auth: { token: h.token(42) } })],
          [
            'when the payload was altered after signing',
            () => {
              const [header, , signature] = h.token('carol').split('.');
              const payload = Buffer.from(JSON.stringify({ sub: 'alice', exp: now() + 3600 })).toString('base64url');
              return { auth: { token: `${header}.${payload}.${signature}` } };
            },
          ],
        ];
        for (const [name, options] of cases) {
          it(name, async () => {
            const err = await rejected(options());
            assert.equal(err.message, 'Unauthorized');
          });
        }
      });

      it('keeps serving an already-connected client while handshakes are refused', async (t) => {
        const alice = await subscribed(t, 'alice', [['campaign', 'c1']]);
        const events = inbox(alice, 'state_invalidated');
        const refusals = await Promise.all([
          rejected({}),
          rejected({ auth: { token: 'garbage' } }),
          rejected({ auth: { token: h.token('alice', { expiresIn: -3600 }) } }),
          rejected({ auth: { token: h.token('alice', { algorithm: 'HS512' }) } }),
          rejected({ auth: { token: unsignedToken({ sub: 'alice', exp: Math.floor(Date.now() / 1000) + 60 }) } }),
        ]);
        for (const err of refusals) assert.equal(err.message, 'Unauthorized');
        assert.equal(alice.connected, true);
        assert.deepEqual(await ack(alice, 'subscribe_settlement', { settlementId: 's1' }), OK);
        const evt = event('state_invalidated', { campaignId: 'c1', scope: 'campaign' });
        await h.publish(evt);
        assert.deepEqual(await events.next(evt.metadata.correlationId), evt);
      });
    });

    describe('subscribe and unsubscribe acks', () => {
      it('lets members subscribe to their campaign, its settlements and their structures', async (t) => {
        const alice = await connect(t, 'alice');
        const bob = await connect(t, 'bob');
        const carol = await connect(t, 'carol');
        const answers = {
          'alice campaign c1': await ack(alice, 'subscribe_campaign', { campaignId: 'c1' }),
          'alice settlement s1': await ack(alice, 'subscribe_settlement', { settlementId: 's1' }),
          'alice settlement s3': await ack(alice, 'subscribe_settlement', { settlementId: 's3' }),
          'alice structure st1': await ack(alice, 'subscribe_structure', { structureId: 'st1' }),
          'alice structure st3': await ack(alice, 'subscribe_structure', { structureId: 'st3' }),
          'bob campaign c1': await ack(bob, 'subscribe_campaign', { campaignId: 'c1' }),
          'bob structure st1': await ack(bob, 'subscribe_structure', { structureId: 'st1' }),
          'carol campaign c2': await ack(carol, 'subscribe_campaign', { campaignId: 'c2' }),
          'carol settlement s2': await ack(carol, 'subscribe_settlement', { settlementId: 's2' }),
          'carol structure st2': await ack(carol, 'subscribe_structure', { structureId: 'st2' }),
        };
        for (const [what, answer] of Object.entries(answers)) assert.deepEqual(answer, OK, what);
      });

      it('acks a repeated subscription with success again', async (t) => {
        const alice = await connect(t, 'alice');
        assert.deepEqual(await ack(alice, 'subscribe_campaign', { campaignId: 'c1' }), OK);
        assert.deepEqual(await ack(alice, 'subscribe_campaign', { campaignId: 'c1' }), OK);
      });

      it('answers Unauthorized to a non-member, for the campaign and for what lies under it', async (t) => {
        const carol = await connect(t, 'carol');
        const alice = await connect(t, 'alice');
        const answers = {
          'carol campaign c1': await ack(carol, 'subscribe_campaign', { campaignId: 'c1' }),
          'carol settlement s1': await ack(carol, 'subscribe_settlement', { settlementId: 's1' }),
          'carol settlement s3': await ack(carol, 'subscribe_settlement', { settlementId: 's3' }),
          'carol structure st1': await ack(carol, 'subscribe_structure', { structureId: 'st1' }),
          'carol structure st3': await ack(carol, 'subscribe_structure', { structureId: 'st3' }),
          'alice campaign c2': await ack(alice, 'subscribe_campaign', { campaignId: 'c2' }),
          'alice settlement s2': await ack(alice, 'subscribe_settlement', { settlementId: 's2' }),
          'alice structure st2': await ack(alice, 'subscribe_structure', { structureId: 'st2' }),
        };
        for (const [what, answer] of Object.entries(answers)) assert.deepEqual(answer, UNAUTHORIZED, what);
      });

      it('answers Unauthorized, the same as for a non-member, to ids that do not exist', async (t) => {
        const alice = await connect(t, 'alice');
        const answers = {
          'campaign c404': await ack(alice, 'subscribe_campaign', { campaignId: 'c404' }),
          'campaign C1 (ids are case-sensitive)': await ack(alice, 'subscribe_campaign', { campaignId: 'C1' }),
          'settlement s404': await ack(alice, 'subscribe_settlement', { settlementId: 's404' }),
          'settlement c1 (a campaign id)': await ack(alice, 'subscribe_settlement', { settlementId: 'c1' }),
          'structure st404': await ack(alice, 'subscribe_structure', { structureId: 'st404' }),
          'structure s1 (a settlement id)': await ack(alice, 'subscribe_structure', { structureId: 's1' }),
          'campaign of 128 characters': await ack(alice, 'subscribe_campaign', { campaignId: 'a'.repeat(128) }),
          'campaign a_b-C9': await ack(alice, 'subscribe_campaign', { campaignId: 'a_b-C9' }),
        };
        for (const [what, answer] of Object.entries(answers)) assert.deepEqual(answer, UNAUTHORIZED, what);
      });

      it('answers success to every well-formed unsubscribe, idempotently, member or not, known id or not', async (t) => {
        const alice = await connect(t, 'alice');
        const carol = await connect(t, 'carol');
        assert.deepEqual(await ack(alice, 'subscribe_campaign', { campaignId: 'c1' }), OK);
        const calls = [
          [alice, 'unsubscribe_campaign', { campaignId: 'c1' }],
          [alice, 'unsubscribe_campaign', { campaignId: 'c1' }],
          [alice, 'unsubscribe_campaign', { campaignId: 'c2' }],
          [alice, 'unsubscribe_campaign', { campaignId: 'c404' }],
          [alice, 'unsubscribe_campaign', { campaignId: 'a'.repeat(128) }],
          [alice, 'unsubscribe_settlement', { settlementId: 's1' }],
          [alice, 'unsubscribe_settlement', { settlementId: 's1' }],
          [alice, 'unsubscribe_settlement', { settlementId: 's404' }],
          [alice, 'unsubscribe_structure', { structureId: 'st1' }],
          [alice, 'unsubscribe_structure', { structureId: 'st404' }],
          [carol, 'unsubscribe_campaign', { campaignId: 'c1' }],
          [carol, 'unsubscribe_settlement', { settlementId: 's1' }],
          [carol, 'unsubscribe_structure', { structureId: 'st1' }],
        ];
        for (const [socket, name, payload] of calls) {
          assert.deepEqual(await ack(socket, name, payload), OK, `${name} ${JSON.stringify(payload)}`);
        }
      });

      for (const [name, field] of SUBSCRIPTION_EVENTS) {
        it(`answers Invalid payload to malformed ${name} payloads`, async (t) => {
          const socket = await connect(t, 'alice');
          const malformed = [
            ['no argument at all', []],
            ['a string', ['c1']],
            ['a number', [42]],
            ['null', [null]],
            ['true', [true]],
            ['an array', [[{ [field]: 'c1' }]]],
            ['an empty object', [{}]],
            ['the id under another name', [{ id: 'c1' }]],
            ['a number id', [{ [field]: 1 }]],
            ['a null id', [{ [field]: null }]],
            ['a boolean id', [{ [field]: true }]],
            ['an array id', [{ [field]: ['c1'] }]],
            ['an object id', [{ [field]: { id: 'c1' } }]],
            ['an empty id', [{ [field]: '' }]],
            ['"../x"', [{ [field]: '../x' }]],
            ['129 characters', [{ [field]: 'a'.repeat(129) }]],
            ['an id with ":"', [{ [field]: 'c1:x' }]],
            ['a room name as id', [{ [field]: 'campaign:c1' }]],
            ['an id with a space', [{ [field]: 'c 1' }]],
            ['an id with a slash', [{ [field]: 'c1/x' }]],
            ['an id with a trailing newline', [{ [field]: 'c1\n' }]],
            ['a non-ASCII id', [{ [field]: 'cé' }]],
            ['an id with "*"', [{ [field]: '*' }]],
          ];
          const observed = [];
          for (const [what, args] of malformed) observed.push([what, await ack(socket, name, ...args)]);
          assert.deepEqual(
            observed,
            malformed.map(([what]) => [what, INVALID]),
          );
          assert.equal(socket.connected, true);
        });
      }
    });

    describe('delivery of server events', () => {
      // Sockets and their subscriptions; every event below is checked against all of them.
      const SUBSCRIBERS = {
        aliceCampaignC1: ['alice', [['campaign', 'c1']]],
        aliceSettlementS1: ['alice', [['settlement', 's1']]],
        aliceSettlementS3: ['alice', [['settlement', 's3']]],
        aliceStructureSt1: ['alice', [['structure', 'st1']]],
        aliceStructureSt3: ['alice', [['structure', 'st3']]],
        aliceNothing: ['alice', []],
        bobC1S1St1: ['bob', [['campaign', 'c1'], ['settlement', 's1'], ['structure', 'st1']]],
        carolC2S2St2: ['carol', [['campaign', 'c2'], ['settlement', 's2'], ['structure', 'st2']]],
        carolTriedC1: ['carol', []], // tries c1, s1 and st1 below and is refused
      };
      const sockets = {};
      const inboxes = {};

      before(async () => {
        const fakeT = { after: () => {} };
        for (const [name, [user, subs]] of Object.entries(SUBSCRIBERS)) {
          sockets[name] = await subscribed(fakeT, user, subs);
          inboxes[name] = Object.fromEntries(EVENT_TYPES.map((type) => [type, inbox(sockets[name], type)]));
        }
        const carol = sockets.carolTriedC1;
        assert.deepEqual(await ack(carol, 'subscribe_campaign', { campaignId: 'c1' }), UNAUTHORIZED);
        assert.deepEqual(await ack(carol, 'subscribe_settlement', { settlementId: 's1' }), UNAUTHORIZED);
        assert.deepEqual(await ack(carol, 'subscribe_structure', { structureId: 'st1' }), UNAUTHORIZED);
      });
      after(() => {
        for (const socket of Object.values(sockets)) socket.close();
      });

      /** How many copies of the event with this correlation id each socket got, of any type. */
      function copiesPerSocket(correlationId) {
        return Object.fromEntries(
          Object.entries(inboxes).map(([name, byType]) => [
            name,
            EVENT_TYPES.reduce((n, type) => n + byType[type].matching(correlationId).length, 0),
          ]),
        );
      }

      /** Publishes `evt` and asserts exactly one copy reaches each socket in `to` and none reaches the others. */
      async function assertDeliveredTo(evt, to) {
        await h.publish(evt);
        const id = evt.metadata.correlationId;
        await Promise.allSettled(to.map((name) => inboxes[name][evt.type].waitFor(id)));
        await quietPeriod();
        const expected = Object.fromEntries(Object.keys(SUBSCRIBERS).map((name) => [name, to.includes(name) ? 1 : 0]));
        assert.deepEqual(copiesPerSocket(id), expected);
        for (const name of to) {
          const [args] = inboxes[name][evt.type].matching(id);
          assert.equal(args.length, 1, `${name} got ${args.length} arguments`);
          assert.deepEqual(args[0], evt, `${name} got a different event object`);
        }
      }

      const C1_ALL = ['bobC1S1St1'];
      const cases = [
        [
          'entity_updated for a campaign entity reaches campaign:<campaignId> only',
          event('entity_updated', { entityType: 'campaign', entityId: 'c1', campaignId: 'c1', changedFields: ['name'] }),
          ['aliceCampaignC1', ...C1_ALL],
        ],
        [
          'entity_updated for a settlement also reaches settlement:<entityId>',
          event('entity_updated', {
            entityType: 'settlement',
            entityId: 's1',
            campaignId: 'c1',
            changedFields: ['population'],
            entityData: { population: 120, name: 'Oakvale' },
          }),
          ['aliceCampaignC1', 'aliceSettlementS1', ...C1_ALL],
        ],
        [
          'entity_updated for a structure also reaches structure:<entityId>',
          event('entity_updated', { entityType: 'structure', entityId: 'st1', campaignId: 'c1' }),
          ['aliceCampaignC1', 'aliceStructureSt1', ...C1_ALL],
        ],
        [
          'entity_updated for another entity kind reaches the campaign only, even if its id names a settlement',
          event('entity_updated', { entityType: 'character', entityId: 's1', campaignId: 'c1' }),
          ['aliceCampaignC1', ...C1_ALL],
        ],
        [
          'entity_updated for another entity kind reaches the campaign only, even if its id names a structure',
          event('entity_updated', { entityType: 'npc', entityId: 'st1', campaignId: 'c1', entityData: { mood: 'grim' } }),
          ['aliceCampaignC1', ...C1_ALL],
        ],
        [
          'state_invalidated (scope campaign) reaches campaign:<campaignId>',
          event('state_invalidated', { campaignId: 'c1', scope: 'campaign' }),
          ['aliceCampaignC1', ...C1_ALL],
        ],
        [
          'state_invalidated (scope entity) reaches campaign:<campaignId>',
          event('state_invalidated', { campaignId: 'c1', scope: 'entity', entityIds: ['s1', 'st1'], reason: 'bulk import' }),
          ['aliceCampaignC1', ...C1_ALL],
        ],
        [
          'world_time_changed reaches campaign:<campaignId>',
          event('world_time_changed', {
            campaignId: 'c1',
            previousTime: '1492-03-01T00:00:00.000Z',
            newTime: '1492-03-02T06:00:00.000Z',
            elapsed: 108000,
          }),
          ['aliceCampaignC1', ...C1_ALL],
        ],
        [
          'world_time_changed with a null previousTime reaches campaign:<campaignId>',
          event('world_time_changed', { campaignId: 'c1', previousTime: null, newTime: '1492-03-02T06:00:00Z' }),
          ['aliceCampaignC1', ...C1_ALL],
        ],
        [
          'settlement_updated reaches campaign:<campaignId> and settlement:<settlementId>',
          event('settlement_updated', { campaignId: 'c1', settlementId: 's1', operation: 'update', changes: { name: 'Oakvale' } }),
          ['aliceCampaignC1', 'aliceSettlementS1', ...C1_ALL],
        ],
        [
          'settlement_updated for another settlement does not reach settlement:s1',
          event('settlement_updated', { campaignId: 'c1', settlementId: 's3', operation: 'create' }),
          ['aliceCampaignC1', 'aliceSettlementS3', ...C1_ALL],
        ],
        [
          'structure_updated reaches campaign:, settlement: and structure: rooms',
          event('structure_updated', {
            campaignId: 'c1',
            settlementId: 's1',
            structureId: 'st1',
            operation: 'delete',
          }),
          ['aliceCampaignC1', 'aliceSettlementS1', 'aliceStructureSt1', ...C1_ALL],
        ],
        [
          'structure_updated for another structure does not reach structure:st1',
          event('structure_updated', {
            campaignId: 'c1',
            settlementId: 's1',
            structureId: 'st3',
            operation: 'update',
            changes: { level: 2 },
          }),
          ['aliceCampaignC1', 'aliceSettlementS1', 'aliceStructureSt3', ...C1_ALL],
        ],
        [
          'settlement_updated in c2 reaches carol once and no member of c1',
          event('settlement_updated', { campaignId: 'c2', settlementId: 's2', operation: 'update' }),
          ['carolC2S2St2'],
        ],
        [
          'structure_updated in c2 reaches carol once (she is in all three rooms)',
          event('structure_updated', { campaignId: 'c2', settlementId: 's2', structureId: 'st2', operation: 'create' }),
          ['carolC2S2St2'],
        ],
        [
          'entity_updated for structure st2 reaches carol once',
          event('entity_updated', { entityType: 'structure', entityId: 'st2', campaignId: 'c2' }),
          ['carolC2S2St2'],
        ],
        [
          'an event for a campaign nobody follows reaches nobody',
          event('state_invalidated', { campaignId: 'c404', scope: 'campaign' }),
          [],
        ],
      ];
      for (const [name, evt, to] of cases) {
        it(name, () => assertDeliveredTo(evt, to));
      }

      it('delivers one copy to a socket subscribed to campaign c1 and settlement s1', async (t) => {
        const socket = await subscribed(t, 'alice', [['campaign', 'c1'], ['settlement', 's1']]);
        const updates = inbox(socket, 'settlement_updated');
        const evt = event('settlement_updated', { campaignId: 'c1', settlementId: 's1', operation: 'update' });
        await h.publish(evt);
        await updates.waitFor(evt.metadata.correlationId);
        await quietPeriod();
        assert.equal(updates.matching(evt.metadata.correlationId).length, 1);
      });

      it('delivers one copy to a socket that subscribed twice to the same campaign', async (t) => {
        const socket = await subscribed(t, 'alice', [['campaign', 'c1'], ['campaign', 'c1']]);
        const updates = inbox(socket, 'state_invalidated');
        const evt = event('state_invalidated', { campaignId: 'c1', scope: 'campaign' });
        await h.publish(evt);
        await updates.waitFor(evt.metadata.correlationId);
        await quietPeriod();
        assert.equal(updates.matching(evt.metadata.correlationId).length, 1);
      });

      it('passes a given timestamp through character for character', async (t) => {
        const socket = await subscribed(t, 'alice', [['campaign', 'c1']]);
        const updates = inbox(socket, 'state_invalidated');
        const stamps = [
          '2026-11-25T17:00:00.000Z',
          '2026-11-25T17:00:00Z',
          '2026-11-25T18:00:00.123456+01:00',
          '2026-11-25T17:00:00.1Z',
          '1999-12-31T23:59:59.999999999-08:00',
        ];
        const published = stamps.map((timestamp) => event('state_invalidated', { campaignId: 'c1', scope: 'campaign' }, { timestamp }));
        for (const evt of published) await h.publish(evt);
        const got = [];
        for (const evt of published) got.push((await updates.next(evt.metadata.correlationId)).timestamp);
        assert.deepEqual(got, stamps);
      });

      it('stamps an event published without a timestamp', async (t) => {
        const socket = await subscribed(t, 'alice', [['campaign', 'c1']]);
        const updates = inbox(socket, 'world_time_changed');
        const evt = event('world_time_changed', { campaignId: 'c1', previousTime: null, newTime: '1492-01-01T00:00:00Z' });
        delete evt.timestamp;
        const publishedAt = Date.now();
        await h.publish(evt);
        const got = await updates.next(evt.metadata.correlationId);
        assert.equal(typeof got.timestamp, 'string');
        const stamped = Date.parse(got.timestamp);
        assert.ok(Number.isFinite(stamped), `timestamp ${got.timestamp} is not a date`);
        assert.ok(Math.abs(stamped - publishedAt) < 60_000, `timestamp ${got.timestamp} is not close to now`);
        const { timestamp, ...rest } = got;
        assert.deepEqual(rest, evt);
      });

      it('passes unknown payload fields through unchanged', async (t) => {
        const socket = await subscribed(t, 'alice', [['campaign', 'c1']]);
        const updates = inbox(socket, 'settlement_updated');
        const evt = event('settlement_updated', {
          campaignId: 'c1',
          settlementId: 's1',
          operation: 'update',
          futureField: { nested: [1, 'two', null, { deep: true }], big: 12345678901, ratio: 0.125 },
          anotherNewField: 'x',
          emptyList: [],
        });
        await h.publish(evt);
        assert.deepEqual(await updates.next(evt.metadata.correlationId), evt);
      });

      it('leaves optional fields that were left out absent, not null', async (t) => {
        const socket = await subscribed(t, 'alice', [['campaign', 'c1']]);
        const structures = inbox(socket, 'structure_updated');
        const entities = inbox(socket, 'entity_updated');
        const structureEvt = {
          type: 'structure_updated',
          timestamp: FIXED_TIMESTAMP,
          payload: { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'update' },
          metadata: { correlationId: uniqueId('corr') },
        };
        const entityEvt = {
          type: 'entity_updated',
          timestamp: FIXED_TIMESTAMP,
          payload: { entityType: 'campaign', entityId: 'c1', campaignId: 'c1' },
          metadata: { correlationId: uniqueId('corr') },
        };
        await h.publish([structureEvt, entityEvt]);
        assert.deepEqual(await structures.next(structureEvt.metadata.correlationId), structureEvt);
        assert.deepEqual(await entities.next(entityEvt.metadata.correlationId), entityEvt);
      });

      it('leaves metadata absent when it was not given', async (t) => {
        const socket = await subscribed(t, 'alice', [['campaign', 'c1']]);
        const seen = [];
        socket.on('state_invalidated', (...args) => seen.push(args.map(withoutOffset)));
        const reason = uniqueId('reason');
        const evt = { type: 'state_invalidated', timestamp: FIXED_TIMESTAMP, payload: { campaignId: 'c1', scope: 'campaign', reason } };
        await h.publish(evt);
        const deadline = Date.now() + 3000;
        while (!seen.some(([e]) => e?.payload?.reason === reason) && Date.now() < deadline) await sleep(20);
        const mine = seen.filter(([e]) => e?.payload?.reason === reason);
        assert.equal(mine.length, 1, 'the event did not arrive');
        assert.deepEqual(mine[0], [evt]);
      });

      it('delivers every event of a batch, in order', async (t) => {
        const socket = await subscribed(t, 'bob', [['campaign', 'c1']]);
        const seen = recordAll(socket);
        const batch = [
          event('state_invalidated', { campaignId: 'c1', scope: 'campaign' }),
          event('world_time_changed', { campaignId: 'c1', previousTime: null, newTime: '1492-01-01T00:00:00Z' }),
          event('settlement_updated', { campaignId: 'c1', settlementId: 's1', operation: 'create' }),
          event('structure_updated', { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'create' }),
          event('entity_updated', { entityType: 'campaign', entityId: 'c1', campaignId: 'c1' }),
        ];
        await h.publish(batch);
        const deadline = Date.now() + 3000;
        while (seen.length < batch.length && Date.now() < deadline) await sleep(20);
        await quietPeriod();
        assert.deepEqual(
          seen.map(({ name, args }) => [name, args]),
          batch.map((evt) => [evt.type, [evt]]),
        );
        const offsets = seen.map(({ offset }) => offset);
        assert.deepEqual([...offsets].sort(), offsets, 'offsets increase in delivery order');
        assert.equal(new Set(offsets).size, offsets.length, 'offsets are unique');
      });

      it('delivers nothing after unsubscribe from a campaign, a settlement or a structure', async (t) => {
        const campaign = await subscribed(t, 'alice', [['campaign', 'c1']]);
        const settlement = await subscribed(t, 'alice', [['settlement', 's1']]);
        const structure = await subscribed(t, 'alice', [['structure', 'st1']]);
        const sockets = [campaign, settlement, structure];
        const seenBefore = sockets.map((s) => inbox(s, 'structure_updated'));
        const first = event('structure_updated', { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'update' });
        await h.publish(first);
        for (const box of seenBefore) await box.waitFor(first.metadata.correlationId);

        assert.deepEqual(await ack(campaign, 'unsubscribe_campaign', { campaignId: 'c1' }), OK);
        assert.deepEqual(await ack(settlement, 'unsubscribe_settlement', { settlementId: 's1' }), OK);
        assert.deepEqual(await ack(structure, 'unsubscribe_structure', { structureId: 'st1' }), OK);
        const after = sockets.map((s) => recordAll(s));
        await h.publish([
          event('structure_updated', { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'update' }),
          event('settlement_updated', { campaignId: 'c1', settlementId: 's1', operation: 'update' }),
          event('entity_updated', { entityType: 'structure', entityId: 'st1', campaignId: 'c1' }),
          event('state_invalidated', { campaignId: 'c1', scope: 'campaign' }),
        ]);
        await quietPeriod();
        assert.deepEqual(
          after.map((seen) => seen.map(({ name }) => name)),
          [[], [], []],
          'events after unsubscribe (campaign, settlement, structure socket)',
        );
      });

      it('keeps the other subscriptions of a socket after one unsubscribe', async (t) => {
        const socket = await subscribed(t, 'alice', [['campaign', 'c1'], ['settlement', 's1']]);
        assert.deepEqual(await ack(socket, 'unsubscribe_campaign', { campaignId: 'c1' }), OK);
        const updates = inbox(socket, 'settlement_updated');
        const campaignOnly = inbox(socket, 'state_invalidated');
        const evt = event('settlement_updated', { campaignId: 'c1', settlementId: 's1', operation: 'update' });
        await h.publish([event('state_invalidated', { campaignId: 'c1', scope: 'campaign' }), evt]);
        assert.deepEqual(await updates.next(evt.metadata.correlationId), evt);
        await assertNothingArrives(campaignOnly.calls, undefined, 'state_invalidated');
      });

      it('delivers nothing to a non-member who tried to subscribe', async (t) => {
        const carol = await connect(t, 'carol');
        assert.deepEqual(await ack(carol, 'subscribe_campaign', { campaignId: 'c1' }), UNAUTHORIZED);
        assert.deepEqual(await ack(carol, 'subscribe_settlement', { settlementId: 's1' }), UNAUTHORIZED);
        assert.deepEqual(await ack(carol, 'subscribe_structure', { structureId: 'st1' }), UNAUTHORIZED);
        const seen = recordAll(carol);
        await h.publish(event('structure_updated', { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'update' }));
        await assertNothingArrives(seen);
      });
    });

    describe('robustness', () => {
      it('handles a subscribe sent without an ack callback, silently, and it takes effect', async (t) => {
        const alice = await connect(t, 'alice');
        const seen = recordAll(alice);
        alice.emit('subscribe_campaign', { campaignId: 'c1' });
        // a later acked round trip, then a little slack for handlers that run concurrently
        assert.deepEqual(await ack(alice, 'subscribe_settlement', { settlementId: 's3' }), OK);
        await sleep(150);
        const evt = event('state_invalidated', { campaignId: 'c1', scope: 'campaign' });
        await h.publish(evt);
        const deadline = Date.now() + 3000;
        while (seen.length === 0 && Date.now() < deadline) await sleep(20);
        await quietPeriod();
        assert.deepEqual(seen, [{ name: 'state_invalidated', args: [evt] }]);
      });

      it('handles an unsubscribe sent without an ack callback, silently, and it takes effect', async (t) => {
        const alice = await subscribed(t, 'alice', [['campaign', 'c1']]);
        alice.emit('unsubscribe_campaign', { campaignId: 'c1' });
        assert.deepEqual(await ack(alice, 'unsubscribe_settlement', { settlementId: 's3' }), OK);
        await sleep(150);
        const seen = recordAll(alice);
        await h.publish(event('state_invalidated', { campaignId: 'c1', scope: 'campaign' }));
        await assertNothingArrives(seen);
      });

      it('ignores refused and malformed requests sent without an ack callback and keeps the socket working', async (t) => {
        const carol = await connect(t, 'carol');
        const seen = recordAll(carol);
        carol.emit('subscribe_campaign', { campaignId: 'c1' });
        carol.emit('subscribe_settlement', { settlementId: 's1' });
        carol.emit('subscribe_structure', { structureId: 'st404' });
        carol.emit('subscribe_campaign', 'c1');
        carol.emit('subscribe_campaign');
        carol.emit('subscribe_campaign', { campaignId: '../x' });
        carol.emit('unsubscribe_structure', null);
        carol.emit('unsubscribe_settlement', { settlementId: 'a'.repeat(129) });
        assert.deepEqual(await ack(carol, 'subscribe_campaign', { campaignId: 'c2' }), OK);
        await sleep(150);
        await h.publish(event('structure_updated', { campaignId: 'c1', settlementId: 's1', structureId: 'st1', operation: 'update' }));
        const evt = event('state_invalidated', { campaignId: 'c2', scope: 'campaign' });
        await h.publish(evt);
        const deadline = Date.now() + 3000;
        while (seen.length === 0 && Date.now() < deadline) await sleep(20);
        await quietPeriod();
        assert.deepEqual(seen, [{ name: 'state_invalidated', args: [evt] }]);
        assert.equal(carol.connected, true);
      });

      it('survives unknown event names', async (t) => {
        const alice = await connect(t, 'alice');
        let disconnected = null;
        alice.on('disconnect', (reason) => {
          disconnected = reason;
        });
        alice.emit('no_such_event');
        alice.emit('no_such_event', { campaignId: 'c1' });
        alice.emit('subscribe', { campaignId: 'c1' });
        alice.emit('no_such_event_with_ack', { x: 1 }, () => {});
        alice.emit('no_such_event', 'a', 2, { three: [3] }, Buffer.from([1, 2, 3]));
        assert.deepEqual(await ack(alice, 'subscribe_campaign', { campaignId: 'c1' }), OK);
        const updates = inbox(alice, 'state_invalidated');
        const evt = event('state_invalidated', { campaignId: 'c1', scope: 'campaign' });
        await h.publish(evt);
        assert.deepEqual(await updates.next(evt.metadata.correlationId), evt);
        assert.equal(disconnected, null);
        assert.equal(alice.connected, true);
      });

      it('keeps serving other clients after a client disconnects abruptly', async (t) => {
        const leaver = await subscribed(t, 'bob', [['campaign', 'c1'], ['settlement', 's1']]);
        leaver.io.engine.close();
        const alice = await subscribed(t, 'alice', [['campaign', 'c1']]);
        const updates = inbox(alice, 'settlement_updated');
        const evt = event('settlement_updated', { campaignId: 'c1', settlementId: 's1', operation: 'update' });
        await h.publish(evt);
        assert.deepEqual(await updates.next(evt.metadata.correlationId), evt);
      });
    });

    it('never writes any 8 characters of a client token, the JWT secret or the publish token to its debug logs', async () => {
      const logs = h.output;
      assert.ok(logs.length > 0, 'herald wrote no logs at all at level debug');
      // Every 8-character window of every secret (a JWT's header is public,
      // the same for every token: its payload and signature count).
      const windows = new Map();
      const secrets = [
        ...h.minted.map((token) => ['a client token', token]),
        ['the JWT secret', h.jwtSecret],
        ['the publish token', h.publishToken],
      ];
      for (const [what, secret] of secrets) {
        const segments = String(secret).split('.');
        for (const segment of segments.length === 3 ? segments.slice(1) : segments) {
          for (let i = 0; i + 8 <= segment.length; i += 1) windows.set(segment.slice(i, i + 8), what);
        }
      }
      assert.ok(windows.size > 1000, `${windows.size} windows checked`);
      const leaks = [];
      for (const line of logs.split('\n')) {
        for (let i = 0; i + 8 <= line.length && leaks.length < 5; i += 1) {
          const what = windows.get(line.slice(i, i + 8));
          if (what) leaks.push(`8 characters of ${what} in: ${line.slice(0, 300)}`);
        }
      }
      assert.deepEqual(leaks, []);
    });
  });
}

module.exports = { defineContractSuite, event, FIXED_TIMESTAMP, EVENT_TYPES };
