// The model row of the conformance suite (model.ts) against the direct lockspace.
import { DirectBackend } from './backends.js';
import { modelConformance } from './model.js';

modelConformance(new DirectBackend(), 150);
