#!/usr/bin/env node
// The lockmgr command line: see `lockmgr --help` and docs/cli.md.
import { main } from '../dist/cli/main.js';

process.exitCode = await main(process.argv.slice(2));
