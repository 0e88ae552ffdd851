// Each subcommand's --help. Loads nothing heavy (see main.ts).
import { LOCKSPACE_SPEC_HELP } from '../lockspaces/tools.js';

export const RUN_HELP = `usage: lockmgr run [OPTION]... RESOURCE... -- COMMAND [ARG]...
       lockmgr run --adopt PID [OPTION]... RESOURCE...

Acquires every resource (all or nothing, in one canonical order), runs COMMAND
holding the leases, and releases them after COMMAND has exited and been
reaped. Forwards SIGTERM, SIGINT and SIGHUP to COMMAND (SIGINT and SIGHUP only
when they did not come from the terminal, which sends them to COMMAND itself).
Exits with COMMAND's exit status, 128 + N if signal N killed it.

resources (at least one; a relative PATH is taken from the current directory):
  --exclusive PATH     a disk nobody else may use meanwhile
  --shared PATH        a disk others may use shared too
  --readonly PATH      a disk COMMAND only reads (shared with other readers,
                       never with a writer: exclusive or shared)

options:
  --wait SECONDS       wait up to SECONDS for busy resources, saying who holds
                       them (default: fail at once)
  -E, --conflict-exit-code N
                       exit with N (0-255) instead of 75 when a resource is busy
                       or --wait runs out, as flock -E does: so that COMMAND's
                       own exit status 75 is not taken for "busy"
  --lockspace SPEC     where the leases live: ${LOCKSPACE_SPEC_HELP}
  --lifetime child     COMMAND keeps its leases if lockmgr dies (default)
  --lifetime supervisor
                       COMMAND is killed if lockmgr dies
  --qemu-compatible    also take QEMU's permission locks, so that qemu-img and
                       qemu-io refuse to write or resize the disks; a QEMU run
                       as COMMAND opens each disk through the descriptor in
                       $LOCKMGR_QEMU_FD(S): -add-fd fd=N,set=N
                       -blockdev driver=file,filename=/dev/fdset/N
  --verify-interval SECONDS
                       check that every lease is still held this often; 0
                       never. Default: 10 where the lockspace declares that its
                       leases can be lost (losable) or with --on-lock-failure,
                       else never
  --on-lock-failure poweroff|pause|ignore
                       what to do with COMMAND when a lease is found lost:
                       SIGKILL (the default), SIGSTOP, or nothing; always
                       reported on stderr
  --adopt PID          instead of running COMMAND, take over the running
                       process PID whose lockmgr died, with the leases it holds
                       (name each RESOURCE in its mode); exits 0 once it exits
  --name NAME, --uuid UUID, --id N, --uri URI
                       the domain's parameters (a libvirt domain's)
  -h, --help           print this help

A busy resource is reported with the processes that hold it and the others
that have it open; exit status 75 (or --conflict-exit-code).
`;

export const STATUS_HELP = `usage: lockmgr status [--json] [--lockspace SPEC] PATH...

For each PATH (a relative one is taken from the current directory): the
lease (byte 0) and who holds it, the migration guard (byte 1), QEMU's
permission locks (bytes 100-299), every lock on the file with the process
that holds it (from /proc/PID/fdinfo and /proc/locks), the other processes
that have it open (those waiting for a lock marked), and the raw /proc/locks
entries. Processes whose /proc this user may not read are reported as such.

options:
  --json               one JSON document (schema: docs/cli.md)
  --lockspace SPEC     also where the leases live there: ${LOCKSPACE_SPEC_HELP}
  -h, --help           print this help

Exit status 0, or 66 if some PATH could not be inspected (see its entry).
`;
