// The model row of the conformance suite (model.ts) against the indirect lockspace.
import { IndirectBackend } from './backends.js';
import { modelConformance } from './model.js';

modelConformance(new IndirectBackend(), 150);
