// The command line as a new user meets it: help, version, usage errors, paths
// relative to the working directory, one exit status per mistake, flags named
// as typed, and all of it without the native addon where no lock is needed.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import type { StatusEntry } from '../../lib/cli/main.js';
import { isRoot, lockFixture, makeFile } from '../helpers.js';
import { lockmgr } from '../harness/cli.js';

const fx = lockFixture();
const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
// node-gyp-build looks for LOCKMGR_PREBUILD's directory instead of the package's, and PREBUILDS_ONLY skips build/Release: no addon can be found.
const canLoop = isRoot && existsSync('/dev/loop-control');
if (!canLoop) console.warn('skipping the loop-device usage test: losetup needs root');
const NO_ADDON = { LOCKMGR_PREBUILD: '/nonexistent', PREBUILDS_ONLY: '1' };

/** One line on stderr, ending with a pointer to the right --help; nothing on stdout. */
function expectUsageError(r: ReturnType<typeof lockmgr>, message: RegExp, help = 'lockmgr --help'): void {
  expect({ code: r.code, stdout: r.stdout }).toEqual({ code: 64, stdout: '' });
  expect(r.stderr.split('\n')).toHaveLength(2);
  expect(r.stderr).toMatch(message);
  expect(r.stderr.trimEnd().endsWith(`(see '${help}')`)).toBe(true);
}

describe('help and version', () => {
  it('--help, -h and help: the commands, the options, every exit status, on stdout', () => {
    for (const args of [['--help'], ['-h'], ['help']]) {
      const r = lockmgr(args);
      expect({ args, code: r.code, stderr: r.stderr }).toEqual({ args, code: 0, stderr: '' });
      expect(r.stdout).toMatch(/^usage: lockmgr COMMAND/);
      for (const cmd of ['run', 'status']) expect(r.stdout).toMatch(new RegExp(`^  ${cmd} +\\S`, 'm'));
      for (const code of ['0', '64', '66', '69', '70', '75', '126', '127']) expect(r.stdout).toMatch(new RegExp(`^  ${code} +\\S`, 'm'));
    }
  });

  it('each subcommand has its own --help (-h, help CMD), even after other options; run --help is not a missing "--"', () => {
    for (const [args, head] of [
      [['run', '--help'], 'usage: lockmgr run '],
      [['run', '--exclusive', 'x.img', '-h'], 'usage: lockmgr run '],
      [['help', 'run'], 'usage: lockmgr run '],
      [['status', '--help'], 'usage: lockmgr status '],
      [['status', '-h', 'x.img'], 'usage: lockmgr status '],
      [['help', 'status'], 'usage: lockmgr status '],
    ] as const) {
      const r = lockmgr(args);
      expect({ args, code: r.code, stderr: r.stderr }).toEqual({ args, code: 0, stderr: '' });
      expect(r.stdout.startsWith(head)).toBe(true);
    }
    expect(lockmgr(['run', '--help']).stdout).toContain('--conflict-exit-code N');
    // After '--', --help belongs to the command.
    expect(lockmgr(['run', '--exclusive', fx.path, '--', 'sh', '-c', 'echo "$1"', 'sh', '--help']).stdout).toBe('--help\n');
  });

  it('--version and -V print the version in package.json', () => {
    for (const flag of ['--version', '-V']) expect(lockmgr([flag])).toMatchObject({ code: 0, stdout: `lockmgr ${pkg.version}\n`, stderr: '' });
  });

  it('without the native addon: help, version and usage errors still work; a command that locks says how to build it (69)', () => {
    expect(lockmgr(['--help'], { env: NO_ADDON })).toMatchObject({ code: 0, stderr: '' });
    expect(lockmgr(['--version'], { env: NO_ADDON })).toMatchObject({ code: 0, stdout: `lockmgr ${pkg.version}\n` });
    expect(lockmgr(['run', '--help'], { env: NO_ADDON })).toMatchObject({ code: 0, stderr: '' });
    expect(lockmgr(['status', '--help'], { env: NO_ADDON })).toMatchObject({ code: 0, stderr: '' });
    expectUsageError(lockmgr(['run', '--bogus'], { env: NO_ADDON }), /unknown option '--bogus'/, 'lockmgr run --help');
    expectUsageError(lockmgr(['run', '--exclusive', fx.path, '--', ], { env: NO_ADDON }), /command is missing/, 'lockmgr run --help');
    expectUsageError(lockmgr([], { env: NO_ADDON }), /a command is needed/);
    const r = lockmgr(['status', fx.path], { env: NO_ADDON });
    expect(r.code).toBe(69);
    expect(r.stderr).toMatch(/^lockmgr: the native addon could not be loaded .*npm run build:addon/);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(r.stderr.split('\n')).toHaveLength(2);
  });

  it('the command line (lib/cli/main.ts) imports nothing that loads the addon; subcommands are loaded when they run', () => {
    const lib = fileURLToPath(new URL('../../lib/', import.meta.url));
    const seen = new Set<string>();
    const visit = (file: string): void => {
      if (seen.has(file)) return;
      seen.add(file);
      // Static imports only (`import ... from`, `export ... from`); `await import()` is lazy.
      for (const m of readFileSync(file, 'utf8').matchAll(/^(?:import|export)\s[^;]*?from\s+'(\.{1,2}\/[^']+)'/gm)) {
        if (/^(?:import|export)\s+type\s/.test(m[0])) continue;
        visit(resolve(dirname(file), m[1]!.replace(/\.js$/, '.ts')));
      }
    };
    visit(join(lib, 'cli/main.ts'));
    const loaded = [...seen].map((f) => relative(lib, f)).sort();
    expect(loaded).not.toContain('os/native.ts');
    expect(loaded.filter((f) => f.startsWith('cli/'))).not.toContain('cli/run.ts');
  });
});

