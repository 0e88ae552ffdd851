// The lockmgr command line: `run` holds leases around a command, `status` says
// who holds what. docs/cli.md documents the flags, exit codes and --json.
import { EXIT, fail, stdio, type Output } from './args.js';
import { run } from './run.js';
import { status } from './status.js';
import { LOCKSPACE_SPEC_HELP, LOCKSPACE_TOOLS } from '../lockspaces/index.js';

export { EXIT, exitCodeFor, type Output } from './args.js';
export type { StatusEntry } from './status.js';

const VERSION = '0.1.0';

export const HELP = `usage:
  lockmgr run [--exclusive PATH]... [--shared PATH]... [--readonly PATH]...
              [--lockspace SPEC] [--wait SECONDS] [--lifetime child|supervisor] [--qemu-compatible]
              [--verify-interval SECONDS] [--on-lock-failure poweroff|pause|ignore]
              [--name NAME] [--uuid UUID] [--id ID] [--uri URI] -- COMMAND [ARG...]
  lockmgr run --adopt PID [--exclusive PATH]... [--shared PATH]... [--readonly PATH]...
              [--lockspace SPEC] [--verify-interval SECONDS] [--on-lock-failure ACTION]
  lockmgr status [--json] [--lockspace SPEC] PATH...
${LOCKSPACE_TOOLS.map((t) => `  ${t.usage}\n`).join('')}  lockmgr --help | --version

run     Acquires every resource (all or nothing, in one canonical order), runs
        COMMAND holding the leases, forwards SIGTERM, SIGINT and SIGHUP to it
        (SIGINT and SIGHUP only when they did not come from the terminal),
        releases the leases after it has been reaped, and exits with its exit
        status (128 + the signal number if a signal killed it).
        --lockspace SPEC     where the leases live: ${LOCKSPACE_SPEC_HELP}
        --wait SECONDS       wait for busy resources (default: fail at once)
        --lifetime child     the command keeps its leases if lockmgr dies (default)
        --lifetime supervisor the command is killed if lockmgr dies
        --qemu-compatible    also take QEMU's permission locks, so qemu-img and
                             qemu-io refuse to write or resize the images;
                             a QEMU run as COMMAND must open each image through
                             the descriptor in $LOCKMGR_QEMU_FD(S): -add-fd
                             fd=N,set=N -blockdev driver=file,filename=/dev/fdset/N
        --adopt PID          take over a running process whose supervisor is gone,
                             with the leases it holds (name each, in its mode),
                             instead of running a command; exits 0 once it exits
        --verify-interval SECONDS check that every lease is still held this often;
                             0 never. Default: 10 where the lockspace declares
                             that its leases can be lost (losable), else never
        --on-lock-failure ACTION what to do with the command when a lease is
                             found lost: poweroff (SIGKILL, the default), pause
                             (SIGSTOP) or ignore; always reported on stderr
status  For each PATH: the lease (byte 0), the migration guard (byte 1), QEMU's
        permission locks (bytes 100-299), the locks in /proc/locks, and the
        processes that have the file open. --json prints one JSON document.

exit status:
  0    success (run: the command's own exit status)
  64   usage error: unknown flag, bad value, missing command
  66   a resource cannot be opened: missing, not permitted, a directory
  69   unsupported: the filesystem or kernel cannot lock, or a feature is absent
  70   internal error
  71   a system limit: too many open files (ulimit -n), processes or threads,
       a full disk; raise the limit or use fewer disks (retrying will not help)
  75   busy: a resource is held by someone else (or the wait ran out); try again
  126  the command exists but cannot be executed
  127  the command was not found
`;


export async function main(argv: readonly string[], out: Output = stdio): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'run':
        return await run(rest, out);
      case 'status':
        return await status(rest, out);
      case '--help':
      case '-h':
      case 'help':
        out.out(HELP);
        return EXIT.ok;
      case '--version':
        out.out(`lockmgr ${VERSION}\n`);
        return EXIT.ok;
      default: {
        // A lockspace's own set-up commands: lib/lockspaces/index.ts.
        const tool = LOCKSPACE_TOOLS.find((t) => t.name === command);
        if (tool !== undefined) return await tool.run(rest, (t) => out.out(t));
        out.err(`lockmgr: ${command === undefined ? 'a command is needed' : `unknown command '${command}'`}\n\n${HELP}`);
        return EXIT.usage;
      }
    }
  } catch (err) {
    return fail(err, out);
  }
}

