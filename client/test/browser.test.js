// The demo page in a real browser (Debian's chromium, driven by
// playwright-core) against the real herald binary in zero-config development
// mode, through a TCP proxy: the page connects, shows published events
// (through the API and its own button), keeps its query cache fresh
// (herald-client/tanstack), survives a dropped connection (the proxy cuts it
// and refuses new ones for a while) with the missed events replayed once and
// in order, and leaves a screenshot in artifacts/browser/demo.png.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

import { HERALD_BIN, inCI, spawnHerald, startProxy } from './helpers.js';

const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const here = path.dirname(fileURLToPath(import.meta.url));
const SCREENSHOT = path.resolve(here, '../../artifacts/browser/demo.png');

const haveChromium = fs.existsSync(CHROMIUM);
if (!haveChromium) {
  const msg = `${CHROMIUM} is missing (apt-get install chromium)`;
  if (inCI()) throw new Error(`browser test: ${msg}; CI=true, so this fails`);
  console.log(`\n*** SKIPPED: browser test: ${msg} ***\n`);
}

/** herald with no secrets and an empty SQLite: development mode, demo data, demo page. */
async function startZeroConfigHerald(dir) {
  const env = {};
  // No HERALD_* from the outside: no secrets (HERALD_JWT_SECRET,
  // HERALD_PUBLISH_TOKEN, their _FILE forms), no HERALD_ENV=production.
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('HERALD_')) env[k] = v;
  Object.assign(env, {
    HERALD_LISTEN: '127.0.0.1:0',
    HERALD_DATABASE_URL: `sqlite://${path.join(dir, 'herald.db')}`,
    HERALD_LOG: process.env.HERALD_LOG || 'warn',
    HERALD_SHUTDOWN_GRACE: '2s',
  });
  const herald = await spawnHerald(env, dir);
  // The development banner comes before the listening line.
  const publish = /^ {2}publish token: +(\S+)\s*$/m.exec(herald.output);
  if (!publish) {
    await herald.stop();
    throw new Error(`no publish token in the development banner:\n${herald.output}`);
  }
  herald.publishToken = publish[1];
  return herald;
}

