'use strict';
// The herald container image (the repository's Dockerfile, built by
// scripts/deploy-test as users build it), booted with podman and checked from
// outside: production refuses to start without its secrets; with them it
// serves /healthz and the stock socket.io-client connects, subscribes and
// gets an event published through the API; it runs as uid 10001; its SQLite
// store in /data survives a restart and a new container on the same volume;
// `podman stop` (SIGTERM to PID 1) ends it within the grace period with exit
// code 0; its HEALTHCHECK reports healthy.
//
// Run by scripts/deploy-test (HERALD_IMAGE names the image); not part of
// `npm test`.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');

const initSqlJs = require('sql.js');

const { OK, ack, waitForConnect, freePort, waitUntil, sleep } = require('../test/helpers');
const { FIXTURE_SQL, signToken, randomSecret } = require('../../test-support/index.cjs');
const { podman, inspect, healthcheck } = require('./podman');
const { io } = require('socket.io-client');

const IMAGE = process.env.HERALD_IMAGE || 'localhost/herald:local';
const NAME = `herald-image-test-${process.pid}`;
const VOLUME = `${NAME}-data`;
/** HERALD_SHUTDOWN_GRACE's default: herald must be gone within it. */
const GRACE_MS = 10_000;

describe(`the herald image (${IMAGE})`, { timeout: 180_000 }, () => {
  const secrets = { HERALD_JWT_SECRET: randomSecret(), HERALD_PUBLISH_TOKEN: randomSecret() };
  const sockets = new Set();
  let port;
  let url;

  /** `podman run -d` of the image on the test volume, with the secrets, published on 127.0.0.1:port. */
  async function runContainer() {
    await podman(['rm', '-f', '-t', '0', NAME], { allowFail: true });
    await podman(
      ['run', '-d', '--name', NAME, '--env', 'HERALD_JWT_SECRET', '--env', 'HERALD_PUBLISH_TOKEN', '-v', `${VOLUME}:/data`, '-p', `127.0.0.1:${port}:3000`, IMAGE],
      { env: secrets },
    );
    await waitUntilServing();
  }

  async function waitUntilServing() {
    await waitUntil(
      async () => {
        try {
          return (await fetch(`${url}/healthz`)).status === 200;
        } catch {
          return false;
        }
      },
      30_000,
      async () => `GET ${url}/healthz to answer 200; logs:\n${(await podman(['logs', NAME], { allowFail: true })).stderr}`,
    );
  }

  function token(sub, claims = {}) {
    return signToken(secrets.HERALD_JWT_SECRET, { sub, ...claims });
  }

  function connect(tok) {
    const socket = io(url, { forceNew: true, reconnection: false, timeout: 10_000, auth: { token: tok } });
    sockets.add(socket);
    return waitForConnect(socket);
  }

  function post(route, body) {
    return fetch(`${url}${route}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${secrets.HERALD_PUBLISH_TOKEN}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
  }

  /** `podman stop` (SIGTERM, then SIGKILL after 20 s): how long it took and the exit code. */
  async function stop() {
    const { ms } = await podman(['stop', '-t', '20', NAME]);
    return { ms, exitCode: Number(await inspect(NAME, '{{.State.ExitCode}}')) };
  }

  before(async () => {
    port = await freePort();
    url = `http://127.0.0.1:${port}`;
    await podman(['volume', 'rm', '-f', VOLUME], { allowFail: true });
    await podman(['volume', 'create', VOLUME]);
  });

  after(async () => {
    for (const s of sockets) s.close();
    await podman(['rm', '-f', '-t', '0', NAME], { allowFail: true });
    await podman(['volume', 'rm', '-f', VOLUME], { allowFail: true });
  });

  it('refuses to start in production without the two secrets: a clear message, a non-zero exit', async () => {
    const bare = await podman(['run', '--rm', IMAGE], { allowFail: true });
    assert.notEqual(bare.status, 0, `the image started without secrets:\n${bare.stderr}`);
    assert.match(bare.stderr, /HERALD_JWT_SECRET/, `the message should name the missing secret:\n${bare.stderr}`);
    const half = await podman(['run', '--rm', '--env', 'HERALD_JWT_SECRET', IMAGE], { env: secrets, allowFail: true });
    assert.notEqual(half.status, 0, `the image started without a publish token:\n${half.stderr}`);
    assert.match(half.stderr, /HERALD_PUBLISH_TOKEN/, `the message should name the missing secret:\n${half.stderr}`);
    for (const out of [bare.stderr, half.stderr]) assert.ok(!out.includes(secrets.HERALD_JWT_SECRET), 'a secret reached the output');
  });

  it('with them it serves /healthz, runs as uid 10001 (PID 1 is herald), and its HEALTHCHECK reports healthy', async () => {
    await runContainer();
    const status = await (await fetch(`${url}/healthz`)).json();
    assert.deepEqual(status, { status: 'ok' });
    assert.equal(await inspect(NAME, '{{.Config.User}}'), 'herald:herald');
    const proc = (await podman(['exec', NAME, 'cat', '/proc/1/status'])).stdout;
    assert.match(proc, /^Uid:\s+10001\s+10001\s+10001\s+10001$/m, proc);
    assert.match(proc, /^Gid:\s+10001\s+10001\s+10001\s+10001$/m, proc);
    assert.equal((await podman(['exec', NAME, 'cat', '/proc/1/comm'])).stdout, 'herald');
    // The check is in the image (built with --format docker: OCI images drop HEALTHCHECK).
    assert.match(await inspect(NAME, '{{.Config.Healthcheck.Test}}'), /healthz/);
    assert.equal(await healthcheck(NAME), 'healthy');
    // /data is the image's volume, owned by herald: the store is there.
    const ls = (await podman(['exec', NAME, 'ls', '-ln', '/data'])).stdout;
    assert.match(ls, /10001 +10001 .* herald\.db$/m, ls);
  });

  it('podman stop (SIGTERM to PID 1) ends it within the grace period, with exit code 0', async () => {
    const { ms, exitCode } = await stop();
    assert.equal(exitCode, 0, (await podman(['logs', NAME])).stderr);
    assert.ok(ms < GRACE_MS, `podman stop took ${ms} ms`);
  });

  it('a stock socket.io-client connects, subscribes and gets an event published through the API; SIGTERM closes its transport', async (t) => {
    // The store herald created in /data, with the membership fixture added
    // while it is stopped (it was checkpointed on the clean exit).
    const mountpoint = await inspect(VOLUME, '{{.Mountpoint}}');
    const db = path.join(mountpoint, 'herald.db');
    assert.ok(!fs.existsSync(`${db}-wal`) || fs.statSync(`${db}-wal`).size === 0, 'herald left an unmerged WAL behind');
    const SQL = await initSqlJs();
    const store = new SQL.Database(fs.readFileSync(db));
    store.exec(FIXTURE_SQL);
    fs.writeFileSync(db, Buffer.from(store.export()));
    store.close();

    await podman(['start', NAME]);
    await waitUntilServing();
    const socket = await connect(token('alice'));
    const got = [];
    socket.on('state_invalidated', (e) => got.push(e));
    assert.deepEqual(await ack(socket, 'subscribe_campaign', { campaignId: 'c1' }), OK);
    const res = await post('/v1/events', { type: 'state_invalidated', payload: { campaignId: 'c1', scope: 'campaign' } });
    assert.equal(res.status, 202, await res.text());
    await waitUntil(() => got.length === 1, 5_000, 'the published event');
    assert.equal(got[0].payload.campaignId, 'c1');
    assert.match(got[0].offset, /^\d{13}-\d{13}-\d{10}$/);

    const reasons = [];
    socket.on('disconnect', (reason) => reasons.push(reason));
    const { ms, exitCode } = await stop();
    t.diagnostic(`podman stop with a connected client: ${ms} ms, exit code ${exitCode}`);
    assert.equal(exitCode, 0);
    assert.ok(ms < GRACE_MS, `podman stop took ${ms} ms`);
    await waitUntil(() => reasons.length > 0, 5_000, 'the client to see its transport close');
    assert.deepEqual(reasons, ['transport close'], 'shutdown closes the transport (the client comes back by itself)');
  });

  it('the SQLite store in /data survives a restart and a new container on the same volume', async () => {
    // Something herald itself writes to its store: a user's revocation.
    await podman(['start', NAME]);
    await waitUntilServing();
    const oldToken = token('bob', { iat: Math.floor(Date.now() / 1000) - 60 });
    const bob = await connect(oldToken);
    bob.close();
    const res = await post('/v1/access/revoke', { userId: 'bob' });
    assert.equal(res.status, 202, await res.text());

    for (const how of ['restart', 'replace']) {
      if (how === 'restart') {
        await podman(['restart', '-t', '20', NAME]);
        await waitUntilServing();
      } else {
        await runContainer();
      }
      await assert.rejects(connect(oldToken), (err) => err.message === 'Unauthorized', `${how}: bob's revocation was forgotten`);
      const alice = await connect(token('alice'));
      assert.deepEqual(await ack(alice, 'subscribe_campaign', { campaignId: 'c1' }), OK, `${how}: the membership fixture was lost`);
      alice.close();
      await sleep(100);
    }
  });
});
