// What the lockspaces add to the command line's help and dispatch, kept apart
// from the lockspaces themselves: `lockmgr --help` and `--version` must work
// without loading the native addon, so nothing here imports a lockspace; a
// tool's code is loaded when it runs.

/** How --lockspace SPEC is written, for the CLI's help (continuation lines indented to its column). */
export const LOCKSPACE_SPEC_HELP = `'direct' (the default: on the
                       images themselves), a directory of lock files
                       (indirect), or sanlock:NAME:PATH:HOSTID
                       (docs/lockspaces.md)`;

/** Commands a lockspace adds to the CLI for setting up its storage (`lockmgr <name> ...`). */
export interface LockspaceTool {
  name: string;
  /** One line of `lockmgr --help`: what the command is for. */
  summary: string;
  /** Its usage, for `lockmgr --help`. */
  usage: string;
  /** Runs it (loaded on demand); `lockmgr NAME --help` is its own. */
  run(args: readonly string[], out: (text: string) => void): Promise<number>;
}

export const LOCKSPACE_TOOLS: readonly LockspaceTool[] = [
  {
    name: 'sanlock',
    summary: 'set up shared storage for sanlock leases (lockmgr sanlock --help)',
    usage: 'lockmgr sanlock init|join|leave|joined|add-disk|add-lease ...',
    run: async (args, out) => (await import('./sanlock-admin.js')).sanlockCommand(args, out),
  },
];
