// What lockmgr does, for whoever asks: node:diagnostics_channel channels
// (lockmgr:open, :wait, :grant, :release, :lock-lost, :child-exit) and
// util.debuglog('lockmgr') lines on stderr (NODE_DEBUG=lockmgr). README.md,
// "Debugging", documents the messages.
//
// tryLock() and unlock() run millions of times a second: a call site asks
// traced(channel) first (a boolean and a getter, no allocation) and builds the
// message only when someone listens.
import { channel, type Channel } from 'node:diagnostics_channel';
import { debuglog } from 'node:util';

export const CHANNELS = {
  open: channel('lockmgr:open'),
  wait: channel('lockmgr:wait'),
  grant: channel('lockmgr:grant'),
  release: channel('lockmgr:release'),
  lockLost: channel('lockmgr:lock-lost'),
  childExit: channel('lockmgr:child-exit'),
} as const;

const log = debuglog('lockmgr');
// NODE_DEBUG is read once, when the process starts: so may this be.
const LOGGING = log.enabled;

/** Whether anyone listens on `ch` (or NODE_DEBUG=lockmgr logs everything). */
export function traced(ch: Channel): boolean {
  return LOGGING || ch.hasSubscribers;
}

/** Publishes `message` on `ch`, and logs `name` and its fields with debuglog. */
export function publish(ch: Channel, message: Record<string, unknown>): void {
  if (ch.hasSubscribers) ch.publish(message);
  if (LOGGING) {
    const fields = Object.entries(message)
      // The objects (the file, the manager) are for subscribers; the log says the rest.
      .filter(([, v]) => v !== undefined && (typeof v !== 'object' || v === null))
      .map(([k, v]) => `${k}=${typeof v === 'string' ? JSON.stringify(v) : String(v)}`);
    log('%s %s', String(ch.name).replace(/^lockmgr:/, ''), fields.join(' '));
  }
}
