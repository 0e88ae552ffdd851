// The lockmgr command line: `run` holds leases around a command, `status` says
// who holds what. docs/cli.md documents the flags, exit codes and --json.
//
// This file loads nothing that loads the native addon: each subcommand is
// imported when it runs, so `lockmgr --help`, `--version` and usage errors
// work (and are quick) even where the addon cannot be loaded.
import { readFileSync } from 'node:fs';
import { LOCKSPACE_TOOLS } from '../lockspaces/tools.js';
import { EXIT, escapedWriter, fail, stdio, usage, wantsHelp, type Output } from './args.js';
import { RUN_HELP, STATUS_HELP } from './help.js';
import { parseRun, parseStatus } from './parse.js';

export { EXIT, exitCodeFor, type Output } from './args.js';
export type { StatusEntry } from './status.js';

/** The package's version, from its package.json. */
export function version(): string {
  return (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
}

const width = Math.max(...['run', 'status', ...LOCKSPACE_TOOLS.map((t) => t.name)].map((n) => n.length)) + 3;

export const HELP = `usage: lockmgr COMMAND [OPTION]... [ARG]...

commands:
  ${'run'.padEnd(width)}hold leases on disks while a command runs
  ${'status'.padEnd(width)}say who holds what on each disk, and who else has it open
${LOCKSPACE_TOOLS.map((t) => `  ${t.name.padEnd(width)}${t.summary}\n`).join('')}
  lockmgr COMMAND --help    (or lockmgr help COMMAND) for the command's options

options:
  -h, --help     print this help
  -V, --version  print the version

exit status:
  0    success (run: the command's own exit status)
  64   usage error: unknown option, bad value, missing command
  66   a PATH cannot be used: missing, not permitted, a directory, a FIFO or character device
  69   unsupported: the filesystem or kernel cannot lock, or a feature is absent
  70   internal error
  71   a system limit: too many open files (ulimit -n), processes or threads,
       a full disk; raise the limit or use fewer disks (retrying will not help)
  75   busy: a resource is held by someone else, or --wait ran out (run: see --conflict-exit-code)
  126  the command exists but cannot be executed
  127  the command was not found

Details and examples: docs/cli.md
`;

const HELPS: Readonly<Record<string, string>> = { run: RUN_HELP, status: STATUS_HELP };

export async function main(argv: readonly string[], out: Output = stdio): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'run':
      case 'status': {
        // The command line is checked (and --help answered) before the
        // subcommand, and with it the native addon, is loaded.
        if (wantsHelp(rest)) {
          out.out(HELPS[command]!);
          return EXIT.ok;
        }
        if (command === 'run') {
          const args = parseRun(rest);
          return await (await import('./run.js')).run(args, out);
        }
        const args = parseStatus(rest);
        return await (await import('./status.js')).status(args, out);
      }
      case '--help':
      case '-h':
      case 'help': {
        const topic = rest[0];
        if (topic === undefined) {
          out.out(HELP);
          return EXIT.ok;
        }
        if (HELPS[topic] !== undefined) {
          out.out(HELPS[topic]);
          return EXIT.ok;
        }
        const tool = LOCKSPACE_TOOLS.find((t) => t.name === topic);
        if (tool !== undefined) return await tool.run(['--help'], escapedWriter(out));
        throw usage(`no help for '${topic}': the commands are run, status${LOCKSPACE_TOOLS.map((t) => `, ${t.name}`).join('')}`);
      }
      case '--version':
      case '-V':
        out.out(`lockmgr ${version()}\n`);
        return EXIT.ok;
      case undefined:
        throw usage('a command is needed: run, status');
      default: {
        // A lockspace's own set-up commands: lib/lockspaces/tools.ts.
        const tool = LOCKSPACE_TOOLS.find((t) => t.name === command);
        if (tool !== undefined) return await tool.run(rest, escapedWriter(out));
        throw usage(command.startsWith('-') ? `unknown option '${command}'` : `unknown command '${command}'`);
      }
    }
  } catch (err) {
    return fail(err, out);
  }
}