describe('demo page in chromium', { skip: !haveChromium && 'no chromium' }, () => {
  let dir;
  let herald;
  let proxy;
  let browser;
  let page;
  const pageErrors = [];
  /** While the proxy is down, the page's failed connection attempts are expected. */
  let networkDown = false;

  async function post(route, body) {
    const res = await fetch(`${herald.url}${route}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${herald.publishToken}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    const text = await res.text();
    assert.equal(res.status, 202, `${route} answered ${res.status} ${text}`);
    return JSON.parse(text);
  }
  const publishEntity = (entityId) =>
    post('/v1/events', {
      type: 'entity_updated',
      payload: { entityType: 'campaign', entityId, campaignId: 'demo-campaign', changedFields: ['name'] },
      metadata: { source: 'browser-test' },
    });

  /** The page's event list, oldest first: [{ offset, type, text }]. */
  const shownEvents = async () =>
    (
      await page.$$eval('#events li', (lis) =>
        lis.map((li) => ({ offset: li.dataset.offset, type: li.dataset.type, text: li.textContent })),
      )
    ).reverse();
  const waitForEventText = (text) =>
    page.waitForFunction(
      (t) => [...document.querySelectorAll('#events li')].some((li) => li.textContent.includes(t)),
      text,
      { timeout: 10_000 },
    );
  const waitForStatus = (status) =>
    page.waitForFunction((s) => document.querySelector('#status')?.textContent === s, status, { timeout: 15_000 });

  before(async () => {
    if (!fs.existsSync(HERALD_BIN)) {
      throw new Error(`herald binary not found at ${HERALD_BIN}: run \`cargo build --bin herald\` in the repository root, or set HERALD_BIN`);
    }
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-browser-'));
    herald = await startZeroConfigHerald(dir);
    proxy = await startProxy(herald.port);
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--disable-quic',
        '--no-first-run',
      ],
    });
    // launch() runs chromium with a fresh temporary user-data dir of its own,
    // removed on close; a new context is a fresh, incognito-like profile too.
    console.log(`browser: chromium ${browser.version()} (${CHROMIUM})`);
    const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
    page = await context.newPage();
    page.on('pageerror', (err) => pageErrors.push(err));
    page.on('console', (msg) => {
      const expected = networkDown && /ERR_CONNECTION_(REFUSED|RESET|CLOSED)|WebSocket connection to .* failed/.test(msg.text());
      if (msg.type() === 'error' && !expected) pageErrors.push(new Error(`console.error: ${msg.text()} (${msg.location().url})`));
    });
    page.on('response', (r) => {
      if (r.status() >= 400) pageErrors.push(new Error(`${r.request().method()} ${r.url()}: ${r.status()}`));
    });
  });
  after(async () => {
    await browser?.close();
    await proxy?.close();
    await herald?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('connects, shows events, recovers after a dropped connection, screenshot', async () => {
    const res = await page.goto(`${proxy.url}/`);
    assert.equal(res.status(), 200);
    await waitForStatus('connected');
    // The subscription is acked once the log says so (events published
    // before that would be missed, not replayed: nothing to replay from).
    await page.waitForFunction(() => document.querySelector('#log')?.textContent.includes('subscribed to campaign'));

    // 1. Through the publish API.
    await publishEntity('browser-api-1');
    await waitForEventText('browser-api-1');

    // 2. The page's own button (POST /dev/publish-demo, entity_updated by default).
    await page.click('#publish');
    await page.waitForFunction(() => document.querySelectorAll('#events li').length === 2, null, { timeout: 10_000 });
    await page.waitForFunction(() => document.querySelector('#publish-result')?.textContent.startsWith('published'));
    assert.equal(await page.isHidden('#publish-error'), true, await page.textContent('#publish-error'));
    let shown = await shownEvents();
    assert.deepEqual(
      shown.map((e) => e.type),
      ['entity_updated', 'entity_updated'],
    );
    assert.match(shown[1].text, /Demo campaign/);
    // The query cache (herald-client/tanstack): the demo campaign's
    // entity_updated carries entityData, written into the campaign query
    // without a fetch; the summary under the campaign's key refetches. The
    // test's own events update entities of other ids (browser-api-1, …):
    // they refetch nothing.
    await page.waitForFunction(() => document.querySelector('#q-summary')?.dataset.fetches === '2', null, { timeout: 10_000 });
    assert.equal(await page.getAttribute('#q-campaign', 'data-fetches'), '1');
    assert.match(await page.getAttribute('#q-campaign', 'data-name'), /^Demo campaign #\d+$/);

    // 3. The connection drops, and stays down for a moment. The two events
    // published meanwhile are missed; the client reconnects by itself,
    // re-subscribes with `since` and gets them replayed; then one more live.
    networkDown = true;
    proxy.block();
    await page.waitForFunction(() => document.querySelector('#status')?.textContent === 'reconnecting', null, { timeout: 15_000 });
    const missed = [await publishEntity('browser-missed-1'), await publishEntity('browser-missed-2')];
    for (const m of missed) assert.equal(m.accepted, 1);
    proxy.unblock();
    // The page logs every status change, newest first: "reconnecting", then "connected" again.
    await page.waitForFunction(
      () => {
        const lines = [...document.querySelectorAll('#log li')].map((li) => li.textContent.replace(/^\S+\s+/, ''));
        return lines[0] === 'connected' && lines.indexOf('reconnecting') > 0;
      },
      null,
      { timeout: 15_000 },
    );
    await waitForStatus('connected');
    networkDown = false;
    await waitForEventText('browser-missed-2');
    await publishEntity('browser-live-1');
    await waitForEventText('browser-live-1');

    shown = await shownEvents();
    const ids = shown.map((e) => /browser-[a-z]+-\d/.exec(e.text)?.[0] ?? 'demo');
    assert.deepEqual(ids, ['browser-api-1', 'demo', 'browser-missed-1', 'browser-missed-2', 'browser-live-1'], 'all, in order');
    const offsets = shown.map((e) => e.offset);
    assert.equal(new Set(offsets).size, offsets.length, `each event once: ${offsets.join(' ')}`);
    assert.deepEqual(offsets, [...offsets].sort(), 'offsets increase');
    assert.equal(await page.$('#resync'), null, 'recovered: no resync');
    assert.equal(await page.textContent('#status'), 'connected');
    assert.equal(await page.textContent('#count'), '5');
    // Neither the other ids' events nor a recovered reconnect refetched anything.
    assert.equal(await page.getAttribute('#q-summary', 'data-fetches'), '2');
    assert.equal(await page.getAttribute('#q-campaign', 'data-fetches'), '1');

    fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    console.log(`screenshot: ${SCREENSHOT}`);
    assert.deepEqual(pageErrors.map(String), []);
  });
});
