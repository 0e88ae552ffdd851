// The model row of the conformance suite (model.ts) against the sanlock lockspace.
import { SanlockBackend } from './backends.js';
import { modelConformance } from './model.js';

modelConformance(new SanlockBackend(), 10);
