// The conformance suite (suite.ts) against the direct lockspace.
import { DirectBackend } from './backends.js';
import { conformance } from './suite.js';

conformance(new DirectBackend());
