// Text for the terminal. Paths and other processes' command lines are
// untrusted: a file named with an escape sequence, or a process that puts one
// in its argv, must not reach the terminal raw (it could retitle the window,
// move the cursor, or hide a line). Every line the CLI writes goes through
// escapeControl(), table or error alike.

const NAMED: Readonly<Record<string, string>> = { '\n': '\\n', '\r': '\\r', '\t': '\\t', '\x1b': '\\e' };

// C0 controls (newline and tab included: a line is split by the CLI, never by
// untrusted text), DEL, C1 controls, and the Unicode bidirectional overrides
// and isolates, which reorder what follows them on the line.
const CONTROL = /[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

/**
 * Escapes every character a terminal would act on: `\n`, `\r`, `\t`, `\e`
 * (ESC), `\xHH` for the other C0 and C1 controls and DEL, `\u{HHHH}` for
 * bidirectional overrides. Printable text, backslashes included, is left as it is.
 */
export function escapeControl(text: string): string {
  return text.replace(CONTROL, (c) => {
    const named = NAMED[c];
    if (named !== undefined) return named;
    const code = c.codePointAt(0)!;
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u{${code.toString(16)}}`;
  });
}

/** Lines joined by newlines, each escaped, with a final newline. */
export function linesText(lines: readonly string[]): string {
  return lines.map((l) => `${escapeControl(l)}\n`).join('');
}

/** Text split at its newlines (the CLI's own), each line escaped. */
export function safeText(text: string): string {
  return text.split('\n').map(escapeControl).join('\n');
}

/**
 * JSON for the terminal: JSON.stringify escapes C0 controls already; this also
 * escapes DEL, C1 controls and bidirectional overrides (as \uXXXX, still valid JSON).
 */
export function safeJson(value: unknown): string {
  return JSON.stringify(value, null, 2).replace(/[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u${c.codePointAt(0)!.toString(16).padStart(4, '0')}`);
}

/** A duration in seconds, as the user gives --wait: "30 s", "0.5 s". */
export function secondsText(ms: number): string {
  const s = ms / 1000;
  return `${Number.isInteger(s) ? s : Number(s.toFixed(3))} s`;
}
