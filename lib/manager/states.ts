// The manager's states, the transitions between them, and where each method
// may be called: one table, read by LockManager, shown in docs/contract.md.
//
//   new --start()--> starting --> running --(child exits | shutdown())--> stopped
//    ^                  |   |        |                                      |
//    +---(acquire or    |   |     stopping                                  |
//         spawn failed)-+   |                                               |
//   any state --free()--> freed  <------------------------------------------+
//
// Migration (docs/contract.md, "Migration"):
//   target (flags.migrate): starting --> incoming --completeMigrateIn()--> running
//                                        incoming --(cancel | child exits)--> stopped
//   source: running --prepareMigrate()--> migrating --completeMigrateOut()--> migrated
//           migrating | migrated --completeMigrateOut({ cancel })--> running
//           migrating | migrated --(child exits)--> stopped
import { InternalError, InvalidStateError } from '../os/errors.js';

export type ManagerState = 'new' | 'starting' | 'incoming' | 'running' | 'migrating' | 'migrated' | 'stopping' | 'stopped' | 'freed';

/** The states in which a supervised process runs. */
export const WITH_CHILD: readonly ManagerState[] = ['incoming', 'running', 'migrating', 'migrated', 'stopping'];

/**
 * Every transition there is. 'stopping' goes back to the state it came from
 * when the SIGTERM of shutdown() could not be sent; 'freed' is final.
 */
export const TRANSITIONS: Readonly<Record<ManagerState, readonly ManagerState[]>> = {
  new: ['starting', 'freed'],
  starting: ['new', 'incoming', 'running', 'freed'],
  incoming: ['running', 'stopping', 'stopped', 'freed'],
  running: ['migrating', 'stopping', 'stopped', 'freed'],
  migrating: ['migrated', 'running', 'stopping', 'stopped', 'freed'],
  migrated: ['running', 'stopping', 'stopped', 'freed'],
  stopping: ['stopped', 'incoming', 'running', 'migrating', 'migrated', 'freed'],
  stopped: ['freed'],
  freed: [],
};

/** The states each method may be called in; any other is InvalidStateError. */
export const ALLOWED = {
  setParameter: ['new'],
  registerResource: ['new'],
  start: ['new'],
  acquireResource: ['running'],
  releaseResource: ['running'],
  inquire: ['new', 'starting', 'incoming', 'running', 'migrating', 'migrated', 'stopping', 'stopped'],
  prepareMigrate: ['running'],
  completeMigrateOut: ['migrating', 'migrated'],
  completeMigrateIn: ['incoming'],
  cancelMigrateIn: ['incoming', 'stopping', 'stopped'],
  getChild: WITH_CHILD,
  signal: WITH_CHILD,
  verify: ['running', 'migrating'],
} as const satisfies Record<string, readonly ManagerState[]>;

export type Method = keyof typeof ALLOWED;

/** The current state, changed only along TRANSITIONS. */
export class StateMachine {
  #state: ManagerState = 'new';

  constructor(private readonly onChange: (state: ManagerState, previous: ManagerState) => void) {}

  get state(): ManagerState {
    return this.#state;
  }

  /** Moves to `state`; a no-op when already there or freed (a late step of start() or an exit). */
  set(state: ManagerState): void {
    const previous = this.#state;
    if (previous === state || previous === 'freed') return;
    if (!TRANSITIONS[previous].includes(state)) throw new InternalError(`the manager cannot go from '${previous}' to '${state}' (docs/contract.md, "States")`);
    this.#state = state;
    this.onChange(state, previous);
  }

  /** InvalidStateError unless the state allows `method`. */
  require(method: Method, name: string = method): void {
    const allowed: readonly ManagerState[] = ALLOWED[method];
    if (!allowed.includes(this.#state)) {
      throw new InvalidStateError(`${name}() is not allowed in state '${this.#state}'; it is allowed in ${allowed.map((s) => `'${s}'`).join(', ')}`);
    }
  }

  is(...states: ManagerState[]): boolean {
    return states.includes(this.#state);
  }
}
