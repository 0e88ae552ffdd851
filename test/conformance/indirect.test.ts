// The conformance suite (suite.ts) against the indirect lockspace.
import { IndirectBackend } from './backends.js';
import { conformance } from './suite.js';

conformance(new IndirectBackend());
