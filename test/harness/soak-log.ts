// The soak's log checker (test/system/soak.test.ts, test/fixtures/soak-worker.mjs):
// replays the O_APPEND log of grants and releases in its write order.
export interface SoakReport {
  records: number;
  grants: { exclusive: number; shared: number };
  releases: number;
  /** Grants still held when their process ended (released by the end). */
  endedHolding: number;
  processes: number;
  /** The most holders seen at once on one resource (shared). */
  maxShared: number;
  violations: string[];
}

/**
 * Never two exclusive holders, never exclusive with shared; every grant
 * matched by a release or by its process's end; no release without a grant,
 * no second grant to a holder that holds; every process's sequence numbers
 * 1, 2, 3, ... with none lost, and an end record from each.
 */
export function checkSoakLog(text: string): SoakReport {
  const violations: string[] = [];
  const report: SoakReport = { records: 0, grants: { exclusive: 0, shared: 0 }, releases: 0, endedHolding: 0, processes: 0, maxShared: 0, violations };
  /** resource -> holder (pid/holder) -> mode */
  const holders = new Map<string, Map<string, string>>();
  const seqs = new Map<string, number>();
  const ended = new Set<string>();
  const lines = text.split('\n');
  if (lines.at(-1) === '') lines.pop();
  for (const [n, line] of lines.entries()) {
    const where = `line ${n + 1} (${line})`;
    const m = /^([GRE]) (\d+) (fd|mgr|all) (-?\d+) (exclusive|shared|-) (\d+)$/.exec(line);
    if (m === null) {
      violations.push(`${where}: malformed`);
      continue;
    }
    report.records++;
    const [, kind, pid, holder, res, mode, seq] = m as unknown as [string, 'G' | 'R' | 'E', string, string, string, string, string];
    const expected = (seqs.get(pid) ?? 0) + 1;
    if (Number(seq) !== expected) violations.push(`${where}: sequence ${seq} of process ${pid}, expected ${expected} (a record lost or repeated)`);
    seqs.set(pid, Number(seq));
    if (ended.has(pid)) violations.push(`${where}: a record after process ${pid} ended`);
    if (kind === 'E') {
      ended.add(pid);
      for (const h of holders.values()) {
        for (const who of [...h.keys()]) {
          if (who.startsWith(`${pid}/`)) {
            h.delete(who);
            report.endedHolding++;
          }
        }
      }
      continue;
    }
    const who = `${pid}/${holder}`;
    const h = holders.get(res) ?? new Map<string, string>();
    holders.set(res, h);
    if (kind === 'R') {
      if (h.get(who) !== mode) violations.push(`${where}: release of a ${mode} lock that ${who} was not granted`);
      h.delete(who);
      report.releases++;
      continue;
    }
    if (h.has(who)) violations.push(`${where}: ${who} granted again while it holds resource ${res}`);
    const others = [...h].filter(([w]) => w !== who);
    if (mode === 'exclusive' && others.length > 0) violations.push(`${where}: exclusive grant while ${others.map(([w, md]) => `${w} holds ${md}`).join(', ')}`);
    if (mode === 'shared' && others.some(([, md]) => md === 'exclusive')) violations.push(`${where}: shared grant while ${others.filter(([, md]) => md === 'exclusive').map(([w]) => w).join(', ')} holds exclusive`);
    h.set(who, mode);
    report.grants[mode as 'exclusive' | 'shared']++;
    if (mode === 'shared') report.maxShared = Math.max(report.maxShared, h.size);
  }
  report.processes = seqs.size;
  for (const pid of seqs.keys()) if (!ended.has(pid)) violations.push(`process ${pid} has no end record`);
  for (const [res, h] of holders) for (const [who, mode] of h) violations.push(`resource ${res}: ${who}'s ${mode} grant was never released and its process never ended`);
  return report;
}