describe('usage errors: one line, a pointer to --help, exit 64', () => {
  it('bare lockmgr, unknown commands and options, missing values, no PATH', () => {
    expectUsageError(lockmgr([]), /^lockmgr: a command is needed: run, status/);
    expectUsageError(lockmgr(['frobnicate']), /^lockmgr: unknown command 'frobnicate'/);
    expectUsageError(lockmgr(['-x']), /^lockmgr: unknown option '-x'/);
    expectUsageError(lockmgr(['status', '--bogus', fx.path]), /^lockmgr: unknown option '--bogus' \(see/, 'lockmgr status --help');
    expectUsageError(lockmgr(['status', '--json=yes', fx.path]), /^lockmgr: --json takes no value/, 'lockmgr status --help');
    expectUsageError(lockmgr(['status']), /^lockmgr: a PATH is needed/, 'lockmgr status --help');
    expectUsageError(lockmgr(['run', '--wait']), /^lockmgr: --wait needs a value/, 'lockmgr run --help');
    expectUsageError(lockmgr(['run', '--exclusive', fx.path, 'true']), /^lockmgr: unexpected argument 'true': the command goes after '--'/, 'lockmgr run --help');
    expectUsageError(lockmgr(['run', '--exclusive', fx.path]), /^lockmgr: the command is missing: put it after '--'/, 'lockmgr run --help');
    expectUsageError(lockmgr(['help', 'frobnicate']), /^lockmgr: no help for 'frobnicate'/);
  });

  it('run without a resource is refused: it would run the command holding nothing', () => {
    const marker = join(fx.tmp.dir, 'ran');
    expectUsageError(lockmgr(['run', '--', 'touch', marker]), /^lockmgr: nothing to lock: name at least one resource with --exclusive, --shared or --readonly PATH/, 'lockmgr run --help');
    expectUsageError(lockmgr(['run', '--wait', '5', '--', 'touch', marker]), /nothing to lock/, 'lockmgr run --help');
    expect(readdirSync(fx.tmp.dir)).not.toContain('ran');
  });

  it('errors name the flags the user typed, never the API: --lifetime, --uuid, --name, --id, --wait, --conflict-exit-code, --lockspace', () => {
    const cases: Array<[string[], RegExp]> = [
      [['--lifetime', 'foo'], /^lockmgr: --lifetime must be 'child' or 'supervisor', got 'foo'/],
      [['--uuid', 'bad'], /^lockmgr: --uuid needs a UUID .*, got 'bad'/],
      [['--name', ''], /^lockmgr: --name needs a non-empty value/],
      [['--id', '-3'], /^lockmgr: --id needs a value; one that starts with '-' is written --id=VALUE/],
      [['--id=-3'], /^lockmgr: --id needs an integer >= 0, got '-3'/],
      [['--wait', 'soon'], /^lockmgr: --wait needs a number of seconds >= 0, got 'soon'/],
      [['--conflict-exit-code', '256'], /^lockmgr: --conflict-exit-code needs an exit status 0-255, got '256'/],
      [['-E', 'x'], /^lockmgr: --conflict-exit-code needs an exit status 0-255, got 'x'/],
      [['--lockspace', 'sanlock:x'], /^lockmgr: --lockspace sanlock:NAME:PATH:HOSTID/],
      [['--lockspace', 'sanlock:x:/dev/lun:0'], /^lockmgr: --lockspace sanlock:NAME:PATH:HOSTID: HOSTID must be this host's id in the lockspace \(1 to 2000\), got 0\n$/],
      [['--lockspace', 'sanlock:x:dev/lun:1'], /^lockmgr: --lockspace sanlock:NAME:PATH:HOSTID: PATH must be the absolute path of the shared lease storage/],
      [['--lockspace', `sanlock:${'x'.repeat(49)}:/dev/lun:1`], /^lockmgr: --lockspace sanlock:NAME:PATH:HOSTID: NAME must be a sanlock lockspace name \(1 to 48 bytes/],
    ];
    for (const [flags, message] of cases) {
      const r = lockmgr(['run', ...flags, '--exclusive', fx.path, '--', 'true']);
      expect({ flags, code: r.code }).toEqual({ flags, code: 64 });
      expect(r.stderr).toMatch(message);
      expect(r.stderr).not.toMatch(/lockLifetime|params\.|resource\.path|lockspace\./);
    }
  });
});

describe('paths: relative ones are taken from the working directory; one mistake, one exit status', () => {
  it('run and status accept a relative PATH, and report it absolute', () => {
    const cwd = fx.tmp.dir;
    const name = 'vm1.img';
    makeFile(cwd, name);
    const r = lockmgr(['run', '--exclusive', name, '--', process.execPath, fileURLToPath(new URL('../../bin/lockmgr.js', import.meta.url)), 'status', '--json', name], { cwd });
    expect(r.code).toBe(0);
    const inside = (JSON.parse(r.stdout) as { entries: StatusEntry[] }).entries[0]!;
    expect(inside).toMatchObject({ path: join(cwd, name), lease: { state: 'exclusive' } });
    mkdirSync(join(cwd, 'sub'));
    const s = lockmgr(['status', '--json', `../${name}`], { cwd: join(cwd, 'sub') });
    expect(s.code).toBe(0);
    // Made absolute as typed, not normalised: a peer that names lock files after the spelling (virtlockd) meets the same string.
    expect((JSON.parse(s.stdout) as { entries: StatusEntry[] }).entries[0]!).toMatchObject({ path: `${join(cwd, 'sub')}/../${name}`, lease: { state: 'free' } });
  });

  it('a PATH that cannot be used exits 66 in run and in status alike: missing, a directory, a character device, a FIFO', () => {
    const fifo = join(fx.tmp.dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    for (const path of ['missing.img', fx.tmp.dir, '/dev/null', fifo]) {
      const run = lockmgr(['run', '--exclusive', path, '--', 'true'], { cwd: fx.tmp.dir });
      const status = lockmgr(['status', path], { cwd: fx.tmp.dir });
      expect({ path, run: run.code, status: status.code }).toEqual({ path, run: 66, status: 66 });
      expect(run.stderr.split('\n')).toHaveLength(2);
    }
    expect(statSync(fifo).isFIFO()).toBe(true);
  });

  it('the same PATH as two modes is a usage error', () => {
    expectUsageError(lockmgr(['run', '--exclusive', fx.path, '--shared', fx.path, '--', 'true']), /is given as both --exclusive and --shared/, 'lockmgr run --help');
  });

  // It once failed on its own lease (and with --wait waited on itself forever): issue 14, review defect 7.
  it.skipIf(!canLoop)('a loop device and its own backing file, as two PATHs, are one disk: a usage error naming both, in any mode, even with --wait', () => {
    const file = makeFile(fx.tmp.dir, 'looped.img');
    const loop = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
    try {
      for (const args of [
        ['--exclusive', loop, '--exclusive', file],
        ['--wait', '3600', '--exclusive', loop, '--exclusive', file],
        ['--shared', loop, '--readonly', file],
      ]) {
        const r = lockmgr(['run', ...args, '--', 'true']);
        expect({ args, code: r.code, stdout: r.stdout, stderr: r.stderr }).toEqual({
          args,
          code: 64,
          stdout: '',
          stderr: `lockmgr: ${loop} and ${file} are the same disk: ${loop} is a loop device over ${file}\n`,
        });
      }
      // Nothing was left held: either name runs.
      expect(lockmgr(['run', '--exclusive', file, '--', 'true']).code).toBe(0);
      expect(lockmgr(['run', '--exclusive', loop, '--', 'true']).code).toBe(0);
    } finally {
      execFileSync('losetup', ['-d', loop]);
    }
  });
});
