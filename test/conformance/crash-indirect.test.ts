// The crash rows of the conformance suite (crash.ts) against the indirect lockspace.
import { IndirectBackend } from './backends.js';
import { crashConformance } from './crash.js';

crashConformance(new IndirectBackend());
