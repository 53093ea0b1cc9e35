'use strict';
// The README's plain-client recipe, as a file: an unmodified socket.io-client
// with default reconnection, that keeps the last offset of each room it is
// subscribed to and re-subscribes with `since` in its `connect` handler.
// Nothing else: no manual reconnect, no herald-client. It records what it
// sees, for the tests to check.

const { io } = require('socket.io-client');

const EVENT_TYPES = ['entity_updated', 'state_invalidated', 'world_time_changed', 'settlement_updated', 'structure_updated'];

/** Whether `event` is delivered to room `kind:id` (the README's delivery table). */
function targets(event, kind, id) {
  const p = event?.payload ?? {};
  switch (kind) {
    case 'campaign':
      return p.campaignId === id;
    case 'settlement':
      return p.settlementId === id || (event.type === 'entity_updated' && p.entityType === 'settlement' && p.entityId === id);
    case 'structure':
      return p.structureId === id || (event.type === 'entity_updated' && p.entityType === 'structure' && p.entityId === id);
    default:
      return false;
  }
}

/**
 * Connects a recipe client to `url`. `auth` is what socket.io-client takes
 * (an object, or a function that gets a fresh token on every reconnect);
 * `rooms` is `[[kind, id], …]`, broadest first. Extra `options` go to `io()`
 * (e.g. `transports`); reconnection stays on, with socket.io-client's defaults
 * unless a test shortens them.
 *
 * Records:
 * - `events`: `{ seq, offset, at }` of every domain event received;
 * - `acks`: `{ room, since, ack, at }` of every (re-)subscribe;
 * - `disconnects`: `{ reason, at }`; `connects`: count.
 */
function recipeClient(url, { auth, rooms, ...options }) {
  const socket = io(url, { forceNew: true, auth, ...options });
  const last = new Map();
  const record = { socket, events: [], acks: [], disconnects: [], connects: 0, last };
  for (const type of EVENT_TYPES) {
    socket.on(type, (event) => {
      for (const [kind, id] of rooms) if (targets(event, kind, id)) last.set(`${kind}:${id}`, event.offset);
      record.events.push({ seq: event?.payload?.seq, run: event?.payload?.run, offset: event.offset, at: Date.now() });
    });
  }
  socket.on('connect', async () => {
    record.connects += 1;
    for (const [kind, id] of rooms) {
      const since = last.get(`${kind}:${id}`);
      let ack;
      try {
        ack = await socket.timeout(20_000).emitWithAck(`subscribe_${kind}`, { [`${kind}Id`]: id, ...(since && { since }) });
      } catch (err) {
        ack = { timeout: err.message };
      }
      record.acks.push({ room: `${kind}:${id}`, since, ack, at: Date.now() });
    }
  });
  socket.on('disconnect', (reason) => record.disconnects.push({ reason, at: Date.now() }));
  return record;
}

module.exports = { recipeClient, targets, EVENT_TYPES };
