// Builds the demo page herald serves in development mode: bundles
// demo/main.ts (with herald-client and socket.io-client) into app.js and
// copies index.html, into assets/demo/ of the repository (herald embeds those
// files), or into the directory given as the first argument.
//
// The output depends only on the sources and the pinned esbuild: no
// timestamps, no absolute paths, no source map. test/demo-build.test.js
// rebuilds into a temporary directory and compares with assets/demo/.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as esbuild from 'esbuild';

const clientDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const outDir = path.resolve(process.argv[2] ?? path.join(clientDir, '../assets/demo'));

fs.mkdirSync(outDir, { recursive: true });
const result = await esbuild.build({
  absWorkingDir: clientDir,
  entryPoints: ['demo/main.ts'],
  outfile: path.join(outDir, 'app.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: ['es2020'],
  minify: true,
  legalComments: 'none',
  charset: 'utf8',
  sourcemap: false,
  define: { 'process.env.NODE_ENV': '"production"' },
  banner: { js: '// Generated from client/demo/main.ts by `npm run build:demo` in client/; do not edit.' },
  logLevel: 'warning',
});
if (result.errors.length > 0) process.exit(1);
fs.copyFileSync(path.join(clientDir, 'demo/index.html'), path.join(outDir, 'index.html'));
console.log(`demo built into ${path.relative(process.cwd(), outDir) || '.'}`);
