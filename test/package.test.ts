// What a consumer gets: the packed tarball, installed without running any
// install script (npm 11 skips dependencies' scripts), must load its prebuilt
// binary; without one, loading must fail with an error that says how to rebuild.
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { makeFile, tempDir } from './helpers.js';

const root = fileURLToPath(new URL('..', import.meta.url));
let tmp: ReturnType<typeof tempDir>;
let tarball: string;

function run(cmd: string, args: string[], cwd: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function consumer(name: string): string {
  const app = join(tmp.dir, name);
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name, private: true, type: 'module', dependencies: { lockmgr: `file:${tarball}` } }));
  run('npm', ['install', '--ignore-scripts', '--prefer-offline', '--no-audit', '--no-fund'], app);
  return app;
}

function tryLockIn(app: string, path: string, env: Record<string, string> = {}) {
  const script = `import('lockmgr').then(
    (m) => { const f = m.openLockable(${JSON.stringify(path)}); console.log(JSON.stringify({ ok: f.tryLock('exclusive') })); f.close(); },
    (e) => console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message })))`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { cwd: app, encoding: 'utf8', env: { ...process.env, ...env } });
  expect(r.stderr).toBe('');
  return JSON.parse(r.stdout);
}

beforeAll(() => {
  tmp = tempDir();
  // Build the prebuild and pack in a copy of the package: prebuildify rebuilds
  // build/ where it runs, and other test files load the addon from
  // build/Release meanwhile; and a test has no business writing into the repo.
  const src = join(tmp.dir, 'src');
  mkdirSync(src);
  for (const f of ['package.json', 'binding.gyp', 'native', 'dist', 'bin', 'docs', 'README.md']) cpSync(join(root, f), join(src, f), { recursive: true });
  symlinkSync(join(root, 'node_modules'), join(src, 'node_modules'));
  run('npm', ['run', 'build:native'], src);
  const name = run('npm', ['pack', '--pack-destination', tmp.dir, '--ignore-scripts'], src).trim().split('\n').pop()!;
  tarball = join(tmp.dir, name);
}, 300_000);
afterAll(() => tmp?.cleanup());

it('the tarball ships dist, types, native sources and a prebuilt binary, and no build directory', () => {
  const files = run('tar', ['-tzf', tarball], tmp.dir).split('\n');
  for (const f of ['package/dist/index.js', 'package/dist/index.d.ts', 'package/dist/cli/main.js', 'package/bin/lockmgr.js', 'package/binding.gyp', 'package/native/ofd.cc', 'package/prebuilds/linux-x64/lockmgr.node']) {
    expect(files).toContain(f);
  }
  expect(files.some((f) => f.startsWith('package/build/'))).toBe(false);
  expect(files.some((f) => f.startsWith('package/test/'))).toBe(false);
});

it('installed without scripts, it loads the prebuilt binary (PREBUILDS_ONLY=1) and locks', () => {
  const app = consumer('app-prebuilt');
  expect(existsSync(join(app, 'node_modules/lockmgr/build'))).toBe(false);
  const file = makeFile(tmp.dir, 'disk.img');
  expect(tryLockIn(app, file, { PREBUILDS_ONLY: '1' })).toEqual({ ok: true });
  // The CLI is installed as a bin, and runs on the prebuilt binary too.
  const bin = join(app, 'node_modules/.bin/lockmgr');
  const r = spawnSync(bin, ['run', '--exclusive', file, '--', bin, 'status', '--json', file], { encoding: 'utf8', env: { ...process.env, PREBUILDS_ONLY: '1' } });
  expect(r.status).toBe(0);
  expect(JSON.parse(r.stdout).entries[0].lease.state).toBe('exclusive');
}, 120_000);

it('without a binary for this platform, loading fails with UnsupportedError saying how to rebuild', () => {
  const app = consumer('app-nobinary');
  rmSync(join(app, 'node_modules/lockmgr/prebuilds'), { recursive: true });
  expect(readdirSync(join(app, 'node_modules/lockmgr'))).not.toContain('build');
  const r = tryLockIn(app, makeFile(tmp.dir, 'disk2.img'));
  expect(r).toMatchObject({ name: 'UnsupportedError', code: 'ERR_UNSUPPORTED' });
  expect(r.message).toContain('npm rebuild lockmgr --build-from-source');
}, 120_000);
