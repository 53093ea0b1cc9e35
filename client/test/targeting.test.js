// targetRooms against the targeting table in tests/fixtures/targeting.json,
// which herald's own targeting is checked against too (a Rust unit test in
// src/events.rs): when either side drifts from the table, its test fails.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';

import { EVENT_TYPES, targetRooms } from '../dist/index.js';

const table = JSON.parse(fs.readFileSync(new URL('../../tests/fixtures/targeting.json', import.meta.url), 'utf8'));

test('targetRooms follows the targeting table herald is checked against', () => {
  for (const { event, rooms } of table.cases) {
    assert.deepEqual(targetRooms(event), rooms, JSON.stringify(event));
  }
});

test('the targeting table covers every event type the client knows', () => {
  assert.deepEqual(new Set(table.cases.map((c) => c.event.type)), new Set(EVENT_TYPES));
});
