// The conformance suite (suite.ts) against the sanlock lockspace.
import { SanlockBackend } from './backends.js';
import { conformance } from './suite.js';

conformance(new SanlockBackend());
