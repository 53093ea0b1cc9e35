// The demo page herald embeds (assets/demo/, committed build output) must be
// what client/demo/ builds to: rebuild into a temporary directory and compare.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const clientDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const committedDir = path.resolve(clientDir, '../assets/demo');

test('assets/demo is the build of client/demo', (t) => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-demo-build-'));
  t.after(() => fs.rmSync(out, { recursive: true, force: true }));
  execFileSync(process.execPath, [path.join(clientDir, 'demo/build.mjs'), out], { cwd: clientDir, stdio: 'pipe' });
  const built = fs.readdirSync(out).sort();
  assert.deepEqual(built, ['app.js', 'index.html']);
  for (const name of built) {
    const committed = path.join(committedDir, name);
    const stale = `assets/demo/${name} is not the build of client/demo: run \`npm run build:demo\` in client/`;
    assert.ok(fs.existsSync(committed), stale);
    assert.ok(fs.readFileSync(committed).equals(fs.readFileSync(path.join(out, name))), stale);
  }
});
