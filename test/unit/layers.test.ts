// The shape of lib/ (docs/architecture.md): folders are layers, the import
// graph is acyclic and points one way (cli -> manager -> lockspaces -> os ->
// native), and no file above the lockspaces names a backend.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const lib = fileURLToPath(new URL('../../lib/', import.meta.url));
const LAYERS = ['os', 'lockspaces', 'manager', 'cli'] as const;

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? files(p) : name.endsWith('.ts') ? [p] : [];
  });
}

/** Each lib file's relative imports, as lib-relative paths of .ts files. */
const graph = new Map(
  files(lib).map((file) => {
    const text = readFileSync(file, 'utf8');
    const deps = [...text.matchAll(/(?:from|import)\s*\(?\s*'(\.{1,2}\/[^']+)'/g)].map((m) => relative(lib, resolve(dirname(file), m[1]!)).replace(/\.js$/, '.ts'));
    return [relative(lib, file), deps] as const;
  }),
);

const layerOf = (file: string): number => (file === 'index.ts' ? LAYERS.length : LAYERS.indexOf(file.split('/')[0] as (typeof LAYERS)[number]));

describe('lib/ is laid out by layer', () => {
  it('every file is in a layer folder (or is index.ts)', () => {
    for (const file of graph.keys()) expect(layerOf(file), file).toBeGreaterThanOrEqual(0);
  });

  it('imports point down or within a layer, never up', () => {
    const up = [...graph].flatMap(([file, deps]) => deps.filter((d) => layerOf(d) > layerOf(file)).map((d) => `${file} -> ${d}`));
    expect(up).toEqual([]);
  });

  it('the import graph has no cycle', () => {
    const state = new Map<string, 'visiting' | 'done'>();
    const cycles: string[] = [];
    const visit = (file: string, path: string[]): void => {
      if (state.get(file) === 'done') return;
      if (state.get(file) === 'visiting') {
        cycles.push([...path.slice(path.indexOf(file)), file].join(' -> '));
        return;
      }
      state.set(file, 'visiting');
      for (const d of graph.get(file) ?? []) visit(d, [...path, file]);
      state.set(file, 'done');
    };
    for (const file of graph.keys()) visit(file, []);
    expect(cycles).toEqual([]);
  });

  it('no file of the manager or the CLI names a lockspace backend (they decide from capabilities)', () => {
    const named = [...graph.keys()]
      .filter((f) => f.startsWith('manager/') || f.startsWith('cli/'))
      .flatMap((f) =>
        readFileSync(join(lib, f), 'utf8')
          .split('\n')
          .map((line, i) => [f, i + 1, line] as const)
          .filter(([, , line]) => /sanlock|indirect|\bdirect\b/i.test(line))
          .map(([file, n, line]) => `${file}:${n}: ${line.trim()}`),
      );
    expect(named).toEqual([]);
  });
});
