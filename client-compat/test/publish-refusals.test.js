'use strict';
// A publish refused before its body was read (401, 415, 413) still gets its
// answer: herald reads and drops what the client is still sending, so a
// client in the middle of a large upload reads the status instead of a reset.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { startHerald } = require('./helpers');

describe('refused publishes with large bodies', () => {
  let herald;
  before(async () => {
    herald = await startHerald();
  });
  after(async () => {
    await herald?.stop();
  });

  it('get 401, 415 or 413, never a reset', async () => {
    const big = 'x'.repeat(1536 * 1024);
    const cases = [
      [{ token: 'wrong' }, 401],
      [{ contentType: 'text/plain' }, 415],
      [{}, 413],
    ];
    const failures = [];
    for (let i = 0; i < 60; i++) {
      const [options, expected] = cases[i % cases.length];
      try {
        const res = await herald.publishRaw(big, options);
        if (res.status !== expected) failures.push(`#${i}: ${res.status}, expected ${expected}`);
      } catch (e) {
        failures.push(`#${i}: no answer (${e.cause?.code || e.message}), expected ${expected}`);
      }
    }
    assert.deepEqual(failures, []);
  });
});
