#!/usr/bin/env node
// What an ELF binary asks of the system that loads it: its DT_NEEDED libraries
// and the symbol versions it needs from each (.gnu.version_r), read from the
// file itself, so that no binutils are needed. The prebuild script refuses a
// binary that needs a newer glibc than it promises, and the package test checks
// the shipped binaries with it.
//
//   node scripts/elf-needs.mjs [--json] FILE...   per file: the libraries and the highest GLIBC_ and GLIBCXX_ versions
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

const SHT_DYNAMIC = 6;
const SHT_GNU_VERNEED = 0x6ffffffe;
const DT_NEEDED = 1n;

/** { needed: ['libc.so.6', ...], versions: { 'libc.so.6': ['GLIBC_2.2.5', ...] } } of a 64-bit little-endian ELF file. */
export function elfNeeds(path) {
  const b = readFileSync(path);
  if (b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2 || b[5] !== 1) throw new Error(`${path}: not a 64-bit little-endian ELF file`);
  const shoff = Number(b.readBigUInt64LE(0x28));
  const shentsize = b.readUInt16LE(0x3a);
  const shnum = b.readUInt16LE(0x3c);
  const sections = [];
  for (let i = 0; i < shnum; i++) {
    const at = shoff + i * shentsize;
    sections.push({
      type: b.readUInt32LE(at + 4),
      offset: Number(b.readBigUInt64LE(at + 24)),
      size: Number(b.readBigUInt64LE(at + 32)),
      link: b.readUInt32LE(at + 40),
      info: b.readUInt32LE(at + 44),
    });
  }
  const str = (table, off) => {
    const start = sections[table].offset + off;
    return b.toString('latin1', start, b.indexOf(0, start));
  };
  const needed = [];
  const versions = {};
  for (const s of sections) {
    if (s.type === SHT_DYNAMIC) {
      for (let at = s.offset; at + 16 <= s.offset + s.size; at += 16) {
        const tag = b.readBigInt64LE(at);
        if (tag === 0n) break;
        if (tag === DT_NEEDED) needed.push(str(s.link, Number(b.readBigUInt64LE(at + 8))));
      }
    } else if (s.type === SHT_GNU_VERNEED) {
      let at = s.offset;
      for (let i = 0; i < s.info; i++) {
        const file = str(s.link, b.readUInt32LE(at + 4));
        const list = (versions[file] ??= []);
        let aux = at + b.readUInt32LE(at + 8);
        for (let j = 0; j < b.readUInt16LE(at + 2); j++) {
          list.push(str(s.link, b.readUInt32LE(aux + 8)));
          aux += b.readUInt32LE(aux + 12);
        }
        at += b.readUInt32LE(at + 12);
      }
    }
  }
  return { needed, versions };
}

/** Compares dotted versions ('2.28' < '2.3.3' is false: 28 > 3). */
export function compareVersions(a, b) {
  const x = a.split('.').map(Number);
  const y = b.split('.').map(Number);
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const d = (x[i] ?? 0) - (y[i] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}

/** The highest version named PREFIX_x.y the file needs from any library ('' if none), e.g. highest(n, 'GLIBC') = '2.28'. */
export function highest(needs, prefix) {
  let top = '';
  for (const list of Object.values(needs.versions)) {
    for (const v of list) {
      if (!v.startsWith(`${prefix}_`)) continue;
      const n = v.slice(prefix.length + 1);
      if (/^[\d.]+$/.test(n) && (top === '' || compareVersions(n, top) > 0)) top = n;
    }
  }
  return top;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const json = process.argv[2] === '--json';
  const report = process.argv.slice(json ? 3 : 2).map((file) => {
    const n = elfNeeds(file);
    return { file, needed: n.needed, glibc: highest(n, 'GLIBC'), glibcxx: highest(n, 'GLIBCXX') };
  });
  if (json) console.log(JSON.stringify(report));
  else for (const r of report) console.log(`${r.file}\n  needs ${r.needed.join(', ')}\n  highest GLIBC_${r.glibc || '-'}, GLIBCXX_${r.glibcxx || '-'}`);
}
