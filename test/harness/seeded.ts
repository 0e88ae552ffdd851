// Seeded randomness for the tests: a test draws its random choices from
// prng(seed), with the seed from an environment variable or a fresh one, and
// prints the seed with any failure, so that the variable replays it (never
// Math.random(), which cannot be replayed).
import { randomInt } from 'node:crypto';

/**
 * The seed in environment variable `name` (an integer 0..2^32-1), or a fresh
 * one. Only the fresh seed itself is drawn from the system; everything random
 * after it comes from prng(seed).
 */
export function seedFrom(name: string): number {
  const text = process.env[name];
  if (text === undefined || text === '') return randomInt(2 ** 32);
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0 || n >= 2 ** 32) throw new Error(`${name} must be an integer from 0 to 2^32-1, got '${text}'`);
  return n;
}

/** A PRNG (mulberry32) from a 32-bit seed: floats in [0, 1), the same sequence for the same seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** An integer in [0, n) from `rand`. */
export function below(rand: () => number, n: number): number {
  return Math.floor(rand() * n);
}

/** A 32-bit seed for a sub-trial, drawn from `rand`. */
export function subSeed(rand: () => number): number {
  return below(rand, 2 ** 32);
}
