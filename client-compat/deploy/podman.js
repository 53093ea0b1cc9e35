'use strict';
// podman for the deploy checks that scripts/deploy-test runs (image.test.js,
// fleet.test.js): the environment the script set (CONTAINERS_CONF: runc,
// cgroupfs, the ulimits) is inherited. Secrets never go on podman's command
// line: `--env NAME` takes them from the environment given here.

const { spawn } = require('node:child_process');

/**
 * Runs `podman args…` and resolves with `{ status, stdout, stderr, ms }`;
 * rejects when it fails, unless `allowFail`.
 */
function podman(args, { env = {}, allowFail = false, timeoutMs = 180_000 } = {}) {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn('podman', args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`could not run podman: ${err.message}`));
    });
    child.once('exit', (status, signal) => {
      clearTimeout(timer);
      const out = { status, signal, stdout: stdout.trim(), stderr: stderr.trim(), ms: Date.now() - started };
      if (status !== 0 && !allowFail) {
        reject(new Error(`podman ${args.join(' ')} exited ${status ?? signal}:\n${out.stderr}\n${out.stdout}`.trim()));
      } else {
        resolve(out);
      }
    });
  });
}

/** `podman inspect --format FORMAT NAME`, trimmed. */
async function inspect(name, format) {
  return (await podman(['inspect', '--format', format, name])).stdout;
}

/** Runs the container's HEALTHCHECK once (what Docker's engine does on its own every interval); resolves with its status. */
async function healthcheck(name) {
  await podman(['healthcheck', 'run', name], { allowFail: true });
  return inspect(name, '{{.State.Health.Status}}');
}

/** GET `path` on herald inside the container (bash's /dev/tcp: the image has no curl); resolves with the raw response. */
async function getInside(name, path, port = 3000) {
  const script = `exec 3<>/dev/tcp/127.0.0.1/${port} && printf 'GET ${path} HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && cat <&3`;
  return (await podman(['exec', name, 'bash', '-c', script])).stdout;
}

/** A series of herald's /metrics read inside the container, or 0. */
async function metricInside(name, series, port = 3000) {
  const text = await getInside(name, '/metrics', port);
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line ? Number(line.slice(series.length + 1)) : 0;
}

module.exports = { podman, inspect, healthcheck, getInside, metricInside };
