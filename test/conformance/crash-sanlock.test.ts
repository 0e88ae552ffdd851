// The crash rows of the conformance suite (crash.ts) against the sanlock lockspace.
import { SanlockBackend } from './backends.js';
import { crashConformance } from './crash.js';

crashConformance(new SanlockBackend());
