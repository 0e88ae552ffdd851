// The crash rows of the conformance suite (crash.ts) against the direct lockspace.
import { DirectBackend } from './backends.js';
import { crashConformance } from './crash.js';

crashConformance(new DirectBackend());
